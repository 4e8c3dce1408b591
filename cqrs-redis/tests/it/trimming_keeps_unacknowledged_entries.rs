//! Trimming removes only entries every group acknowledged: pending entries (and everything
//! after them) stay and are still delivered, a group that has read nothing blocks trimming,
//! and a group created after a trim does not wait for a trimmed predecessor of its lane.

use crate::support::{Env, consumer_options, event, n_of, within};
use cqrs_core::ports::{Consumer, EventTransport};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_keeps_unacknowledged_entries() {
    let Some(env) = Env::with("trim", |o| o.trim_approximate(false)).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("audit");
            let stream = env.transport.stream_key(&topic).unwrap();
            let name = |n: &str| consumer_options(&format!("{}-{n}", env.id));
            let mut slow = env
                .transport
                .consumer(&topic, "slow", name("slow"))
                .await
                .unwrap();
            let mut fast = env
                .transport
                .consumer(&topic, "fast", name("fast"))
                .await
                .unwrap();
            let events: Vec<_> = (1..=10).map(|n| event(Some("k"), n)).collect();
            env.transport.publish(&topic, &events).await.unwrap();

            // A group that has read nothing yet needs every entry.
            let report = env.transport.trim(&topic).await.unwrap();
            assert_eq!((report.removed, report.bound), (0, None));

            // `fast` handles everything; `slow` acknowledges 1..=6 and holds 7 pending.
            assert_eq!(
                take(fast.as_mut(), 10, true).await,
                (1..=10).collect::<Vec<_>>()
            );
            assert_eq!(
                take(slow.as_mut(), 6, true).await,
                (1..=6).collect::<Vec<_>>()
            );
            assert_eq!(take(slow.as_mut(), 1, false).await, [7]);

            let report = env.transport.trim(&topic).await.unwrap();
            assert_eq!(report.removed, 6, "only what both groups acknowledged");
            let len = env.command("XLEN", vec![stream.as_str().into()]).await;
            assert_eq!(len.as_u64(), Some(4));

            // The pending entry comes back after the redelivery delay, and the rest follows.
            let rest = take(slow.as_mut(), 4, true).await;
            assert_eq!(rest, [7, 8, 9, 10]);

            // Everything acknowledged: all but the last delivered entry may go.
            let report = env.transport.trim(&topic).await.unwrap();
            assert_eq!(report.removed, 3);

            // A group created now starts at entry 10, whose predecessor in the lane was trimmed:
            // it must not wait for it.
            let mut late = env
                .transport
                .consumer(&topic, "late", name("late"))
                .await
                .unwrap();
            assert_eq!(take(late.as_mut(), 1, true).await, [10]);

            let groups = env
                .command("XINFO", vec!["GROUPS".into(), stream.as_str().into()])
                .await;
            assert_eq!(groups.into_array().len(), 3);
        }),
    )
    .await;
    env.cleanup().await;
}

/// Fetches until `count` deliveries arrived (10 s at most), acknowledging them when `ack`.
async fn take(consumer: &mut dyn Consumer, count: usize, ack: bool) -> Vec<u64> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < count && tokio::time::Instant::now() < until {
        let batch = consumer.fetch(count - got.len()).await.unwrap();
        got.extend(batch.iter().map(n_of));
        if ack {
            let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
            consumer.ack(&ids).await.unwrap();
        }
    }
    got
}

/// Dead letters are kept for their retention, then deleted: `trim_dead_letters` removes those
/// older than the age it is given (by their ids, the times they were dead-lettered), and a
/// maintenance round does it with its `dead_letter_retention`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_past_their_retention_are_deleted() {
    let Some(env) = Env::new("dead-retention").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("audit");
            let dead = env.transport.dead_letter_key(&topic).unwrap();
            let add = |id: &'static str| {
                let dead = dead.clone();
                let env = &env;
                async move {
                    env.command(
                        "XADD",
                        vec![
                            dead.as_str().into(),
                            id.into(),
                            "reason".into(),
                            "poison".into(),
                        ],
                    )
                    .await
                }
            };
            // Two from long ago (1970), one now.
            add("1000-0").await;
            add("2000-0").await;
            add("*").await;
            let day = Duration::from_secs(24 * 3600);
            assert_eq!(
                env.transport.trim_dead_letters(&topic, day).await.unwrap(),
                2
            );
            assert_eq!(
                env.transport.trim_dead_letters(&topic, day).await.unwrap(),
                0
            );
            let len = env.command("XLEN", vec![dead.as_str().into()]).await;
            assert_eq!(len.as_u64(), Some(1), "the recent one stays");

            // Another topic's old dead letter: a maintenance round applies the default
            // retention.
            let other = env.topic("audit2");
            let other_dead = env.transport.dead_letter_key(&other).unwrap();
            env.command(
                "XADD",
                vec![
                    other_dead.as_str().into(),
                    "3000-0".into(),
                    "reason".into(),
                    "poison".into(),
                ],
            )
            .await;
            cqrs_redis::StreamMaintenance::new(env.transport.clone(), [other.clone()])
                .run_once()
                .await
                .unwrap();
            let len = env.command("XLEN", vec![other_dead.as_str().into()]).await;
            assert_eq!(
                len.as_u64(),
                Some(0),
                "a round applies the default retention"
            );
            assert_eq!(
                env.transport
                    .trim_dead_letters(&topic, Duration::MAX)
                    .await
                    .unwrap(),
                0,
                "no overflow"
            );
        }),
    )
    .await;
    env.cleanup().await;
}

/// A dead-letter retention of zero deleted every dead letter each round, before anyone could
/// look at it; it is raised to the minimum of 1 minute, so a recent one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_dead_letter_retention_keeps_recent_dead_letters() {
    let Some(env) = Env::new("dead-retention-zero").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("audit");
            let dead = env.transport.dead_letter_key(&topic).unwrap();
            // One from 1970, one dead-lettered two seconds ago.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let recent = format!("{}-0", (now - Duration::from_secs(2)).as_millis());
            for id in ["1000-0".to_owned(), recent] {
                env.command(
                    "XADD",
                    vec![
                        dead.as_str().into(),
                        id.into(),
                        "reason".into(),
                        "poison".into(),
                    ],
                )
                .await;
            }
            cqrs_redis::StreamMaintenance::new(env.transport.clone(), [topic.clone()])
                .dead_letter_retention(Some(Duration::ZERO))
                .run_once()
                .await
                .unwrap();
            let len = env.command("XLEN", vec![dead.as_str().into()]).await;
            assert_eq!(
                len.as_u64(),
                Some(1),
                "the old one goes, the recent one stays"
            );
        }),
    )
    .await;
    env.cleanup().await;
}
