//! A step whose reply was lost (Redis ran it; the connection closed before the reply came back)
//! after it reclaimed an entry this consumer had nacked: the next step takes the entry over,
//! and it is handed out as its second delivery. It used to stay pending here in no list for
//! another redelivery delay, and the claim after that counted a delivery no handler got: with
//! `max_deliveries(2)`, the entry was dead-lettered after one attempt.

use crate::proxy::Proxy;
use crate::support::{Env, n_of, plain_redis_host, within};
use cqrs_core::ports::Consumer;
use cqrs_core::testing::eventually;
use cqrs_redis::ConnectionOptions;
use fred::types::Value;
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_entry_a_lost_step_reclaimed_is_handed_out_once() {
    let Some(host) = plain_redis_host() else {
        return;
    };
    let proxy = Proxy::start(&host).await;
    let Some(env) = Env::with("lost-step-claim", |o| {
        o.connection(
            ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_secs(2))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200)),
        )
    })
    .await
    else {
        return;
    };
    within(
        90,
        Box::pin(async {
            let delay = Duration::from_secs(2);
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let mut consumer = env
                .join(&topic, "c", |o| o.redelivery_delay(delay).max_deliveries(2))
                .await;
            env.publish_one(&topic, "k", 1).await;
            let first = fetch_one(consumer.as_mut()).await;
            assert_eq!((n_of(&first), first.attempt), (1, 1));
            consumer.nack(&first.id).await.unwrap();

            // Due again, the next step reclaims it (counting delivery 2), and its reply is
            // lost. A step that did not claim it yet (its claim interval not over) is retried.
            let mut claimed = false;
            for _ in 0..3 {
                eventually(
                    Duration::from_secs(10),
                    "the nacked entry falls due",
                    || async {
                        (pending(&env, &stream).await.0 >= delay.as_millis() as u64).then_some(())
                    },
                )
                .await;
                proxy.close_after_reply_to("EVALSHA");
                let lost = consumer.fetch(10).await;
                assert!(proxy.cut_sprung(), "the step ran");
                assert!(lost.is_err(), "the step's reply was lost: {lost:?}");
                if pending(&env, &stream).await.1 == 2 {
                    claimed = true;
                    break;
                }
            }
            assert!(claimed, "no lost step reclaimed the entry");

            let mut handed = Vec::new();
            // Two redelivery delays: enough for the next claim to dead-letter it.
            let until = Instant::now() + 2 * delay;
            while Instant::now() < until {
                if let Ok(batch) = consumer.fetch(10).await {
                    handed.extend(batch.iter().map(|d| (n_of(d), d.attempt)));
                    let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
                    consumer.ack(&ids).await.unwrap();
                }
                if !handed.is_empty() {
                    break;
                }
            }
            assert_eq!(handed, [(1, 2)], "handed out once, as its second delivery");
            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
        }),
    )
    .await;
    env.cleanup().await;
}

async fn fetch_one(consumer: &mut dyn Consumer) -> cqrs_core::ports::Delivery {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let mut got = consumer.fetch(10).await.expect("fetch");
        if let Some(delivery) = got.pop() {
            assert!(got.is_empty());
            return delivery;
        }
        assert!(Instant::now() < until, "nothing fetched");
    }
}

/// The idle time (ms) and delivery count of the one entry pending in group `g`.
async fn pending(env: &Env, stream: &str) -> (u64, u64) {
    let reply = env
        .command(
            "XPENDING",
            vec![stream.into(), "g".into(), "-".into(), "+".into(), 10.into()],
        )
        .await;
    let Value::Array(entries) = reply else {
        panic!("XPENDING answered {reply:?}");
    };
    assert_eq!(entries.len(), 1, "{entries:?}");
    let Value::Array(fields) = &entries[0] else {
        panic!("{entries:?}");
    };
    (fields[2].as_u64().unwrap(), fields[3].as_u64().unwrap())
}
