//! What a consumer remembers about its deliveries stays right in the corners: an entry
//! reclaimed and held back with its delivery count taken back to 1 still has its recorded
//! error removed when acknowledged; a nacked entry is not taken for a stranded one at
//! `close` however many entries were handed back before it; and deliveries dropped unanswered
//! and taken over elsewhere are forgotten.

use crate::support::{Env, consumer_options, event, n_of, within};
use cqrs_core::ports::{Consumer, DeliveryId, EventTransport};
use cqrs_redis::{KeyOrdering, RedisConsumer};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_removes_the_error_of_an_entry_back_on_its_first_count() {
    let Some(env) = Env::with("ack-error", |o| o.key_ordering(KeyOrdering::Exact)).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let errors = errors_key(&env, &topic);
            // Well over a fetch and a keep-alive (up to twice its 100 ms `block` on Redis 7.0),
            // even on a loaded machine: the first entry, kept alive between fetches, is not
            // reclaimed meanwhile.
            let delay = Duration::from_secs(2);
            let options = consumer_options(&format!("{}-c", env.id)).redelivery_delay(delay);
            let mut c: RedisConsumer = env
                .transport
                .redis_consumer(&topic, "g", options)
                .await
                .unwrap();
            let events = [1, 2].map(|n| event(Some("k"), n));
            env.transport.publish(&topic, &events).await.unwrap();
            let batch = fetch_some(&mut c).await;
            assert_eq!(batch.iter().map(n_of).collect::<Vec<_>>(), [1, 2]);
            let (o, p) = (batch[0].id.clone(), batch[1].id.clone());
            // The first is handled, its ack still to come; the second fails.
            c.nack_with_error(&p, "boom").await.unwrap();
            let has_error = |id: DeliveryId| {
                let errors = errors.clone();
                let env = &env;
                async move {
                    env.command("HEXISTS", vec![errors.into(), id.0.into()])
                        .await
                        .as_u64()
                }
            };
            assert_eq!(has_error(p.clone()).await, Some(1));

            // Reclaimed after the delay and held back behind the first, its count taken back.
            let until = tokio::time::Instant::now() + Duration::from_secs(15);
            while c.held() == 0 {
                c.keep_alive(std::slice::from_ref(&o)).await.unwrap();
                assert!(c.fetch(10).await.unwrap().is_empty());
                assert!(tokio::time::Instant::now() < until, "never reclaimed");
            }
            c.ack(std::slice::from_ref(&o)).await.unwrap();
            let again = fetch_some(&mut c).await;
            assert_eq!(again.iter().map(n_of).collect::<Vec<_>>(), [2]);
            assert_eq!(again[0].attempt, 1, "back on its first count");
            c.ack(std::slice::from_ref(&p)).await.unwrap();
            assert_eq!(has_error(p).await, Some(0), "the error outlived its entry");
        }),
    )
    .await;
    env.cleanup().await;
}

/// An entry reclaimed by `b` and nacked there with an error, then acknowledged by `a` (slower
/// than the redelivery delay, on what it took for the entry's first delivery) leaves no error
/// behind: the errors hash grew without end that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_by_a_slow_consumer_removes_the_error_another_recorded() {
    let Some(env) = Env::new("slow-ack-error").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let errors = errors_key(&env, &topic);
            let delay = Duration::from_millis(500);
            let mut a = env.join(&topic, "a", |o| o.redelivery_delay(delay)).await;
            let mut b = env.join(&topic, "b", |o| o.redelivery_delay(delay)).await;
            env.publish_one(&topic, "k", 1).await;
            let first = a.fetch(10).await.unwrap();
            assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [1]);
            let x = first[0].id.clone();
            // `a` takes longer than the delay: `b` reclaims the entry, and fails it.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let taken = loop {
                let got = b.fetch(10).await.unwrap();
                if !got.is_empty() {
                    break got;
                }
                assert!(tokio::time::Instant::now() < until, "never reclaimed");
            };
            assert_eq!(
                taken.iter().map(|d| d.id.0.as_str()).collect::<Vec<_>>(),
                [x.0.as_str()]
            );
            b.nack_with_reason(&x, "boom").await.unwrap();
            let hlen = || env.command("HLEN", vec![errors.as_str().into()]);
            assert_eq!(hlen().await.as_u64(), Some(1));

            a.ack(std::slice::from_ref(&x)).await.unwrap();
            assert_eq!(
                hlen().await.as_u64(),
                Some(0),
                "the error outlived its entry"
            );
        }),
    )
    .await;
    env.cleanup().await;
}

/// An entry deleted from the stream while pending (`XDEL`, an operator's trim) takes its
/// recorded error with it when it leaves the pending list: nacked before the delete (the
/// reclaim drops it), or after (the nack's claim drops it). (Both errors stayed for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_deleted_while_pending_leaves_no_error_behind() {
    let Some(env) = Env::new("deleted-error").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let errors = errors_key(&env, &topic);
            let mut c = env
                .join(&topic, "c", |o| {
                    o.redelivery_delay(Duration::from_millis(200))
                })
                .await;
            env.publish_one(&topic, "a", 1).await;
            env.publish_one(&topic, "b", 2).await;
            let [first, second] =
                <[DeliveryId; 2]>::try_from(fetch_both(c.as_mut()).await).expect("two entries");
            let xdel = |id: DeliveryId| {
                env.command("XDEL", vec![stream.as_str().into(), id.0.as_str().into()])
            };
            c.nack_with_reason(&first, "boom").await.unwrap();
            xdel(first).await;
            // The second was nacked before too: the nack after the delete removes that error.
            c.nack_with_reason(&second, "earlier").await.unwrap();
            xdel(second.clone()).await;
            c.nack_with_reason(&second, "bang").await.unwrap();
            let hlen = || env.command("HLEN", vec![errors.as_str().into()]);
            // The reclaim of the first comes once its redelivery delay has passed.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let left = c.fetch(10).await.unwrap();
                assert!(left.is_empty(), "a deleted entry handed out");
                if hlen().await.as_u64() == Some(0) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "errors of deleted entries stayed: {:?}",
                    env.command("HGETALL", vec![errors.as_str().into()]).await
                );
            }
        }),
    )
    .await;
    env.cleanup().await;
}

/// The same when the entry, back after its nack and deleted while handed out, is deferred or
/// kept alive: the claim that drops it takes its error with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_deleted_while_handed_out_again_leaves_no_error_behind() {
    let Some(env) = Env::new("deleted-error-again").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let errors = errors_key(&env, &topic);
            let hlen = || env.command("HLEN", vec![errors.as_str().into()]);
            let mut c = env
                .join(&topic, "c", |o| {
                    o.redelivery_delay(Duration::from_millis(200))
                })
                .await;
            env.publish_one(&topic, "a", 1).await;
            env.publish_one(&topic, "b", 2).await;
            let ids = fetch_both(c.as_mut()).await;
            for id in &ids {
                c.nack_with_reason(id, "boom").await.unwrap();
            }
            assert_eq!(hlen().await.as_u64(), Some(2));
            // Back after the redelivery delay, handed out again.
            assert_eq!(fetch_both(c.as_mut()).await, ids);
            for id in &ids {
                env.command("XDEL", vec![stream.as_str().into(), id.0.as_str().into()])
                    .await;
            }
            c.defer(&ids[..1]).await.unwrap();
            c.keep_alive(&ids[1..]).await.unwrap();
            assert_eq!(
                hlen().await.as_u64(),
                Some(0),
                "errors of deleted entries stayed: {:?}",
                env.command("HGETALL", vec![errors.as_str().into()]).await
            );
        }),
    )
    .await;
    env.cleanup().await;
}

/// The group `g`'s errors hash of `topic`.
fn errors_key(env: &Env, topic: &str) -> String {
    format!(
        "{}:{{{topic}}}:errors:g",
        crate::support::key_prefix(&env.id)
    )
}

/// Fetches until the two entries published (events 1 and 2) are handed out, for up to 10 s;
/// their ids, in event order.
async fn fetch_both(c: &mut dyn Consumer) -> Vec<DeliveryId> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 2 {
        got.extend(c.fetch(10).await.unwrap());
        assert!(tokio::time::Instant::now() < until, "not both fetched");
    }
    got.sort_by_key(n_of);
    got.into_iter().map(|d| d.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_keeps_a_nacked_entry_after_many_returns() {
    let Some(env) = Env::new("many-returns").await else {
        return;
    };
    within(
        120,
        Box::pin(async {
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let delay = Duration::from_secs(60);
            let options = consumer_options(&format!("{}-c", env.id)).redelivery_delay(delay);
            let mut c = env
                .transport
                .redis_consumer(&topic, "g", options)
                .await
                .unwrap();
            env.publish_one(&topic, "k", 1).await;
            let batch = fetch_some(&mut c).await;
            let p = batch[0].id.clone();
            c.nack(&p).await.unwrap();
            // Many more handed back (ids pending to no one: another consumer took them).
            let others: Vec<DeliveryId> =
                (0..66_000).map(|i| DeliveryId(format!("1-{i}"))).collect();
            c.defer(&others).await.unwrap();
            c.close().await.unwrap();

            // Still nacked: idle since the nack, its one delivery counted.
            let pending = env
                .command(
                    "XPENDING",
                    vec![
                        stream.as_str().into(),
                        "g".into(),
                        "-".into(),
                        "+".into(),
                        10.into(),
                    ],
                )
                .await
                .into_array();
            assert_eq!(pending.len(), 1, "{pending:?}");
            let row = pending[0].clone().into_array();
            assert_eq!(row[0].clone().into_string().as_deref(), Some(p.0.as_str()));
            let idle = row[2].as_u64().unwrap();
            assert!(
                idle < delay.as_millis() as u64 / 2,
                "released at once: idle {idle} ms"
            );
            assert_eq!(row[3].as_u64(), Some(1), "its delivery was taken back");
        }),
    )
    .await;
    env.cleanup().await;
}

/// Fetches until a batch is not empty, for up to 10 s.
async fn fetch_some(consumer: &mut RedisConsumer) -> Vec<cqrs_core::ports::Delivery> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = consumer.fetch(10).await.unwrap();
        if !got.is_empty() {
            return got;
        }
        assert!(tokio::time::Instant::now() < until, "nothing fetched");
    }
}

/// How many deliveries `c` remembers in flight (its `Debug` output says).
fn in_flight(c: &RedisConsumer) -> usize {
    let shown = format!("{c:?}");
    let (_, rest) = shown
        .split_once("in_flight: ")
        .expect("in_flight in the Debug output");
    rest.split(|ch: char| !ch.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Fetches from `c` until it has handed out `n` deliveries; returns them.
async fn fetch_n(c: &mut RedisConsumer, n: usize) -> Vec<cqrs_core::ports::Delivery> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        assert!(tokio::time::Instant::now() < until, "{} of {n}", got.len());
        got.extend(c.fetch(256).await.unwrap());
    }
    got
}

/// A caller of `fetch` may drop deliveries without answering them; another consumer then
/// reclaims and acknowledges them, which this one never hears of. Once it has many in
/// flight, it forgets those no longer pending to it: they were kept for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_dropped_unanswered_and_taken_over_are_forgotten() {
    const FIRST: u64 = 1100;
    const SECOND: u64 = 1000;
    let Some(env) = Env::with("in-flight", |o| o.key_ordering(KeyOrdering::Unordered)).await else {
        return;
    };
    within(
        90,
        Box::pin(async {
            let topic = env.topic("orders");
            let options = |name: &str, delay| {
                consumer_options(&format!("{}-{name}", env.id)).redelivery_delay(delay)
            };
            // `dropping` never reclaims by time: fetches of a loaded machine taking longer
            // than the delay would hand it its own deliveries again.
            let mut dropping: RedisConsumer = env
                .transport
                .redis_consumer(&topic, "g", options("dropping", Duration::from_secs(3600)))
                .await
                .unwrap();
            let first: Vec<_> = (1..=FIRST).map(|n| event(None, n)).collect();
            env.transport.publish(&topic, &first).await.unwrap();
            drop(fetch_n(&mut dropping, FIRST as usize).await);
            assert_eq!(in_flight(&dropping), FIRST as usize);

            // Another consumer takes them over once idle, and acknowledges them.
            let mut heir = env
                .transport
                .consumer(&topic, "g", options("heir", Duration::from_millis(300)))
                .await
                .unwrap();
            let mut taken = 0;
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            while taken < FIRST as usize {
                assert!(tokio::time::Instant::now() < until, "{taken} taken over");
                let batch = heir.fetch(256).await.unwrap();
                let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
                heir.ack(&ids).await.unwrap();
                taken += batch.len();
            }

            let second: Vec<_> = (FIRST + 1..=FIRST + SECOND)
                .map(|n| event(None, n))
                .collect();
            env.transport.publish(&topic, &second).await.unwrap();
            let kept = fetch_n(&mut dropping, SECOND as usize).await;
            assert!(kept.iter().all(|d| n_of(d) > FIRST));
            assert_eq!(
                in_flight(&dropping),
                SECOND as usize,
                "only the deliveries still pending to it"
            );
        }),
    )
    .await;
    env.cleanup().await;
}
