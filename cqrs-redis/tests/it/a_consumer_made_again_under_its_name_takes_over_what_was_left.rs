//! A consumer dropped without closing (a consume loop that returned on an error: its ack
//! failed, its fetch timed out) leaves what it handed out pending to its name. A consumer made
//! again under that name (the loop restarted with the same options) takes those entries over
//! at its first step: handed out again at once, with the delivery count their read gave them,
//! instead of waiting out the redelivery delay and being dead-lettered, unhandled, by the
//! reclaim that counts a second delivery (`max_deliveries(1)`).

use crate::support::{Env, consumer_options, event, n_of, within};
use cqrs_core::ports::EventTransport;
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_made_again_under_its_name_takes_over_what_was_left() {
    let Some(env) = Env::new("made-again").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("events");
            // Far longer than the test waits: only a takeover hands the entries out again.
            let delay = Duration::from_secs(120);
            let options = consumer_options(&format!("{}-c", env.id))
                .max_deliveries(1)
                .redelivery_delay(delay);
            let events = [event(Some("k"), 1), event(Some("k"), 2), event(None, 3)];
            env.transport.publish(&topic, &events).await.unwrap();

            let mut first = env
                .transport
                .consumer(&topic, "g", options.clone())
                .await
                .unwrap();
            let mut handed = Vec::new();
            let until = Instant::now() + Duration::from_secs(10);
            while handed.len() < events.len() && Instant::now() < until {
                handed.extend(first.fetch(10).await.unwrap().iter().map(n_of));
            }
            handed.sort_unstable();
            assert_eq!(handed, [1, 2, 3], "the first consumer got every event");
            drop(first);

            let mut again = env.transport.consumer(&topic, "g", options).await.unwrap();
            let mut taken_over = Vec::new();
            let until = Instant::now() + Duration::from_secs(10);
            while taken_over.len() < events.len() && Instant::now() < until {
                let batch = again.fetch(10).await.unwrap();
                taken_over.extend(batch.iter().map(|d| (n_of(d), d.attempt)));
                again
                    .ack(&batch.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
                    .await
                    .unwrap();
            }
            let position = |n: u64| taken_over.iter().position(|(m, _)| *m == n);
            assert!(
                position(1) < position(2),
                "key `k` in its order: {taken_over:?}"
            );
            taken_over.sort_unstable();
            assert_eq!(
                taken_over,
                [(1, 1), (2, 1), (3, 1)],
                "taken over at once, as their first delivery"
            );
            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
        }),
    )
    .await;
    env.cleanup().await;
}
