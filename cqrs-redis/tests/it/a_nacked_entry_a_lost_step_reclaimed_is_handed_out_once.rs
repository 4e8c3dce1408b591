//! A step whose reply was lost (Redis ran it; the connection closed before the reply came back)
//! after it reclaimed an entry this consumer had nacked: the next step takes the entry over,
//! and it is handed out as its second delivery. It used to stay pending here in no list for
//! another redelivery delay, and the claim after that counted a delivery no handler got: with
//! `max_deliveries(2)`, the entry was dead-lettered after one attempt.

use crate::proxy::Proxy;
use crate::support::{Env, n_of, within};
use cqrs_core::ports::Consumer;
use cqrs_core::testing::eventually;
use fred::types::Value;
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_entry_a_lost_step_reclaimed_is_handed_out_once() {
    let Some((proxy, env)) = crate::proxy::env_behind_a_proxy("lost-step-claim").await else {
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
            // lost.
            lose_a_step_that_reclaims(&env, &proxy, consumer.as_mut(), &stream, delay).await;

            let mut handed = Vec::new();
            // Five redelivery delays: the next claim, at one, would dead-letter it.
            let until = Instant::now() + 5 * delay;
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

/// A delivery whose handler ran past the redelivery delay: a step of its own consumer whose
/// reply was lost reclaimed it meanwhile (counting delivery 2). Its nack then hands it back
/// for the delay, as any nack: the recovery must not take it for stranded, as it would with
/// the count it was handed out with (1) remembered, and hand it out again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_after_a_lost_step_reclaimed_the_delivery_still_waits_the_delay() {
    let Some((proxy, env)) = crate::proxy::env_behind_a_proxy("lost-step-nack").await else {
        return;
    };
    within(
        90,
        Box::pin(async {
            // Long enough that the fetch below ends (its block is 100 ms) well before it.
            let delay = Duration::from_secs(5);
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let mut consumer = env.join(&topic, "c", |o| o.redelivery_delay(delay)).await;
            env.publish_one(&topic, "k", 1).await;
            let first = fetch_one(consumer.as_mut()).await;
            assert_eq!((n_of(&first), first.attempt), (1, 1));
            lose_a_step_that_reclaims(&env, &proxy, consumer.as_mut(), &stream, delay).await;
            consumer.nack(&first.id).await.unwrap();
            let early = loop {
                // A fetch that fails on the closed connection's reconnect is retried.
                if let Ok(batch) = consumer.fetch(10).await {
                    break batch;
                }
            };
            assert!(
                early.is_empty(),
                "handed out again without the nack's delay: {:?}",
                early
                    .iter()
                    .map(|d| (n_of(d), d.attempt))
                    .collect::<Vec<_>>()
            );
            let again = fetch_one(consumer.as_mut()).await;
            assert_eq!(n_of(&again), 1, "after the delay");
        }),
    )
    .await;
    env.cleanup().await;
}

/// Waits until the one entry pending in group `g` has been idle for `delay`, then lets the
/// next step of `consumer` run and loses its reply; until one of them reclaimed the entry
/// (its delivery count 2): a step whose claim interval was not over yet claims nothing.
async fn lose_a_step_that_reclaims(
    env: &Env,
    proxy: &Proxy,
    consumer: &mut dyn Consumer,
    stream: &str,
    delay: Duration,
) {
    for _ in 0..3 {
        eventually(Duration::from_secs(15), "the entry falls due", || async {
            (pending(env, stream).await.0 >= delay.as_millis() as u64).then_some(())
        })
        .await;
        proxy.close_after_reply_to("EVALSHA");
        let lost = consumer.fetch(10).await;
        assert!(proxy.cut_sprung(), "the step ran");
        assert!(lost.is_err(), "the step's reply was lost: {lost:?}");
        if pending(env, stream).await.1 == 2 {
            return;
        }
    }
    panic!("no lost step reclaimed the entry");
}

async fn fetch_one(consumer: &mut dyn Consumer) -> cqrs_core::ports::Delivery {
    let until = Instant::now() + Duration::from_secs(15);
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
