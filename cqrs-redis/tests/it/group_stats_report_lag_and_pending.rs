//! `topic_stats` reports the stream length, and per group the pending entries and the lag
//! (entries not delivered yet), for metrics; `prune_consumers` deletes idle consumers without
//! pending entries only.

use crate::support::{Env, consumer_options, event, within};
use cqrs_core::ports::EventTransport;
use fred::interfaces::StreamsInterface;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_stats_report_lag_and_pending() {
    let Some(env) = Env::new("stats").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("metrics");
            assert_eq!(
                env.transport.topic_stats(&topic).await.unwrap(),
                Default::default()
            );
            let mut consumer = env
                .transport
                .consumer(&topic, "g", consumer_options(&format!("{}-c", env.id)))
                .await
                .unwrap();
            let events: Vec<_> = (1..=5).map(|n| event(None, n)).collect();
            env.transport.publish(&topic, &events).await.unwrap();
            let mut got = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while got.len() < 2 && tokio::time::Instant::now() < until {
                got.extend(consumer.fetch(2 - got.len()).await.unwrap());
            }
            assert_eq!(got.len(), 2);

            let stats = env.transport.topic_stats(&topic).await.unwrap();
            assert_eq!(stats.length, 5);
            assert_eq!(stats.dead_letters, 0);
            let group = &stats.groups[0];
            assert_eq!((group.name.as_str(), group.consumers), ("g", 1));
            assert_eq!(group.pending, 2, "delivered, not acknowledged");
            assert_eq!(group.lag, Some(3), "not delivered yet");

            let pruned = env
                .transport
                .prune_consumers(&topic, "g", Duration::ZERO)
                .await
                .unwrap();
            assert!(
                pruned.is_empty(),
                "a consumer with pending entries stays: {pruned:?}"
            );
            let ids: Vec<_> = got.iter().map(|d| d.id.clone()).collect();
            consumer.ack(&ids).await.unwrap();
            let stats = env.transport.topic_stats(&topic).await.unwrap();
            assert_eq!(stats.groups[0].pending, 0);
            drop(consumer);
            let pruned = env
                .transport
                .prune_consumers(&topic, "g", Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(pruned, [format!("{}-c", env.id)]);
        }),
    )
    .await;
    env.cleanup().await;
}

/// A topic whose stream is gone while its dead letters remain (deleted by hand, or lost by a
/// server restart) reports zero entries and its dead letters, not an error; and maintenance
/// keeps going over the other topics when one of them fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_maintenance_carry_on_past_a_broken_topic() {
    let Some(env) = Env::new("stats-gone").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let (gone, fine) = (env.topic("gone"), env.topic("fine"));
            let dead_key = format!("{}:{{{gone}}}:dead", crate::support::key_prefix(&env.id));
            let _: String = env
                .admin
                .xadd(dead_key.as_str(), false, None, "*", ("error", "by hand"))
                .await
                .unwrap();
            let stats = env.transport.topic_stats(&gone).await.unwrap();
            assert_eq!((stats.length, stats.dead_letters), (0, 1));
            assert!(stats.groups.is_empty());

            // A consumer of `fine` that handled everything, then went away: maintenance prunes
            // it, even though the topic listed before `fine` cannot be maintained.
            let name = format!("{}-c", env.id);
            let consumer = env
                .transport
                .consumer(&fine, "g", consumer_options(&name))
                .await
                .unwrap();
            drop(consumer);
            let maintenance =
                cqrs_redis::StreamMaintenance::new(env.transport.clone(), ["}broken", &fine])
                    .consumer_idle(Duration::ZERO);
            let error = maintenance.run_once().await.expect_err("the broken topic");
            assert!(error.to_string().contains("}broken"), "{error}");
            let stats = env.transport.topic_stats(&fine).await.unwrap();
            assert_eq!(stats.groups[0].consumers, 0, "pruned");
        }),
    )
    .await;
    env.cleanup().await;
}
