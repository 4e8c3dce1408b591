//! A release (entries a consumer held and never handed out, let go of for another consumer)
//! that fails is sent again, and a release sent again takes a delivery back only once.
//!
//! Without the first, a `keep_alive` whose release never reached Redis left the entry pending
//! to its consumer, idle since its last refresh: another consumer reclaimed it only after the
//! redelivery delay, with the read that brought it here still counted (one delivery no handler
//! got; with `max_deliveries(1)`, dead-lettered unhandled). Without the second, a release
//! whose reply was lost, sent again (by the next call, or `Drop`), took the count back twice,
//! so the entry's next handling was reported as an attempt fewer than it was.

use crate::proxy::{Proxy, env_behind_a_proxy};
use crate::support::{Env, n_of, within};
use cqrs_core::ports::Consumer;
use cqrs_core::testing::eventually;
use cqrs_redis::RedisConsumer;
use std::time::Duration;

/// How the consumer whose release failed sends it again.
#[derive(Clone, Copy, Debug)]
enum Again {
    KeepAlive,
    Fetch,
    Drop,
    /// The group is deleted first (`XGROUP DESTROY`, a server restarted without persistence):
    /// the release has nothing left to do, and the next fetch makes the group again.
    GroupGone,
}

/// c2 is handling event 1 (key k2); c1 is handed 2 (key k1) and holds 3 (key k2) behind 1.
/// Once c2 acknowledges 1, c1's `keep_alive` releases 3 (it waits for nothing of c1's); that
/// release never reaches Redis (the keep-alive itself succeeds: the batch was refreshed). The
/// next `keep_alive`, the next `fetch`, or the consumer's `Drop` sends it again: 3 is released
/// (idle since the epoch, its read taken back), and c2 takes it at once as its first delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_release_that_failed_is_sent_again_by_the_next_keep_alive() {
    a_failed_release_is_sent_again(Again::KeepAlive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_release_that_failed_is_sent_again_by_the_next_fetch() {
    a_failed_release_is_sent_again(Again::Fetch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_release_that_failed_is_sent_again_when_the_consumer_is_dropped() {
    a_failed_release_is_sent_again(Again::Drop).await;
}

/// A release still to send again when its group is deleted does not fail every later step:
/// the group and its pending entries are gone, and the next fetch makes the group again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_to_send_again_of_a_deleted_group_does_not_block_the_consumer() {
    a_failed_release_is_sent_again(Again::GroupGone).await;
}

async fn a_failed_release_is_sent_again(again: Again) {
    let name = format!("release-again-{again:?}").to_lowercase();
    let Some((proxy, env)) = env_behind_a_proxy(&name).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("tickets");
            // Long: only a release lets c2 take 3 within the test.
            let delay = Duration::from_secs(60);
            let mut c1 = env.join(&topic, "c1", |o| o.redelivery_delay(delay)).await;
            let mut c2 = env.join(&topic, "c2", |o| o.redelivery_delay(delay)).await;
            env.publish_one(&topic, "k2", 1).await;
            let first = c2.fetch(10).await.unwrap();
            assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [1]);
            env.publish_one(&topic, "k1", 2).await;
            env.publish_one(&topic, "k2", 3).await;
            let mut handling = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while handling.is_empty() {
                assert!(tokio::time::Instant::now() < until, "2 was not handed out");
                handling = c1.fetch(10).await.unwrap();
            }
            assert_eq!(handling.iter().map(n_of).collect::<Vec<_>>(), [2]);
            c2.ack(&[first[0].id.clone()]).await.unwrap();

            let connections = proxy.accepted();
            proxy.swallow("released");
            c1.keep_alive(&[handling[0].id.clone()])
                .await
                .expect("the batch was refreshed; the release is sent again later");
            assert!(proxy.swallowed(), "the release was sent");
            let (owner, idle, count) = third(&env, &topic).await;
            assert_eq!(owner, format!("{}-c1", env.id));
            assert!(idle < delay.as_millis() as u64, "not released yet");
            assert_eq!(count, 1, "c1's read");
            reconnected(&proxy, connections).await;

            match again {
                Again::KeepAlive => c1.keep_alive(&[handling[0].id.clone()]).await.unwrap(),
                Again::Fetch => {
                    // Released before the fetch reads on, 3 may come back to c1 itself (due at
                    // once, its predecessor done): as a first delivery, which it could not be
                    // unreleased (pending to c1 and idle for less than the delay).
                    let got = c1.fetch(10).await.unwrap();
                    if !got.is_empty() {
                        assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), [3]);
                        assert_eq!(got[0].attempt, 1, "c1's first read taken back");
                        c1.ack(&[got[0].id.clone()]).await.unwrap();
                        return;
                    }
                }
                Again::Drop => drop(c1),
                Again::GroupGone => {
                    let stream = env.transport.stream_key(&topic).unwrap();
                    env.command(
                        "XGROUP",
                        vec!["DESTROY".into(), stream.as_str().into(), "g".into()],
                    )
                    .await;
                    for _ in 0..2 {
                        c1.fetch(10).await.expect("the group is made again");
                    }
                    return;
                }
            }
            let released = || async {
                let (owner, idle, count) = third(&env, &topic).await;
                (owner == format!("{}-c1", env.id) && idle > 365 * 24 * 3600 * 1000 && count == 0)
                    .then_some(())
            };
            // Drop releases in a task of its own: waited for. The others have released when
            // they return.
            match again {
                Again::Drop => {
                    eventually(Duration::from_secs(20), "released by the drop", released).await
                }
                _ => assert!(
                    released().await.is_some(),
                    "the release sent again: 3 idle since the epoch, c1's read taken back: {:?}",
                    third(&env, &topic).await
                ),
            }

            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let taken = loop {
                let batch = c2.fetch(10).await.unwrap();
                if !batch.is_empty() {
                    break batch;
                }
                assert!(tokio::time::Instant::now() < until, "c2 did not get 3");
            };
            assert_eq!(taken.iter().map(n_of).collect::<Vec<_>>(), [3]);
            assert_eq!(taken[0].attempt, 1, "never handled before");
            c2.ack(&[taken[0].id.clone()]).await.unwrap();
        }),
    )
    .await;
    env.cleanup().await;
}

/// An entry stranded at `a` with two deliveries counted (a claim of another consumer's
/// delivery whose reply was lost: one read here that no handler got). `close` releases it,
/// taking that read back (2 → 1), and the reply is lost, so the close fails and the entry
/// stays held. The next `close` sends the release again: the entry, released already, keeps
/// its count of 1 (the other consumer's delivery), not 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_sent_again_takes_a_delivery_back_once() {
    let Some((proxy, env)) = env_behind_a_proxy("release-once").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("tickets");
            let name = format!("{}-a", env.id);
            let mut a: RedisConsumer = env
                .transport
                .redis_consumer(
                    &topic,
                    "g",
                    crate::support::consumer_options(&name)
                        .redelivery_delay(Duration::from_secs(60)),
                )
                .await
                .unwrap();
            env.publish_one(&topic, "k", 1).await;
            let stream = env.transport.stream_key(&topic).unwrap();
            env.read_as(&stream, &name, 1).await;
            let id = env.entry_ids(&stream).await.remove(0);
            env.command(
                "XCLAIM",
                vec![
                    stream.as_str().into(),
                    "g".into(),
                    name.as_str().into(),
                    0.into(),
                    id.as_str().into(),
                    "RETRYCOUNT".into(),
                    2.into(),
                    "JUSTID".into(),
                ],
            )
            .await;

            let connections = proxy.accepted();
            proxy.lose_reply_to("released");
            let failed = Consumer::close(&mut a).await;
            assert!(proxy.reply_lost(), "Redis ran the release");
            assert!(failed.is_err(), "its reply was lost: {failed:?}");
            let (_, idle, count) = env.pending_entry(&stream, &id).await;
            assert!(idle > 365 * 24 * 3600 * 1000, "released, idle {idle} ms");
            assert_eq!(count, 1, "the read here taken back");
            reconnected(&proxy, connections).await;

            Consumer::close(&mut a).await.unwrap();
            let (owner, idle, count) = env.pending_entry(&stream, &id).await;
            assert_eq!(owner, name);
            assert!(
                idle > 365 * 24 * 3600 * 1000,
                "still released, idle {idle} ms"
            );
            assert_eq!(
                count, 1,
                "the release sent again took the other consumer's delivery back too"
            );
        }),
    )
    .await;
    env.cleanup().await;
}

/// Waits until the proxy accepted a connection more than `before`: the dead one replaced.
async fn reconnected(proxy: &Proxy, before: usize) {
    eventually(
        Duration::from_secs(20),
        "the dead connection replaced",
        || async { (proxy.accepted() > before).then_some(()) },
    )
    .await;
}

/// The consumer event 3 (the stream's third entry) is pending to, its idle time (ms) and its
/// delivery count.
async fn third(env: &Env, topic: &str) -> (String, u64, u64) {
    let stream = env.transport.stream_key(topic).unwrap();
    let id = env.entry_ids(&stream).await.remove(2);
    env.pending_entry(&stream, &id).await
}
