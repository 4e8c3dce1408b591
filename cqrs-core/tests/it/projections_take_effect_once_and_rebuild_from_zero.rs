use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::memory::{
    InMemoryEventStore, InMemoryProjectionStore, InMemoryTransport, InMemoryUnit,
};
use cqrs_core::ports::{
    Consumer, ConsumerOptions, Delivery, DeliveryId, EventStore, EventTransport, ProjectionStore,
    StoreError, TransportCapabilities, TransportError,
};
use cqrs_core::projection::{Projection, ProjectionError, ProjectionRunner, WatchError};
use cqrs_core::testing::{MetricCounts, eventually};
use cqrs_core::{
    DecodeError, EventEnvelope, EventRecord, EventTypes, ExpectedVersion, HandlerError, Metadata,
};
use cqrs_core::{ErrorKind, Position, UnknownEventPolicy};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// Sums `Added` events, staging its effects in the unit; fails on a sum it is told to, once.
#[derive(Default)]
struct Sum {
    total: Arc<Mutex<u64>>,
    seen: Arc<Mutex<Vec<u64>>>,
    fail_once_on: Mutex<Option<u64>>,
    /// A sum it fails on every time.
    poison: Option<u64>,
    /// Whether it panics on the poison instead of returning an error.
    panics: bool,
    /// A sum it refuses every time, with an error marked permanent.
    refuses_for_good: Option<u64>,
    /// While set, every event fails with a retryable `Unavailable`.
    unavailable: AtomicBool,
    /// A sum that fails with `Unavailable` every time.
    unavailable_on: Option<u64>,
    /// How many times it answered `Unavailable`.
    unavailable_answers: AtomicUsize,
    /// A sum whose staged effect panics when the unit commits.
    effect_panics_on: Option<u64>,
    /// Events applied since the last reset.
    since_reset: AtomicUsize,
    /// At each `rebuilt`, how many events had been applied since the reset.
    rebuilt_after: Mutex<Vec<usize>>,
    /// Sums whose `apply` never finishes.
    hangs_on: Vec<u64>,
    /// Whether `reset` refuses.
    reset_fails: bool,
}

#[async_trait]
impl<S: ProjectionStore<Unit = InMemoryUnit>> Projection<S> for Sum {
    fn name(&self) -> &str {
        "sum"
    }

    async fn apply(
        &self,
        unit: &mut InMemoryUnit,
        event: &EventEnvelope,
    ) -> Result<(), HandlerError> {
        let Some(added) = event.downcast_ref::<Added>() else {
            return Ok(());
        };
        if self.hangs_on.contains(&added.sum) {
            std::future::pending::<()>().await;
        }
        if self.poison == Some(added.sum) {
            assert!(!self.panics, "the projection panics on {}", added.sum);
            return Err(HandlerError::invalid("poison", "this event always fails"));
        }
        if self.refuses_for_good == Some(added.sum) {
            return Err(
                HandlerError::invalid("refused_for_good", "no retry mends this").permanent(),
            );
        }
        if self.unavailable.load(Ordering::SeqCst) || self.unavailable_on == Some(added.sum) {
            self.unavailable_answers.fetch_add(1, Ordering::SeqCst);
            return Err(HandlerError::unavailable(
                "read model away",
                "the read model's server is down",
            ));
        }
        if self.effect_panics_on == Some(added.sum) {
            let sum = added.sum;
            unit.on_commit(move || panic!("the effect of {sum} panics"));
            return Ok(());
        }
        let mut fail = self.fail_once_on.lock().unwrap();
        if *fail == Some(added.sum) {
            *fail = None;
            return Err(HandlerError::invalid("told_to_fail", "failing once"));
        }
        self.since_reset.fetch_add(1, Ordering::SeqCst);
        let (total, seen, sum) = (self.total.clone(), self.seen.clone(), added.sum);
        unit.on_commit(move || {
            *total.lock().unwrap() += sum;
            seen.lock().unwrap().push(sum);
        });
        Ok(())
    }

    async fn rebuilt(&self, _unit: &mut InMemoryUnit) -> Result<(), HandlerError> {
        self.rebuilt_after
            .lock()
            .unwrap()
            .push(self.since_reset.load(Ordering::SeqCst));
        Ok(())
    }

    async fn reset(&self, unit: &mut InMemoryUnit) -> Result<(), HandlerError> {
        if self.reset_fails {
            return Err(HandlerError::invalid(
                "reset_refused",
                "the read model refuses",
            ));
        }
        self.since_reset.store(0, Ordering::SeqCst);
        let (total, seen) = (self.total.clone(), self.seen.clone());
        unit.on_commit(move || {
            *total.lock().unwrap() = 0;
            seen.lock().unwrap().clear();
        });
        Ok(())
    }
}

fn types() -> Arc<EventTypes> {
    let mut types = EventTypes::new();
    types.register::<Added>();
    Arc::new(types)
}

/// A runner of `sum` fed by topic `sums` of `transport`, in group `sum`.
fn sums_runner<S: ProjectionStore<Unit = InMemoryUnit>>(
    store: Arc<S>,
    sum: &Arc<Sum>,
    transport: &Arc<InMemoryTransport>,
    options: ConsumerOptions,
) -> ProjectionRunner<S, Sum> {
    ProjectionRunner::from_transport(
        store,
        sum.clone(),
        transport.clone(),
        "sums",
        "sum",
        options,
        types(),
    )
}

fn record(sum: u64) -> EventRecord {
    EventRecord::from_envelope(&EventEnvelope::new(Added { sum }, Metadata::new())).unwrap()
}

/// The sums of the events group `sum` dead-lettered on topic `sums`, in order.
fn dead_sums(transport: &InMemoryTransport) -> Vec<u64> {
    transport
        .dead_letters("sums", "sum")
        .iter()
        .map(|(r, _)| r.payload["sum"].as_u64().unwrap())
        .collect()
}

/// `record(sum)` with partition key `key`.
fn keyed(key: &str, sum: u64) -> EventRecord {
    EventRecord::from_envelope(
        &EventEnvelope::new(Added { sum }, Metadata::new()).with_partition_key(key),
    )
    .unwrap()
}

#[test]
fn a_store_fed_projection_catches_up_keeps_its_checkpoint_and_rebuilds() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let store = Arc::new(InMemoryProjectionStore::new());
        let sum = Arc::new(Sum::default());
        events
            .append(
                "s-1",
                ExpectedVersion::NO_STREAM,
                vec![record(1), record(2)],
            )
            .await
            .unwrap();
        let mut runner =
            ProjectionRunner::from_store(store.clone(), sum.clone(), events.clone(), types())
                .batch_size(1);
        assert_eq!(runner.run_once().await.unwrap(), 1);
        assert_eq!(runner.run_once().await.unwrap(), 1);
        assert_eq!(runner.run_once().await.unwrap(), 0);
        events
            .append("s-1", ExpectedVersion::Exactly(2), vec![record(4)])
            .await
            .unwrap();
        assert_eq!(runner.run_once().await.unwrap(), 1);
        assert_eq!(*sum.total.lock().unwrap(), 7);

        // A second runner on the same store continues from the checkpoint.
        let mut second =
            ProjectionRunner::from_store(store.clone(), sum.clone(), events.clone(), types());
        assert_eq!(second.run_once().await.unwrap(), 0);

        assert_eq!(runner.rebuild().await.unwrap(), 3);
        assert_eq!(
            *sum.total.lock().unwrap(),
            7,
            "rebuilt from zero to the same total"
        );
        assert_eq!(
            *sum.rebuilt_after.lock().unwrap(),
            vec![3],
            "`rebuilt` ran once, after the reset and every event's replay"
        );
        assert_eq!(
            runner.run_once().await.unwrap(),
            0,
            "the rebuild left the checkpoint at the end"
        );
    });
}

/// A watch on a store-fed projection waits until its runner has taken effect up to a
/// position (read-your-writes): not reached before the runner ran, reached once it did, and
/// past it the model holds the write.
#[test]
fn a_watch_waits_until_the_projection_took_effect_up_to_a_write() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let store = Arc::new(InMemoryProjectionStore::new());
        let sum = Arc::new(Sum::default());
        let mut runner =
            ProjectionRunner::from_store(store.clone(), sum.clone(), events.clone(), types());
        let watch = runner.watch();
        assert_eq!(watch.projection(), "sum");
        let stored = events
            .append(
                "s-1",
                ExpectedVersion::NO_STREAM,
                vec![record(1), record(2)],
            )
            .await
            .unwrap();
        let written = stored.last().unwrap().position.unwrap();
        assert!(
            !watch.reached(written).await.unwrap(),
            "the runner has not run"
        );
        assert_eq!(watch.checkpoint().await.unwrap(), None);
        // The runner goes on while the wait polls: the wait ends once it committed, with the
        // write in the model.
        let (seen, ran) = tokio::join!(
            async {
                watch
                    .wait_for(written, Duration::from_secs(30))
                    .await
                    .unwrap();
                *sum.total.lock().unwrap()
            },
            async {
                tokio::task::yield_now().await;
                runner.catch_up().await
            }
        );
        assert_eq!(seen, 3, "the write shows in the model when the wait ends");
        assert_eq!(ran.unwrap(), 2);
        assert_eq!(watch.checkpoint().await.unwrap(), Some(written));
        // An earlier position is reached too; a later one is not, until the runner gets there.
        assert!(watch.reached(Position::new(1)).await.unwrap());
        let later = Position::new(written.get() + 1);
        assert!(!watch.reached(later).await.unwrap());
    });
}

/// A wait for a position the projection never reaches gives up after its time, saying where
/// it stands; a store away meanwhile is retried, and said when it was away to the end; a store
/// that refuses the read for good ends the wait at once.
#[tokio::test(start_paused = true)]
async fn a_watch_gives_up_in_time_retries_a_store_away_and_stops_at_a_refusal() {
    let store = Arc::new(Flaky::default());
    let watch = cqrs_core::projection::ProjectionWatch::new(store.clone(), "sum")
        .poll_interval(Duration::from_millis(100));
    let mut unit = store.begin("sum").await.unwrap();
    store
        .save_checkpoint(&mut unit, "sum", Position::new(4))
        .await
        .unwrap();
    store.commit(unit).await.unwrap();

    let started = tokio::time::Instant::now();
    let err = watch
        .wait_for(Position::new(5), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WatchError::TimedOut { reached: Some(p), last_error: None, .. } if *p == Position::new(4)),
        "{err:?}"
    );
    assert!(err.to_string().contains("stands at 4"), "{err}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_millis(2200),
        "gave up after {waited:?}"
    );

    // Away, then back with the checkpoint there: the wait goes on through the failures.
    store.down.store(true, Ordering::SeqCst);
    let (waited, ()) = tokio::join!(
        watch.wait_for(Position::new(6), Duration::from_secs(5)),
        async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut unit = store.inner.begin("sum").await.unwrap();
            store
                .inner
                .save_checkpoint(&mut unit, "sum", Position::new(6))
                .await
                .unwrap();
            store.inner.commit(unit).await.unwrap();
            store.down.store(false, Ordering::SeqCst);
        }
    );
    waited.expect("reached once the store was back");

    // Away to the end: the last error is told.
    store.down.store(true, Ordering::SeqCst);
    let err = watch
        .wait_for(Position::new(7), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WatchError::TimedOut { last_error: Some(e), .. } if e.kind() == ErrorKind::Unavailable),
        "{err:?}"
    );
    store.down.store(false, Ordering::SeqCst);

    let refusing = Arc::new(Flaky {
        refusing: Some(Refusing::EveryWrite),
        ..Flaky::default()
    });
    let started = tokio::time::Instant::now();
    let err = cqrs_core::projection::ProjectionWatch::new(refusing, "sum")
        .wait_for(Position::new(1), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, WatchError::Store { .. }), "{err:?}");
    assert_eq!(started.elapsed(), Duration::ZERO, "no wait after a refusal");

    // No limit, `Duration::MAX`, is taken as such (no overflow).
    watch
        .wait_for(Position::new(6), Duration::MAX)
        .await
        .unwrap();

    // A store that never answers: the wait ends in its time (and one poll interval for the
    // last read), saying the reads got no answer.
    let hanging = Arc::new(Flaky {
        hangs: true,
        ..Flaky::default()
    });
    let started = tokio::time::Instant::now();
    let err = cqrs_core::projection::ProjectionWatch::new(hanging, "sum")
        .poll_interval(Duration::from_millis(100))
        .wait_for(Position::new(1), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WatchError::TimedOut { reached: None, last_error: Some(e), .. } if e.kind() == ErrorKind::Timeout),
        "{err:?}"
    );
    assert!(err.to_string().contains("no answer"), "{err}");
    assert!(
        started.elapsed() <= Duration::from_millis(1100),
        "{:?}",
        started.elapsed()
    );
}

/// A batch of types the projection does not register applies nothing: `run_once` returns 0
/// for it although the store has more, and `catch_up` goes on to the end.
#[test]
fn catch_up_passes_batches_of_skipped_types_that_run_once_counts_as_zero() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let sum = Arc::new(Sum::default());
        let mut others: Vec<EventRecord> = (0..3).map(record).collect();
        for other in &mut others {
            other.event_type = "test.nobody_registers_this".into();
        }
        others.push(record(5));
        events
            .append("s-1", ExpectedVersion::NO_STREAM, others)
            .await
            .unwrap();
        let runner = || {
            ProjectionRunner::from_store(
                Arc::new(InMemoryProjectionStore::new()),
                sum.clone(),
                events.clone(),
                types(),
            )
            .batch_size(3)
        };
        assert_eq!(runner().run_once().await.unwrap(), 0, "three skipped");
        assert_eq!(*sum.total.lock().unwrap(), 0);
        let mut runner = runner();
        assert_eq!(runner.catch_up().await.unwrap(), 1);
        assert_eq!(*sum.total.lock().unwrap(), 5);
        assert_eq!(runner.catch_up().await.unwrap(), 0, "caught up");
    });
}

/// A checkpoint past the end of the event store (the store restored from an older backup
/// without the checkpoints) is an error that says to rebuild, not a runner caught up for ever
/// that skips every new event at or below it; the rebuild mends it.
#[test]
fn a_checkpoint_past_the_end_of_the_store_is_an_error_a_rebuild_mends() {
    run(async {
        let sum = Arc::new(Sum::default());
        let (mut runner, events, store) = fed_from_a_store(&sum, &[1, 2]).await;
        let mut unit = store.begin("sum").await.unwrap();
        store
            .save_checkpoint(&mut unit, "sum", Position::new(10))
            .await
            .unwrap();
        store.commit(unit).await.unwrap();
        for _ in 0..2 {
            let error = runner.run_once().await.unwrap_err();
            assert!(
                matches!(&error, ProjectionError::CheckpointAhead { checkpoint, .. } if *checkpoint == Position::new(10)),
                "{error}"
            );
            assert!(
                error.to_string().contains("rebuild the projection"),
                "{error}"
            );
        }
        // Rebuilt by another runner (another instance, an operator's tool): this one reads
        // the checkpoint again, not the one it last saw.
        let rebuilder =
            ProjectionRunner::from_store(store.clone(), sum.clone(), events.clone(), types());
        assert_eq!(rebuilder.rebuild().await.unwrap(), 2);
        assert_eq!(*sum.total.lock().unwrap(), 3);
        assert_eq!(
            runner.run_once().await.unwrap(),
            0,
            "caught up, at the store's end"
        );
        events
            .append("s-1", ExpectedVersion::Exactly(2), vec![record(4)])
            .await
            .unwrap();
        assert_eq!(runner.run_once().await.unwrap(), 1);
        assert_eq!(*sum.total.lock().unwrap(), 7);
    });
}

/// A rebuild whose `reset` fails says so, and that nothing changed (it named the nil event
/// `(reset)`, as if an event had failed); the read model and the checkpoint stay.
#[test]
fn a_rebuild_whose_reset_fails_says_so_and_changes_nothing() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let store = Arc::new(InMemoryProjectionStore::new());
        let sum = Arc::new(Sum {
            reset_fails: true,
            ..Sum::default()
        });
        events
            .append(
                "s-1",
                ExpectedVersion::NO_STREAM,
                vec![record(1), record(2)],
            )
            .await
            .unwrap();
        let mut runner =
            ProjectionRunner::from_store(store.clone(), sum.clone(), events.clone(), types());
        assert_eq!(runner.run_once().await.unwrap(), 2);
        let error = runner.rebuild().await.unwrap_err();
        assert!(
            matches!(&error, ProjectionError::Rebuild { step: "reset", .. }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "projection `sum`'s `reset` failed during a rebuild, which changed nothing: \
             the read model refuses"
        );
        assert_eq!(*sum.total.lock().unwrap(), 3, "the read model stays");
        assert_eq!(
            runner.run_once().await.unwrap(),
            0,
            "and so does the checkpoint"
        );
    });
}

/// A store-fed batch whose commit panics (an effect staged by one event's `apply`) fails the
/// step on that event, after committing the events before it one unit each: their effects,
/// run by the failed commit already, run once more at most, however often the step is retried.
/// (The panic unwound out of the runner, and every restart of the worker ran the effects
/// before it again.)
#[test]
fn a_store_fed_batch_whose_commit_panics_repeats_no_effect_for_ever() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let sum = Arc::new(Sum {
            effect_panics_on: Some(2),
            ..Sum::default()
        });
        let recorded = vec![record(1), record(2), record(4)];
        let panicking = recorded[1].event_id;
        events
            .append("s-1", ExpectedVersion::NO_STREAM, recorded)
            .await
            .unwrap();
        let mut runner = ProjectionRunner::from_store(
            Arc::new(InMemoryProjectionStore::new()),
            sum.clone(),
            events.clone(),
            types(),
        );
        for attempt in 1..=3 {
            let error = runner.run_once().await.unwrap_err();
            assert!(
                matches!(&error, ProjectionError::Apply { event_id, .. } if *event_id == panicking),
                "attempt {attempt}: {error:?}"
            );
            assert!(
                error
                    .to_string()
                    .contains("the commit panicked: the effect of 2 panics"),
                "{error}"
            );
        }
        assert_eq!(
            *sum.seen.lock().unwrap(),
            [1, 1],
            "1 took effect in the failed commit, and once more alone: no more"
        );
    });
}

#[test]
fn a_rebuild_ends_at_the_end_of_the_store_while_events_keep_arriving() {
    run(async {
        let inner = Arc::new(InMemoryEventStore::new());
        inner
            .append(
                "s-1",
                ExpectedVersion::NO_STREAM,
                vec![record(1), record(1), record(1)],
            )
            .await
            .unwrap();
        // Stands for events that never stop: a rebuild reading until an empty page would
        // replay every one of them, in one unit of work, holding the live runner off.
        let events = Arc::new(ArrivesWhileRead {
            inner: inner.clone(),
            arrivals: AtomicUsize::new(1_000),
            failing: AtomicBool::new(false),
        });
        let store = Arc::new(InMemoryProjectionStore::new());
        let sum = Arc::new(Sum::default());
        let mut runner =
            ProjectionRunner::from_store(store.clone(), sum.clone(), events.clone(), types())
                .batch_size(2);
        let replayed = runner.rebuild().await.unwrap();
        assert!(
            replayed < 10,
            "the rebuild stopped at the end it found, not after {replayed} events"
        );
        // Nothing is lost: the live runner takes it from the rebuild's checkpoint.
        events.arrivals.store(0, Ordering::SeqCst);
        let stored = inner
            .read_all(Position::START, usize::MAX)
            .await
            .unwrap()
            .len();
        while runner.run_once().await.unwrap() > 0 {}
        assert_eq!(
            *sum.total.lock().unwrap(),
            stored as u64,
            "every event counted once"
        );
    });
}

/// The name `cqrs_events_handled_total` of `sum` for `Added` events goes by.
const HANDLED: &str = "cqrs_events_handled_total{projection=sum,event_type=test.added}";

#[test]
fn a_failed_batch_takes_effect_up_to_the_failed_event_which_is_retried() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let events = Arc::new(InMemoryEventStore::new());
            let store = Arc::new(InMemoryProjectionStore::new());
            let sum = Arc::new(Sum::default());
            *sum.fail_once_on.lock().unwrap() = Some(5);
            events
                .append(
                    "s-1",
                    ExpectedVersion::NO_STREAM,
                    vec![record(1), record(5)],
                )
                .await
                .unwrap();
            let mut runner = ProjectionRunner::from_store(store, sum.clone(), events, types());
            let err = runner.run_once().await.unwrap_err();
            assert!(matches!(err, ProjectionError::Apply { .. }), "{err}");
            assert!(
                err.to_string().contains("projection `sum` failed on event"),
                "{err}"
            );
            assert_eq!(
                *sum.seen.lock().unwrap(),
                [1],
                "the event before the failed one took effect, in a unit of its own"
            );
            assert_eq!(
                counts.get(HANDLED),
                1,
                "the rolled-back unit counted nothing, the one after it its one event"
            );
            assert_eq!(
                runner.run_once().await.unwrap(),
                1,
                "the step is retried from the failed event"
            );
            assert_eq!(*sum.seen.lock().unwrap(), [1, 5]);
            assert_eq!(
                counts.get(HANDLED),
                2,
                "each event counted once it took effect"
            );
            assert_eq!(runner.rebuild().await.unwrap(), 2);
            assert_eq!(counts.get(HANDLED), 4, "a rebuild counts what it replayed");
        })
    });
}

/// A runner of `sum` fed from a store holding `sums` in one stream `s-1`, with that store and
/// the runner's projection store.
async fn fed_from_a_store(
    sum: &Arc<Sum>,
    sums: &[u64],
) -> (
    ProjectionRunner<InMemoryProjectionStore, Sum>,
    Arc<InMemoryEventStore>,
    Arc<InMemoryProjectionStore>,
) {
    let events = Arc::new(InMemoryEventStore::new());
    events
        .append(
            "s-1",
            ExpectedVersion::NO_STREAM,
            sums.iter().map(|&n| record(n)).collect(),
        )
        .await
        .unwrap();
    let store = Arc::new(InMemoryProjectionStore::new());
    let runner = ProjectionRunner::from_store(store.clone(), sum.clone(), events.clone(), types());
    (runner, events, store)
}

/// Runs three steps of `runner`, each of which must fail on the poison event.
async fn three_steps_fail_on_the_poison(
    runner: &mut ProjectionRunner<InMemoryProjectionStore, Sum>,
    sum: &Sum,
    seen: &[u64],
) {
    for attempt in 1..=3 {
        let err = runner.run_once().await.unwrap_err();
        assert!(
            matches!(&err, ProjectionError::Apply { source, .. } if source.code() == "poison"),
            "attempt {attempt}: {err}"
        );
        assert_eq!(*sum.seen.lock().unwrap(), seen, "attempt {attempt}");
    }
}

/// Fed from the store, an event the projection refuses every time stops the runner at that
/// event: the events before it in its batch take effect (a stuck event holds back only itself
/// and what follows it in the store's order, not up to a batch of others), those after it
/// wait, and none takes effect twice however often the step is retried.
#[test]
fn a_store_fed_runner_stops_at_the_event_it_cannot_apply_not_at_its_batch() {
    run(async {
        let sum = Arc::new(Sum {
            poison: Some(3),
            ..Sum::default()
        });
        let (mut runner, events, store) = fed_from_a_store(&sum, &[1, 2, 3, 4]).await;
        three_steps_fail_on_the_poison(&mut runner, &sum, &[1, 2]).await;
        let mut unit = store.begin("sum").await.unwrap();
        let at = store.checkpoint(&mut unit, "sum").await.unwrap();
        drop(unit);
        let second = events.load("s-1", 0).await.unwrap()[1].position;
        assert_eq!(at, second, "the checkpoint is the last event applied");
    });
}

/// Fed from the store with `skip_after(3)`, an event the projection refuses every time is
/// skipped at the third step that fails on it: the checkpoint moves past it, the events after
/// it take effect, and the skip is counted by type.
#[test]
fn a_store_fed_runner_with_skip_after_skips_an_event_refused_that_many_times() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let sum = Arc::new(Sum {
                poison: Some(3),
                ..Sum::default()
            });
            let (runner, events, store) = fed_from_a_store(&sum, &[1, 2, 3, 4]).await;
            let mut runner = runner.skip_after(3);
            for attempt in 1..=2 {
                let err = runner.run_once().await.unwrap_err();
                assert!(
                    matches!(&err, ProjectionError::Apply { source, .. } if source.code() == "poison"),
                    "attempt {attempt}: {err}"
                );
            }
            assert_eq!(counts.get(SKIPPED), 0, "not yet");
            assert_eq!(
                runner.run_once().await.unwrap(),
                0,
                "the third failure skips the event: the step moves on, applying nothing"
            );
            assert_eq!(counts.get(SKIPPED), 1);
            let stored = events.load("s-1", 0).await.unwrap();
            let mut unit = store.begin("sum").await.unwrap();
            let at = store.checkpoint(&mut unit, "sum").await.unwrap();
            drop(unit);
            assert_eq!(
                at, stored[2].position,
                "the checkpoint is past the skipped event"
            );
            assert_eq!(runner.catch_up().await.unwrap(), 1);
            assert_eq!(*sum.seen.lock().unwrap(), [1, 2, 4]);
            assert_eq!(counts.get(SKIPPED), 1);
        })
    });
}

/// `skip_after` skips only what is the event's fault: a read model that answers `Unavailable`
/// every time is waited for, however many steps fail, and once it is back every event takes
/// effect.
#[test]
fn skip_after_never_skips_an_event_the_read_model_is_unavailable_for() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let sum = Arc::new(Sum::default());
            sum.unavailable.store(true, Ordering::SeqCst);
            let (runner, _, _) = fed_from_a_store(&sum, &[1, 2, 3, 4]).await;
            let mut runner = runner.skip_after(1);
            for attempt in 1..=5 {
                let err = runner.run_once().await.unwrap_err();
                assert_eq!(
                    err.kind(),
                    ErrorKind::Unavailable,
                    "attempt {attempt}: {err}"
                );
            }
            sum.unavailable.store(false, Ordering::SeqCst);
            assert_eq!(runner.catch_up().await.unwrap(), 4);
            assert_eq!(*sum.seen.lock().unwrap(), [1, 2, 3, 4]);
            assert_eq!(counts.get(SKIPPED), 0);
        })
    });
}

/// The count is per event: failures on one event, then on another, do not add up to a skip of
/// the second.
#[test]
fn skip_after_counts_each_event_apart() {
    run(async {
        let sum = Arc::new(Sum {
            poison: Some(3),
            ..Sum::default()
        });
        *sum.fail_once_on.lock().unwrap() = Some(5);
        let (runner, _, _) = fed_from_a_store(&sum, &[1, 5, 3, 4]).await;
        let mut runner = runner.skip_after(2);
        let first = runner.run_once().await.unwrap_err();
        assert!(first.to_string().contains("failing once"), "{first}");
        // 5 goes through this time; 3 fails for the first time, not the second.
        let second = runner.run_once().await.unwrap_err();
        assert!(
            second.to_string().contains("this event always fails"),
            "{second}"
        );
        assert_eq!(*sum.seen.lock().unwrap(), [1, 5]);
        assert_eq!(
            runner.run_once().await.unwrap(),
            0,
            "3's second failure skips it"
        );
        assert_eq!(runner.catch_up().await.unwrap(), 1);
        assert_eq!(*sum.seen.lock().unwrap(), [1, 5, 4]);
    });
}

/// An event that does not decode (a payload of the wrong shape, which no build mends) counts
/// as the event's fault too, and its skip is counted as `decode`.
#[test]
fn skip_after_skips_an_event_that_does_not_decode() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let sum = Arc::new(Sum::default());
            let events = Arc::new(InMemoryEventStore::new());
            let mut garbled = record(2);
            garbled.payload = serde_json::json!({ "sum": "two" });
            events
                .append(
                    "s-1",
                    ExpectedVersion::NO_STREAM,
                    vec![record(1), garbled, record(3)],
                )
                .await
                .unwrap();
            let store = Arc::new(InMemoryProjectionStore::new());
            let mut runner =
                ProjectionRunner::from_store(store, sum.clone(), events, types()).skip_after(2);
            let err = runner.run_once().await.unwrap_err();
            assert!(matches!(err, ProjectionError::Decode { .. }), "{err}");
            assert_eq!(runner.run_once().await.unwrap(), 0, "skipped at the second");
            assert_eq!(runner.catch_up().await.unwrap(), 1);
            assert_eq!(*sum.seen.lock().unwrap(), [1, 3]);
            assert_eq!(
                counts.get(
                    "cqrs_projection_skipped_total{projection=sum,event_type=test.added,reason=decode}"
                ),
                1
            );
        })
    });
}

const SKIPPED: &str =
    "cqrs_projection_skipped_total{projection=sum,event_type=test.added,reason=apply}";

/// Fed from the store, an event whose `apply` runs past the runner's `apply_timeout` every
/// time stops the runner at that event as a refusal does: the events before it in its batch
/// take effect, once, however often the step is retried (they were rolled back with it).
#[test]
fn a_store_fed_runner_stops_at_the_event_that_times_out_not_at_its_batch() {
    run(async {
        let sum = Arc::new(Sum {
            hangs_on: vec![3],
            ..Sum::default()
        });
        let (runner, _, _) = fed_from_a_store(&sum, &[1, 2, 3, 4]).await;
        let mut runner = runner.apply_timeout(Duration::from_millis(50));
        for attempt in 1..=3 {
            let err = runner.run_once().await.unwrap_err();
            assert!(
                matches!(&err, ProjectionError::Apply { source, .. } if source.code() == "apply_timeout"),
                "attempt {attempt}: {err}"
            );
            assert_eq!(*sum.seen.lock().unwrap(), [1, 2], "attempt {attempt}");
        }
    });
}

/// The same with an event the projection refuses after the one whose effect panics: the
/// events before the refused one are committed on their own, and when that commit panics,
/// one by one, so no effect runs again at every retry: 1 took effect in the commit that
/// panicked, and once more alone, no more. The step fails at 2, whose commit panics alone,
/// where the runner is stuck, not at the refused 3 after it.
#[test]
fn events_before_a_refused_one_whose_commit_panics_repeat_no_effect_for_ever() {
    run(async {
        let sum = Arc::new(Sum {
            effect_panics_on: Some(2),
            poison: Some(3),
            ..Sum::default()
        });
        let (mut runner, events, _) = fed_from_a_store(&sum, &[1, 2, 3]).await;
        let second = events.load("s-1", 1).await.unwrap()[0].event_id;
        for attempt in 1..=3 {
            let err = runner.run_once().await.unwrap_err();
            assert!(
                matches!(&err, ProjectionError::Apply { event_id, source, .. }
                    if *event_id == second && source.message().contains("the commit panicked")),
                "attempt {attempt}: {err}"
            );
            assert_eq!(*sum.seen.lock().unwrap(), [1, 1], "attempt {attempt}");
        }
    });
}

#[test]
fn a_transport_fed_projection_counts_a_redelivered_event_once() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let transport = Arc::new(InMemoryTransport::new());
            let store = Arc::new(InMemoryProjectionStore::new());
            let sum = Arc::new(Sum::default());
            let once = record(3);
            // The same event published twice, as a relay that died mid-batch would.
            transport
                .publish("sums", &[once.clone(), record(10), once])
                .await
                .unwrap();
            let options = ConsumerOptions::default()
                .block(Duration::from_millis(50))
                .redelivery_delay(Duration::from_millis(50));
            let mut runner = sums_runner(store, &sum, &transport, options);
            *sum.fail_once_on.lock().unwrap() = Some(10);
            // The failing batch sets 10 aside and applies 3 (once) in the same run; 10 is
            // redelivered and succeeds.
            assert!(runner.run_once().await.is_err(), "10 fails once");
            assert_eq!(*sum.seen.lock().unwrap(), [3]);
            let mut applied = 0;
            for _ in 0..50 {
                applied += runner.run_once().await.expect("no other failure");
                if transport.backlog("sums", "sum") == 0 {
                    break;
                }
            }
            assert_eq!(applied, 1, "10, once");
            let mut seen = sum.seen.lock().unwrap().clone();
            seen.sort();
            assert_eq!(seen, [3, 10], "each event took effect once");
            assert_eq!(
                transport.backlog("sums", "sum"),
                0,
                "everything was acknowledged"
            );
            assert_eq!(
                counts.get(HANDLED),
                2,
                "counted once each, not again when 3 was applied anew beside 10 set aside"
            );
        })
    });
}

#[test]
fn a_rebuild_pauses_the_live_runner() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let store = Arc::new(InMemoryProjectionStore::new());
        let sum = Arc::new(Sum::default());
        events
            .append("s-1", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        // Hold the projection's lock as a rebuild does, and check the live runner waits.
        let unit = cqrs_core::ports::ProjectionStore::begin(store.as_ref(), "sum")
            .await
            .unwrap();
        let mut runner = ProjectionRunner::from_store(
            store.clone(),
            sum,
            events as Arc<dyn EventStore>,
            types(),
        );
        let mut live = Box::pin(runner.run_once());
        // Polled by hand, many times, with the runtime free to run anything else in between:
        // a runner that did not wait for the lock would finish (the store has no I/O). The
        // control: a unit of another consumer begins at once meanwhile.
        for _ in 0..1_000 {
            assert!(
                poll_once(&mut live).await.is_pending(),
                "the live runner ran during the rebuild"
            );
            tokio::task::yield_now().await;
        }
        let mut other = Box::pin(cqrs_core::ports::ProjectionStore::begin(
            store.as_ref(),
            "other",
        ));
        assert!(
            poll_once(&mut other).await.is_ready(),
            "a unit of another consumer waits too: the polls above prove nothing"
        );
        cqrs_core::ports::ProjectionStore::commit(store.as_ref(), unit)
            .await
            .unwrap();
        assert_eq!(live.await.unwrap(), 1);
    });
}

/// One poll of `future`, with the task's own waker.
async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut *future).poll(cx)))
        .await
}

/// A poison event fails every batch it is in; the events it shares batches with are handed
/// back without using up their deliveries, so once the poison is dead-lettered they take
/// effect, instead of being dead-lettered with it.
#[test]
fn a_poison_event_does_not_take_its_batch_mates_down() {
    run(poison_with_a_batch_mate(false));
}

/// The poison event 13 published with the good event 5: only 5 takes effect, only 13 is
/// dead-lettered. The projection returns an error on 13, or panics on it.
async fn poison_with_a_batch_mate(panics: bool) {
    let transport = Arc::new(InMemoryTransport::new());
    let sum = Arc::new(Sum {
        poison: Some(13),
        panics,
        ..Sum::default()
    });
    transport
        .publish("sums", &[record(13), record(5)])
        .await
        .unwrap();
    let mut runner = sums_runner(
        Arc::new(InMemoryProjectionStore::new()),
        &sum,
        &transport,
        three_attempts(),
    );
    run_until_drained(&mut runner, &transport).await;
    assert_eq!(*sum.seen.lock().unwrap(), [5], "the batch mate took effect");
    let dead = dead_sums(&transport);
    assert_eq!(dead, [13], "only the poison is dead-lettered");
}

/// An effect that panics when its unit commits (after the effects staged before it ran) is
/// found by taking the batch one event per unit: it is dead-lettered after its deliveries,
/// and each batch mate takes effect once more at most, instead of the whole batch coming back
/// (and its first effects running again) every redelivery delay for good.
#[test]
fn a_panicking_effect_is_found_and_its_batch_mates_take_effect_once_more_at_most() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum {
            effect_panics_on: Some(7),
            ..Sum::default()
        });
        transport
            .publish("sums", &[record(1), record(7), record(2)])
            .await
            .unwrap();
        let mut runner = sums_runner(
            Arc::new(InMemoryProjectionStore::new()),
            &sum,
            &transport,
            ConsumerOptions::default()
                .block(Duration::from_millis(20))
                .redelivery_delay(Duration::from_millis(10))
                .max_deliveries(2),
        );
        run_until_drained(&mut runner, &transport).await;
        assert_eq!(
            *sum.seen.lock().unwrap(),
            [1, 1, 2],
            "1's effect ran before the panic, and once more alone; 2's once"
        );
        assert_eq!(dead_sums(&transport), [7], "the panicking effect's event");
    });
}

/// A poison event is set aside within the batch it fails: the events of other keys, and its
/// own key's events before it, take effect in that same batch instead of waiting for the
/// poison's redeliveries; its key's later events wait until it is dead-lettered. (They all
/// waited: the whole batch was handed back on every failure.)
#[test]
fn a_poison_event_is_set_aside_and_other_keys_take_effect_at_once() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum {
            poison: Some(13),
            ..Sum::default()
        });
        transport
            .publish(
                "sums",
                &[keyed("a", 1), keyed("a", 13), keyed("b", 2), keyed("a", 4)],
            )
            .await
            .unwrap();
        let mut runner = sums_runner(
            Arc::new(InMemoryProjectionStore::new()),
            &sum,
            &transport,
            three_attempts(),
        );
        let failed = runner.run_once().await;
        assert!(
            matches!(failed, Err(ProjectionError::Apply { .. })),
            "the poison's failure is reported: {failed:?}"
        );
        assert_eq!(
            *sum.seen.lock().unwrap(),
            [1, 2],
            "the first batch applied what the poison does not hold back"
        );
        assert_eq!(
            transport.backlog("sums", "sum"),
            2,
            "13 and the 4 behind it"
        );
        run_until_drained(&mut runner, &transport).await;
        assert_eq!(*sum.seen.lock().unwrap(), [1, 2, 4]);
        let dead = dead_sums(&transport);
        assert_eq!(dead, [13], "only the poison is dead-lettered");
    });
}

/// An event no redelivery mends (refused with an error marked permanent, or whose payload is
/// not its type's) is dead-lettered on its first delivery, with its error, instead of holding
/// its key for `max_deliveries` redelivery delays; its key's later events then take effect.
#[test]
fn an_event_no_redelivery_mends_is_dead_lettered_at_once() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let transport = Arc::new(InMemoryTransport::new());
            let sum = Arc::new(Sum {
                refuses_for_good: Some(13),
                ..Sum::default()
            });
            let mut garbled = keyed("c", 7);
            garbled.payload = serde_json::json!({ "sum": "seven" });
            transport
                .publish(
                    "sums",
                    &[
                        keyed("a", 13),
                        keyed("b", 2),
                        garbled,
                        keyed("a", 4),
                        keyed("c", 8),
                    ],
                )
                .await
                .unwrap();
            let mut runner = sums_runner(
                Arc::new(InMemoryProjectionStore::new()),
                &sum,
                &transport,
                ten_attempts(),
            );
            let failed = runner.run_once().await;
            assert!(
                matches!(failed, Err(ProjectionError::Apply { .. })),
                "the refusal is reported: {failed:?}"
            );
            assert_eq!(*sum.seen.lock().unwrap(), [2]);
            let dead = transport.dead_letters_with_errors("sums", "sum");
            let given_up: Vec<_> = dead
                .iter()
                .map(|(record, deliveries, error)| {
                    (
                        record.payload["sum"].clone(),
                        *deliveries,
                        error.clone().unwrap_or_default(),
                    )
                })
                .collect();
            assert_eq!(given_up.len(), 2, "{given_up:?}");
            assert_eq!((given_up[0].0.as_u64(), given_up[0].1), (Some(13), 1));
            assert!(
                given_up[0].2.contains("no retry mends this"),
                "{given_up:?}"
            );
            assert_eq!((given_up[1].0.as_str(), given_up[1].1), (Some("seven"), 1));
            assert!(
                given_up[1].2.contains("could not be decoded"),
                "{given_up:?}"
            );
            assert_eq!(
                counts.get(
                    "cqrs_projection_dead_lettered_total{projection=sum,event_type=test.added}"
                ),
                2
            );

            run_until_drained(&mut runner, &transport).await;
            assert_eq!(*sum.seen.lock().unwrap(), [2, 4, 8], "their keys went on");
            assert_eq!(transport.dead_letters("sums", "sum").len(), 2);
        })
    });
}

/// An event no redelivery mends behind events of its key in its batch is handed back, not
/// dead-lettered there: out of the pending list, it would let its key's later events pass those
/// earlier ones. It is dead-lettered when it comes back, first of its key.
#[test]
fn an_event_no_redelivery_mends_waits_for_its_keys_earlier_events() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum {
            refuses_for_good: Some(13),
            ..Sum::default()
        });
        transport
            .publish("sums", &[keyed("a", 1), keyed("a", 13), keyed("a", 4)])
            .await
            .unwrap();
        let mut runner = sums_runner(
            Arc::new(InMemoryProjectionStore::new()),
            &sum,
            &transport,
            ten_attempts(),
        );
        assert!(runner.run_once().await.is_err());
        assert_eq!(*sum.seen.lock().unwrap(), [1]);
        assert!(
            transport.dead_letters("sums", "sum").is_empty(),
            "dead-lettered while 1 was pending"
        );
        run_until_drained(&mut runner, &transport).await;
        assert_eq!(*sum.seen.lock().unwrap(), [1, 4]);
        let dead = transport.dead_letters("sums", "sum");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(
            (dead[0].0.payload["sum"].as_u64(), dead[0].1),
            (Some(13), 2),
            "on its second delivery, the first of its key"
        );
    });
}

/// A batch whose other events took effect while one was set aside is progress: the worker
/// reports itself degraded and goes on at once, instead of backing off as after a failed
/// batch (each such batch counted as a failure: the waits grew, and after `stall_after` the
/// worker said it was stuck while it moved).
#[test]
fn a_batch_with_an_event_set_aside_is_progress_not_a_failure() {
    run_paused(|| async {
        let poison = Sum {
            poison: Some(13),
            ..Sum::default()
        };
        let waited = next_event_after_a_batch_with_13_set_aside(poison).await;
        assert!(
            waited < Duration::from_millis(500),
            "the worker backed off: 2 applied after {waited:?}"
        );
    });
}

/// Runs `sum` as a worker (a failed batch backs off for at least a second) on a batch of 13
/// (which `sum` sets aside) and 1; once 1 took effect and the worker is degraded, publishes 2
/// and returns how long 2 took to take effect.
async fn next_event_after_a_batch_with_13_set_aside(sum: Sum) -> Duration {
    use cqrs_core::runtime::{Health, Runtime};
    use cqrs_core::testing::eventually;
    let sum = Arc::new(sum);
    let transport = Arc::new(InMemoryTransport::new());
    transport
        .publish("sums", &[keyed("p", 13), keyed("a", 1)])
        .await
        .unwrap();
    let runner = sums_runner(
        Arc::new(InMemoryProjectionStore::new()),
        &sum,
        &transport,
        ConsumerOptions::default()
            .block(Duration::from_millis(20))
            .redelivery_delay(Duration::from_secs(60)),
    )
    // A failed batch backs off for at least this long.
    .idle_interval(Duration::from_secs(1));
    let runtime = Runtime::builder().worker(runner).start();
    let seen = |expected: &'static [u64]| {
        let sum = sum.clone();
        move || {
            let sum = sum.clone();
            async move { (*sum.seen.lock().unwrap() == expected).then_some(()) }
        }
    };
    eventually(Duration::from_secs(5), "1 applied", seen(&[1])).await;
    eventually(Duration::from_secs(5), "degraded", || async {
        matches!(
            runtime.health().await.components["sum"].0,
            Health::Degraded(_)
        )
        .then_some(())
    })
    .await;
    let published = tokio::time::Instant::now();
    transport.publish("sums", &[keyed("b", 2)]).await.unwrap();
    eventually(Duration::from_secs(5), "2 applied", seen(&[1, 2])).await;
    let waited = published.elapsed();
    runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    waited
}

/// A transport-fed runner whose fetch waits without limit still stops at shutdown, within the
/// grace period.
#[test]
fn a_transport_fed_runner_stops_while_its_fetch_waits() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum::default());
        transport.publish("sums", &[record(2)]).await.unwrap();
        let runner = sums_runner(
            Arc::new(InMemoryProjectionStore::new()),
            &sum,
            &transport,
            ConsumerOptions::default().block(Duration::MAX),
        );
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        cqrs_core::testing::eventually(Duration::from_secs(5), "the event applied", || async {
            (transport.backlog("sums", "sum") == 0 && *sum.seen.lock().unwrap() == [2])
                .then_some(())
        })
        .await;
        // Waiting in a fetch that never returns by itself.
        runtime
            .shutdown(Duration::from_secs(5))
            .await
            .expect("stopped within the grace period");
    });
}

/// The in-memory projection store, whose `begin` fails with `Unavailable` while `down` is set:
/// a database that is away.
#[derive(Default)]
struct Flaky {
    inner: InMemoryProjectionStore,
    down: AtomicBool,
    /// Units of work asked for (begun or not).
    begins: AtomicUsize,
    /// Whether `begin` and `purge_inbox` never finish (a database that stopped answering).
    hangs: bool,
    /// Set when a purge starts, and when a purge is dropped.
    purge_started: Arc<AtomicBool>,
    purge_dropped: Arc<AtomicBool>,
    /// How many purges started.
    purges: Arc<AtomicUsize>,
    /// Whether `purge_inbox` panics (a store's bug).
    purge_panics: bool,
    /// Whether `purge_inbox` alone never finishes (a lock it waits for).
    purge_hangs: bool,
    /// An event whose unit the store refuses at the commit, for good (a deferred constraint
    /// its effect breaks), and whether the unit begun last marked it.
    poison: Option<Uuid>,
    poisoned: AtomicBool,
    /// Writes the store refuses for good (its tables missing).
    refusing: Option<Refusing>,
}

/// What a [`Flaky`] store refuses for good.
#[derive(Clone, Copy, PartialEq)]
enum Refusing {
    /// Every write: the inbox, the checkpoint, the commit.
    EveryWrite,
    /// Only the checkpoint's save.
    TheCheckpoint,
}

fn missing_table() -> StoreError {
    StoreError::Backend {
        backend: "test",
        source: "relation \"inbox\" does not exist".into(),
    }
}

#[async_trait]
impl ProjectionStore for Flaky {
    type Unit = InMemoryUnit;

    async fn begin(&self, consumer: &str) -> Result<InMemoryUnit, StoreError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        if self.hangs {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                backend: "test",
                source: "the database is away".into(),
            });
        }
        self.poisoned.store(false, Ordering::SeqCst);
        self.inner.begin(consumer).await
    }

    async fn mark_processed(
        &self,
        unit: &mut InMemoryUnit,
        consumer: &str,
        id: Uuid,
    ) -> Result<bool, StoreError> {
        if self.refusing == Some(Refusing::EveryWrite) {
            return Err(missing_table());
        }
        if self.poison == Some(id) {
            self.poisoned.store(true, Ordering::SeqCst);
        }
        self.inner.mark_processed(unit, consumer, id).await
    }

    async fn checkpoint(
        &self,
        unit: &mut InMemoryUnit,
        consumer: &str,
    ) -> Result<Option<Position>, StoreError> {
        self.inner.checkpoint(unit, consumer).await
    }

    async fn committed_checkpoint(&self, consumer: &str) -> Result<Option<Position>, StoreError> {
        if self.hangs {
            std::future::pending::<()>().await;
        }
        // Its tables missing: a read is refused too.
        if self.refusing == Some(Refusing::EveryWrite) {
            return Err(missing_table());
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                backend: "test",
                source: "the database is away".into(),
            });
        }
        self.inner.committed_checkpoint(consumer).await
    }

    async fn save_checkpoint(
        &self,
        unit: &mut InMemoryUnit,
        consumer: &str,
        position: Position,
    ) -> Result<(), StoreError> {
        if self.refusing.is_some() {
            return Err(missing_table());
        }
        self.inner.save_checkpoint(unit, consumer, position).await
    }

    async fn reset(&self, unit: &mut InMemoryUnit, consumer: &str) -> Result<(), StoreError> {
        self.inner.reset(unit, consumer).await
    }

    async fn commit(&self, unit: InMemoryUnit) -> Result<(), StoreError> {
        if self.refusing == Some(Refusing::EveryWrite) {
            return Err(missing_table());
        }
        if self.poisoned.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Backend {
                backend: "test",
                source: "a deferred constraint the unit's writes break".into(),
            });
        }
        self.inner.commit(unit).await
    }

    async fn purge_inbox(&self, consumer: &str, older_than: Duration) -> Result<u64, StoreError> {
        let _dropped = SetOnDrop(self.purge_dropped.clone());
        self.purge_started.store(true, Ordering::SeqCst);
        self.purges.fetch_add(1, Ordering::SeqCst);
        if self.purge_panics {
            panic!("the store's purge has a bug");
        }
        if self.hangs || self.purge_hangs {
            std::future::pending::<()>().await;
        }
        self.inner.purge_inbox(consumer, older_than).await
    }
}

/// Options under which ten counted attempts dead-letter an event: one dead-lettered on its
/// first delivery or its second was given up, not out of attempts.
fn ten_attempts() -> ConsumerOptions {
    three_attempts().max_deliveries(10)
}

/// Options under which three counted attempts dead-letter an event.
fn three_attempts() -> ConsumerOptions {
    ConsumerOptions::default()
        .block(Duration::from_millis(20))
        .redelivery_delay(Duration::from_millis(10))
        .max_deliveries(3)
}

/// Runs `runner` until the group has acknowledged everything (at most 200 batches), ignoring
/// its errors.
async fn run_until_drained<S: ProjectionStore<Unit = InMemoryUnit>>(
    runner: &mut ProjectionRunner<S, Sum>,
    transport: &InMemoryTransport,
) {
    for _ in 0..200 {
        let _ = runner.run_once().await;
        if transport.backlog("sums", "sum") == 0 {
            break;
        }
    }
}

/// A transport that counts how often each event was handed out, so a test can tell that an
/// event came back more often than `max_deliveries`.
pub(crate) struct Counted {
    inner: Arc<InMemoryTransport>,
    handed_out: Arc<Mutex<HashMap<Uuid, usize>>>,
    /// Its consumers' `close` fails.
    close_fails: std::sync::atomic::AtomicBool,
    /// Its consumers' `fetch` fails while set (the transport away).
    pub(crate) fetch_fails: Arc<AtomicBool>,
    /// How many consumers it made.
    pub(crate) consumers_made: AtomicUsize,
    /// How many fetches its consumers made.
    pub(crate) fetches: Arc<AtomicUsize>,
}

impl Counted {
    pub(crate) fn new(inner: &Arc<InMemoryTransport>) -> Arc<Self> {
        Arc::new(Self {
            inner: inner.clone(),
            handed_out: Arc::default(),
            close_fails: Default::default(),
            fetch_fails: Arc::default(),
            consumers_made: AtomicUsize::new(0),
            fetches: Arc::default(),
        })
    }

    /// How often each of `events` was handed out: the least of their counts.
    pub(crate) fn handed_out(&self, events: &[Uuid]) -> usize {
        let counts = self.handed_out.lock().unwrap();
        events
            .iter()
            .map(|id| counts.get(id).copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }
}

#[async_trait]
impl EventTransport for Counted {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        self.inner.publish(topic, events).await
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        self.consumers_made.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(CountedConsumer {
            inner: self.inner.consumer(topic, group, options).await?,
            handed_out: self.handed_out.clone(),
            close_fails: self.close_fails.load(std::sync::atomic::Ordering::Relaxed),
            fetch_fails: self.fetch_fails.clone(),
            fetches: self.fetches.clone(),
        }))
    }
}

struct CountedConsumer {
    inner: Box<dyn Consumer>,
    handed_out: Arc<Mutex<HashMap<Uuid, usize>>>,
    close_fails: bool,
    fetch_fails: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
}

#[async_trait]
impl Consumer for CountedConsumer {
    async fn fetch(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if self.fetch_fails.load(Ordering::SeqCst) {
            return Err(TransportError::Unavailable {
                backend: "test",
                source: "told to fail its fetches".into(),
            });
        }
        let batch = self.inner.fetch(max).await?;
        let mut counts = self.handed_out.lock().unwrap();
        for delivery in &batch {
            *counts.entry(delivery.record.event_id).or_default() += 1;
        }
        Ok(batch)
    }

    async fn ack(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        self.inner.ack(ids).await
    }

    async fn nack(&mut self, id: &DeliveryId) -> Result<(), TransportError> {
        self.inner.nack(id).await
    }

    async fn dead_letter(&mut self, id: &DeliveryId, reason: &str) -> Result<(), TransportError> {
        self.inner.dead_letter(id, reason).await
    }

    async fn nack_with_reason(
        &mut self,
        id: &DeliveryId,
        reason: &str,
    ) -> Result<(), TransportError> {
        self.inner.nack_with_reason(id, reason).await
    }

    async fn defer(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        self.inner.defer(ids).await
    }

    async fn keep_alive(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        self.inner.keep_alive(ids).await
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        self.inner.keep_alive_interval()
    }

    async fn close(&mut self) -> Result<(), TransportError> {
        if self.close_fails {
            return Err(TransportError::Backend {
                backend: "test",
                source: "told to fail its close".into(),
            });
        }
        self.inner.close().await
    }
}

/// Runs `runner`, ignoring its errors, until each of `events` has been handed out `more`
/// more times (within 10 s), and returns how often each of them was handed out by then.
async fn run_until_handed_out<S: ProjectionStore<Unit = InMemoryUnit>>(
    runner: &mut ProjectionRunner<S, Sum>,
    counted: &Counted,
    events: &[Uuid],
    more: usize,
) -> usize {
    let target = counted.handed_out(events) + more;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let _ = runner.run_once().await;
        let handed_out = counted.handed_out(events);
        if handed_out >= target {
            return handed_out;
        }
        let dead = counted.inner.dead_letters("sums", "sum");
        assert!(
            dead.is_empty(),
            "dead-lettered after {handed_out} deliveries: {dead:?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "within 10 s, the events were handed out {handed_out} times, not {target}"
        );
    }
}

/// An event whose unit the store refuses for good at the commit (a constraint its effect
/// breaks) holds up only its own key and is dead-lettered after its attempts: its batch is
/// taken one by one, and a trial unit without it tells the event from a broken store. Handed
/// back whole, the batch came back whole for ever, no attempt counted, every key in it held.
#[test]
fn an_event_whose_unit_the_store_refuses_for_good_holds_up_only_its_key() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let events = [keyed("a", 1), keyed("b", 2)];
        let store = Arc::new(Flaky {
            poison: Some(events[0].event_id),
            ..Flaky::default()
        });
        let sum = Arc::new(Sum::default());
        transport.publish("sums", &events).await.unwrap();
        let mut runner = ProjectionRunner::from_transport(
            store.clone(),
            sum.clone(),
            transport.clone(),
            "sums",
            "sum",
            three_attempts(),
            types(),
        );
        run_until_drained(&mut runner, &transport).await;
        assert_eq!(
            *sum.total.lock().unwrap(),
            2,
            "the other key's event took effect"
        );
        assert_eq!(dead_sums(&transport), [1], "the refused one dead-lettered");
        assert_eq!(transport.backlog("sums", "sum"), 0);
    });
}

/// A store that refuses every unit for good (a table missing, or only its checkpoint table)
/// is no event's fault: nothing is dead-lettered, however long it lasts.
#[test]
fn a_store_that_refuses_every_unit_dead_letters_nothing() {
    for only_the_checkpoint in [false, true] {
        run(async {
            let transport = Arc::new(InMemoryTransport::new());
            // With positions, as a relay from a store publishes them: each unit saves the
            // checkpoint.
            let mut events = [keyed("a", 1), keyed("b", 2)];
            for (n, event) in (1..).zip(events.iter_mut()) {
                event.position = Some(Position::new(n));
            }
            let sum = Arc::new(Sum::default());
            transport.publish("sums", &events).await.unwrap();
            let mut runner = ProjectionRunner::from_transport(
                Arc::new(Flaky {
                    refusing: Some(if only_the_checkpoint {
                        Refusing::TheCheckpoint
                    } else {
                        Refusing::EveryWrite
                    }),
                    ..Flaky::default()
                }),
                sum.clone(),
                transport.clone(),
                "sums",
                "sum",
                three_attempts(),
                types(),
            );
            for _ in 0..50 {
                let _ = runner.run_once().await;
            }
            let dead = dead_sums(&transport);
            assert!(
                dead.is_empty(),
                "only the checkpoint {only_the_checkpoint}: {dead:?}"
            );
            assert_eq!(transport.backlog("sums", "sum"), 2, "both still there");
        });
    }
}

/// Failures that are nobody's event (the projection store away, the read model answering
/// `Unavailable`) hand the batch back without counting attempts: once the failure passes, the
/// events take effect instead of having been dead-lettered meanwhile.
#[test]
fn a_store_or_read_model_outage_dead_letters_nothing() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let counted = Counted::new(&transport);
        let store = Arc::new(Flaky::default());
        let sum = Arc::new(Sum::default());
        let events = [record(1), record(2)];
        let ids = [events[0].event_id, events[1].event_id];
        transport.publish("sums", &events).await.unwrap();
        let mut runner = ProjectionRunner::from_transport(
            store.clone(),
            sum.clone(),
            counted.clone(),
            "sums",
            "sum",
            three_attempts(),
            types(),
        );

        // Each outage lasts past the 3 deliveries an event may use up.
        store.down.store(true, Ordering::SeqCst);
        let during_the_store_outage = run_until_handed_out(&mut runner, &counted, &ids, 4).await;
        assert!(during_the_store_outage > 3);
        store.down.store(false, Ordering::SeqCst);
        sum.unavailable.store(true, Ordering::SeqCst);
        let after_the_read_model_outage =
            run_until_handed_out(&mut runner, &counted, &ids, 4).await;
        assert!(after_the_read_model_outage - during_the_store_outage > 3);
        sum.unavailable.store(false, Ordering::SeqCst);
        assert!(
            transport.dead_letters("sums", "sum").is_empty(),
            "dead-lettered during an outage: {:?}",
            transport.dead_letters("sums", "sum")
        );

        run_until_drained(&mut runner, &transport).await;
        assert_eq!(*sum.total.lock().unwrap(), 3, "both took effect once back");
    });
}

/// Under `UnknownEventPolicy::Fail`, an event of a type this build does not know waits for a
/// build that knows it: it is not dead-lettered, however often it comes back.
#[test]
fn an_unknown_event_under_fail_waits_for_a_build_that_knows_it() {
    let mut unknown = record(1);
    unknown.event_type = "future.event".into();
    waits_for_a_newer_build(unknown, UnknownEventPolicy::Fail);
}

/// Under `UnknownEventPolicy::AwaitNewerBuild`, an event of a type no part of this build
/// knows waits for a newer build, as under `Fail`: it is not dead-lettered nor skipped.
#[test]
fn an_event_no_part_of_the_build_knows_waits_under_await_newer_build() {
    let mut unknown = record(1);
    unknown.event_type = "future.event".into();
    waits_for_a_newer_build(unknown, UnknownEventPolicy::AwaitNewerBuild);
}

/// Another plugin's event on the topic: known to this build, not to the runner's types.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, cqrs_core::Event)]
#[cqrs(name = "test.another_plugins_event")]
struct AnotherPluginsEvent {
    sum: u64,
}

/// Under `UnknownEventPolicy::AwaitNewerBuild`, an event of a type another part of this build
/// reads is passed over (acknowledged, not applied), and the runner goes on.
#[test]
fn an_event_another_part_of_the_build_reads_is_passed_over_under_await_newer_build() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum::default());
        let others = EventRecord::from_envelope(&EventEnvelope::new(
            AnotherPluginsEvent { sum: 100 },
            Metadata::new(),
        ))
        .unwrap();
        transport
            .publish("sums", &[others, record(2)])
            .await
            .unwrap();
        let mut types = EventTypes::new();
        types.register::<Added>();
        types.unknown_events(UnknownEventPolicy::AwaitNewerBuild);
        let mut runner = ProjectionRunner::from_transport(
            Arc::new(InMemoryProjectionStore::new()),
            sum.clone(),
            transport.clone(),
            "sums",
            "sum",
            three_attempts(),
            Arc::new(types),
        );
        run_until_drained(&mut runner, &transport).await;
        assert_eq!(transport.backlog("sums", "sum"), 0, "both acknowledged");
        assert!(transport.dead_letters("sums", "sum").is_empty());
        assert_eq!(*sum.total.lock().unwrap(), 2, "only its own type applied");
    });
}

/// An event of a known type with a schema version above this build's (a newer instance wrote
/// it during a rolling deploy) waits for a build that knows that version, whatever the policy:
/// it is not dead-lettered, however often it comes back.
#[test]
fn an_event_of_a_newer_schema_version_waits_for_a_build_that_knows_it() {
    let mut newer = record(1);
    newer.schema_version = 99;
    waits_for_a_newer_build(newer, UnknownEventPolicy::Skip);
}

/// An event only a newer build can read waits for it without holding up other keys: set
/// aside within its batch, with its own key's later events, while the rest take effect. Nothing
/// is dead-lettered however often it comes back.
#[test]
fn an_event_waiting_for_a_newer_build_holds_up_only_its_own_key() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let counted = Counted::new(&transport);
        let sum = Arc::new(Sum::default());
        let mut newer = keyed("a", 1);
        newer.schema_version = 99;
        let id = newer.event_id;
        transport
            .publish("sums", &[newer, keyed("b", 2), keyed("a", 4)])
            .await
            .unwrap();
        let mut runner = ProjectionRunner::from_transport(
            Arc::new(InMemoryProjectionStore::new()),
            sum.clone(),
            counted.clone(),
            "sums",
            "sum",
            three_attempts(),
            types(),
        );
        let first = runner.run_once().await;
        assert!(
            matches!(&first, Err(ProjectionError::Decode { event_id, .. }) if *event_id == id),
            "{first:?}"
        );
        assert_eq!(
            *sum.seen.lock().unwrap(),
            [2],
            "the other key's event took effect"
        );
        // Past the 3 deliveries it may use up.
        let handed_out = run_until_handed_out(&mut runner, &counted, &[id], 5).await;
        assert!(handed_out > 3, "handed out {handed_out} times");
        assert!(transport.dead_letters("sums", "sum").is_empty());
        assert_eq!(
            transport.backlog("sums", "sum"),
            2,
            "1 and the 4 behind it wait"
        );
        assert_eq!(*sum.seen.lock().unwrap(), [2]);
    });
}

/// An event whose `apply` answers `Unavailable` every time (its part of the read model away,
/// an aggregate only a newer build can load) waits without holding up other keys: set aside
/// within its batch, with its own key's later events, while the rest take effect. Nothing is
/// dead-lettered however often it comes back. (The whole batch waited with it, and the events
/// of other keys fetched with it on every redelivery.)
#[test]
fn an_event_whose_apply_keeps_waiting_holds_up_only_its_own_key() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let counted = Counted::new(&transport);
        let sum = Arc::new(Sum {
            unavailable_on: Some(1),
            ..Sum::default()
        });
        let waiting = keyed("a", 1);
        let id = waiting.event_id;
        transport
            .publish(
                "sums",
                &[waiting, keyed("b", 2), keyed("a", 4), keyed("c", 8)],
            )
            .await
            .unwrap();
        let mut runner = ProjectionRunner::from_transport(
            Arc::new(InMemoryProjectionStore::new()),
            sum.clone(),
            counted.clone(),
            "sums",
            "sum",
            three_attempts(),
            types(),
        );
        let first = runner.run_once().await;
        assert!(
            matches!(&first, Err(ProjectionError::Apply { event_id, .. }) if *event_id == id),
            "{first:?}"
        );
        assert_eq!(
            *sum.seen.lock().unwrap(),
            [2, 8],
            "the other keys' events took effect"
        );
        // Past the 3 deliveries it may use up.
        let handed_out = run_until_handed_out(&mut runner, &counted, &[id], 5).await;
        assert!(handed_out > 3, "handed out {handed_out} times");
        assert!(transport.dead_letters("sums", "sum").is_empty());
        assert_eq!(
            transport.backlog("sums", "sum"),
            2,
            "1 and the 4 behind it wait"
        );
        assert_eq!(*sum.seen.lock().unwrap(), [2, 8]);
    });
}

/// A read model away answers `Unavailable` for every event: the second event that answers so
/// says it is the backend, not one event, and the whole batch is handed back, without an
/// attempt, the event of a type the projection skips with it, instead of every event being
/// tried in a pass of its own.
#[test]
fn a_read_model_away_fails_the_batch_after_two_events() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum::default());
        sum.unavailable.store(true, Ordering::SeqCst);
        let mut skipped = keyed("x", 100);
        skipped.event_type = "test.unknown".into();
        transport
            .publish(
                "sums",
                &[
                    keyed("a", 1),
                    keyed("b", 2),
                    keyed("c", 4),
                    skipped,
                    keyed("d", 8),
                ],
            )
            .await
            .unwrap();
        let mut runner = sums_runner(
            Arc::new(InMemoryProjectionStore::new()),
            &sum,
            &transport,
            three_attempts(),
        );
        let failed = runner.run_once().await;
        assert!(
            matches!(failed, Err(ProjectionError::Apply { .. })),
            "{failed:?}"
        );
        assert_eq!(sum.unavailable_answers.load(Ordering::SeqCst), 2);
        assert!(sum.seen.lock().unwrap().is_empty());
        assert_eq!(transport.backlog("sums", "sum"), 5, "the whole batch waits");
        sum.unavailable.store(false, Ordering::SeqCst);
        run_until_drained(&mut runner, &transport).await;
        assert_eq!(*sum.total.lock().unwrap(), 15, "each took effect once back");
        assert!(transport.dead_letters("sums", "sum").is_empty());
    });
}

/// When a batch sets aside a refused event and then one that waits, the step fails with the
/// wait's error, the one its health and backoff follow (it returned the first error set aside,
/// which after a commit's panic is of a kind that turns the worker unhealthy at once).
#[test]
fn a_batch_that_sets_aside_a_wait_fails_with_the_waits_error() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum {
            poison: Some(13),
            unavailable_on: Some(1),
            ..Sum::default()
        });
        let waiting = keyed("a", 1);
        let id = waiting.event_id;
        transport
            .publish("sums", &[keyed("p", 13), waiting, keyed("b", 2)])
            .await
            .unwrap();
        let mut runner = sums_runner(
            Arc::new(InMemoryProjectionStore::new()),
            &sum,
            &transport,
            three_attempts(),
        );
        let failed = runner.run_once().await;
        assert!(
            matches!(&failed, Err(ProjectionError::Apply { event_id, .. }) if *event_id == id),
            "{failed:?}"
        );
        assert_eq!(*sum.seen.lock().unwrap(), [2], "the rest took effect");
    });
}

/// A batch whose other events took effect while one that waits (its `apply` answered
/// `Unavailable`) was set aside still counts as failed: the worker backs off, as it does while
/// its backend is away, instead of going on at once as after progress.
#[test]
fn a_batch_with_an_event_that_waits_set_aside_still_backs_off() {
    run_paused(|| async {
        let waits = Sum {
            unavailable_on: Some(13),
            ..Sum::default()
        };
        let waited = next_event_after_a_batch_with_13_set_aside(waits).await;
        assert!(
            waited >= Duration::from_millis(500),
            "the worker went on at once: 2 applied after {waited:?}"
        );
    });
}

/// An event of an old schema version no upcaster takes further (a type whose version went up
/// with no upcaster registered, which `validate` cannot see, or a record with a wrong schema
/// version) would wait for a build that never comes: no redelivery brings the upcaster, so it
/// is dead-lettered on its first delivery, where it can be seen and replayed, instead of
/// blocking its key. Its batch mate takes effect.
#[test]
fn an_event_missing_its_upcaster_is_dead_lettered_at_once() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum::default());
        let mut old = record(1);
        old.schema_version = 0;
        let id = old.event_id;
        transport.publish("sums", &[old, record(5)]).await.unwrap();
        let types = types();
        types.validate().expect("no chain registered, no gap found");
        let mut runner = sums_runner(
            Arc::new(InMemoryProjectionStore::new()),
            &sum,
            &transport,
            three_attempts(),
        );
        let first = runner
            .run_once()
            .await
            .expect_err("the old event fails its batch");
        assert!(
            matches!(
                &first,
                ProjectionError::Decode { event_id, source: DecodeError::MissingUpcaster { found: 0, .. } }
                    if *event_id == id
            ),
            "{first:?}"
        );
        run_until_drained(&mut runner, &transport).await;
        let dead = transport.dead_letters("sums", "sum");
        assert_eq!(
            dead.iter()
                .map(|(r, n)| (r.event_id, *n))
                .collect::<Vec<_>>(),
            [(id, 1)],
            "dead-lettered on its first delivery"
        );
        assert_eq!(*sum.seen.lock().unwrap(), [5], "the batch mate took effect");
    });
}

/// The event-bus consumer dead-letters an event missing its upcaster at once, on its first
/// delivery (no redelivery brings the upcaster), never handled.
#[test]
fn the_event_bus_consumer_dead_letters_an_event_missing_its_upcaster() {
    use cqrs_core::runtime::{HealthReporter, Shutdown, Worker, WorkerContext};
    run(async {
        let seen = Counter::named("counter");
        let bus = cqrs_core::EventBus::builder()
            .handler(seen.clone())
            .build()
            .unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        let mut old = record(1);
        old.schema_version = 0;
        let id = old.event_id;
        transport.publish("adds", &[old]).await.unwrap();
        let mut consumer = cqrs_core::projection::EventBusConsumer::new(
            bus,
            transport.clone(),
            "adds",
            "bus",
            three_attempts(),
        );
        let (stop, shutdown) = Shutdown::new();
        let running = tokio::spawn(async move {
            consumer
                .run(WorkerContext::new(
                    shutdown,
                    HealthReporter::detached("test"),
                ))
                .await
                .map_err(|e| e.to_string())
        });
        cqrs_core::testing::eventually(Duration::from_secs(5), "dead-lettered", || async {
            (!transport.dead_letters("adds", "bus").is_empty()).then_some(())
        })
        .await;
        stop.trigger();
        running.await.unwrap().unwrap();
        let dead = transport.dead_letters("adds", "bus");
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].0.event_id, dead[0].1), (id, 1));
        let reason = transport.dead_letters_with_errors("adds", "bus")[0]
            .2
            .clone();
        assert!(
            reason.as_deref().is_some_and(|r| r.contains("upcaster")),
            "{reason:?}"
        );
        assert_eq!(transport.backlog("adds", "bus"), 0);
        assert_eq!(seen.seen(), 0);
    });
}

/// A run that ends cleanly but cannot close its consumer says so: what the consumer held back
/// waits for the redelivery delay.
#[test]
fn a_runner_whose_consumer_fails_to_close_returns_the_error() {
    use cqrs_core::runtime::{HealthReporter, Shutdown, Worker, WorkerContext};
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let counted = Counted::new(&transport);
        counted
            .close_fails
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let sum = Arc::new(Sum::default());
        transport.publish("sums", &[record(4)]).await.unwrap();
        let mut runner = ProjectionRunner::from_transport(
            Arc::new(InMemoryProjectionStore::new()),
            sum.clone(),
            counted.clone(),
            "sums",
            "sum",
            ConsumerOptions::default().block(Duration::from_millis(10)),
            types(),
        );
        let (stop, shutdown) = Shutdown::new();
        let running = tokio::spawn(async move {
            runner
                .run(WorkerContext::new(
                    shutdown,
                    HealthReporter::detached("test"),
                ))
                .await
                .map_err(|e| e.to_string())
        });
        cqrs_core::testing::eventually(Duration::from_secs(10), "the event applied", || async {
            (*sum.seen.lock().unwrap() == [4]).then_some(())
        })
        .await;
        stop.trigger();
        let error = running.await.unwrap().unwrap_err();
        assert!(error.contains("told to fail its close"), "{error}");
    });
}

/// Runs a transport-fed `sum` past its deliveries with `event` in the topic, and checks the
/// event is neither dead-lettered nor applied, but still waiting.
fn waits_for_a_newer_build(event: EventRecord, policy: UnknownEventPolicy) {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let counted = Counted::new(&transport);
        let store = Arc::new(InMemoryProjectionStore::new());
        let sum = Arc::new(Sum::default());
        let id = event.event_id;
        transport.publish("sums", &[event]).await.unwrap();
        let mut types = EventTypes::new();
        types.register::<Added>();
        types.unknown_events(policy);
        let mut runner = ProjectionRunner::from_transport(
            store.clone(),
            sum.clone(),
            counted.clone(),
            "sums",
            "sum",
            three_attempts(),
            Arc::new(types),
        );
        // Past the 3 deliveries it may use up.
        let handed_out = run_until_handed_out(&mut runner, &counted, &[id], 5).await;
        assert!(handed_out > 3, "handed out {handed_out} times");
        let err = runner.run_once().await;
        assert!(
            transport.dead_letters("sums", "sum").is_empty(),
            "dead-lettered: {:?}",
            transport.dead_letters("sums", "sum")
        );
        assert_eq!(
            transport.backlog("sums", "sum"),
            1,
            "still waiting: {err:?}"
        );
        assert_eq!(*sum.total.lock().unwrap(), 0);
    });
}

/// A batch that takes longer than the redelivery delay is kept alive: another instance of the
/// projection does not get it meanwhile.
#[test]
fn a_long_batch_is_not_handed_to_another_instance() {
    // On tokio's paused clock (everything here is in memory): on the real one, a thread held
    // up for 40 ms let the keep-alive and the second consumer's claim come due together.
    run_paused(|| async {
        let transport = Arc::new(InMemoryTransport::new());
        let store = Arc::new(Flaky::default());
        let sum = Arc::new(Sum::default());
        transport.publish("sums", &[record(4)]).await.unwrap();
        let options = |name: &str| {
            ConsumerOptions::default()
                .consumer_name(name)
                .block(Duration::from_millis(20))
                .redelivery_delay(Duration::from_millis(60))
        };
        // The projection's lock is held, so the first runner's batch waits in `begin`, past
        // several redelivery delays.
        let lock = store.inner.begin("sum").await.unwrap();
        let first = {
            let (store, sum, transport, options) = (
                store.clone(),
                sum.clone(),
                transport.clone(),
                options("first"),
            );
            tokio::spawn(async move {
                sums_runner(store, &sum, &transport, options)
                    .run_once()
                    .await
            })
        };
        cqrs_core::testing::eventually(
            Duration::from_secs(5),
            "the first runner fetched",
            || async { (store.begins.load(Ordering::SeqCst) > 0).then_some(()) },
        )
        .await;
        let mut second = transport
            .consumer("sums", "sum", options("second"))
            .await
            .unwrap();
        let mut waited = Duration::ZERO;
        while waited < Duration::from_millis(300) {
            let fetched = second.fetch(10).await.unwrap();
            assert!(fetched.is_empty(), "handed out again while kept alive");
            waited += Duration::from_millis(20);
        }
        store.inner.commit(lock).await.unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(*sum.total.lock().unwrap(), 4);
    });
}

/// A full batch of events the projection does not apply (types it skips) is not "caught up":
/// the store-fed runner reads on at once instead of sleeping its idle interval after it.
#[test]
fn a_batch_of_skipped_events_does_not_make_the_store_fed_runner_sleep() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let mut skipped = Vec::new();
        for n in 0..250 {
            let mut other = record(n);
            other.event_type = "other.event".into();
            skipped.push(other);
        }
        events
            .append("others", ExpectedVersion::Any, skipped)
            .await
            .unwrap();
        events
            .append("sums", ExpectedVersion::Any, vec![record(5)])
            .await
            .unwrap();
        let sum = Arc::new(Sum::default());
        let runner = ProjectionRunner::from_store(
            Arc::new(InMemoryProjectionStore::new()),
            sum.clone(),
            events.clone(),
            types(),
        )
        .batch_size(100)
        // Were the runner to sleep after a batch of skipped events, the event would wait
        // well past the test's deadline.
        .idle_interval(Duration::from_secs(3600));
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        cqrs_core::testing::eventually(Duration::from_secs(10), "the event applied", || async {
            (*sum.seen.lock().unwrap() == [5]).then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A transport-fed runner whose consumer never blocks (`block` of zero) still lets the
/// shutdown through on a single-threaded runtime.
#[test]
fn a_runner_polling_without_blocking_still_stops() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum::default());
        let runner = sums_runner(
            Arc::new(InMemoryProjectionStore::new()),
            &sum,
            &transport,
            ConsumerOptions::default().block(Duration::ZERO),
        );
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        transport.publish("sums", &[record(3)]).await.unwrap();
        cqrs_core::testing::eventually(Duration::from_secs(10), "the event applied", || async {
            (*sum.seen.lock().unwrap() == [3]).then_some(())
        })
        .await;
        runtime
            .shutdown(Duration::from_secs(5))
            .await
            .expect("stopped within the grace period");
    });
}

/// A running runner deletes its inbox entries older than its retention, once per interval,
/// also while its fetch waits without limit; entries younger than the retention stay.
#[test]
fn a_running_runner_purges_its_old_inbox_entries() {
    run(async {
        let clock = cqrs_core::clock::ManualClock::new();
        let store = Arc::new(InMemoryProjectionStore::with_clock(Arc::new(clock.clone())));
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum::default());
        let (old, young) = (record(2), record(3));
        let hour = Duration::from_secs(3600);
        transport
            .publish("sums", std::slice::from_ref(&old))
            .await
            .unwrap();
        let runner = sums_runner(
            store.clone(),
            &sum,
            &transport,
            ConsumerOptions::default().block(Duration::MAX),
        )
        .inbox_retention(hour)
        .inbox_purge_interval(Duration::from_millis(5));
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the first event applied",
            || async { (*sum.seen.lock().unwrap() == [2]).then_some(()) },
        )
        .await;
        clock.advance(hour / 2);
        transport
            .publish("sums", std::slice::from_ref(&young))
            .await
            .unwrap();
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the second event applied",
            || async { (*sum.seen.lock().unwrap() == [2, 3]).then_some(()) },
        )
        .await;
        // Now the runner waits in its fetch; the old entry comes of age meanwhile, and the
        // purge still comes round.
        clock.advance(hour * 2 / 3);
        let processed = |id: Uuid| {
            let store = store.clone();
            async move {
                let mut unit = store.begin("sum").await.unwrap();
                !store.mark_processed(&mut unit, "sum", id).await.unwrap()
            }
        };
        cqrs_core::testing::eventually(Duration::from_secs(10), "the old entry purged", || async {
            (!processed(old.event_id).await).then_some(())
        })
        .await;
        assert!(processed(young.event_id).await, "the young entry stays");
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A purge runs on a task nobody awaits: a panic in the store's purge is logged with the
/// projection's name (not only printed by the panic hook), and the projection goes on.
#[test]
fn a_purge_that_panics_is_logged_and_the_projection_goes_on() {
    let store = Flaky {
        purge_panics: true,
        ..Flaky::default()
    };
    a_purge_gone_wrong_is_logged_and_the_projection_goes_on(
        store,
        "the panic logged",
        1,
        |fields| {
            fields
                .get("message")
                .is_some_and(|m| m.contains("inbox purge panicked"))
                && fields
                    .get("panic")
                    .is_some_and(|p| p.contains("the store's purge has a bug"))
        },
    );
}

/// A purge that never ends (a lock it waits for) is said at every interval it goes on, while
/// the projection goes on; no other purge starts meanwhile. (It was skipped without a word, and
/// the inbox grew.)
#[test]
fn a_purge_still_running_at_the_next_interval_is_logged() {
    let store = Flaky {
        purge_hangs: true,
        ..Flaky::default()
    };
    // Left running, never dropped to start another.
    let (dropped, purges) = (store.purge_dropped.clone(), store.purges.clone());
    a_purge_gone_wrong_is_logged_and_the_projection_goes_on(
        store,
        "the hung purge logged at two intervals, and still running",
        2,
        |fields| {
            fields.get("running_for").is_some()
                && fields
                    .get("message")
                    .is_some_and(|m| m.contains("inbox purge is still running"))
                && !dropped.load(Ordering::SeqCst)
        },
    );
    assert_eq!(purges.load(Ordering::SeqCst), 1, "no other purge started");
}

/// Runs `sum`'s runner on `store`, purging every 5 ms, until it logged, under the projection's
/// name, `times` records `logged` accepts (`what`); then an event published still takes effect.
fn a_purge_gone_wrong_is_logged_and_the_projection_goes_on(
    store: Flaky,
    what: &str,
    times: usize,
    logged: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
) {
    let (_, events) = crate::the_tracing_layer_opens_a_span_per_dispatch::recorder();
    run(async {
        let store = Arc::new(store);
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum::default());
        let runner = sums_runner(
            store.clone(),
            &sum,
            &transport,
            ConsumerOptions::default().block(Duration::from_millis(20)),
        )
        .inbox_purge_interval(Duration::from_millis(5));
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        cqrs_core::testing::eventually(Duration::from_secs(10), what, || async {
            events
                .lock()
                .unwrap()
                .iter()
                .filter(|(fields, _)| {
                    fields.get("projection").is_some_and(|p| p == "sum") && logged(fields)
                })
                .count()
                .ge(&times)
                .then_some(())
        })
        .await;
        transport.publish("sums", &[record(2)]).await.unwrap();
        cqrs_core::testing::eventually(Duration::from_secs(10), "the event applied", || async {
            (*sum.seen.lock().unwrap() == [2]).then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A store-fed runner purges its inbox too, though with stores in memory none of its steps
/// ever waits.
#[test]
fn a_store_fed_runner_purges_its_old_inbox_entries() {
    run(async {
        let clock = cqrs_core::clock::ManualClock::new();
        let store = Arc::new(InMemoryProjectionStore::with_clock(Arc::new(clock.clone())));
        let events = Arc::new(InMemoryEventStore::new());
        let sum = Arc::new(Sum::default());
        let old = record(2);
        events
            .append("s-1", ExpectedVersion::NO_STREAM, vec![old.clone()])
            .await
            .unwrap();
        let hour = Duration::from_secs(3600);
        let runner = ProjectionRunner::from_store(store.clone(), sum.clone(), events, types())
            .idle_interval(Duration::from_millis(5))
            .inbox_retention(hour)
            .inbox_purge_interval(Duration::from_millis(5));
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        cqrs_core::testing::eventually(Duration::from_secs(10), "the event applied", || async {
            (*sum.seen.lock().unwrap() == [2]).then_some(())
        })
        .await;
        clock.advance(hour * 2);
        cqrs_core::testing::eventually(Duration::from_secs(10), "the old entry purged", || async {
            let mut unit = store.begin("sum").await.unwrap();
            store
                .mark_processed(&mut unit, "sum", old.event_id)
                .await
                .unwrap()
                .then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A projection that panics on an event is treated as one that fails on it: only that event
/// is handed back as an attempt and dead-lettered in the end, and its batch mates take effect
/// (a panic unwinding past the runner handed the whole batch back counted, and every event
/// of it reached the dead letters together).
#[test]
fn a_panicking_projection_does_not_take_its_batch_mates_down() {
    run(poison_with_a_batch_mate(true));
}

/// A runner whose store is down backs off from 10 ms at least, doubling, even with an idle
/// interval of zero (it retried every millisecond, logging each time).
#[test]
fn a_failing_runner_backs_off_even_with_a_zero_idle_interval() {
    run_paused(|| async {
        let store = Arc::new(Flaky::default());
        store.down.store(true, Ordering::SeqCst);
        let runner = ProjectionRunner::from_store(
            store.clone(),
            Arc::new(Sum::default()),
            Arc::new(InMemoryEventStore::new()),
            types(),
        )
        .idle_interval(Duration::ZERO);
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let begins = store.begins.load(Ordering::SeqCst);
        // At 0, 10, 30, 70, 150, 310 and 630 ms: 7 tries in the first second (every
        // millisecond before: about 1,000).
        assert!((6..=8).contains(&begins), "{begins} tries in 1 s");
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A caught-up store-fed runner with an idle interval of zero waits 1 ms between queries at
/// least (it queried the store without pause: under a paused clock, time never moved).
#[test]
fn a_caught_up_runner_pauses_between_queries_even_with_a_zero_idle_interval() {
    run_paused(|| async {
        let store = Arc::new(Flaky::default());
        let runner = ProjectionRunner::from_store(
            store.clone(),
            Arc::new(Sum::default()),
            Arc::new(InMemoryEventStore::new()),
            types(),
        )
        .idle_interval(Duration::ZERO);
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let begins = store.begins.load(Ordering::SeqCst);
        // One query per millisecond at most.
        assert!((100..=1001).contains(&begins), "{begins} queries in 1 s");
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// An inbox retention of zero deleted the whole inbox at each purge; it is raised to the
/// minimum of 1 minute.
#[test]
fn a_zero_inbox_retention_keeps_entries_for_a_minute() {
    run(async {
        let clock = cqrs_core::clock::ManualClock::new();
        let store = Arc::new(InMemoryProjectionStore::with_clock(Arc::new(clock.clone())));
        let events = Arc::new(InMemoryEventStore::new());
        events
            .append("s-1", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        let mut runner =
            ProjectionRunner::from_store(store, Arc::new(Sum::default()), events, types())
                .inbox_retention(Duration::ZERO);
        assert_eq!(runner.run_once().await.unwrap(), 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(runner.purge_inbox().await.unwrap(), 0, "a second old: kept");
        clock.advance(Duration::from_secs(60));
        assert_eq!(
            runner.purge_inbox().await.unwrap(),
            1,
            "past a minute: purged"
        );
    });
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A runner aborted at shutdown (stuck in its store) takes its inbox purge with it: the purge
/// does not run on after the worker is gone.
#[test]
fn an_aborted_runner_takes_its_inbox_purge_with_it() {
    run(async {
        let store = Arc::new(Flaky {
            hangs: true,
            ..Flaky::default()
        });
        let runner = ProjectionRunner::from_store(
            store.clone(),
            Arc::new(Sum::default()),
            Arc::new(InMemoryEventStore::new()),
            types(),
        );
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        cqrs_core::testing::eventually(Duration::from_secs(10), "the purge started", || async {
            store.purge_started.load(Ordering::SeqCst).then_some(())
        })
        .await;
        runtime
            .shutdown(Duration::from_millis(50))
            .await
            .expect_err("the runner is stuck in `begin`");
        cqrs_core::testing::eventually(Duration::from_secs(10), "the purge dropped", || async {
            store.purge_dropped.load(Ordering::SeqCst).then_some(())
        })
        .await;
    });
}

/// A gap in the upcasters is found when the worker starts, not when an event needs the
/// missing one: the runner and the event-bus consumer fail at once, naming it.
#[test]
fn a_worker_with_a_gap_in_its_upcasters_fails_at_start() {
    use cqrs_core::runtime::{HealthReporter, Shutdown, Worker, WorkerContext};
    run(async {
        // At version 3, with an upcaster from version 1 and none from 2.
        #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
        struct Noted {
            body: String,
        }
        impl cqrs_core::Message for Noted {
            const NAME: &'static str = "test.noted3";
        }
        impl cqrs_core::Event for Noted {
            const VERSION: u32 = 3;
        }
        let mut types = EventTypes::new();
        types.register::<Added>().register::<Noted>();
        types.upcaster("test.noted3", 1, Ok);
        let types = Arc::new(types);
        let context = || WorkerContext::new(Shutdown::new().1, HealthReporter::detached("test"));
        let mut runner = ProjectionRunner::from_store(
            Arc::new(InMemoryProjectionStore::new()),
            Arc::new(Sum::default()),
            Arc::new(InMemoryEventStore::new()),
            types.clone(),
        );
        let err = runner.run(context()).await.unwrap_err();
        assert!(
            err.to_string().contains(
                "the upcasters of event `test.noted3` have a gap: none takes schema version 2"
            ),
            "{err}"
        );

        let bus = cqrs_core::EventBus::builder().build().unwrap();
        let mut consumer = cqrs_core::projection::EventBusConsumer::new(
            bus,
            Arc::new(InMemoryTransport::new()),
            "sums",
            "bus",
            ConsumerOptions::default(),
        )
        .event_types((*types).clone());
        let err = consumer.run(context()).await.unwrap_err();
        assert!(err.to_string().contains("schema version 2"), "{err}");
    });
}

/// A projection written by hand (without `#[async_trait]`) whose `apply` panics on the sum 13
/// while building its future, before there is a future to poll; it records the other sums.
#[derive(Default)]
struct PanicsEagerly {
    seen: Arc<Mutex<Vec<u64>>>,
}

type Applied<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), HandlerError>> + Send + 'a>>;

impl Projection<InMemoryProjectionStore> for PanicsEagerly {
    fn name(&self) -> &str {
        "sum"
    }

    fn apply<'a, 'b, 'c, 'd>(
        &'a self,
        unit: &'b mut InMemoryUnit,
        event: &'c EventEnvelope,
    ) -> Applied<'d>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        let sum = event.downcast_ref::<Added>().map(|added| added.sum);
        assert_ne!(sum, Some(13), "the projection panics eagerly on 13");
        let seen = self.seen.clone();
        Box::pin(async move {
            if let Some(sum) = sum {
                unit.on_commit(move || seen.lock().unwrap().push(sum));
            }
            Ok(())
        })
    }

    fn reset<'a, 'b, 'c>(&'a self, _: &'b mut InMemoryUnit) -> Applied<'c>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        Box::pin(async { Ok(()) })
    }
}

/// A hand-written projection whose `apply` panics before returning its future fails only
/// that event, as one whose future panics does: of [1, 13, 2], 13 is dead-lettered and 1 and
/// 2 take effect (the call was outside the runner's guard, and the panic unwound past it).
#[test]
fn a_projection_that_panics_before_its_future_fails_only_its_event() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        transport
            .publish("sums", &[record(1), record(13), record(2)])
            .await
            .unwrap();
        let projection = Arc::new(PanicsEagerly::default());
        let mut runner = ProjectionRunner::from_transport(
            Arc::new(InMemoryProjectionStore::new()),
            projection.clone(),
            transport.clone(),
            "sums",
            "sum",
            three_attempts(),
            types(),
        );
        for _ in 0..200 {
            // A panic here fails the test: the runner must turn it into an error.
            let _ = runner.run_once().await;
            if transport.backlog("sums", "sum") == 0 {
                break;
            }
        }
        let mut seen = projection.seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, [1, 2], "the batch mates took effect");
        let dead = dead_sums(&transport);
        assert_eq!(dead, [13], "only the panicking event is dead-lettered");
    });
}

/// A runner idle for longer than `stall_after` (caught up, waiting for events) whose store
/// then fails once is degraded, not unhealthy: the time it waited for events is no stall.
#[test]
fn an_idle_runner_whose_store_fails_once_is_only_degraded() {
    run_paused(|| async {
        let store = Arc::new(Flaky::default());
        let runner = ProjectionRunner::from_store(
            store.clone(),
            Arc::new(Sum::default()),
            Arc::new(InMemoryEventStore::new()),
            types(),
        )
        .idle_interval(Duration::from_secs(60))
        .stall_after(Duration::from_secs(2));
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        // Caught up once: then it waits out its idle interval.
        cqrs_core::testing::eventually(Duration::from_secs(5), "a first step", || async {
            (store.begins.load(Ordering::SeqCst) >= 1).then_some(())
        })
        .await;
        store.down.store(true, Ordering::SeqCst);
        let health = cqrs_core::testing::eventually(
            Duration::from_secs(120),
            "the failed step is reported",
            || async {
                match &runtime.health().await.components["sum"].0 {
                    cqrs_core::runtime::Health::Healthy => None,
                    other => Some(other.clone()),
                }
            },
        )
        .await;
        assert!(
            matches!(health, cqrs_core::runtime::Health::Degraded(_)),
            "{health:?}"
        );
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}

/// A projection whose read model's commit panics once (an `on_commit` effect's bug, a
/// backend's driver panicking).
#[derive(Default)]
struct PanicsOnCommitOnce {
    seen: Arc<Mutex<Vec<u64>>>,
    armed: Arc<AtomicBool>,
}

#[async_trait]
impl Projection<InMemoryProjectionStore> for PanicsOnCommitOnce {
    fn name(&self) -> &str {
        "sum"
    }

    async fn apply(
        &self,
        unit: &mut InMemoryUnit,
        event: &EventEnvelope,
    ) -> Result<(), HandlerError> {
        let Some(sum) = event.downcast_ref::<Added>().map(|added| added.sum) else {
            return Ok(());
        };
        let (seen, armed) = (self.seen.clone(), self.armed.clone());
        unit.on_commit(move || {
            assert!(!armed.swap(false, Ordering::SeqCst), "the commit panics");
            seen.lock().unwrap().push(sum);
        });
        Ok(())
    }

    async fn reset(&self, _: &mut InMemoryUnit) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// A panic in a transport-fed batch outside the projection's `apply` (here in the store's
/// commit) is reported, and the batch is taken one event per unit: the panic gone, each event
/// takes effect, no attempt is counted against any (with one delivery allowed, nothing is
/// dead-lettered), and the panic is the step's error.
#[test]
fn a_batch_whose_commit_panics_is_handed_back_without_an_attempt() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        transport
            .publish("sums", &[record(1), record(2)])
            .await
            .unwrap();
        let projection = Arc::new(PanicsOnCommitOnce::default());
        projection.armed.store(true, Ordering::SeqCst);
        let mut runner = ProjectionRunner::from_transport(
            Arc::new(InMemoryProjectionStore::new()),
            projection.clone(),
            transport.clone(),
            "sums",
            "sum",
            three_attempts().max_deliveries(1),
            types(),
        );
        let mut failures = 0;
        for _ in 0..200 {
            // A panic here fails the test: the runner must turn it into an error.
            if runner.run_once().await.is_err() {
                failures += 1;
            }
            if transport.backlog("sums", "sum") == 0 {
                break;
            }
        }
        assert_eq!(failures, 1, "the batch whose commit panicked failed");
        assert!(transport.dead_letters("sums", "sum").is_empty());
        let mut seen = projection.seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, [1, 2]);
    });
}

/// The event whose effect panics found last in its batch leaves the worker degraded, as
/// when it is found first: the others took effect (not a failing step).
#[test]
fn a_panicking_effect_found_last_leaves_the_worker_degraded() {
    use cqrs_core::runtime::{Health, Runtime};
    use cqrs_core::testing::eventually;
    run_paused(|| async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum {
            effect_panics_on: Some(7),
            ..Sum::default()
        });
        transport
            .publish("sums", &[record(1), record(7)])
            .await
            .unwrap();
        let runner = sums_runner(
            Arc::new(InMemoryProjectionStore::new()),
            &sum,
            &transport,
            ConsumerOptions::default()
                .block(Duration::from_millis(20))
                .redelivery_delay(Duration::from_secs(3600)),
        );
        let runtime = Runtime::builder().worker(runner).start();
        eventually(Duration::from_secs(5), "1 applied alone", || async {
            (*sum.seen.lock().unwrap() == [1, 1]).then_some(())
        })
        .await;
        eventually(Duration::from_secs(5), "degraded", || async {
            let health = runtime.health().await.components["sum"].0.clone();
            match health {
                Health::Degraded(_) => Some(()),
                Health::Unhealthy(reason) => panic!("unhealthy: {reason}"),
                _ => None,
            }
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A lone event whose unit panics once (the store's passing fault, as far as the runner can
/// tell) is handed back without an attempt: with one delivery allowed, it is not
/// dead-lettered, and takes effect once the commit works.
#[test]
fn a_lone_event_whose_commit_panics_once_is_not_dead_lettered() {
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        transport.publish("sums", &[record(3)]).await.unwrap();
        let projection = Arc::new(PanicsOnCommitOnce::default());
        projection.armed.store(true, Ordering::SeqCst);
        let mut runner = ProjectionRunner::from_transport(
            Arc::new(InMemoryProjectionStore::new()),
            projection.clone(),
            transport.clone(),
            "sums",
            "sum",
            three_attempts().max_deliveries(1),
            types(),
        );
        for _ in 0..200 {
            let _ = runner.run_once().await;
            if transport.backlog("sums", "sum") == 0 {
                break;
            }
        }
        assert!(transport.dead_letters("sums", "sum").is_empty());
        assert_eq!(*projection.seen.lock().unwrap(), [3]);
    });
}

/// A transport-fed runner whose store came back takes a batch of duplicates (a relay that
/// shipped again): nothing applies, but its unit committed, so the store works and the runner
/// is healthy at once, not degraded until the failed batch's redelivery (a batch that applied
/// nothing was taken for an empty fetch).
#[test]
fn a_batch_of_duplicates_after_a_failure_clears_the_runners_health() {
    run_paused(|| async {
        let store = Arc::new(Flaky::default());
        let sum = Arc::new(Sum::default());
        let transport = Arc::new(InMemoryTransport::new());
        let applied_once = record(2);
        transport
            .publish("sums", std::slice::from_ref(&applied_once))
            .await
            .unwrap();
        let redelivery_delay = Duration::from_secs(10);
        let options = ConsumerOptions::default()
            .block(Duration::from_millis(100))
            .redelivery_delay(redelivery_delay)
            .max_deliveries(3);
        let runner = sums_runner(store.clone(), &sum, &transport, options);
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        let health = || async { runtime.health().await.components["sum"].0.clone() };
        cqrs_core::testing::eventually(Duration::from_secs(30), "the first event", || async {
            (*sum.total.lock().unwrap() == 2).then_some(())
        })
        .await;
        store.down.store(true, Ordering::SeqCst);
        transport.publish("sums", &[record(3)]).await.unwrap();
        cqrs_core::testing::eventually(Duration::from_secs(30), "the failed batch", || async {
            matches!(health().await, cqrs_core::runtime::Health::Degraded(_)).then_some(())
        })
        .await;
        let failed_at = tokio::time::Instant::now();
        store.down.store(false, Ordering::SeqCst);
        transport
            .publish("sums", std::slice::from_ref(&applied_once))
            .await
            .unwrap();
        cqrs_core::testing::eventually(Duration::from_secs(30), "healthy", || async {
            (health().await == cqrs_core::runtime::Health::Healthy).then_some(())
        })
        .await;
        assert!(
            failed_at.elapsed() < redelivery_delay,
            "healthy only {:?} after the failure, with the failed batch's redelivery",
            failed_at.elapsed()
        );
        assert_eq!(
            *sum.total.lock().unwrap(),
            2,
            "the duplicate took no effect"
        );
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}

/// A transport-fed runner whose fetch failed, with nothing to fetch once the transport is
/// back, is healthy at the next empty fetch: no batch was handed back, so there is no
/// redelivery to wait for. Before, it stayed degraded for twice the redelivery delay, and
/// failed fetches spaced closer than that on an idle topic added up to "unhealthy".
#[test]
fn a_failed_fetch_on_an_idle_topic_does_not_hold_the_runners_health() {
    run_paused(|| async {
        let store = Arc::new(InMemoryProjectionStore::new());
        let sum = Arc::new(Sum::default());
        let transport = Counted::new(&Arc::new(InMemoryTransport::new()));
        let redelivery_delay = Duration::from_secs(10);
        let options = ConsumerOptions::default()
            .block(Duration::from_millis(100))
            .redelivery_delay(redelivery_delay);
        let runner = ProjectionRunner::from_transport(
            store,
            sum.clone(),
            transport.clone(),
            "sums",
            "sum",
            options,
            types(),
        );
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        let health = || async { runtime.health().await.components["sum"].0.clone() };
        cqrs_core::testing::eventually(Duration::from_secs(30), "healthy", || async {
            (health().await == cqrs_core::runtime::Health::Healthy).then_some(())
        })
        .await;
        transport.fetch_fails.store(true, Ordering::SeqCst);
        cqrs_core::testing::eventually(Duration::from_secs(30), "the failed fetch", || async {
            matches!(health().await, cqrs_core::runtime::Health::Degraded(_)).then_some(())
        })
        .await;
        let failed_at = tokio::time::Instant::now();
        transport.fetch_fails.store(false, Ordering::SeqCst);
        cqrs_core::testing::eventually(Duration::from_secs(60), "healthy again", || async {
            (health().await == cqrs_core::runtime::Health::Healthy).then_some(())
        })
        .await;
        assert!(
            failed_at.elapsed() < redelivery_delay,
            "healthy only {:?} after the fetch failed, with no batch to wait for",
            failed_at.elapsed()
        );
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}

/// A transport-fed runner whose store stays down: its batch fails and waits out the
/// redelivery delay (the fetches meanwhile come back empty), then fails again. Health is never
/// Healthy in between (an empty fetch proves the transport, not the store) and turns Unhealthy
/// once the batches have kept failing for `stall_after`; with the store back, the event takes
/// effect and the runner is healthy again.
#[test]
fn a_transport_fed_runner_whose_store_stays_down_is_reported() {
    run_paused(|| async {
        let store = Arc::new(Flaky::default());
        store.down.store(true, Ordering::SeqCst);
        let sum = Arc::new(Sum::default());
        let transport = Arc::new(InMemoryTransport::new());
        transport.publish("sums", &[record(1)]).await.unwrap();
        let options = ConsumerOptions::default()
            .block(Duration::from_millis(100))
            .redelivery_delay(Duration::from_secs(10))
            .max_deliveries(3);
        let runner = sums_runner(store.clone(), &sum, &transport, options)
            .stall_after(Duration::from_secs(25));
        let runtime = cqrs_core::runtime::Runtime::builder()
            .worker(runner)
            .start();
        let health = || async { runtime.health().await.components["sum"].0.clone() };
        cqrs_core::testing::eventually(Duration::from_secs(30), "the failed batch", || async {
            matches!(health().await, cqrs_core::runtime::Health::Degraded(_)).then_some(())
        })
        .await;
        let failed_at = tokio::time::Instant::now();
        loop {
            let now = health().await;
            assert_ne!(
                now,
                cqrs_core::runtime::Health::Healthy,
                "healthy {:?} after the failure, with the store down",
                failed_at.elapsed()
            );
            if matches!(now, cqrs_core::runtime::Health::Unhealthy(_)) {
                break;
            }
            assert!(
                failed_at.elapsed() < Duration::from_secs(120),
                "never unhealthy: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        store.down.store(false, Ordering::SeqCst);
        cqrs_core::testing::eventually(
            Duration::from_secs(60),
            "healthy, the event applied",
            || async {
                (health().await == cqrs_core::runtime::Health::Healthy
                    && *sum.total.lock().unwrap() == 1)
                    .then_some(())
            },
        )
        .await;
        assert!(transport.dead_letters("sums", "sum").is_empty());
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}

/// A batch that takes many passes keeps its deliveries for the whole step, not for one pass
/// at a time: five events hang, each is cut off by the apply timeout (2 s) and set aside, the
/// rest retried at once. No pass lasts the keep-alive interval (3 s), the step outlasts the
/// redelivery delay (9 s), and another consumer of the group gets none of the batch before the
/// step is over (the last event's effect taken, the others handed back).
#[test]
fn a_batch_of_many_short_passes_is_kept_alive_for_the_whole_step() {
    run_paused(|| async {
        let sum = Arc::new(Sum {
            hangs_on: vec![1, 2, 3, 4, 5],
            ..Sum::default()
        });
        let transport = Arc::new(InMemoryTransport::new());
        let records: Vec<_> = (1..=6).map(record).collect();
        transport.publish("sums", &records).await.unwrap();
        let options = ConsumerOptions::default()
            .block(Duration::from_millis(100))
            .redelivery_delay(Duration::from_secs(9))
            .max_deliveries(10);
        // The runner's hand-outs counted, so the other consumer starts once it has the batch.
        let counted = Counted::new(&transport);
        let mut runner = ProjectionRunner::from_transport(
            Arc::new(InMemoryProjectionStore::new()),
            sum.clone(),
            counted.clone(),
            "sums",
            "sum",
            options.clone(),
            types(),
        )
        .apply_timeout(Duration::from_secs(2));
        let started = tokio::time::Instant::now();
        let step = tokio::spawn(async move { runner.run_once().await });
        let ids: Vec<Uuid> = records.iter().map(|r| r.event_id).collect();
        cqrs_core::testing::eventually(Duration::from_secs(1), "the runner fetches", || async {
            (counted.handed_out(&ids) == 1).then_some(())
        })
        .await;
        let mut other = transport
            .consumer("sums", "sum", options.consumer_name("other"))
            .await
            .unwrap();
        let mut early = Vec::new();
        while !step.is_finished() {
            for delivery in other.fetch(10).await.unwrap() {
                if *sum.total.lock().unwrap() != 6 {
                    early.push((delivery.record.payload["sum"].clone(), started.elapsed()));
                }
            }
        }
        let _ = step.await.unwrap();
        assert!(
            started.elapsed() > Duration::from_secs(9),
            "the step took {:?}, less than the redelivery delay: the test proves nothing",
            started.elapsed()
        );
        assert_eq!(
            *sum.total.lock().unwrap(),
            6,
            "the event that does not hang took effect"
        );
        assert!(
            early.is_empty(),
            "handed to another consumer while the step ran (sum, when): {early:?}"
        );
    });
}

/// A runner whose `run` future was dropped (a caller's timeout) before it ended, its shutdown
/// later asked for, still fetches when called directly: `catch_up` took the dropped run's
/// shutdown signal for its own and, about every other call, returned 0 without fetching.
#[test]
fn a_runner_whose_run_was_dropped_catches_up_when_called() {
    use cqrs_core::runtime::{HealthReporter, Shutdown, Worker, WorkerContext};
    run(async {
        let transport = Arc::new(InMemoryTransport::new());
        let sum = Arc::new(Sum::default());
        let mut runner = ProjectionRunner::from_transport(
            Arc::new(InMemoryProjectionStore::new()),
            sum.clone(),
            transport.clone(),
            "sums",
            "sum",
            ConsumerOptions::default().block(Duration::from_millis(10)),
            types(),
        );
        let (stop, shutdown) = Shutdown::new();
        {
            let run = runner.run(WorkerContext::new(
                shutdown,
                HealthReporter::detached("test"),
            ));
            tokio::pin!(run);
            // Polled once (it waits in its fetch), then dropped.
            tokio::select! {
                biased;
                ended = &mut run => panic!("the run ended: {ended:?}"),
                () = tokio::task::yield_now() => {}
            }
        }
        stop.trigger();
        for n in 1..=20 {
            transport.publish("sums", &[record(n)]).await.unwrap();
            assert_eq!(runner.catch_up().await.unwrap(), 1, "event {n} applied");
        }
        assert_eq!(sum.seen.lock().unwrap().len(), 20);
    });
}

/// `cqrs_projection_lag_seconds` of `sum`.
const LAG: &str = "cqrs_projection_lag_seconds{projection=sum}";

/// `record(sum)`, occurred `ago`.
fn occurred_ago(sum: u64, ago: Duration) -> EventRecord {
    let mut record = record(sum);
    record.metadata.occurred_at = chrono::Utc::now() - ago;
    record
}

/// `record(sum)`, occurred `ago` before `clock`'s now.
fn occurred_before(clock: &cqrs_core::clock::ManualClock, sum: u64, ago: Duration) -> EventRecord {
    use cqrs_core::clock::Clock;
    let mut record = record(sum);
    record.metadata.occurred_at = clock.now() - ago;
    record
}

/// On the runner's clock (`ProjectionRunner::clock`), to the second.
#[test]
fn a_store_fed_runner_reports_how_long_its_oldest_waiting_event_has_waited() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let clock = cqrs_core::clock::ManualClock::new();
            let events = Arc::new(InMemoryEventStore::new());
            let store = Arc::new(InMemoryProjectionStore::new());
            let sum = Arc::new(Sum {
                poison: Some(7),
                ..Sum::default()
            });
            let minutes = |n: u64| Duration::from_secs(60 * n);
            events
                .append(
                    "s-1",
                    ExpectedVersion::NO_STREAM,
                    vec![
                        occurred_before(&clock, 1, minutes(10)),
                        occurred_before(&clock, 2, minutes(5)),
                    ],
                )
                .await
                .unwrap();
            let mut runner =
                ProjectionRunner::from_store(store, sum.clone(), events.clone(), types())
                    .clock(Arc::new(clock.clone()));
            assert_eq!(counts.gauge(LAG), None, "nothing read yet");
            assert_eq!(runner.run_once().await.unwrap(), 2);
            assert_eq!(
                counts.gauge(LAG),
                Some(600.0),
                "the oldest event read was 10 minutes old"
            );
            assert_eq!(runner.run_once().await.unwrap(), 0);
            assert_eq!(counts.gauge(LAG), Some(0.0), "caught up");

            // Stuck on an event: each retry reads it again, older.
            events
                .append(
                    "s-1",
                    ExpectedVersion::Exactly(2),
                    vec![occurred_before(&clock, 7, minutes(3))],
                )
                .await
                .unwrap();
            assert!(runner.run_once().await.is_err(), "7 always fails");
            assert_eq!(counts.gauge(LAG), Some(180.0));
            clock.advance(minutes(1));
            assert!(runner.run_once().await.is_err());
            assert_eq!(counts.gauge(LAG), Some(240.0), "a minute older");
        })
    });
}

#[test]
fn a_transport_fed_runner_reports_how_long_its_oldest_fetched_event_has_waited() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let transport = Arc::new(InMemoryTransport::new());
            let store = Arc::new(InMemoryProjectionStore::new());
            let sum = Arc::new(Sum::default());
            transport
                .publish(
                    "sums",
                    &[
                        occurred_ago(4, Duration::ZERO),
                        occurred_ago(5, Duration::from_secs(30)),
                    ],
                )
                .await
                .unwrap();
            let options = ConsumerOptions::default().block(Duration::from_millis(20));
            let mut runner = sums_runner(store, &sum, &transport, options);
            assert_eq!(runner.run_once().await.unwrap(), 2);
            let lag = counts.gauge(LAG).unwrap();
            assert!((30.0..90.0).contains(&lag), "{lag}");
            assert_eq!(runner.run_once().await.unwrap(), 0, "nothing to fetch");
            assert_eq!(counts.gauge(LAG), Some(0.0), "caught up");

            let mut ahead = record(6);
            ahead.metadata.occurred_at = chrono::Utc::now() + Duration::from_secs(3600);
            transport.publish("sums", &[ahead]).await.unwrap();
            assert_eq!(runner.run_once().await.unwrap(), 1);
            assert_eq!(
                counts.gauge(LAG),
                Some(0.0),
                "an event stamped ahead of this clock (another host's) is not behind"
            );
        })
    });
}

#[test]
fn a_runner_that_cannot_read_reports_its_lag_as_not_a_number() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let events = Arc::new(ArrivesWhileRead {
                inner: Arc::new(InMemoryEventStore::new()),
                arrivals: AtomicUsize::new(0),
                failing: AtomicBool::new(false),
            });
            let store = Arc::new(InMemoryProjectionStore::new());
            let sum = Arc::new(Sum::default());
            let mut runner = ProjectionRunner::from_store(store, sum, events.clone(), types());
            assert_eq!(runner.run_once().await.unwrap(), 0);
            assert_eq!(runner.run_once().await.unwrap(), 0);
            assert_eq!(counts.gauge(LAG), Some(0.0), "caught up");
            events.failing.store(true, Ordering::SeqCst);
            assert!(runner.run_once().await.is_err());
            assert!(
                counts.gauge(LAG).unwrap().is_nan(),
                "not 0 (up to date) while the events cannot be read: {:?}",
                counts.gauge(LAG)
            );
            events.failing.store(false, Ordering::SeqCst);
            assert_eq!(runner.run_once().await.unwrap(), 0);
            assert_eq!(counts.gauge(LAG), Some(0.0), "measured again");
        })
    });
}

/// A batch handed back (its read model away) is still to apply while it waits for its
/// redelivery: the lag holds its oldest event (it went to 0 at the next empty fetch, so a
/// projection that could not apply anything looked up to date), and goes to 0 once applied.
#[test]
fn a_batch_waiting_for_its_redelivery_keeps_the_lag() {
    let counts = MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let transport = Arc::new(InMemoryTransport::new());
            let counted = Counted::new(&transport);
            let sum = Arc::new(Sum::default());
            sum.unavailable.store(true, Ordering::SeqCst);
            let old = occurred_ago(4, Duration::from_secs(45));
            let id = old.event_id;
            transport.publish("sums", &[old]).await.unwrap();
            let runner = ProjectionRunner::from_transport(
                Arc::new(InMemoryProjectionStore::new()),
                sum.clone(),
                counted.clone(),
                "sums",
                "sum",
                ConsumerOptions::default()
                    .block(Duration::from_millis(10))
                    .redelivery_delay(Duration::from_secs(2)),
                types(),
            );
            let runtime = cqrs_core::runtime::Runtime::builder()
                .worker(runner)
                .start();
            eventually(Duration::from_secs(5), "handed out", || async {
                (counted.handed_out(&[id]) == 1).then_some(())
            })
            .await;
            // The batch failed and was handed back; several empty fetches since.
            let fetched = counted.fetches.load(Ordering::SeqCst);
            eventually(Duration::from_secs(5), "five more fetches", || async {
                (counted.fetches.load(Ordering::SeqCst) >= fetched + 5).then_some(())
            })
            .await;
            assert_eq!(counted.handed_out(&[id]), 1, "not redelivered yet");
            let lag = counts.gauge(LAG).expect("set at each fetch");
            assert!((45.0..100.0).contains(&lag), "the lag held: {lag}");

            sum.unavailable.store(false, Ordering::SeqCst);
            eventually(Duration::from_secs(10), "applied, caught up", || async {
                (counts.gauge(LAG) == Some(0.0)).then_some(())
            })
            .await;
            assert_eq!(*sum.total.lock().unwrap(), 4);
            runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        })
    });
}
