//! A server that answers `PING` but refuses every write (out of memory under `noeviction`,
//! here) reads as degraded, naming the topics and why, while publishes fail: the health check
//! said healthy while the outbox backed up. Healthy again once each such topic's publish goes
//! through. Runs its own
//! `redis-server` (its memory limit is changed).

use crate::own_server::{Logs, Server};
use crate::support::{event, raw, within};
use cqrs_core::ports::{EventTransport, TransportError};
use cqrs_core::runtime::{Health, HealthCheck};
use cqrs_redis::{ConnectionOptions, RedisStreamOptions};
use fred::interfaces::ClientLike;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_publishes_a_server_refuses() {
    let id = cqrs_core::testing::test_id("refused-writes");
    let mut logs = Logs::new();
    let Some(server) = Server::start_free(&id, &mut logs).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let transport = RedisStreamOptions::with_connection(
                ConnectionOptions::new(server.url()).command_timeout(Duration::from_secs(2)),
            )
            .connect()
            .await
            .expect("connect");
            transport
                .publish("events", &[event(Some("k"), 1)])
                .await
                .expect("publish");
            assert_eq!(transport.check().await, Health::Healthy);

            let admin = server.admin().await;
            let set = |limit: &'static str| {
                let admin = admin.clone();
                async move {
                    raw(
                        &admin,
                        "CONFIG",
                        vec![
                            Value::from("SET"),
                            Value::from("maxmemory"),
                            Value::from(limit),
                        ],
                    )
                    .await
                }
            };
            set("1").await;
            let refused = transport
                .publish("events", &[event(Some("k"), 2)])
                .await
                .expect_err("out of memory");
            assert!(
                matches!(refused, TransportError::Unavailable { .. }),
                "{refused:?}"
            );
            match transport.check().await {
                Health::Degraded(why) => assert!(why.contains("OOM"), "{why}"),
                other => panic!("expected degraded, got {other:?}"),
            }

            set("0").await;
            // Per topic: another topic's success says nothing of this one.
            transport
                .publish("other", &[event(Some("k"), 3)])
                .await
                .expect("publish once the limit is gone");
            assert!(
                matches!(transport.check().await, Health::Degraded(why) if why.contains("`events`")),
                "still degraded for `events`"
            );
            transport
                .publish("events", &[event(Some("k"), 4)])
                .await
                .expect("publish once the limit is gone");
            assert_eq!(transport.check().await, Health::Healthy);
            let _ = admin.quit().await;
        }),
    )
    .await;
}
