//! A consumer closed through the port (`Consumer::close`, as `consume_until_shutdown` does at
//! shutdown) releases the entries it holds back at once: right after `close`, `XPENDING` shows
//! them due (idle for the redelivery delay) and never delivered, and another consumer takes
//! them as a first delivery.

use crate::support::{
    Env, blocked_connections, blocked_now, consumer_options, event, n_of, within,
};
use cqrs_core::ports::{Consumer, EventTransport};
use cqrs_core::testing::eventually;
use cqrs_redis::RedisConsumer;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_consumer_releases_what_it_holds() {
    let Some(env) = Env::new("close").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let delay = Duration::from_secs(8);
            let mut a = env.join(&topic, "a", |o| o.redelivery_delay(delay)).await;
            let first = env.one_pending_and_its_successor(&topic, a.as_mut()).await;
            // Read while its predecessor is pending: held back, not handed out.
            assert!(a.fetch(1).await.unwrap().is_empty());
            a.ack(std::slice::from_ref(&first.id)).await.unwrap();
            a.close().await.unwrap();

            assert_released(&env, &topic, "a", 1, delay).await;
            assert_eq!(taken_over(&env, &topic, delay).await, [2]);
            drop(a);
        }),
    )
    .await;
    env.cleanup().await;
}

/// A `fetch` dropped while its read blocks (a shutdown) leaves the read waiting on the
/// server: an entry published then is delivered to it, pending to the consumer but handed to
/// no one. Closing the consumer releases it too, so another takes it at once instead of after
/// the redelivery delay (and its key's later entries do not wait that long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_releases_what_a_dropped_blocking_read_was_served() {
    let Some(env) = Env::new("close-blocked").await else {
        return;
    };
    within(
        90,
        Box::pin(async {
            let delay = Duration::from_secs(30);
            // Each read blocks for a claim interval at most (here 1 s): one may end before the
            // publish reaches it, on a machine stalled that long. Then again, on a new topic
            // (the entry it missed would be read at once by the next fetch).
            let mut attempt = 0;
            let (topic, name, mut a) = loop {
                attempt += 1;
                let topic = env.topic(&format!("tickets-{attempt}"));
                let name = format!("a{attempt}");
                // A fetch that goes on reading well past the wait for its read to block.
                let options = consumer_options(&format!("{}-{name}", env.id))
                    .redelivery_delay(delay)
                    .block(Duration::from_secs(30));
                let mut a: RedisConsumer = env
                    .transport
                    .redis_consumer(&topic, "g", options)
                    .await
                    .unwrap();
                if served_to_a_dropped_read(&env, &topic, &name, &mut a).await {
                    break (topic, name, a);
                }
                assert!(
                    attempt < 5,
                    "in {attempt} tries, no blocking read waited until the publish reached it"
                );
            };
            Consumer::close(&mut a).await.unwrap();

            assert_released(&env, &topic, &name, 1, delay).await;
            assert_eq!(taken_over(&env, &topic, delay).await, [1]);
            drop(a);
        }),
    )
    .await;
    env.cleanup().await;
}

/// Drops a `fetch` of `a` (consumer `name` of `topic`) once its read waits on the server
/// (`CLIENT LIST`), then publishes event 1 of key `k`. Returns whether that read was served
/// the entry, which is then pending to `a`; `false` when the read ended, served nothing,
/// before the publish reached it.
async fn served_to_a_dropped_read(
    env: &Env,
    topic: &str,
    name: &str,
    a: &mut RedisConsumer,
) -> bool {
    let ids = a.client_ids().await.unwrap();
    {
        let fetch = Consumer::fetch(&mut *a, 10);
        tokio::pin!(fetch);
        tokio::select! {
            result = &mut fetch => panic!("the fetch returned before it blocked: {result:?}"),
            _ = blocked_connections(&env.admin, &ids) => {}
        }
    }
    env.publish_one(topic, "k", 1).await;
    // Served, the read ends at once; ended unserved, it reads nothing more (its fetch is
    // gone). Blocked first, then pending: a read seen ended has had whatever it was served.
    let ids = &ids;
    eventually(
        Duration::from_secs(15),
        "the dropped fetch's read is served the entry, or ends",
        || async move {
            let blocked = !blocked_now(&env.admin, ids).await.is_empty();
            if !pending_to(env, topic, name).await.is_empty() {
                Some(true)
            } else {
                (!blocked).then_some(false)
            }
        },
    )
    .await
}

/// The rows of `XPENDING` for consumer `name` of group `g` of `topic`.
async fn pending_to(env: &Env, topic: &str, name: &str) -> Vec<Vec<Value>> {
    let stream = env.transport.stream_key(topic).unwrap();
    let consumer = format!("{}-{name}", env.id);
    env.command(
        "XPENDING",
        vec![
            stream.as_str().into(),
            "g".into(),
            "-".into(),
            "+".into(),
            100.into(),
            consumer.as_str().into(),
        ],
    )
    .await
    .into_array()
    .into_iter()
    .map(Value::into_array)
    .collect()
}

/// Asserts that consumer `name` of group `g` holds `count` pending entries, every one released:
/// idle for at least the redelivery delay (due to the next consumer that looks) and with a
/// delivery count of 0 (its read taken back). Checked on the server right after `close`, so
/// how fast another consumer then takes them does not matter.
async fn assert_released(env: &Env, topic: &str, name: &str, count: usize, delay: Duration) {
    let pending = pending_to(env, topic, name).await;
    assert_eq!(pending.len(), count, "pending at {name}: {pending:?}");
    for row in pending {
        assert!(
            row[2]
                .as_u64()
                .is_some_and(|idle| idle >= delay.as_millis() as u64)
                && row[3].as_u64() == Some(0),
            "close did not release {row:?} (the redelivery delay is {delay:?})"
        );
    }
}

/// What a new consumer `b` of the group gets (its event numbers), fetching until it gets
/// something or 10 s pass. `b` allows one delivery: a released entry was never handed out, so
/// it comes as attempt 1 and is not dead-lettered as over its limit.
async fn taken_over(env: &Env, topic: &str, delay: Duration) -> Vec<u64> {
    let mut b = env
        .join(topic, "b", |o| o.redelivery_delay(delay).max_deliveries(1))
        .await;
    let started = tokio::time::Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && started.elapsed() < Duration::from_secs(10) {
        got = b.fetch(10).await.unwrap();
    }
    for delivery in &got {
        assert_eq!(
            delivery.attempt,
            1,
            "event {} never handled",
            n_of(delivery)
        );
    }
    got.iter().map(n_of).collect()
}

/// What a consumer nacked is not stranded: closing it leaves the entry to come back after the
/// redelivery delay, as a nack promises, instead of handing it to another consumer at once
/// (which would retry a poison entry faster than configured, and spend a delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_does_not_release_what_was_nacked() {
    let Some(env) = Env::new("close-nacked").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let delay = Duration::from_secs(30);
            let mut a = env.join(&topic, "a", |o| o.redelivery_delay(delay)).await;
            env.publish_one(&topic, "k", 1).await;
            env.publish_one(&topic, "other", 2).await;
            let mut got = Vec::new();
            while got.len() < 2 {
                got.extend(a.fetch(2).await.unwrap());
            }
            a.nack(&got[0].id).await.unwrap();
            a.defer(std::slice::from_ref(&got[1].id)).await.unwrap();
            a.close().await.unwrap();

            let mut b = env.join(&topic, "b", |o| o.redelivery_delay(delay)).await;
            let started = tokio::time::Instant::now();
            while started.elapsed() < Duration::from_millis(1500) {
                let taken = b.fetch(10).await.unwrap();
                assert!(
                    taken.is_empty(),
                    "handed back entries wait out the delay: {:?}",
                    taken.iter().map(n_of).collect::<Vec<_>>()
                );
            }
            drop(a);
        }),
    )
    .await;
    env.cleanup().await;
}

/// `close` finds every entry stranded at the consumer, however many: it pages through the
/// consumer's pending entries (10,000 a page), and releases them all, not only the first page
/// (nor the first 1,000, as it once did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_releases_every_stranded_entry_past_a_page() {
    let Some(env) = Env::new("close-many").await else {
        return;
    };
    within(
        120,
        Box::pin(async {
            const STRANDED: usize = 10_100;
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            let delay = Duration::from_secs(60);
            let mut a = env.join(&topic, "a", |o| o.redelivery_delay(delay)).await;
            let events: Vec<_> = (0..STRANDED as u64).map(|n| event(None, n)).collect();
            for batch in events.chunks(1_000) {
                env.transport.publish(&topic, batch).await.unwrap();
            }
            // Read as `a` behind its back, like a blocking read whose fetch was dropped: pending
            // to `a`, handed to no one.
            let consumer = format!("{}-a", env.id);
            let read = env.read_as(&stream, &consumer, STRANDED + 1).await;
            drop(read);
            a.close().await.unwrap();

            // Every one released: idle for the redelivery delay, its read's count taken back.
            let pending = env
                .command(
                    "XPENDING",
                    vec![
                        stream.as_str().into(),
                        "g".into(),
                        "-".into(),
                        "+".into(),
                        (STRANDED as i64 + 1).into(),
                        consumer.as_str().into(),
                    ],
                )
                .await
                .into_array();
            assert_eq!(pending.len(), STRANDED);
            let held_on = pending
                .into_iter()
                .map(Value::into_array)
                .filter(|row| {
                    row[2]
                        .as_u64()
                        .is_none_or(|idle| idle < delay.as_millis() as u64)
                        || row[3].as_u64() != Some(0)
                })
                .count();
            assert_eq!(held_on, 0, "entries close did not release");
            drop(a);
        }),
    )
    .await;
    env.cleanup().await;
}

/// A redelivery delay of `Duration::MAX` ("never by time") does not stop `close` from
/// releasing what the consumer held back: Redis cannot hold an idle time that long (an
/// `XCLAIM … IDLE` past its clock counts as 0, an `XAUTOCLAIM` min-idle that long claims
/// nothing), and the released entry used to stay pending to the closed consumer for good,
/// its lane blocked behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_releases_held_entries_with_a_redelivery_delay_of_duration_max() {
    let Some(env) = Env::new("close-delay-max").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let never = |o: cqrs_core::ports::ConsumerOptions| o.redelivery_delay(Duration::MAX);
            let options = consumer_options(&format!("{}-a", env.id));
            let mut a: RedisConsumer = env
                .transport
                .redis_consumer(&topic, "g", never(options))
                .await
                .unwrap();
            let mut b = env.join(&topic, "b", never).await;
            env.publish_one(&topic, "k", 1).await;
            env.publish_one(&topic, "k", 2).await;
            let first = b.fetch(1).await.unwrap();
            assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [1]);
            // Read behind its predecessor, pending to `b`: held back.
            assert!(a.fetch(10).await.unwrap().is_empty());
            assert_eq!(a.held(), 1);
            a.close().await.unwrap();
            b.ack(std::slice::from_ref(&first[0].id)).await.unwrap();

            let mut c = env.join(&topic, "c", never).await;
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut got = Vec::new();
            while got.is_empty() {
                assert!(
                    tokio::time::Instant::now() < until,
                    "the entry `a` held back was not released within 10 s"
                );
                got = c.fetch(10).await.unwrap();
            }
            assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), [2]);
            assert_eq!(got[0].attempt, 1, "released unhandled: its first delivery");
        }),
    )
    .await;
    env.cleanup().await;
}

/// A close whose release never reaches Redis (its connection died, so the close fails) leaves
/// what was stranded at the consumer (read for it, in none of its lists: a read whose reply
/// was lost) to its `Drop`, which releases it. It was only in the close's own list, so
/// nothing released it: it waited out the redelivery delay, and came back with a delivery
/// counted that no handler got (with `max_deliveries(1)`, dead-lettered unhandled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_that_fails_leaves_what_was_stranded_to_drop() {
    let Some((proxy, env)) = crate::proxy::env_behind_a_proxy("close-failed").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("tickets");
            let delay = Duration::from_secs(30);
            let options = consumer_options(&format!("{}-a", env.id)).redelivery_delay(delay);
            let mut a: RedisConsumer = env
                .transport
                .redis_consumer(&topic, "g", options)
                .await
                .unwrap();
            env.publish_one(&topic, "k", 1).await;
            let stream = env.transport.stream_key(&topic).unwrap();
            env.read_as(&stream, &format!("{}-a", env.id), 1).await;
            assert_eq!(
                pending_to(&env, &topic, "a").await.len(),
                1,
                "stranded at a"
            );

            let connections = proxy.accepted();
            proxy.swallow("released");
            let failed = Consumer::close(&mut a).await;
            assert!(proxy.swallowed(), "the release was sent");
            assert!(
                failed.is_err(),
                "the release never reached Redis: {failed:?}"
            );
            // The consumer is dropped once its dead connection is replaced (the unresponsive
            // timeout), as at a shutdown whose close was cut off on a live one.
            eventually(
                Duration::from_secs(20),
                "the dead connection replaced",
                || async { (proxy.accepted() > connections).then_some(()) },
            )
            .await;
            drop(a);

            eventually(
                Duration::from_secs(20),
                "the stranded entry released by the consumer's drop",
                || async {
                    let pending = pending_to(&env, &topic, "a").await;
                    let released = pending.len() == 1
                        && pending[0][2]
                            .as_u64()
                            .is_some_and(|idle| idle >= delay.as_millis() as u64)
                        && pending[0][3].as_u64() == Some(0);
                    released.then_some(())
                },
            )
            .await;
        }),
    )
    .await;
    env.cleanup().await;
}
