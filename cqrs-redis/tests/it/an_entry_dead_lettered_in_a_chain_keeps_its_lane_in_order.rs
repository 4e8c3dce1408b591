//! An entry dead-lettered in the middle of its lane (it does not decode, or it is over its
//! deliveries) while the entry ahead of it is only being handed out: the entry behind it must
//! still wait for that one. It is dead-lettered once its predecessor is done, and only then is
//! the rest of the lane handed out.

use crate::support::{Env, consumer_options, event, n_of, within};
use cqrs_core::ports::{Consumer, DeliveryId, EventTransport};
use cqrs_redis::{KeyOrdering, RedisConsumer};
use fred::types::Value;
use std::time::Duration;

/// Well over a fetch and a keep-alive (its 100 ms `block` can take twice that on Redis 7.0),
/// even on a loaded machine, so the entry kept alive between fetches is not reclaimed
/// meanwhile.
const DELAY: Duration = Duration::from_secs(2);

/// `P` (n = 1), then an undecodable `U` chained by hand behind it, then `F` (n = 3), all of key
/// `k`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_entry_in_a_chain_waits_for_its_predecessor() {
    let Some(env) = Env::with("chain-undecodable", |o| o.key_ordering(KeyOrdering::Exact)).await
    else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let lanes = format!("{}:{{{topic}}}:lanes", crate::support::key_prefix(&env.id));
            env.publish_one(&topic, "k", 1).await;
            let p = last_in_lane(&env, &lanes).await;
            let u = env
                .command(
                    "XADD",
                    vec![
                        stream.as_str().into(),
                        "*".into(),
                        "id".into(),
                        "not-a-uuid".into(),
                        "key".into(),
                        "k".into(),
                        "lane".into(),
                        "k:k".into(),
                        "prev".into(),
                        p.as_str().into(),
                        "record".into(),
                        "{garbage".into(),
                    ],
                )
                .await
                .into_string()
                .unwrap();
            env.command("HSET", vec![lanes.as_str().into(), "k:k".into(), u.into()])
                .await;
            env.publish_one(&topic, "k", 3).await;

            let mut consumer = join(&env, &topic, "c", |o| o).await;
            the_rest_of_the_lane_waits_for_its_head(&env, &topic, &mut consumer, "undecodable")
                .await;
        }),
    )
    .await;
    env.cleanup().await;
}

/// `P`, `E`, `F` (n = 1, 2, 3) of key `k`; `E` has used up its deliveries while `P` has not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_over_its_deliveries_in_a_chain_waits_for_its_predecessor() {
    let Some(env) = Env::with("chain-over-limit", |o| o.key_ordering(KeyOrdering::Exact)).await
    else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let events = [1, 2, 3].map(|n| event(Some("k"), n));
            env.transport.publish(&topic, &events).await.unwrap();
            let max = |o: cqrs_core::ports::ConsumerOptions| o.max_deliveries(3);
            let mut first = join(&env, &topic, "first", max).await;
            let batch = fetch_some(&mut first, 10).await;
            assert_eq!(batch.iter().map(n_of).collect::<Vec<_>>(), [1, 2, 3]);
            // `first` crashes with the chain in flight; E had been tried (here: counted) more
            // often than P: 3 times, its limit. Only the claim that takes it over (its 4th
            // count) puts it over, so the gate must keep that count while it holds E behind P.
            let e = batch[1].id.0.clone();
            drop(first);
            env.command(
                "XCLAIM",
                vec![
                    stream.as_str().into(),
                    "g".into(),
                    format!("{}-first", env.id).into(),
                    0.into(),
                    e.into(),
                    "RETRYCOUNT".into(),
                    3.into(),
                    "JUSTID".into(),
                ],
            )
            .await;
            tokio::time::sleep(DELAY + Duration::from_millis(100)).await;

            let mut consumer = join(&env, &topic, "c", max).await;
            the_rest_of_the_lane_waits_for_its_head(&env, &topic, &mut consumer, "delivered").await;
        }),
    )
    .await;
    env.cleanup().await;
}

/// The lane is P (n = 1), a bad entry, F (n = 3). P is handed out and fails; while its retry
/// is in flight, F must not be handed out, and the bad entry is not dead-lettered yet. Once
/// P is acknowledged, the bad entry is dead-lettered (its error starting with `reason`) and F
/// handed out.
async fn the_rest_of_the_lane_waits_for_its_head(
    env: &Env,
    topic: &str,
    consumer: &mut RedisConsumer,
    reason: &str,
) {
    // P, and what follows it in its chain: P fails, the rest is handed back unhandled.
    let batch = fetch_some(consumer, 10).await;
    assert_eq!(n_of(&batch[0]), 1, "P first");
    let p = batch[0].id.clone();
    consumer.nack(&p).await.unwrap();
    let rest: Vec<DeliveryId> = batch[1..].iter().map(|d| d.id.clone()).collect();
    consumer.defer(&rest).await.unwrap();

    // P comes back after the redelivery delay, alone in a batch of one.
    tokio::time::sleep(DELAY + Duration::from_millis(50)).await;
    let again = fetch_some(consumer, 1).await;
    assert_eq!(again.iter().map(n_of).collect::<Vec<_>>(), [1], "P again");
    assert_eq!(again[0].id, p);

    // While P is in flight, nothing of its lane is handed out.
    let until = tokio::time::Instant::now() + DELAY * 2;
    while tokio::time::Instant::now() < until {
        consumer.keep_alive(std::slice::from_ref(&p)).await.unwrap();
        let got = consumer.fetch(1).await.unwrap();
        assert!(
            got.is_empty(),
            "handed out while P is in flight: {:?}",
            got.iter().map(n_of).collect::<Vec<_>>()
        );
    }
    let dead = env.transport.dead_letters(topic, None, 10).await.unwrap();
    assert!(dead.is_empty(), "dead-lettered before P is done: {dead:?}");

    consumer.ack(std::slice::from_ref(&p)).await.unwrap();
    let last = fetch_some(consumer, 10).await;
    assert_eq!(last.iter().map(n_of).collect::<Vec<_>>(), [3], "then F");
    consumer.ack(&[last[0].id.clone()]).await.unwrap();
    let dead = env.transport.dead_letters(topic, None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].error.contains(reason), "{}", dead[0].error);
}

async fn join(
    env: &Env,
    topic: &str,
    name: &str,
    configure: impl FnOnce(cqrs_core::ports::ConsumerOptions) -> cqrs_core::ports::ConsumerOptions,
) -> RedisConsumer {
    let options =
        configure(consumer_options(&format!("{}-{name}", env.id)).redelivery_delay(DELAY));
    env.transport
        .redis_consumer(topic, "g", options)
        .await
        .unwrap()
}

/// Fetches until a batch is not empty, for up to 10 s.
async fn fetch_some(consumer: &mut RedisConsumer, max: usize) -> Vec<cqrs_core::ports::Delivery> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = consumer.fetch(max).await.unwrap();
        if !got.is_empty() {
            return got;
        }
        assert!(tokio::time::Instant::now() < until, "nothing fetched");
    }
}

/// The id of lane `k:k`'s last entry.
async fn last_in_lane(env: &Env, lanes: &str) -> String {
    match env.command("HGET", vec![lanes.into(), "k:k".into()]).await {
        Value::Null => panic!("lane k:k has no entry"),
        v => v.into_string().unwrap(),
    }
}
