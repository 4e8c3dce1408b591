//! Two workers run the core's `consume_until_shutdown` on one group, each handling up to four
//! keys at once, and fail every first attempt of some events: every event takes effect exactly
//! once in the end, each key's events in publish order, and keys really ran in parallel.
//! With `CQRS_LONG=1` it is a soak: 100 times the events, with as much more time.

use crate::support::{Env, assert_each_key_in_order, event, within};
use cqrs_core::ports::EventTransport;
use cqrs_core::projection::{ConsumeLoop, Handled, consume_until_shutdown};
use cqrs_core::runtime::{HealthReporter, Shutdown, WorkerContext};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many events: 200, or 20,000 for the soak.
fn events() -> u64 {
    if cqrs_core::testing::long() {
        20_000
    } else {
        200
    }
}

/// How long they may take.
fn limit() -> Duration {
    Duration::from_secs(if cqrs_core::testing::long() { 1800 } else { 60 })
}
const KEYS: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

#[derive(Default)]
struct Seen {
    /// Per key, the events that took effect, in the order they did.
    applied: BTreeMap<String, Vec<u64>>,
    /// Per key, whether a handler of it is running now.
    running: BTreeMap<String, bool>,
    /// Two handlers of one key at once: the chain rule broken.
    overlaps: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_loops_keep_each_keys_order_while_handling_keys_in_parallel() {
    let Some(env) = Env::new("loops").await else {
        return;
    };
    within(
        limit().as_secs() + 30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let total = events();
            let events: Vec<_> = (1..=total)
                .map(|n| event(Some(KEYS[(n as usize * 5 / 3) % KEYS.len()]), n))
                .collect();
            for chunk in events.chunks(200) {
                env.transport.publish(&topic, chunk).await.unwrap();
            }

            let seen: Arc<Mutex<Seen>> = Arc::default();
            let (in_parallel, most_in_parallel) =
                (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let (stop, shutdown) = Shutdown::new();
            let mut workers = Vec::new();
            for name in ["w1", "w2"] {
                let mut consumer = env
                    // The loop keeps its batch alive every third of this; a loaded machine's
                    // stall of two thirds would hand a key still being handled to the other
                    // worker, so not a short one.
                    .join(&topic, name, |o| o.redelivery_delay(Duration::from_secs(2)))
                    .await;
                let ctx = WorkerContext::new(shutdown.clone(), HealthReporter::detached(name));
                let (seen, in_parallel, most) =
                    (seen.clone(), in_parallel.clone(), most_in_parallel.clone());
                workers.push(tokio::spawn(async move {
                    let handle = |d: cqrs_core::ports::Delivery| {
                        let (seen, in_parallel, most) = (&seen, &in_parallel, &most);
                        async move {
                            let key = d.record.partition_key.clone().unwrap_or_default();
                            let n = d.record.payload["n"].as_u64().unwrap();
                            {
                                let mut seen = seen.lock().unwrap();
                                let was_running = seen.running.insert(key.clone(), true);
                                if was_running == Some(true) {
                                    seen.overlaps.push(format!("{key} at n = {n}"));
                                }
                            }
                            let now = in_parallel.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            in_parallel.fetch_sub(1, Ordering::SeqCst);
                            let mut seen = seen.lock().unwrap();
                            seen.running.insert(key.clone(), false);
                            // Every seventh event fails its first attempt.
                            if d.attempt == 1 && n.is_multiple_of(7) {
                                return Handled::Retry(format!("event {n} failed once"));
                            }
                            let list = seen.applied.entry(key).or_default();
                            if !list.contains(&n) {
                                list.push(n);
                            }
                            Handled::Done
                        }
                    };
                    consume_until_shutdown(
                        consumer.as_mut(),
                        &ctx,
                        ConsumeLoop::default().batch(16).concurrency(4),
                        handle,
                    )
                    .await
                }));
            }

            let until = tokio::time::Instant::now() + limit();
            loop {
                let done = seen
                    .lock()
                    .unwrap()
                    .applied
                    .values()
                    .map(Vec::len)
                    .sum::<usize>();
                if done as u64 >= total {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "only {done} of {total} events took effect in {:?}",
                    limit()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.trigger();
            for worker in workers {
                worker.await.unwrap().unwrap();
            }

            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(
                dead.is_empty(),
                "nothing dead-lettered (max deliveries 10, one failure each): {dead:#?}"
            );
            let seen = seen.lock().unwrap();
            assert!(
                seen.overlaps.is_empty(),
                "two events of one key at once: {:?}",
                seen.overlaps
            );
            assert_each_key_in_order(&events, &seen.applied);
            assert!(
                most_in_parallel.load(Ordering::SeqCst) > 1,
                "keys were handled in parallel"
            );
        }),
    )
    .await;
    env.cleanup().await;
}
