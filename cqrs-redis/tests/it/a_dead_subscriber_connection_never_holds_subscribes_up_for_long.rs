//! With connections never taken for dead (`unresponsive_timeout(Duration::MAX)`, no
//! keepalive), a subscriber connection that died silently must not hold `subscribe` up for
//! ever: the watchdog's `PING` keeps the subscribe lock for at most the command timeout (it
//! only has to keep its ping from coming between a `SUBSCRIBE` and its confirmation), and the
//! subscribe then fails on its own command timeout. It used to hold the lock until the ping
//! was answered: here, never.

use crate::proxy::Proxy;
use crate::support::{plain_redis_host, reachable, within};
use crate::the_pubsub_passes_the_conformance_suite::prefix;
use cqrs_core::ports::PubSub;
use cqrs_core::testing::test_id;
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_subscriber_connection_never_holds_subscribes_up_for_long() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let id = test_id("black-hole-subscribe");
    within(
        60,
        Box::pin(async {
            let proxy = Proxy::start(&host).await;
            let connection = ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_millis(500))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
                .unresponsive_timeout(Duration::MAX)
                .tcp_keepalive(None)
                .ping_interval(Duration::from_millis(20));
            let pubsub = RedisPubSubOptions::with_connection(connection)
                .channel_prefix(prefix(&id))
                .connect()
                .await
                .expect("connect through the proxy");
            let _first = pubsub.subscribe("first").await.unwrap();
            proxy.black_hole();
            // The watchdogs' next pings go into the black hole, the subscriber's holding the
            // lock (each then waits for its reply for good: one ping each).
            cqrs_core::testing::eventually(
                Duration::from_secs(10),
                "both watchdogs pinged into the dead connections",
                || async { (proxy.lost("PING") >= 2).then_some(()) },
            )
            .await;
            let subscribed =
                tokio::time::timeout(Duration::from_secs(5), pubsub.subscribe("x")).await;
            assert!(
                matches!(subscribed, Ok(Err(_))),
                "a subscribe on a dead connection fails within its timeouts"
            );
        }),
    )
    .await;
}
