//! A failover that demotes the primary without closing its connections (a managed Redis moves
//! its DNS name to the new primary, and the old one, now a replica, keeps its clients): every
//! write on those connections gets `READONLY`. The adapters take that as connection trouble:
//! a publish fails with a retryable error, the connection is replaced, and once it reaches the
//! new primary, publishing and consuming work again. Runs two `redis-server`s of its own
//! behind a proxy whose address stands for the DNS name.

use crate::own_server::{Logs, Server};
use crate::proxy::Proxy;
use crate::support::{consumer_options, event, fetch_some, publish_until_ok, raw, within};
use cqrs_core::ports::EventTransport;
use cqrs_redis::{ConnectionOptions, RedisStreamOptions};
use fred::interfaces::ClientLike;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_demoted_under_its_connections_is_left_for_the_new_one() {
    let id = cqrs_core::testing::test_id("demoted");
    let mut logs = Logs::new();
    let Some(old) = Server::start_free(&id, &mut logs).await else {
        return;
    };
    let Some(new) = Server::start_free(&id, &mut logs).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let proxy = Proxy::start(&format!("127.0.0.1:{}", old.port)).await;
            let transport = RedisStreamOptions::with_connection(
                ConnectionOptions::new(proxy.url())
                    .command_timeout(Duration::from_millis(500))
                    .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200)),
            )
            .connect()
            .await
            .expect("connect");
            transport
                .publish("events", &[event(Some("k"), 1)])
                .await
                .expect("a publish to the primary");

            // The failover: the old primary turns into a replica of the new one and keeps
            // its connections; new connections reach the new primary.
            let admin = old.admin().await;
            raw(
                &admin,
                "REPLICAOF",
                vec![Value::from("127.0.0.1"), Value::from(i64::from(new.port))],
            )
            .await;
            proxy.redirect(&format!("127.0.0.1:{}", new.port));

            // Retryable errors only (`publish_until_ok` fails on any other), then a publish
            // that goes through: on the new primary.
            let after = event(Some("k"), 2);
            publish_until_ok(|| transport.publish("events", std::slice::from_ref(&after))).await;
            let mut consumer = transport
                .consumer("events", "g", consumer_options("c"))
                .await
                .expect("a consumer on the new primary");
            let got = fetch_some(
                consumer.as_mut(),
                10,
                "the event published after the failover",
            )
            .await;
            assert!(
                got.iter().any(|d| d.record.event_id == after.event_id),
                "the event published after the failover is on the new primary"
            );
            let _ = admin.quit().await;
        }),
    )
    .await;
}
