//! One approximate trim removes at most the transport's `trim_limit` (Redis itself stops at
//! 10,000 entries a call without a `LIMIT`); a maintenance round calls it again while it
//! removes entries, so a backlog bigger than one call's worth goes in one round, and a topic
//! busier than 10,000 entries a minute does not grow without end.
//!
//! Approximate trimming removes whole stream nodes only (at most `stream-node-max-entries`
//! entries, 100 by default, which the tests leave alone: they share one server): what stays
//! is the node holding the bound, so "trimmed" below means at most 100 entries left.

use crate::support::{Env, consumer_options, event, within};
use cqrs_core::ports::EventTransport;
use cqrs_redis::StreamMaintenance;
use std::time::Duration;

/// At most one stream node of Redis's default size.
const ONE_NODE: u64 = 100;

async fn len(env: &Env, stream: &str) -> u64 {
    env.command("XLEN", vec![stream.into()])
        .await
        .as_u64()
        .unwrap()
}

/// With the default limit: 25,000 entries every group is done with (a group whose last
/// delivered entry is the last one, nothing pending) go in one round, not 10,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trims_a_backlog_past_what_redis_removes_in_one_call() {
    let Some(env) = Env::new("trim-backlog").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("audit");
            let stream = env.transport.stream_key(&topic).unwrap();
            // Small entries, written in one script: the trim does not read them.
            env.command(
                "EVAL",
                vec![
                    "for i = 1, tonumber(ARGV[1]) do redis.call('XADD', KEYS[1], '*', 'f', 'v') end"
                        .into(),
                    1.into(),
                    stream.as_str().into(),
                    25_000.into(),
                ],
            )
            .await;
            env.command(
                "XGROUP",
                vec![
                    "CREATE".into(),
                    stream.as_str().into(),
                    "g".into(),
                    "$".into(),
                ],
            )
            .await;
            assert_eq!(len(&env, &stream).await, 25_000);

            StreamMaintenance::new(env.transport.clone(), [topic.clone()])
                .run_once()
                .await
                .unwrap();
            let left = len(&env, &stream).await;
            assert!(left <= ONE_NODE, "{left} entries left after one round");
        }),
    )
    .await;
    env.cleanup().await;
}

/// With a small limit: one `trim` removes at most that many; a round removes the events a group
/// handled and acknowledged, many times that, and none it has not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trim_stays_within_its_limit_and_a_round_goes_past_it() {
    let Some(env) = Env::with("trim-limit", |o| o.trim_limit(100)).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("audit");
            let stream = env.transport.stream_key(&topic).unwrap();
            let mut consumer = env
                .transport
                .consumer(&topic, "g", consumer_options(&format!("{}-c", env.id)))
                .await
                .unwrap();
            let events: Vec<_> = (1..=1_000).map(|n| event(None, n)).collect();
            env.transport.publish(&topic, &events).await.unwrap();
            // The group handles 900 and leaves the last 100 unread.
            let mut handled = 0;
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            while handled < 900 {
                assert!(tokio::time::Instant::now() < until, "handled {handled}");
                let batch = consumer.fetch(900 - handled).await.unwrap();
                handled += batch.len();
                let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
                consumer.ack(&ids).await.unwrap();
            }

            let first = env.transport.trim(&topic).await.unwrap();
            assert!(
                (1..=100).contains(&first.removed),
                "one call removed {}",
                first.removed
            );

            StreamMaintenance::new(env.transport.clone(), [topic.clone()])
                .run_once()
                .await
                .unwrap();
            let left = len(&env, &stream).await;
            assert!(
                (101..=101 + ONE_NODE).contains(&left),
                "{left} entries left after one round: the 100 unread ones and the last handled \
                 one (the group's last delivered entry, the bound) stay, and at most a node of \
                 the handled ones"
            );
            // Everything unread is still delivered.
            let mut rest = 0;
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            while rest < 100 {
                assert!(
                    tokio::time::Instant::now() < until,
                    "read {rest} of the rest"
                );
                rest += consumer.fetch(100).await.unwrap().len();
            }
        }),
    )
    .await;
    env.cleanup().await;
}
