//! Entries left pending by a consumer that crashed (here: a raw `XREADGROUP` by a consumer that
//! then vanished, and a consumer dropped without acknowledging) reach another consumer of the
//! group after the redelivery delay, with their delivery counted.

use crate::support::{Env, consumer_options, event, n_of, within};
use cqrs_core::ports::EventTransport;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_consumers_entries_are_reclaimed_by_another() {
    let Some(env) = Env::new("reclaim").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("jobs");
            let stream = env.transport.stream_key(&topic).unwrap();
            let events: Vec<_> = (1..=6).map(|n| event(None, n)).collect();
            // The group exists before anyone reads.
            let survivor_options = consumer_options(&format!("{}-survivor", env.id));
            let mut survivor = env
                .transport
                .consumer(&topic, "g", survivor_options)
                .await
                .unwrap();
            env.transport.publish(&topic, &events).await.unwrap();

            // A process read three entries and died.
            env.read_as(&stream, "ghost", 3).await;
            // Another took the rest and was dropped without acknowledging.
            let mut crashed = env
                .transport
                .consumer(
                    &topic,
                    "g",
                    // Reclaims nothing: on a loaded machine the ghost's entries could sit
                    // idle past the tests' short delay before its first fetch.
                    consumer_options(&format!("{}-crashed", env.id))
                        .redelivery_delay(Duration::from_secs(3600)),
                )
                .await
                .unwrap();
            let mut taken = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while taken.len() < 3 && tokio::time::Instant::now() < until {
                taken.extend(crashed.fetch(10).await.unwrap());
            }
            assert_eq!(taken.iter().map(n_of).collect::<Vec<_>>(), [4, 5, 6]);
            drop(crashed);

            let mut reclaimed = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(15);
            while reclaimed.len() < 6 && tokio::time::Instant::now() < until {
                let batch = survivor.fetch(10).await.unwrap();
                let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
                survivor.ack(&ids).await.unwrap();
                reclaimed.extend(batch);
            }
            let mut numbers: Vec<_> = reclaimed.iter().map(n_of).collect();
            numbers.sort_unstable();
            assert_eq!(numbers, [1, 2, 3, 4, 5, 6], "every entry reclaimed once");
            assert!(
                reclaimed.iter().all(|d| d.attempt == 2),
                "each was delivered a second time: {:?}",
                reclaimed.iter().map(|d| d.attempt).collect::<Vec<_>>()
            );
            let pending = env
                .command("XPENDING", vec![stream.as_str().into(), "g".into()])
                .await
                .into_array();
            assert_eq!(
                pending.first().and_then(Value::as_u64),
                Some(0),
                "nothing pending"
            );
        }),
    )
    .await;
    env.cleanup().await;
}
