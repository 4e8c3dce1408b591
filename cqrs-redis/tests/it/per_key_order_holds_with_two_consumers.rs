//! Two consumers of one group handle 120 events of 4 keys concurrently, failing now and then:
//! each key's events take effect in publish order, and the events of one key in flight at one
//! time are all in one batch of one consumer (a chain, handled in order), with exact per-key
//! lanes and with few shared lanes.

use crate::support::{Env, assert_each_key_in_order, event, n_of, within};
use cqrs_core::ports::EventTransport;
use cqrs_redis::KeyOrdering;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_with_two_consumers_and_exact_lanes() {
    order_holds(KeyOrdering::Exact, "order_exact").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_with_two_consumers_and_shared_lanes() {
    order_holds(KeyOrdering::Lanes(2), "order_lanes").await;
}

#[derive(Default)]
struct Seen {
    applied: BTreeMap<String, Vec<u64>>,
    /// Per key, the batch (consumer, batch number) its in-flight events came in, and how many.
    in_flight: HashMap<String, ((&'static str, u64), usize)>,
    overlaps: Vec<String>,
}

async fn order_holds(ordering: KeyOrdering, name: &str) {
    let Some(env) = Env::with(name, |o| o.key_ordering(ordering)).await else {
        return;
    };
    within(
        90,
        Box::pin(async {
            let topic = env.topic("tickets");
            let keys = ["a", "b", "c", "d"];
            let events: Vec<_> = (1..=120)
                .map(|n| event(Some(keys[(n as usize * 7 / 3) % 4]), n))
                .collect();
            let seen: Arc<Mutex<Seen>> = Arc::default();
            let mut tasks = Vec::new();
            for consumer_name in ["a", "b"] {
                let mut consumer = env
                    // Long enough that a loaded machine's stall between a fetch and its
                    // acks does not hand entries still being handled to the other consumer
                    // (nothing here keeps them alive), short enough for the nacked ones.
                    .join(&topic, consumer_name, |o| {
                        o.redelivery_delay(Duration::from_secs(2))
                    })
                    .await;
                let seen = seen.clone();
                tasks.push(tokio::spawn(async move {
                    let until = tokio::time::Instant::now() + Duration::from_secs(60);
                    let (mut turn, mut batches) = (0u64, 0u64);
                    while tokio::time::Instant::now() < until {
                        if seen
                            .lock()
                            .unwrap()
                            .applied
                            .values()
                            .map(Vec::len)
                            .sum::<usize>()
                            >= 120
                        {
                            break;
                        }
                        let batch = consumer.fetch(8).await.unwrap();
                        batches += 1;
                        let this = (consumer_name, batches);
                        {
                            let seen = &mut *seen.lock().unwrap();
                            for d in &batch {
                                let key = d.record.partition_key.clone().unwrap();
                                let (from, count) =
                                    seen.in_flight.entry(key.clone()).or_insert((this, 0));
                                if *count > 0 && *from != this {
                                    seen.overlaps.push(format!("{key} at n = {}", n_of(d)));
                                }
                                *from = this;
                                *count += 1;
                            }
                        }
                        // Chains whose delivery failed: the rest is handed back unhandled.
                        let mut broken = std::collections::HashSet::new();
                        for d in batch {
                            turn += 1;
                            // Let the other consumer run in between.
                            tokio::task::yield_now().await;
                            let key = d.record.partition_key.clone().unwrap();
                            let skip = d.order_key.as_ref().is_some_and(|k| broken.contains(k));
                            let fail = skip || (d.attempt == 1 && turn.is_multiple_of(4));
                            if fail {
                                broken.extend(d.order_key.clone());
                            }
                            {
                                let mut seen = seen.lock().unwrap();
                                seen.in_flight.get_mut(&key).unwrap().1 -= 1;
                                if !fail {
                                    let list = seen.applied.entry(key).or_default();
                                    if !list.contains(&n_of(&d)) {
                                        list.push(n_of(&d));
                                    }
                                }
                            }
                            if skip {
                                consumer.defer(std::slice::from_ref(&d.id)).await.unwrap();
                            } else if fail {
                                consumer.nack(&d.id).await.unwrap();
                            } else {
                                consumer.ack(std::slice::from_ref(&d.id)).await.unwrap();
                            }
                        }
                    }
                }));
            }
            env.transport.publish(&topic, &events).await.unwrap();
            for task in tasks {
                task.await.unwrap();
            }
            let seen = seen.lock().unwrap();
            assert!(
                seen.overlaps.is_empty(),
                "one key in flight in two batches at once: {:?}",
                seen.overlaps
            );
            assert_each_key_in_order(&events, &seen.applied);
        }),
    )
    .await;
    env.cleanup().await;
}
