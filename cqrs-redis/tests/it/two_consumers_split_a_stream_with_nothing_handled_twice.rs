//! Two consumers of one group, fetching concurrently, split 200 events (keyed and unkeyed):
//! every event is handled exactly once when nothing fails, and both consumers get work.

use crate::support::{Env, event, within};
use cqrs_core::ports::EventTransport;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_split_a_stream_with_nothing_handled_twice() {
    let Some(env) = Env::new("split").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let events: Vec<_> = (1..=200)
                .map(|n| {
                    let key = format!("k{}", n % 20);
                    event((n % 5 != 0).then_some(key.as_str()), n)
                })
                .collect();
            let handled: Arc<Mutex<HashMap<Uuid, Vec<&'static str>>>> = Arc::default();
            let mut tasks = Vec::new();
            for name in ["a", "b"] {
                let mut consumer = env
                    .join(&topic, name, |o| o.redelivery_delay(Duration::from_secs(5)))
                    .await;
                let handled = handled.clone();
                tasks.push(tokio::spawn(async move {
                    let until = tokio::time::Instant::now() + Duration::from_secs(30);
                    while tokio::time::Instant::now() < until {
                        if handled.lock().unwrap().len() >= 200 {
                            break;
                        }
                        let batch = consumer.fetch(10).await.expect("fetch");
                        {
                            let mut handled = handled.lock().unwrap();
                            for d in &batch {
                                handled.entry(d.record.event_id).or_default().push(name);
                            }
                        }
                        let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
                        consumer.ack(&ids).await.expect("ack");
                    }
                }));
            }
            for chunk in events.chunks(50) {
                env.transport.publish(&topic, chunk).await.expect("publish");
            }
            for task in tasks {
                task.await.expect("consumer task");
            }
            {
                let handled = handled.lock().unwrap();
                let missing: Vec<_> = events
                    .iter()
                    .filter(|e| !handled.contains_key(&e.event_id))
                    .map(|e| e.event_id)
                    .collect();
                let twice: Vec<_> = handled.iter().filter(|(_, by)| by.len() > 1).collect();
                assert!(missing.is_empty(), "never handled: {missing:?}");
                assert!(twice.is_empty(), "handled twice: {twice:?}");
                let by_a = handled.values().filter(|by| by[0] == "a").count();
                assert!(
                    by_a > 0 && by_a < 200,
                    "both consumers got work: a handled {by_a} of 200"
                );
            }
            let stats = env.transport.topic_stats(&topic).await.expect("stats");
            assert_eq!(stats.groups[0].pending, 0, "nothing left pending");
        }),
    )
    .await;
    env.cleanup().await;
}
