//! An entry whose `prev` field is no stream id (written by hand, or by a broken publisher)
//! cannot be gated: it is dead-lettered as malformed, and the consumer, and the entries after
//! it, carry on. Its successors are gated on it, so it leaves the pending list only once the
//! entries before it did (its lane's among them): dead-lettered earlier, it would let them
//! past a predecessor still pending. A `prev` that is not even text is malformed the same way,
//! on every path; and a gate check that fails for another reason fails the fetch instead of
//! dead-lettering anything.

use crate::support::{
    Env, acl_user, delete_stale_users, event, key_prefix, n_of, plain_redis_host, reachable, within,
};
use cqrs_core::ports::{Consumer, ConsumerOptions};
use cqrs_redis::{ConnectionOptions, KeyOrdering, RedisStreamOptions};
use fred::bytes::Bytes;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_with_a_malformed_prev_is_dead_lettered() {
    let Some(env) = Env::with("bad-prev", |o| o.key_ordering(KeyOrdering::Exact)).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            env.publish_one(&topic, "k", 1).await;
            let bad = add_bad_entry(&env, &topic, "abc".into(), 2).await;
            env.publish_one(&topic, "k", 3).await;
            env.publish_one(&topic, "q", 4).await;

            let mut consumer = env.join(&topic, "c", |o| o).await;
            let got = handle_at_least(consumer.as_mut(), 3).await;
            assert_eq!(got, [1, 3, 4], "everything but the malformed entry");

            // Later entries keep flowing.
            env.publish_one(&topic, "k", 5).await;
            let mut later = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while later.is_empty() && tokio::time::Instant::now() < until {
                later = consumer.fetch(10).await.expect("fetch keeps working");
            }
            assert_eq!(later.iter().map(n_of).collect::<Vec<_>>(), [5]);
            assert_one_malformed_dead_letter(&env, &topic, &bad, "abc").await;
        }),
    )
    .await;
    env.cleanup().await;
}

/// `prev` is a stream id, but not one of an earlier entry: here the entry's own, which the
/// gate found pending (the entry itself) on every step, so the entry and its lane waited for
/// ever, and so did every later malformed entry and the trimming behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_prev_is_its_own_id_is_dead_lettered() {
    let Some(env) = Env::with("bad-prev-self", |o| o.key_ordering(KeyOrdering::Exact)).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            env.publish_one(&topic, "k", 1).await;
            // An id far ahead of the clock, so it is later than the first entry's.
            let own = "99999999999999-7";
            let bad = add_bad_entry_at(&env, &topic, own, own.into(), 2).await;
            assert_eq!(bad, own);
            env.publish_one(&topic, "k", 3).await;
            env.publish_one(&topic, "q", 4).await;

            let mut consumer = env.join(&topic, "c", |o| o).await;
            let got = handle_at_least(consumer.as_mut(), 3).await;
            assert_eq!(got, [1, 3, 4], "everything but the malformed entry");
            assert_one_malformed_dead_letter(&env, &topic, &bad, own).await;
        }),
    )
    .await;
    env.cleanup().await;
}

/// The lanes hash outlived its stream (deleted by hand), and the server's clock is now behind
/// the lane's last entry: the next entry's `prev` is later than itself, but no entry of the
/// stream. It starts its lane again; it used to be dead-lettered as malformed, and the entry
/// after it handed out without it (its `prev` no longer pending), out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_after_a_lane_of_a_deleted_stream_is_handed_out() {
    let Some(env) = Env::with("stale-prev", |o| o.key_ordering(KeyOrdering::Exact)).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let lanes = format!("{}:{{{topic}}}:lanes", key_prefix(&env.id));
            // The last entry of lane `k` in the deleted stream, "written" far ahead of the clock.
            env.command(
                "HSET",
                vec![
                    lanes.as_str().into(),
                    "k:k".into(),
                    "99999999999999-0".into(),
                ],
            )
            .await;
            env.publish_one(&topic, "k", 1).await;
            env.publish_one(&topic, "k", 2).await;

            let mut consumer = env.join(&topic, "c", |o| o).await;
            // In the order handed out (`handle_at_least` sorts).
            let mut got = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while got.len() < 2 && tokio::time::Instant::now() < until {
                let batch = consumer.fetch(10).await.expect("fetch keeps working");
                got.extend(batch.iter().map(n_of));
                let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
                consumer.ack(&ids).await.unwrap();
            }
            assert_eq!(got, [1, 2], "the lane, whole and in order");
            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(dead.is_empty(), "{dead:?}");
        }),
    )
    .await;
    env.cleanup().await;
}

/// `prev` is no stream id at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_entry_waits_for_a_nacked_predecessor() {
    the_lane_waits_behind_a_malformed_entry("bad-prev-text", "abc".into(), "abc").await;
}

/// `prev` looks like a stream id, but Redis refuses it (past 64 bits): the gate learns that
/// only from the `XPENDING` it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_prev_redis_refuses_waits_for_a_nacked_predecessor() {
    the_lane_waits_behind_a_malformed_entry(
        "bad-prev-range",
        "99999999999999999999-0".into(),
        "99999999999999999999-0",
    )
    .await;
}

/// `prev` is not UTF-8: malformed too, not taken for an empty `prev` (the first of its lane).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_prev_is_not_text_waits_for_a_nacked_predecessor() {
    the_lane_waits_behind_a_malformed_entry(
        "bad-prev-bytes",
        Value::Bytes(Bytes::from_static(b"\xff\xfe1-0")),
        r"\xff\xfe1-0",
    )
    .await;
}

/// The lane of key `k` is P (n = 1), a bad entry with `prev` (n = 2), F (n = 3). P is handed
/// out and nacked before the others are published. Until P comes back and is acknowledged,
/// nothing else of the lane is handed out (F's `prev` is the bad entry, so the bad entry must
/// not leave the pending list before P) and nothing is dead-lettered; then the bad entry is
/// dead-lettered as malformed (its `prev` shown as `shown`), and F handed out.
async fn the_lane_waits_behind_a_malformed_entry(name: &str, prev: Value, shown: &str) {
    let Some(env) = Env::with(name, |o| o.key_ordering(KeyOrdering::Exact)).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let mut consumer = env.join(&topic, "c", |o| o).await;
            env.publish_one(&topic, "k", 1).await;
            let first = fetch_some(consumer.as_mut()).await;
            assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [1]);
            let p = first[0].id.clone();
            consumer.nack(&p).await.unwrap();
            let bad = add_bad_entry(&env, &topic, prev, 2).await;
            env.publish_one(&topic, "k", 3).await;

            // Nothing but P, which comes back after the redelivery delay.
            let again = fetch_some(consumer.as_mut()).await;
            assert_eq!(
                again.iter().map(n_of).collect::<Vec<_>>(),
                [1],
                "handed out while P is pending"
            );
            assert_eq!(again[0].id, p);
            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(dead.is_empty(), "dead-lettered before P is done: {dead:?}");

            consumer.ack(std::slice::from_ref(&p)).await.unwrap();
            let last = fetch_some(consumer.as_mut()).await;
            assert_eq!(last.iter().map(n_of).collect::<Vec<_>>(), [3], "then F");
            consumer.ack(&[last[0].id.clone()]).await.unwrap();
            assert_one_malformed_dead_letter(&env, &topic, &bad, shown).await;
        }),
    )
    .await;
    env.cleanup().await;
}

/// The gate's `XPENDING` for a well-formed `prev` fails for another reason than the id (here
/// the consumer's user may not run `XPENDING`; a group deleted between the read and the gate
/// is another): the fetch fails, as on any other failure of the step, and the entry is neither
/// dead-lettered as malformed nor acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_check_failing_otherwise_fails_the_fetch_and_dead_letters_nothing() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let Some(env) = Env::with("gate-error", |o| o.key_ordering(KeyOrdering::Exact)).await else {
        return;
    };
    delete_stale_users(&env.admin, "cqrs-test-gate_error_").await;
    let user = acl_user(&env.admin, &env.id).await;
    let setuser: Vec<Value> = ["SETUSER", &user, "on", "nopass", "+@all", "-xpending", "~*"]
        .iter()
        .map(|a| Value::from(*a))
        .collect();
    env.command("ACL", setuser).await;
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let mut a = env.join(&topic, "a", |o| o).await;
            env.publish_one(&topic, "k", 1).await;
            let p = fetch_some(a.as_mut()).await;
            assert_eq!(p.iter().map(n_of).collect::<Vec<_>>(), [1]);
            env.publish_one(&topic, "k", 2).await;

            // A consumer logged in as the test's user reads F (n = 2), whose predecessor is
            // in flight at `a`: only the gate script can decide it.
            let connection = ConnectionOptions::new(format!("redis://{user}:x@{host}"))
                .command_timeout(Duration::from_secs(2));
            let transport = RedisStreamOptions::with_connection(connection)
                .key_prefix(key_prefix(&env.id))
                .key_ordering(KeyOrdering::Exact)
                .connect()
                .await
                .expect("connect as the test's user");
            let options = ConsumerOptions::default()
                .consumer_name(format!("{}-b", env.id))
                .block(Duration::from_millis(100));
            let mut b = transport
                .redis_consumer(&topic, "g", options)
                .await
                .unwrap();
            let error = b.fetch(10).await.expect_err("the gate check failed");
            assert!(
                error.to_string().contains("can't run this command"),
                "{error}"
            );
            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(dead.is_empty(), "dead-lettered: {dead:?}");
            let summary = env
                .command("XPENDING", vec![stream.as_str().into(), "g".into()])
                .await
                .into_array();
            assert_eq!(summary[0].as_u64(), Some(2), "P and F still pending");
            drop(b);
        }),
    )
    .await;
    env.command("ACL", vec!["DELUSER".into(), user.as_str().into()])
        .await;
    env.cleanup().await;
}

/// Appends an entry of key `k` (lane `k:k`) with event `n` and the given `prev`, and makes it
/// the lane's last entry, as a publisher would. Returns its id.
async fn add_bad_entry(env: &Env, topic: &str, prev: Value, n: u64) -> String {
    add_bad_entry_at(env, topic, "*", prev, n).await
}

/// [`add_bad_entry`] with entry id `id` (`*`: Redis picks it).
async fn add_bad_entry_at(env: &Env, topic: &str, id: &str, prev: Value, n: u64) -> String {
    let stream = env.transport.stream_key(topic).unwrap();
    let lanes = format!("{}:{{{topic}}}:lanes", key_prefix(&env.id));
    let record = serde_json::to_string(&event(Some("k"), n)).unwrap();
    let bad = env
        .command(
            "XADD",
            vec![
                stream.as_str().into(),
                id.into(),
                "key".into(),
                "k".into(),
                "lane".into(),
                "k:k".into(),
                "prev".into(),
                prev,
                "record".into(),
                record.into(),
            ],
        )
        .await
        .into_string()
        .unwrap();
    env.command(
        "HSET",
        vec![lanes.as_str().into(), "k:k".into(), bad.as_str().into()],
    )
    .await;
    bad
}

/// The topic's one dead letter is entry `bad`, as malformed (its `prev` shown as `shown`),
/// with its record.
async fn assert_one_malformed_dead_letter(env: &Env, topic: &str, bad: &str, shown: &str) {
    let dead = env.transport.dead_letters(topic, None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].entry_id, bad);
    assert!(
        dead[0].error.starts_with("malformed entry")
            && dead[0].error.contains(&format!("`{shown}`")),
        "{}",
        dead[0].error
    );
    assert_eq!(
        dead[0].record.as_ref().map(|r| r.payload["n"].clone()),
        Some(2.into())
    );
}

/// Fetches and acknowledges until `n` events were handed out (or 10 s passed); their event
/// numbers, sorted.
async fn handle_at_least(consumer: &mut dyn Consumer, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < n && tokio::time::Instant::now() < until {
        let batch = consumer.fetch(10).await.expect("fetch keeps working");
        got.extend(batch.iter().map(n_of));
        let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
        consumer.ack(&ids).await.unwrap();
    }
    got.sort_unstable();
    got
}

/// Fetches until a batch is not empty, for up to 10 s.
async fn fetch_some(consumer: &mut dyn Consumer) -> Vec<cqrs_core::ports::Delivery> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = consumer.fetch(10).await.expect("fetch keeps working");
        if !got.is_empty() {
            return got;
        }
        assert!(tokio::time::Instant::now() < until, "nothing fetched");
    }
}
