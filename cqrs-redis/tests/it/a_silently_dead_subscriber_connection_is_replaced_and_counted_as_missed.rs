//! A subscriber connection that dies silently (the test's proxy turns into a black hole: no
//! FIN, no RST, nothing forwarded) is noticed by its unanswered watchdog `PING`: the pub/sub
//! reports unhealthy while it reconnects, counts a possible loss in `missed()` once it is
//! back, and messages published afterwards arrive.

use crate::proxy::Proxy;
use crate::support::{connect_admin, plain_redis_host, raw, reachable, within};
use crate::the_pubsub_passes_the_conformance_suite::prefix;
use cqrs_core::ports::PubSub;
use cqrs_core::runtime::{Health, HealthCheck};
use cqrs_core::testing::{eventually, test_id};
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions};
use fred::clients::Client;
use std::time::Duration;

async fn publish(admin: &Client, channel: &str, payload: &str) {
    raw(admin, "PUBLISH", vec![channel.into(), payload.into()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_subscriber_connection_is_replaced_and_counted_as_missed() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let id = test_id("black-hole-pubsub");
    within(
        60,
        Box::pin(async {
            let proxy = Proxy::start(&host).await;
            let connection = ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_secs(2))
                .connect_timeout(Duration::from_secs(2))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
                // Past a loaded machine's stalls: a watchdog ping taken for unanswered before
                // the black hole would replace the connection early (and lose a message).
                .unresponsive_timeout(Duration::from_secs(3))
                .ping_interval(Duration::from_millis(100));
            let pubsub = RedisPubSubOptions::with_connection(connection)
                .channel_prefix(prefix(&id))
                .connect()
                .await
                .expect("connect through the proxy");
            // Publishes straight to Redis, past the proxy.
            let admin = connect_admin().await.unwrap();
            let channel = format!("{id}-news");
            let full = format!("{}:{channel}", prefix(&id));
            let mut a = pubsub.subscribe(&channel).await.unwrap();
            publish(&admin, &full, "before").await;
            let message = tokio::time::timeout(Duration::from_secs(5), a.recv())
                .await
                .expect("a message before the black hole")
                .expect("open");
            assert_eq!(&*message.payload, "before");

            proxy.black_hole();
            publish(&admin, &full, "lost").await;
            eventually(
                Duration::from_secs(10),
                "unhealthy while the dead connection is replaced",
                || {
                    let pubsub = pubsub.clone();
                    async move { matches!(pubsub.check().await, Health::Unhealthy(_)).then_some(()) }
                },
            )
            .await;

            proxy.forward();
            eventually(
                Duration::from_secs(10),
                "a possible loss counted once reconnected",
                || {
                    let missed = a.missed();
                    async move { (missed >= 1).then_some(()) }
                },
            )
            .await;
            // Live again once the channel is subscribed again: a message published from then
            // on arrives, and the one published into the black hole never does.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                publish(&admin, &full, "after").await;
                if let Ok(message) = tokio::time::timeout(Duration::from_millis(200), a.recv()).await
                {
                    assert_eq!(&*message.expect("open").payload, "after");
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "no message arrived within 10 s of the proxy forwarding again"
                );
            }
            eventually(Duration::from_secs(10), "healthy again", || {
                let pubsub = pubsub.clone();
                async move { matches!(pubsub.check().await, Health::Healthy).then_some(()) }
            })
            .await;
            // The dead connection may still be listed by Redis (the proxy keeps it open): a new
            // channel subscribes all the same.
            let mut other = pubsub
                .subscribe(&format!("{id}-other"))
                .await
                .expect("a new channel after the connection was replaced");
            publish(&admin, &format!("{}:{id}-other", prefix(&id)), "other").await;
            let message = tokio::time::timeout(Duration::from_secs(5), other.recv())
                .await
                .expect("a message on the new channel")
                .expect("open");
            assert_eq!(&*message.payload, "other");
            let _ = fred::interfaces::ClientLike::quit(&admin).await;
        }),
    )
    .await;
}
