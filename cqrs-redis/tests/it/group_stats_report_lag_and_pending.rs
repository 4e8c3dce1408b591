//! `topic_stats` reports the stream length, and per group the pending entries and the lag
//! (entries not delivered yet), for metrics; `prune_consumers` deletes idle consumers without
//! pending entries only.

use crate::support::{Env, consumer_options, event, within};
use cqrs_core::ports::EventTransport;
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
