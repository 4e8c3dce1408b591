//! Dead letters of one key replayed together keep the key's order: the replay appends them in
//! the order of their original entries, whatever order the ids were given in, and chains them
//! in their lane, so a consumer hands out the second only once the first is acknowledged.

use crate::support::{Env, n_of, within};
use cqrs_core::ports::{Consumer, EventTransport};
use std::time::Duration;

/// Publishes v1 and v2 of key `k` to a topic and joins a consumer `name` that gives each
/// event one delivery (a failed one is dead-lettered), with a short redelivery delay.
async fn two_events_of_one_key(env: &Env, name: &str) -> (String, Box<dyn Consumer>) {
    let topic = env.topic("payments");
    let consumer = env
        .join(&topic, name, |o| {
            o.redelivery_delay(Duration::from_millis(200))
                .max_deliveries(1)
        })
        .await;
    env.transport
        .publish(
            &topic,
            &[
                crate::support::event(Some("k"), 1),
                crate::support::event(Some("k"), 2),
            ],
        )
        .await
        .unwrap();
    (topic, consumer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_dead_letters_of_one_key_are_handed_out_in_their_order() {
    let Some(env) = Env::new("replay-order").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let (topic, mut first) = two_events_of_one_key(&env, "first").await;

            // The handler fails for both: each is dead-lettered after its one delivery, v1
            // first (v2 waits for it).
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            let mut dead = Vec::new();
            while dead.len() < 2 {
                assert!(
                    tokio::time::Instant::now() < until,
                    "dead-lettered: {dead:?}"
                );
                for d in first.fetch(1).await.unwrap() {
                    first.nack(&d.id).await.unwrap();
                }
                dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            }
            drop(first);
            let n = |d: &cqrs_redis::DeadLetter| d.record.as_ref().unwrap().payload["n"].as_u64();
            let v1 = dead.iter().find(|d| n(d) == Some(1)).unwrap().id.clone();
            let v2 = dead.iter().find(|d| n(d) == Some(2)).unwrap().id.clone();

            // Replayed with the ids in the wrong order.
            let replayed = env
                .transport
                .replay_dead_letters(&topic, &[v2.clone(), v1.clone()])
                .await
                .unwrap();
            assert_eq!(replayed.len(), 2);
            let new_id = |dead: &str| {
                let r = replayed.iter().find(|r| r.dead_letter_id == dead).unwrap();
                let (ms, seq) = r.entry_id.split_once('-').unwrap();
                (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
            };
            assert!(
                new_id(&v1) < new_id(&v2),
                "v1 appended before v2: {replayed:?}"
            );

            // A redelivery delay well past the wait below: v1 stays handed out, not reclaimed.
            let mut second = env
                .join(&topic, "second", |o| {
                    o.redelivery_delay(Duration::from_secs(10))
                        .max_deliveries(1)
                })
                .await;
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let one = loop {
                assert!(
                    tokio::time::Instant::now() < until,
                    "the replay is handed out"
                );
                let batch = second.fetch(1).await.unwrap();
                if let Some(d) = batch.into_iter().next() {
                    break d;
                }
            };
            assert_eq!(n_of(&one), 1, "the older event first");
            assert!(one.order_key.is_some(), "the replay is in a lane");

            // v2 waits for v1, which is not acknowledged yet.
            let wait = tokio::time::Instant::now() + Duration::from_millis(500);
            while tokio::time::Instant::now() < wait {
                let batch = second.fetch(10).await.unwrap();
                assert!(
                    batch.is_empty(),
                    "v2 handed out before v1 was acknowledged: {:?}",
                    batch.iter().map(n_of).collect::<Vec<_>>()
                );
            }
            second.ack(std::slice::from_ref(&one.id)).await.unwrap();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let two = loop {
                assert!(tokio::time::Instant::now() < until, "v2 follows v1");
                let batch = second.fetch(10).await.unwrap();
                if let Some(d) = batch.into_iter().next() {
                    break d;
                }
            };
            assert_eq!(n_of(&two), 2);
            assert_eq!(two.order_key, one.order_key, "one chain, in one lane");
            second.ack(&[two.id]).await.unwrap();
        }),
    )
    .await;
    env.cleanup().await;
}

/// An event replayed, failed again and dead-lettered again still sorts by where it was first
/// published: replayed with a later event of its key, it comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_dead_lettered_again_after_a_replay_keeps_its_place() {
    let Some(env) = Env::new("replay-again").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let (topic, mut consumer) = two_events_of_one_key(&env, "c").await;
            let n = |d: &cqrs_redis::DeadLetter| d.record.as_ref().unwrap().payload["n"].as_u64();
            // Fails whatever it is handed until `count` dead letters are there.
            let fail_until = async |consumer: &mut Box<dyn Consumer>, count: usize| {
                let until = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
                    if dead.len() == count {
                        return dead;
                    }
                    assert!(tokio::time::Instant::now() < until, "dead: {dead:?}");
                    for d in consumer.fetch(1).await.unwrap() {
                        consumer.nack(&d.id).await.unwrap();
                    }
                }
            };
            let dead = fail_until(&mut consumer, 2).await;
            let v1 = dead.iter().find(|d| n(d) == Some(1)).unwrap().id.clone();
            // v1 alone is replayed, and fails again.
            env.transport
                .replay_dead_letters(&topic, std::slice::from_ref(&v1))
                .await
                .unwrap();
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            let dead = loop {
                let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
                if dead.len() == 2 && dead.iter().all(|d| d.id != v1) {
                    break dead;
                }
                assert!(tokio::time::Instant::now() < until, "dead again: {dead:?}");
                for d in consumer.fetch(1).await.unwrap() {
                    consumer.nack(&d.id).await.unwrap();
                }
            };
            let v1_again = dead.iter().find(|d| n(d) == Some(1)).unwrap().id.clone();
            let v2 = dead.iter().find(|d| n(d) == Some(2)).unwrap().id.clone();
            let replayed = env
                .transport
                .replay_dead_letters(&topic, &[v2.clone(), v1_again.clone()])
                .await
                .unwrap();
            let new_id = |dead: &str| {
                let r = replayed.iter().find(|r| r.dead_letter_id == dead).unwrap();
                let (ms, seq) = r.entry_id.split_once('-').unwrap();
                (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
            };
            assert!(
                new_id(&v1_again) < new_id(&v2),
                "v1 (first published first) appended before v2: {replayed:?}"
            );
            drop(consumer);
        }),
    )
    .await;
    env.cleanup().await;
}
