//! A consume loop whose connections are killed (`CLIENT KILL ID` of this test's own client
//! ids only) keeps going: its fetches fail for a moment, fred reconnects, and it handles what
//! was published after.

use crate::support::{Env, consumer_options, event, publish_until_ok, within};
use cqrs_core::ports::{Consumer, EventTransport};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_loop_recovers_when_its_connections_are_killed() {
    let Some(env) = Env::new("kill").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("events");
            let mut consumer = env
                .transport
                .redis_consumer(&topic, "g", consumer_options(&format!("{}-c", env.id)))
                .await
                .unwrap();
            let mut ids = consumer.client_ids().await.unwrap();
            ids.extend(env.transport.client_ids().await.unwrap());
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(
                ids.len(),
                2,
                "the consumer's own connection and the shared one"
            );

            let handled: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
            let errors = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let task = {
                let (handled, errors, stop) = (handled.clone(), errors.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        match consumer.fetch(10).await {
                            Ok(batch) => {
                                let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
                                handled
                                    .lock()
                                    .unwrap()
                                    .extend(batch.iter().map(|d| d.record.event_id));
                                // A failed ack only means a redelivery later; the set dedupes.
                                if consumer.ack(&ids).await.is_err() {
                                    errors.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            };

            let before: Vec<_> = (1..=5).map(|n| event(Some("k"), n)).collect();
            env.transport.publish(&topic, &before).await.unwrap();
            cqrs_core::testing::eventually(Duration::from_secs(10), "the first events", || {
                let done = before
                    .iter()
                    .all(|e| handled.lock().unwrap().contains(&e.event_id));
                async move { done.then_some(()) }
            })
            .await;

            // One CLIENT KILL per id: its filters combine with AND.
            let mut killed = 0;
            for id in &ids {
                let reply = env
                    .command("CLIENT", vec!["KILL".into(), "ID".into(), (*id).into()])
                    .await;
                killed += reply.as_u64().unwrap_or(0);
            }
            assert_eq!(killed, 2, "both connections killed");

            let after: Vec<_> = (6..=10).map(|n| event(Some("k"), n)).collect();
            for e in &after {
                publish_until_ok(|| env.transport.publish(&topic, std::slice::from_ref(e))).await;
            }
            cqrs_core::testing::eventually(
                Duration::from_secs(20),
                "the events published after",
                || {
                    let done = after
                        .iter()
                        .all(|e| handled.lock().unwrap().contains(&e.event_id));
                    async move { done.then_some(()) }
                },
            )
            .await;
            stop.store(true, Ordering::SeqCst);
            task.await.unwrap();

            let new_ids = env.transport.client_ids().await.unwrap();
            assert!(
                new_ids.iter().all(|id| !ids.contains(id)),
                "a new connection: {new_ids:?}"
            );
            eprintln!(
                "fetch or ack errors while reconnecting: {}",
                errors.load(Ordering::SeqCst)
            );
        }),
    )
    .await;
    env.cleanup().await;
}
