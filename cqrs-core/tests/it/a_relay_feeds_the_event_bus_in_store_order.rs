//! A relay to an `EventBusTransport` hands every stored event to the bus's handlers in the
//! store's order; a failed event is retried without handing the events before it to the bus
//! again, given up after `max_attempts` failures that count (never for one that says "not
//! now"), and events of a newer build wait for it while undecodable ones are skipped.

use crate::fixtures::*;
use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore};
use cqrs_core::ports::{ConsumerOptions, EventStore, EventTransport, TransportError};
use cqrs_core::projection::EventBusTransport;
use cqrs_core::relay::StoreRelay;
use cqrs_core::testing::MetricCounts;
use cqrs_core::{
    ErrorKind, EventBus, EventContext, EventHandler, EventRecord, ExpectedVersion, HandlerError,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records the sums it handled, in order; fails on a sum with the kind it is told to, as many
/// times as it is told to.
#[derive(Clone, Default)]
struct Recorder {
    handled: Arc<Mutex<Vec<u64>>>,
    calls: Arc<Mutex<Vec<u64>>>,
    fail: Arc<Mutex<HashMap<u64, (ErrorKind, u32)>>>,
    /// Sums it refuses for good (`HandlerError::permanent`), every time.
    refuse: Arc<Mutex<Vec<u64>>>,
}

impl Recorder {
    fn fail(&self, sum: u64, kind: ErrorKind, times: u32) {
        self.fail.lock().unwrap().insert(sum, (kind, times));
    }
    fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
    }
    fn calls(&self) -> Vec<u64> {
        self.calls.lock().unwrap().clone()
    }
}

#[cqrs_core::async_trait]
impl EventHandler<Added> for Recorder {
    async fn handle(&self, event: &Added, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push(event.sum);
        if self.refuse.lock().unwrap().contains(&event.sum) {
            let message = format!("refuses {} for good", event.sum);
            return Err(HandlerError::invalid("refused", message).permanent());
        }
        if let Some((kind, times)) = self.fail.lock().unwrap().get_mut(&event.sum)
            && *times > 0
        {
            *times -= 1;
            let message = format!("refuses {}", event.sum);
            return Err(HandlerError::new(*kind, "refused", message));
        }
        self.handled.lock().unwrap().push(event.sum);
        Ok(())
    }

    fn name(&self) -> &str {
        "recorder"
    }
}

struct Fed {
    store: Arc<InMemoryEventStore>,
    relay: StoreRelay<InMemoryProjectionStore>,
    recorder: Recorder,
}

fn fed(configure: impl FnOnce(EventBusTransport) -> EventBusTransport) -> Fed {
    let recorder = Recorder::default();
    let bus = EventBus::builder()
        .handler(recorder.clone())
        .build()
        .unwrap();
    let store = Arc::new(InMemoryEventStore::new());
    let relay = StoreRelay::new(
        "event-bus",
        store.clone(),
        Arc::new(InMemoryProjectionStore::new()),
        // One attempt per call, unless the test says otherwise: each `relay_once` is one.
        Arc::new(configure(
            EventBusTransport::new(bus).retry_within(Duration::ZERO),
        )),
        "event-bus",
    );
    Fed {
        store,
        relay,
        recorder,
    }
}

async fn append(store: &InMemoryEventStore, stream: &str, records: Vec<EventRecord>) {
    store
        .append(stream, ExpectedVersion::Any, records)
        .await
        .unwrap();
}

#[test]
fn events_reach_the_handlers_in_store_order_and_a_retry_hands_on_only_what_failed() {
    run(async {
        let fed = fed(|t| t);
        append(&fed.store, "a", vec![added(1), added(2)]).await;
        append(&fed.store, "b", vec![added(3)]).await;
        fed.recorder.fail(2, ErrorKind::Internal, 2);

        fed.relay.relay_once().await.unwrap_err();
        let error = fed.relay.relay_once().await.unwrap_err().to_string();
        assert!(
            error.contains("recorder") && error.contains("refuses 2"),
            "{error}"
        );
        assert_eq!(fed.relay.relay_once().await.unwrap(), 3);

        assert_eq!(fed.recorder.handled(), vec![1, 2, 3]);
        assert_eq!(
            fed.recorder.calls(),
            vec![1, 2, 2, 2, 3],
            "1 is not handed on again"
        );
        assert_eq!(fed.relay.relay_once().await.unwrap(), 0, "caught up");
    });
}

#[test]
fn an_event_failing_every_time_is_given_up_after_max_attempts_and_the_feed_goes_on() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let fed = fed(|t| t.max_attempts(3));
            append(&fed.store, "a", vec![added(1), added(2)]).await;
            fed.recorder.fail(1, ErrorKind::Invalid, u32::MAX);

            fed.relay.relay_once().await.unwrap_err();
            fed.relay.relay_once().await.unwrap_err();
            assert_eq!(
                counts.get("cqrs_event_bus_given_up_total{event_type=test.added}"),
                0
            );
            // Refused on the third: the relay skips it, and hands on the next.
            assert_eq!(fed.relay.relay_once().await.unwrap(), 2);

            assert_eq!(fed.recorder.calls(), vec![1, 1, 1, 2]);
            assert_eq!(fed.recorder.handled(), vec![2]);
            assert_eq!(
                counts.get("cqrs_event_bus_given_up_total{event_type=test.added}"),
                1
            );
            assert_eq!(
                counts.get(
                    "cqrs_events_skipped_total{relay=event-bus,event_type=test.added,reason=refused}"
                ),
                1
            );
            assert_eq!(fed.relay.relay_once().await.unwrap(), 0, "caught up");
        });
    });
}

/// An event its handler refuses permanently is given up at once, in the first call: no
/// attempt would mend it, so none is made again.
#[test]
fn an_event_refused_permanently_is_given_up_at_once() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let fed = fed(|t| t.max_attempts(3));
            append(&fed.store, "a", vec![added(1), added(2)]).await;
            fed.recorder.refuse.lock().unwrap().push(1);

            assert_eq!(fed.relay.relay_once().await.unwrap(), 2);
            assert_eq!(fed.recorder.calls(), vec![1, 2], "1 handed on once");
            assert_eq!(fed.recorder.handled(), vec![2]);
            assert_eq!(
                counts.get("cqrs_event_bus_given_up_total{event_type=test.added}"),
                1
            );
        });
    });
}

/// Runs the relay until it has caught up, failures and all; returns how many batches failed.
async fn until_caught_up(relay: &StoreRelay<InMemoryProjectionStore>) -> usize {
    let mut failed = 0;
    for _ in 0..50 {
        match relay.relay_once().await {
            Ok(0) => return failed,
            Ok(_) => {}
            Err(_) => failed += 1,
        }
    }
    panic!("not caught up after 50 batches");
}

#[test]
fn two_events_failing_in_one_batch_are_each_given_up_and_nothing_is_handed_on_twice() {
    run(async {
        let fed = fed(|t| t.max_attempts(2));
        append(
            &fed.store,
            "a",
            vec![added(1), added(2), added(3), added(4)],
        )
        .await;
        fed.recorder.fail(2, ErrorKind::Internal, u32::MAX);
        fed.recorder.fail(3, ErrorKind::Internal, u32::MAX);
        until_caught_up(&fed.relay).await;
        assert_eq!(fed.recorder.calls(), vec![1, 2, 2, 3, 3, 4]);
        assert_eq!(fed.recorder.handled(), vec![1, 4]);
    });
}

#[test]
fn the_relays_one_at_a_time_pass_around_an_undecodable_event_hands_nothing_on_twice() {
    run(async {
        let fed = fed(|t| t);
        let mut broken = added(9);
        broken.payload = serde_json::json!({"sum": "nine"});
        append(&fed.store, "a", vec![added(1), added(5), broken, added(3)]).await;
        // Its first call hands on 1 and 5, then fails on the broken event; the relay then
        // publishes the batch one event at a time, and the calls of 1 and 5 succeed at once.
        assert_eq!(fed.relay.relay_once().await.unwrap(), 4);
        assert_eq!(fed.recorder.calls(), vec![1, 5, 3]);
    });
}

#[test]
fn failures_that_say_not_now_are_retried_for_as_long_as_they_last() {
    run(async {
        let fed = fed(|t| t.max_attempts(1));
        append(&fed.store, "a", vec![added(1)]).await;
        fed.recorder.fail(1, ErrorKind::Unavailable, 5);
        for _ in 0..5 {
            let error = fed.relay.relay_once().await.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        }
        assert_eq!(fed.recorder.handled(), Vec::<u64>::new(), "not given up");
        assert_eq!(fed.relay.relay_once().await.unwrap(), 1);
        assert_eq!(fed.recorder.handled(), vec![1]);
    });
}

#[test]
fn a_newer_builds_event_waits_and_an_undecodable_one_is_skipped() {
    run(async {
        let fed = fed(|t| t);
        let mut newer = added(1);
        newer.schema_version += 1;
        append(&fed.store, "a", vec![newer]).await;
        let error = fed.relay.relay_once().await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        assert_eq!(fed.recorder.calls(), Vec::<u64>::new());

        // A feed of its own: this one waits at the newer event.
        let fed = self::fed(|t| t);
        let mut broken = added(2);
        broken.payload = serde_json::json!({"sum": "two"});
        append(&fed.store, "b", vec![broken, added(3)]).await;
        assert_eq!(
            fed.relay.relay_once().await.unwrap(),
            2,
            "the broken one skipped"
        );
        assert_eq!(fed.recorder.handled(), vec![3]);
    });
}

/// Under `UnknownEventPolicy::AwaitNewerBuild`, the feed passes over an event of a type
/// another part of this build reads and waits at one no part of it knows.
#[test]
fn under_await_newer_build_the_feed_waits_only_at_a_newer_builds_type() {
    #[derive(Clone, Debug, serde::Serialize, serde::Deserialize, cqrs_core::Event)]
    #[cqrs(name = "test.read_elsewhere_in_the_build")]
    struct ReadElsewhere {}

    run(async {
        let awaiting = |t: EventBusTransport| {
            let mut types = cqrs_core::EventTypes::new();
            types.unknown_events(cqrs_core::UnknownEventPolicy::AwaitNewerBuild);
            t.event_types(types)
        };
        let fed = fed(awaiting);
        let elsewhere = EventRecord::from_envelope(&cqrs_core::EventEnvelope::new(
            ReadElsewhere {},
            cqrs_core::Metadata::new(),
        ))
        .unwrap();
        let mut newer = added(2);
        newer.event_type = "test.from_a_newer_build".into();
        append(&fed.store, "a", vec![elsewhere, added(1), newer, added(3)]).await;
        let error = fed.relay.relay_once().await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        assert_eq!(
            fed.recorder.handled(),
            vec![1],
            "up to the newer build's event"
        );
        let error = fed.relay.relay_once().await.unwrap_err();
        assert_eq!(
            error.kind(),
            ErrorKind::Unavailable,
            "still waiting: {error}"
        );
        assert_eq!(fed.recorder.handled(), vec![1]);
    });
}

#[test]
fn types_no_handler_takes_are_passed_over_uncounted_and_nothing_consumes_it() {
    let counts = MetricCounts::default();
    let _recorder = metrics::set_default_local_recorder(&counts);
    run(async {
        let fed = fed(|t| t);
        let mut other = added(1);
        other.event_type = "test.nobody_handles_this".into();
        append(&fed.store, "a", vec![other, added(2)]).await;
        assert_eq!(fed.relay.relay_once().await.unwrap(), 2);
        assert_eq!(fed.recorder.handled(), vec![2]);
        assert_eq!(
            counts.get("cqrs_events_unknown_total{event_type=test.nobody_handles_this}"),
            0,
            "not counted as unknown: handled elsewhere"
        );

        let bus = EventBus::builder().build().unwrap();
        let error = EventBusTransport::new(bus)
            .consumer("event-bus", "g", ConsumerOptions::default())
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(&error, TransportError::Invalid(m) if m.contains("only publishes")),
            "{error}"
        );
    });
}

#[test]
fn a_given_up_event_replayed_once_its_cause_is_fixed_is_handed_on() {
    run(async {
        let recorder = Recorder::default();
        let bus = EventBus::builder()
            .handler(recorder.clone())
            .build()
            .unwrap();
        let transport = Arc::new(
            EventBusTransport::new(bus)
                .max_attempts(1)
                .retry_within(Duration::ZERO),
        );
        let store = Arc::new(InMemoryEventStore::new());
        let relay = |checkpoints| {
            StoreRelay::new(
                "event-bus",
                store.clone(),
                checkpoints,
                transport.clone(),
                "event-bus",
            )
        };
        append(&store, "a", vec![added(1), added(2)]).await;
        recorder.fail(1, ErrorKind::Invalid, 1);
        assert_eq!(
            until_caught_up(&relay(Arc::new(InMemoryProjectionStore::new()))).await,
            0
        );
        assert_eq!(recorder.handled(), vec![2], "1 given up");

        // The cause fixed, the operator replays from the start: a relay with no checkpoint.
        until_caught_up(&relay(Arc::new(InMemoryProjectionStore::new()))).await;
        assert_eq!(recorder.handled(), vec![2, 1, 2], "1 handed on this time");
    });
}

#[test]
fn a_call_hands_a_failing_event_on_again_after_pauses_until_it_passes_or_is_given_up() {
    run_paused(|| async {
        let fed = fed(|t| {
            t.retry_within(Duration::from_secs(15))
                .backoff(Duration::from_millis(100), Duration::from_secs(2))
                .max_attempts(4)
        });
        append(&fed.store, "a", vec![added(1), added(2), added(3)]).await;
        fed.recorder.fail(1, ErrorKind::Internal, 2);
        fed.recorder.fail(2, ErrorKind::Internal, u32::MAX);
        let started = tokio::time::Instant::now();
        // One batch: 1 passes on its third attempt, 2 is given up on its fourth (refused, so
        // the relay skips it in its one-at-a-time pass), 3 passes.
        assert_eq!(fed.relay.relay_once().await.unwrap(), 3);
        assert_eq!(fed.recorder.calls(), vec![1, 1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(fed.recorder.handled(), vec![1, 3]);
        // Paused 100 + 200 ms for 1, then 100 + 200 + 400 ms for 2.
        assert_eq!(started.elapsed(), Duration::from_millis(1_000));
    });
}

#[test]
fn a_failure_that_lasts_past_retry_within_fails_the_call() {
    run_paused(|| async {
        let fed = fed(|t| {
            t.retry_within(Duration::from_secs(1))
                .backoff(Duration::from_millis(100), Duration::from_secs(2))
        });
        append(&fed.store, "a", vec![added(1)]).await;
        fed.recorder.fail(1, ErrorKind::Unavailable, 5);
        let error = fed.relay.relay_once().await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        // Attempts at 0, 100, 300 and 700 ms; the next would start past 1 s.
        assert_eq!(fed.recorder.calls(), vec![1, 1, 1, 1]);
        // The next call: its first attempt fails a fifth time, its second passes.
        assert_eq!(fed.relay.relay_once().await.unwrap(), 1);
        assert_eq!(fed.recorder.calls(), vec![1; 6]);
    });
}

#[test]
fn its_health_check_is_degraded_while_an_event_is_handed_on_again() {
    use cqrs_core::runtime::{Health, HealthCheck};
    run_paused(|| async {
        let recorder = Recorder::default();
        let bus = EventBus::builder()
            .handler(recorder.clone())
            .build()
            .unwrap();
        let transport = Arc::new(EventBusTransport::new(bus));
        let store = Arc::new(InMemoryEventStore::new());
        let relay = relay_to(&store, transport.clone());
        append(&store, "a", vec![added(1)]).await;
        recorder.fail(1, ErrorKind::Unavailable, 3);
        assert_eq!(transport.check().await, Health::Healthy);
        // Checked during the pause after the first failure.
        let during = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            transport.check().await
        };
        let (shipped, during) = tokio::join!(relay.relay_once(), during);
        assert!(
            matches!(&during, Health::Degraded(reason) if reason.contains("refuses 1")),
            "{during:?}"
        );
        assert_eq!(shipped.unwrap(), 1);
        assert_eq!(transport.check().await, Health::Healthy, "through");

        // A call dropped while it hands an event on again (a relay's publish timeout) leaves
        // nothing reported.
        append(&store, "a", vec![added(2)]).await;
        recorder.fail(2, ErrorKind::Unavailable, u32::MAX);
        let cut = tokio::time::timeout(Duration::from_millis(50), relay.relay_once()).await;
        assert!(cut.is_err(), "cut short while it pauses");
        assert_eq!(
            transport.check().await,
            Health::Healthy,
            "nothing left reported"
        );
    });
}

/// A second [`Recorder`], under another name.
#[derive(Clone, Default)]
struct Also(Recorder);

#[cqrs_core::async_trait]
impl EventHandler<Added> for Also {
    async fn handle(&self, event: &Added, ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.0.handle(event, ctx).await
    }

    fn name(&self) -> &str {
        "also"
    }
}

/// A relay to a bus of two handlers, `recorder` and `also` (with a layer when `layered`, so
/// the retry goes through the bus's service), over `store`, with the transport as configured.
fn two_handlers(
    store: &Arc<InMemoryEventStore>,
    layered: bool,
    configure: impl FnOnce(EventBusTransport) -> EventBusTransport,
) -> (
    StoreRelay<InMemoryProjectionStore>,
    Recorder,
    Also,
    Arc<EventBusTransport>,
) {
    let (recorder, also) = (Recorder::default(), Also::default());
    let builder = EventBus::builder()
        .handler(recorder.clone())
        .handler(also.clone());
    let bus = if layered {
        builder
            .layer(cqrs_core::middleware::TracingLayer::new())
            .build()
    } else {
        builder.build()
    }
    .unwrap();
    let transport = Arc::new(configure(EventBusTransport::new(bus)));
    (
        relay_to(store, transport.clone()),
        recorder,
        also,
        transport,
    )
}

/// A relay `event-bus` from `store` to `transport`, starting with no checkpoint.
fn relay_to(
    store: &Arc<InMemoryEventStore>,
    transport: Arc<EventBusTransport>,
) -> StoreRelay<InMemoryProjectionStore> {
    StoreRelay::new(
        "event-bus",
        store.clone(),
        Arc::new(InMemoryProjectionStore::new()),
        transport,
        "event-bus",
    )
}

/// An event one handler fails on is handed again to that handler alone, on a bare bus and on a
/// layered one: within a call's retries and in the relay's later calls alike. The handler that
/// took it is not asked twice.
#[test]
fn only_the_handlers_that_failed_get_the_event_again() {
    run_paused(|| async {
        for layered in [false, true] {
            // Across calls: one attempt each.
            let store = Arc::new(InMemoryEventStore::new());
            let (relay, recorder, also, _) =
                two_handlers(&store, layered, |t| t.retry_within(Duration::ZERO));
            append(&store, "a", vec![added(1), added(2)]).await;
            also.0.fail(1, ErrorKind::Internal, 2);
            let error = relay.relay_once().await.unwrap_err().to_string();
            assert!(
                error.contains("also") && !error.contains("recorder"),
                "{error}"
            );
            relay.relay_once().await.unwrap_err();
            assert_eq!(relay.relay_once().await.unwrap(), 2);
            assert_eq!(recorder.calls(), vec![1, 2], "layered: {layered}");
            assert_eq!(also.0.calls(), vec![1, 1, 1, 2], "layered: {layered}");

            // Within one call: its retries after pauses.
            let store = Arc::new(InMemoryEventStore::new());
            let (relay, recorder, also, _) = two_handlers(&store, layered, |t| {
                t.retry_within(Duration::from_secs(15))
                    .backoff(Duration::from_millis(100), Duration::from_secs(2))
            });
            append(&store, "a", vec![added(1), added(2)]).await;
            also.0.fail(1, ErrorKind::Internal, 2);
            assert_eq!(relay.relay_once().await.unwrap(), 2);
            assert_eq!(recorder.calls(), vec![1, 2], "layered: {layered}");
            assert_eq!(also.0.calls(), vec![1, 1, 1, 2], "layered: {layered}");
        }
    });
}

/// What the handlers that failed are owed is forgotten on a replay (the checkpoint moved
/// back): every handler gets the replayed events, the one that had taken the failed event
/// too.
#[test]
fn a_replay_hands_the_events_to_every_handler_again() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let (relay, recorder, also, transport) =
            two_handlers(&store, false, |t| t.retry_within(Duration::ZERO));
        append(&store, "a", vec![added(1), added(2)]).await;
        assert_eq!(relay.relay_once().await.unwrap(), 2);
        append(&store, "a", vec![added(3)]).await;
        also.0.fail(3, ErrorKind::Internal, 1);
        relay.relay_once().await.unwrap_err();
        assert_eq!(
            (recorder.calls(), also.0.calls()),
            (vec![1, 2, 3], vec![1, 2, 3])
        );

        // The operator replays from the start: a relay with no checkpoint, the same transport.
        assert_eq!(until_caught_up(&relay_to(&store, transport)).await, 0);
        assert_eq!(recorder.calls(), vec![1, 2, 3, 1, 2, 3]);
        assert_eq!(also.0.calls(), vec![1, 2, 3, 1, 2, 3]);
    });
}
