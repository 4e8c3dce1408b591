//! A resubscription after a reconnect that fails without a refusal (its `SUBSCRIBE` goes
//! unanswered on a connection fred still takes for up: a server stalled short of the
//! unresponsive timeout, here a proxy that loses every reply) leaves the channels unsubscribed
//! with both connections up. Health says so until a resubscription goes through; it said
//! Healthy, and messages published meanwhile were dropped with health green.

use crate::proxy::Proxy;
use crate::support::{connect_admin, plain_redis_host, raw, reachable, within};
use cqrs_core::ports::PubSub;
use cqrs_core::runtime::{Health, HealthCheck};
use cqrs_core::testing::{eventually, test_id};
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubscribe_that_fails_on_a_live_connection_is_unhealthy() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let id = test_id("resubscribe-failed");
    within(
        60,
        Box::pin(async {
            let proxy = Proxy::start(&host).await;
            // Commands that time out (after 2 s: room for a loaded machine), no watchdog ping
            // and no replacing of a quiet connection: the dead one stays "connected".
            let connection = ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_secs(2))
                .ping_interval(Duration::from_secs(3600))
                .unresponsive_timeout(Duration::MAX)
                // A second between attempts: long enough to be seen, had health turned green
                // between a failed resubscription and the next.
                .reconnect_delays(Duration::from_secs(1), Duration::from_secs(1));
            let pubsub = RedisPubSubOptions::with_connection(connection)
                .channel_prefix(format!("cqrs-test:{id}"))
                .connect()
                .await
                .expect("connect through the proxy");
            let _subscription = pubsub.subscribe("news").await.expect("subscribe");
            assert_eq!(pubsub.check().await, Health::Healthy);

            // The resubscription's SUBSCRIBE reaches Redis, and its connection then goes
            // dead (nothing closes it).
            proxy.lose_reply_to("SUBSCRIBE");
            let admin = connect_admin().await.unwrap();
            // Both connections (`client_ids` does not say which is which).
            for id in pubsub.client_ids().await.unwrap() {
                let killed = raw(
                    &admin,
                    "CLIENT",
                    vec!["KILL".into(), "ID".into(), id.into()],
                )
                .await;
                assert_eq!(killed.as_u64(), Some(1), "killed connection {id}");
            }
            // Health says "not subscribed again" from the reconnect on, before the SUBSCRIBE
            // goes out: wait for the lost reply first, so what follows is the health after it.
            eventually(
                Duration::from_secs(20),
                "the resubscription's SUBSCRIBE went out and lost its reply",
                || std::future::ready(proxy.reply_lost().then_some(())),
            )
            .await;
            eventually(
                Duration::from_secs(20),
                "the lost resubscription reported",
                || {
                    let pubsub = pubsub.clone();
                    async move {
                        match pubsub.check().await {
                            Health::Unhealthy(why)
                                if why.contains("not subscribed its channels again") =>
                            {
                                Some(())
                            }
                            _ => None,
                        }
                    }
                },
            )
            .await;
            // And it stays so through the SUBSCRIBE's time-out (2 s), the failed attempt, and
            // the pause before the next: nothing can end it, every reply on the connection
            // being lost.
            let until = tokio::time::Instant::now() + Duration::from_secs(4);
            while tokio::time::Instant::now() < until {
                match pubsub.check().await {
                    Health::Unhealthy(why) if why.contains("not subscribed its channels again") => {
                    }
                    other => panic!("with the resubscription lost, health went {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }),
    )
    .await;
}
