//! An entry handed out `max_deliveries` times and never answered (its consumers crashed, or
//! let it go) is dead-lettered with that count, and its error says the same count; it is
//! counted in `cqrs_transport_dead_lettered_total` (no consume loop saw it go).

use crate::support::{Env, consumer_options, event, within};
use cqrs_core::ports::{Consumer, EventTransport};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_entry_is_dead_lettered_with_how_often_it_was_handed_out() {
    let Some(env) = Env::new("dead-unanswered").await else {
        return;
    };
    let counts = cqrs_core::testing::MetricCounts::default();
    let topic = env.topic("orders");
    within(
        30,
        Box::pin(counts.scope(async {
            let mut consumer = env
                .transport
                .redis_consumer(
                    &topic,
                    "billing",
                    consumer_options(&format!("{}-billing", env.id))
                        .redelivery_delay(Duration::from_millis(200))
                        .max_deliveries(2),
                )
                .await
                .unwrap();
            let unanswered = event(Some("k"), 1);
            env.transport
                .publish(&topic, std::slice::from_ref(&unanswered))
                .await
                .unwrap();
            // Taken and never acknowledged nor nacked, as by a consumer that crashes: it comes
            // back after the delay, until the group gives up on it.
            let mut attempts = Vec::new();
            let dead = loop {
                for d in consumer.fetch(10).await.unwrap() {
                    attempts.push(d.attempt);
                }
                let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
                if !dead.is_empty() {
                    break dead;
                }
            };
            assert_eq!(attempts, [1, 2], "handed out max_deliveries times");
            assert_eq!(dead.len(), 1, "{dead:#?}");
            assert_eq!(
                dead[0].record.as_ref().map(|r| r.event_id),
                Some(unanswered.event_id)
            );
            assert_eq!(dead[0].deliveries, 2, "{:#?}", dead[0]);
            assert_eq!(
                dead[0].error, "delivered 2 times without an acknowledgement",
                "the error counts what `deliveries` counts"
            );
        })),
    )
    .await;
    assert_eq!(
        counts.get(&format!(
            "cqrs_transport_dead_lettered_total{{topic={topic},group=billing,transport=redis,reason=max_deliveries}}"
        )),
        1,
        "{:?}",
        counts.series()
    );
    env.cleanup().await;
}
