//! With its server stopped, publishing fails fast with `Unavailable` (the outbox relay
//! retries), and so does a pub/sub subscribe to a new channel (it waited a whole command
//! timeout, behind every other channel's, and then said `Timeout`), and `topic_stats`,
//! `dead_letters` and `trim` report `Unavailable` with the cause; when a server is back on
//! the address (empty: no persistence), the consumer recreates its group and handles what is
//! published then, and subscribing works again. Runs its own `redis-server`.

use crate::own_server::{Logs, Server};
use crate::support::{consumer_options, event, publish_until_ok, within};
use cqrs_core::ports::{EventTransport, PubSub, TransportError};
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions, RedisStreamOptions};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fails_fast_while_redis_is_down_and_consumers_resume() {
    let id = cqrs_core::testing::test_id("redis-down");
    let mut logs = Logs::new();
    let Some(mut server) = Server::start_free(&id, &mut logs).await else {
        return;
    };
    let port = server.port;
    within(
        90,
        Box::pin(async {
            let transport = RedisStreamOptions::with_connection(
                ConnectionOptions::new(server.url())
                    .command_timeout(Duration::from_millis(500))
                    .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200)),
            )
            .connect()
            .await
            .expect("connect");
            // A command timeout well over the 2 s the subscribes below are given to fail
            // together: on a loaded machine they may take a while, but one that waited a
            // command timeout (behind the one before, or for the server) would not fit.
            let pubsub = RedisPubSubOptions::with_connection(
                ConnectionOptions::new(server.url())
                    .command_timeout(Duration::from_secs(5))
                    .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200)),
            )
            .channel_prefix(format!("cqrs-test:{id}"))
            .connect()
            .await
            .expect("connect the pub/sub");
            let _before = pubsub
                .subscribe("before")
                .await
                .expect("subscribe while up");
            let mut consumer = transport
                .consumer("events", "g", consumer_options("c"))
                .await
                .unwrap();
            let handled: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let task = {
                let (handled, stop) = (handled.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        match consumer.fetch(10).await {
                            Ok(batch) => {
                                let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
                                handled
                                    .lock()
                                    .unwrap()
                                    .extend(batch.iter().map(|d| d.record.event_id));
                                let _ = consumer.ack(&ids).await;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            };
            let first = event(Some("k"), 1);
            transport
                .publish("events", std::slice::from_ref(&first))
                .await
                .unwrap();
            cqrs_core::testing::eventually(Duration::from_secs(10), "the first event", || {
                let done = handled.lock().unwrap().contains(&first.event_id);
                async move { done.then_some(()) }
            })
            .await;

            server.stop();
            let down = event(Some("k"), 2);
            // A publish in flight when the server died may time out; once fred knows the
            // connection is gone, publishing fails at once with `Unavailable`.
            cqrs_core::testing::eventually(
                Duration::from_secs(10),
                "publish to fail with Unavailable",
                || {
                    let (transport, down) = (transport.clone(), down.clone());
                    async move {
                        match transport.publish("events", &[down]).await {
                            Err(TransportError::Unavailable { .. }) => Some(()),
                            Err(TransportError::Timeout { .. }) => None,
                            other => {
                                panic!("a retryable error while the server is down, got {other:?}")
                            }
                        }
                    }
                },
            )
            .await;
            for _ in 0..3 {
                let result = tokio::time::timeout(
                    Duration::from_secs(2),
                    transport.publish("events", std::slice::from_ref(&down)),
                )
                .await
                .expect("publish fails fast instead of waiting for the server");
                assert!(
                    matches!(result, Err(TransportError::Unavailable { .. })),
                    "{result:?}"
                );
            }
            // An operator's calls say the server is away too, with the cause (they waited the
            // command timeout out and said `Timeout`, "redis did not answer in time").
            let stats = transport.topic_stats("events").await.map(drop);
            let dead = transport.dead_letters("events", None, 10).await.map(drop);
            let trimmed = transport.trim("events").await.map(drop);
            for (call, result) in [
                ("topic_stats", stats),
                ("dead_letters", dead),
                ("trim", trimmed),
            ] {
                assert!(
                    matches!(result, Err(TransportError::Unavailable { .. })),
                    "{call} while the server is down: {result:?}"
                );
                // At once, with what happened, not fred's timeout after waiting the command
                // timeout out for a reconnect.
                assert!(
                    !format!("{result:?}").contains("kind: Timeout"),
                    "{call} while the server is down: {result:?}"
                );
            }
            // Once fred knows the subscriber connection is gone, each new channel's subscribe
            // fails at once, not one command timeout after the one before.
            cqrs_core::testing::eventually(
                Duration::from_secs(20),
                "subscribe to fail with Unavailable",
                || {
                    let pubsub = pubsub.clone();
                    async move {
                        match pubsub.subscribe("probe").await {
                            Err(TransportError::Unavailable { .. }) => Some(()),
                            Err(TransportError::Timeout { .. }) => None,
                            other => {
                                panic!("a retryable error while the server is down, got {other:?}")
                            }
                        }
                    }
                },
            )
            .await;
            let subscribes = async {
                let (a, b, c, d) = tokio::join!(
                    pubsub.subscribe("a"),
                    pubsub.subscribe("b"),
                    pubsub.subscribe("c"),
                    pubsub.subscribe("d")
                );
                [a, b, c, d]
            };
            let results = tokio::time::timeout(Duration::from_secs(2), subscribes)
                .await
                .expect("four subscribes fail within one command timeout, together");
            for result in results {
                assert!(
                    matches!(result, Err(TransportError::Unavailable { .. })),
                    "{result:?}"
                );
            }

            let log = logs
                .create(&id, port)
                .expect("create the server's log file");
            let mut server = Server::start(port, log).expect("restart redis-server");
            server
                .wait_until_up()
                .await
                .unwrap_or_else(|e| panic!("restart on the same port: {e}"));
            let back = event(Some("k"), 3);
            publish_until_ok(|| transport.publish("events", std::slice::from_ref(&back))).await;
            cqrs_core::testing::eventually(
                Duration::from_secs(20),
                "the event published after the restart",
                || {
                    let done = handled.lock().unwrap().contains(&back.event_id);
                    async move { done.then_some(()) }
                },
            )
            .await;
            cqrs_core::testing::eventually(
                Duration::from_secs(20),
                "a subscribe once the server is back",
                || {
                    let pubsub = pubsub.clone();
                    async move { pubsub.subscribe("after").await.ok() }
                },
            )
            .await;
            stop.store(true, Ordering::SeqCst);
            task.await.unwrap();
            server.stop();
        }),
    )
    .await;
}
