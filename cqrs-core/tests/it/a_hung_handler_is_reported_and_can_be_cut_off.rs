//! A handler or a projection that never finishes: its batch is kept alive for ever, so the
//! worker reports the stall once the batch runs past its bound, and, with a timeout set, the
//! hung delivery is cancelled and handed back while the other keys' events go through.

use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::memory::{InMemoryProjectionStore, InMemoryTransport, InMemoryUnit};
use cqrs_core::ports::{ConsumerOptions, EventTransport};
use cqrs_core::projection::{ConsumeLoop, EventBusConsumer, Projection, ProjectionRunner};
use cqrs_core::runtime::{Health, Runtime};
use cqrs_core::testing::eventually;
use cqrs_core::{
    EventBus, EventContext, EventEnvelope, EventHandler, EventRecord, EventTypes, HandlerError,
    Metadata,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sum 1 (key `a`) hangs for ever; sums 2 and 3 (keys `b`, `c`) are handled at once.
fn published() -> Vec<EventRecord> {
    [(1, "a"), (2, "b"), (3, "c")]
        .into_iter()
        .map(|(sum, key)| {
            let envelope =
                EventEnvelope::new(Added { sum }, Metadata::new()).with_partition_key(key);
            EventRecord::from_envelope(&envelope).unwrap()
        })
        .collect()
}

fn options() -> ConsumerOptions {
    ConsumerOptions::default()
        .block(Duration::from_millis(50))
        .redelivery_delay(Duration::from_millis(300))
}

/// Hangs on sum 1; records every other sum it handles, and counts its tries of sum 1.
#[derive(Clone, Default)]
struct Hangs {
    hung: Arc<AtomicUsize>,
    handled: Arc<Mutex<Vec<u64>>>,
}

impl Hangs {
    async fn handle(&self, sum: u64) {
        if sum == 1 {
            self.hung.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.handled.lock().unwrap().push(sum);
    }

    fn handled(&self) -> Vec<u64> {
        let mut handled = self.handled.lock().unwrap().clone();
        handled.sort();
        handled
    }
}

#[async_trait]
impl EventHandler<Added> for Hangs {
    async fn handle(&self, event: &Added, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        Hangs::handle(self, event.sum).await;
        Ok(())
    }

    fn name(&self) -> &str {
        "hangs"
    }
}

#[async_trait]
impl Projection<InMemoryProjectionStore> for Hangs {
    fn name(&self) -> &str {
        "hangs"
    }

    async fn apply(
        &self,
        _unit: &mut InMemoryUnit,
        event: &EventEnvelope,
    ) -> Result<(), HandlerError> {
        if let Some(added) = event.downcast_ref::<Added>() {
            Hangs::handle(self, added.sum).await;
        }
        Ok(())
    }

    async fn reset(&self, _unit: &mut InMemoryUnit) -> Result<(), HandlerError> {
        Ok(())
    }
}

async fn bus_consumer(hangs: &Hangs, consume: ConsumeLoop) -> (Runtime, Arc<InMemoryTransport>) {
    let transport = Arc::new(InMemoryTransport::new());
    transport.publish("adds", &published()).await.unwrap();
    let bus = EventBus::builder().handler(hangs.clone()).build().unwrap();
    let runtime = Runtime::builder()
        .worker(
            EventBusConsumer::new(bus, transport.clone(), "adds", "bus", options())
                .consume_loop(consume),
        )
        .start();
    (runtime, transport)
}

async fn runner(
    hangs: &Hangs,
    configure: impl FnOnce(
        ProjectionRunner<InMemoryProjectionStore, Hangs>,
    ) -> ProjectionRunner<InMemoryProjectionStore, Hangs>,
) -> (Runtime, Arc<InMemoryTransport>) {
    let transport = Arc::new(InMemoryTransport::new());
    transport.publish("adds", &published()).await.unwrap();
    let mut types = EventTypes::new();
    types.register::<Added>();
    let runner = ProjectionRunner::from_transport(
        Arc::new(InMemoryProjectionStore::new()),
        Arc::new(hangs.clone()),
        transport.clone(),
        "adds",
        "hangs",
        options(),
        Arc::new(types),
    );
    let runtime = Runtime::builder().worker(configure(runner)).start();
    (runtime, transport)
}

/// A runtime running a store-fed runner of [`Hangs`] over the published events, in one
/// stream, configured by `configure`.
async fn store_fed(
    configure: impl FnOnce(
        ProjectionRunner<InMemoryProjectionStore, Hangs>,
    ) -> ProjectionRunner<InMemoryProjectionStore, Hangs>,
) -> Runtime {
    let events = Arc::new(cqrs_core::memory::InMemoryEventStore::new());
    cqrs_core::ports::EventStore::append(
        &*events,
        "adds",
        cqrs_core::ports::ExpectedVersion::Any,
        published(),
    )
    .await
    .unwrap();
    let mut types = EventTypes::new();
    types.register::<Added>();
    let runner = ProjectionRunner::from_store(
        Arc::new(InMemoryProjectionStore::new()),
        Arc::new(Hangs::default()),
        events,
        Arc::new(types),
    );
    Runtime::builder().worker(configure(runner)).start()
}

/// The worker's health once it is unhealthy with a stall report, within a deadline.
async fn reports_a_stall(runtime: &Runtime, worker: &str) -> String {
    eventually(
        Duration::from_secs(10),
        "the worker reports the stalled batch",
        || async {
            match &runtime.health().await.components[worker].0 {
                Health::Unhealthy(reason) if reason.contains("has been running since") => {
                    Some(reason.clone())
                }
                _ => None,
            }
        },
    )
    .await
}

/// A hung event-bus handler, kept alive for ever, turns the consumer unhealthy once its
/// batch runs past `stall_after`, with a message saying since when it has been running.
#[test]
fn a_hung_bus_handler_makes_the_consumer_unhealthy() {
    run_paused(|| async {
        let hangs = Hangs::default();
        let consume = ConsumeLoop::default().stall_after(Duration::from_secs(2));
        let (runtime, _transport) = bus_consumer(&hangs, consume).await;
        let reason = reports_a_stall(&runtime, "event-bus:adds:bus").await;
        assert!(reason.contains("past the stall bound of 2s"), "{reason}");
        assert_eq!(hangs.handled(), [2, 3], "the other keys were handled");
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}

/// With a handler timeout, the hung delivery is cancelled and handed back (tried again), and
/// the other keys' deliveries of its batch are acknowledged.
#[test]
fn a_bus_handler_past_its_timeout_is_retried_and_its_batch_mates_acknowledged() {
    run_paused(|| async {
        let hangs = Hangs::default();
        let consume = ConsumeLoop::default().handler_timeout(Duration::from_secs(1));
        let (runtime, transport) = bus_consumer(&hangs, consume).await;
        eventually(
            Duration::from_secs(10),
            "the hung event is tried again and only it is left",
            || async {
                (hangs.hung.load(Ordering::SeqCst) >= 2 && transport.backlog("adds", "bus") == 1)
                    .then_some(())
            },
        )
        .await;
        assert_eq!(hangs.handled(), [2, 3]);
        assert!(transport.dead_letters("adds", "bus").is_empty());
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}

/// A store-fed runner has no dead letters: an `apply` that times out every time holds it on
/// that event for good, so once no batch has succeeded for `stall_after` it is unhealthy,
/// not merely degraded.
#[test]
fn a_store_fed_runner_stuck_on_an_event_that_times_out_becomes_unhealthy() {
    run_paused(|| async {
        let runtime = store_fed(|r| {
            r.apply_timeout(Duration::from_millis(200))
                .stall_after(Duration::from_secs(2))
        })
        .await;
        let reason = eventually(
            Duration::from_secs(10),
            "the runner reports that no batch succeeds",
            || async {
                match &runtime.health().await.components["hangs"].0 {
                    Health::Unhealthy(reason) if reason.contains("batches keep failing") => {
                        Some(reason.clone())
                    }
                    _ => None,
                }
            },
        )
        .await;
        assert!(
            reason.contains("apply_timeout") || reason.contains("apply did not finish"),
            "{reason}"
        );
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}

/// An `apply_timeout` longer than `stall_after`: the stall report (the batch runs past its
/// bound) is followed, when the batch times out, by "no batch has succeeded" counted from the
/// run's start, never by a merely degraded report in between.
#[test]
fn a_store_fed_runner_reported_stalled_stays_unhealthy_when_its_batch_times_out() {
    run_paused(|| async {
        let runtime = store_fed(|r| {
            r.apply_timeout(Duration::from_secs(3))
                .stall_after(Duration::from_secs(2))
        })
        .await;
        let stalled = std::sync::atomic::AtomicBool::new(false);
        eventually(
            Duration::from_secs(20),
            "the timed-out batch is reported as no batch succeeding",
            || async {
                match &runtime.health().await.components["hangs"].0 {
                    Health::Unhealthy(reason) if reason.contains("batches keep failing") => {
                        Some(())
                    }
                    // The stall report's own wording (the runner's), not any other
                    // unhealthy report.
                    Health::Unhealthy(reason)
                        if reason.contains("has been running since")
                            && reason.contains("past the stall bound of 2s") =>
                    {
                        stalled.store(true, Ordering::SeqCst);
                        None
                    }
                    Health::Degraded(reason) if stalled.load(Ordering::SeqCst) => {
                        panic!("degraded after the stall report: {reason}")
                    }
                    _ => None,
                }
            },
        )
        .await;
        assert!(
            stalled.load(Ordering::SeqCst),
            "the stall was reported first"
        );
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}

/// A transport-fed projection whose `apply` hangs turns the runner unhealthy once its batch
/// runs past `stall_after`.
#[test]
fn a_hung_projection_makes_its_runner_unhealthy() {
    run_paused(|| async {
        let hangs = Hangs::default();
        let (runtime, _transport) = runner(&hangs, |r| r.stall_after(Duration::from_secs(2))).await;
        let reason = reports_a_stall(&runtime, "hangs").await;
        assert!(reason.contains("past the stall bound of 2s"), "{reason}");
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}

/// With an apply timeout, the hung event is cancelled and handed back (tried again), and the
/// other keys' events take effect and are acknowledged.
#[test]
fn a_projection_past_its_apply_timeout_is_retried_and_the_other_keys_go_on() {
    run_paused(|| async {
        let hangs = Hangs::default();
        let (runtime, transport) = runner(&hangs, |r| {
            r.batch_size(1).apply_timeout(Duration::from_secs(1))
        })
        .await;
        eventually(
            Duration::from_secs(10),
            "the hung event is tried again and only it is left",
            || async {
                (hangs.hung.load(Ordering::SeqCst) >= 2 && transport.backlog("adds", "hangs") == 1)
                    .then_some(())
            },
        )
        .await;
        assert_eq!(hangs.handled(), [2, 3]);
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}
