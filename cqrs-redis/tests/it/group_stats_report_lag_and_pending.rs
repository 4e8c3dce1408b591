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

/// A group left without a consumer (its last one pruned) that has entries it has not read
/// holds back trimming for good: maintenance names it, and its worker reports itself
/// degraded, until the group is deleted. A group without a consumer that has read
/// everything is no such group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_without_consumers_holding_back_trimming_is_reported() {
    use cqrs_core::runtime::{Health, HealthReporter, Shutdown, Worker, WorkerContext};
    use cqrs_redis::StreamMaintenance;
    let Some(env) = Env::new("stats-unread").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("metrics");
            let join = |group: &'static str| {
                env.transport.consumer(
                    &topic,
                    group,
                    consumer_options(&format!("{}-{group}", env.id)),
                )
            };
            let mut live = join("live").await.unwrap();
            drop(join("gone").await.unwrap());
            let events: Vec<_> = (1..=3).map(|n| event(None, n)).collect();
            env.transport.publish(&topic, &events).await.unwrap();
            let mut got = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while got.len() < 3 && tokio::time::Instant::now() < until {
                got.extend(live.fetch(3 - got.len()).await.unwrap());
            }
            let ids: Vec<_> = got.iter().map(|d| d.id.clone()).collect();
            live.ack(&ids).await.unwrap();

            // Consumers idle for no time at all are pruned: both groups are left without one.
            let maintenance = StreamMaintenance::new(env.transport.clone(), [topic.clone()])
                .consumer_idle(Duration::ZERO);
            maintenance.run_once().await.unwrap();
            let idle: Vec<(String, String, u64)> = maintenance
                .groups_without_consumers()
                .into_iter()
                .map(|idle| (idle.topic, idle.group, idle.unread))
                .collect();
            assert_eq!(
                idle,
                [(topic.clone(), "gone".to_owned(), 3)],
                "`live` read everything: it holds nothing back"
            );

            let (stop, shutdown) = Shutdown::new();
            let health = HealthReporter::detached("maintenance");
            let ctx = WorkerContext::new(shutdown, health.clone());
            let mut worker = StreamMaintenance::new(env.transport.clone(), [topic.clone()])
                .consumer_idle(Duration::ZERO)
                .interval(Duration::from_millis(20));
            let running = tokio::spawn(async move { worker.run(ctx).await });
            let reason = cqrs_core::testing::eventually(
                Duration::from_secs(10),
                "the worker reports the group",
                || {
                    let health = health.clone();
                    async move {
                        match health.get() {
                            Health::Degraded(reason) => Some(reason),
                            _ => None,
                        }
                    }
                },
            )
            .await;
            assert!(
                reason.contains("`gone`") && reason.contains("XGROUP DESTROY"),
                "{reason}"
            );

            let stream = env.transport.stream_key(&topic).unwrap();
            env.command(
                "XGROUP",
                vec!["DESTROY".into(), stream.as_str().into(), "gone".into()],
            )
            .await;
            cqrs_core::testing::eventually(
                Duration::from_secs(10),
                "healthy once the group is deleted",
                || {
                    let health = health.clone();
                    async move { (health.get() == Health::Healthy).then_some(()) }
                },
            )
            .await;
            stop.trigger();
            running.await.unwrap().unwrap();
            maintenance.run_once().await.unwrap();
            assert!(maintenance.groups_without_consumers().is_empty());
        }),
    )
    .await;
    env.cleanup().await;
}
