//! Projections: read models fed from the event store's global order or a durable transport,
//! with their checkpoint and inbox committed together with their effects.

use crate::ports::{
    Consumer, ConsumerOptions, Delivery, DeliveryId, EventStore, EventTransport, ProjectionStore,
    StoreError, TransportError,
};
use crate::runtime::{Health, HealthReporter, Shutdown, Worker, WorkerContext};
use crate::{
    BoxError, DecodeError, DispatchError, ErrorKind, EventBus, EventEnvelope, EventRecord,
    EventTypes, HandlerError, Position,
};
use async_trait::async_trait;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

mod watch;
pub use watch::{ProjectionWatch, WatchError};

/// The `event_type` labels of the dead-letter counters: the type is read from a record, so a
/// name that is not wire-like is `invalid`, and past 256 distinct names they share `other`
/// (bounded series, whatever a stream or a table holds).
static DEAD_LETTER_TYPE_LABELS: crate::record::EventTypeLabels<256> =
    crate::record::EventTypeLabels::new();

/// A read model kept up to date from events.
///
/// `apply` writes through the unit of work of the [`ProjectionStore`], so the projection's
/// effects, its inbox entries and its checkpoint commit together: a redelivered event takes
/// effect once.
#[async_trait]
pub trait Projection<S: ProjectionStore>: Send + Sync + 'static {
    /// A stable name: the key of its checkpoint and inbox. Renamed, the projection has no
    /// checkpoint and replays from the first event onto its read model as it is (counts
    /// doubled, or a unique violation): [`rebuild`](ProjectionRunner::rebuild) under the new
    /// name, which resets the read model first.
    fn name(&self) -> &str;

    /// Applies one event. Events the projection does not care about are simply ignored.
    async fn apply(&self, unit: &mut S::Unit, event: &EventEnvelope) -> Result<(), HandlerError>;

    /// Clears the read model, before a rebuild from zero.
    async fn reset(&self, unit: &mut S::Unit) -> Result<(), HandlerError>;

    /// Finishes a rebuild: called once after [`reset`](Self::reset) and the replay of every
    /// event, in the same unit, before it commits. For a read model that keeps totals (counts
    /// per status, sums) cheaper to compute once from its rows than to move event by event
    /// while thousands of events replay in one transaction. Does nothing by default.
    async fn rebuilt(&self, unit: &mut S::Unit) -> Result<(), HandlerError> {
        let _ = unit;
        Ok(())
    }
}

/// Why a projection batch failed. The batch is rolled back; the runner retries it (fed from
/// the store, from the event that failed: the events before it take effect first, in a unit
/// of their own, unless the projection refused it as retryable).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The projection store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// An event could not be decoded: an unknown type under
    /// [`UnknownEventPolicy::Fail`](crate::UnknownEventPolicy::Fail), a type no part of this
    /// build knows under
    /// [`UnknownEventPolicy::AwaitNewerBuild`](crate::UnknownEventPolicy::AwaitNewerBuild), or a
    /// schema version above this build's (these wait for a newer build: a transport-fed runner hands them back
    /// without counting an attempt), an old version with no upcaster, an upcaster that failed,
    /// or a payload that does not match its type (no redelivery mends these: a transport-fed
    /// runner dead-letters the event).
    #[error("event {event_id} could not be decoded: {source}")]
    Decode {
        /// The event.
        event_id: uuid::Uuid,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The projection refused an event.
    #[error("projection `{projection}` failed on event {event_id} ({event_type}): {source}")]
    Apply {
        /// The projection.
        projection: String,
        /// The event.
        event_id: uuid::Uuid,
        /// Its type.
        event_type: String,
        /// The projection's error.
        #[source]
        source: HandlerError,
    },
    /// The projection's [`reset`](Projection::reset) or [`rebuilt`](Projection::rebuilt)
    /// failed during a [`rebuild`](ProjectionRunner::rebuild); the rebuild's unit of work is
    /// rolled back, so nothing changed.
    #[error(
        "projection `{projection}`'s `{step}` failed during a rebuild, which changed nothing: {source}"
    )]
    Rebuild {
        /// The projection.
        projection: String,
        /// `reset` or `rebuilt`.
        step: &'static str,
        /// The projection's error.
        #[source]
        source: HandlerError,
    },
    /// A rebuild needs the event store, and the runner was built without one.
    #[error(
        "projection `{0}` has no event store to rebuild from; build the runner with `from_store` or `with_event_store`"
    )]
    NoEventStore(String),
    /// The event store holds no event at or past the projection's checkpoint, which is the
    /// position of an event the projection applied: the store was restored from an older
    /// backup or recreated without the projections' checkpoints, or the checkpoints are
    /// another store's. Read from there, every new event at or below the checkpoint would be
    /// skipped. [`rebuild`](ProjectionRunner::rebuild) the projection (or point it at its own
    /// store).
    #[error(
        "projection `{projection}`'s checkpoint is at position {checkpoint}, past the end of the event store: the store was restored or recreated without the projection's checkpoints, or they belong to another store; rebuild the projection"
    )]
    CheckpointAhead {
        /// The projection.
        projection: String,
        /// Its checkpoint.
        checkpoint: Position,
    },
}

impl ProjectionError {
    /// The class of this error, to decide whether to retry: a store's or a transport's own,
    /// the projection's (`Apply`, `Rebuild`), `Unavailable` for an event only a newer build
    /// can read, `Internal` for what no retry mends (another decode failure, a checkpoint
    /// past the store), `Invalid` for a runner built without the event store it needs.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProjectionError::Store(e) => e.kind(),
            ProjectionError::Transport(e) => e.kind(),
            ProjectionError::Decode { source, .. } if source.waits_for_another_build() => {
                ErrorKind::Unavailable
            }
            ProjectionError::Decode { .. } | ProjectionError::CheckpointAhead { .. } => {
                ErrorKind::Internal
            }
            ProjectionError::Apply { source, .. } | ProjectionError::Rebuild { source, .. } => {
                source.kind()
            }
            ProjectionError::NoEventStore(_) => ErrorKind::Invalid,
        }
    }
}

enum Source {
    Store,
    Transport {
        transport: Arc<dyn EventTransport>,
        topic: String,
        group: String,
        options: ConsumerOptions,
        consumer: Option<Box<dyn Consumer>>,
    },
}

/// Feeds a [`Projection`] from the event store's global order, or from a durable transport's
/// consumer group, and can rebuild it from zero.
///
/// Each batch runs in one unit of work: for each event, `mark_processed` (skip it if it was
/// processed before), `apply`, then the checkpoint (the last position) and `commit`; transport
/// deliveries are acknowledged after the commit. A failed batch is rolled back (and nacked) and
/// retried; fed from the store, the events before the one that failed are applied first, in a
/// unit of their own (unless the projection refused it as retryable: `Unavailable`,
/// `RateLimited`, `Timeout`), so the runner stops at that event. When the store refuses a
/// batch's unit for good without naming an event (a projection that went on after a failed
/// statement left it aborted, and a later statement failed), the events are applied one unit
/// each, and the step fails as [`ProjectionError::Apply`] at the first that fails alone. A
/// [`rebuild`](ProjectionRunner::rebuild) holds the projection's lock, so the live runner
/// pauses until it is done.
///
/// Run as a [`Worker`], it also deletes its inbox entries older than
/// [`inbox_retention`](ProjectionRunner::inbox_retention) (7 days by default) once per
/// [`inbox_purge_interval`](ProjectionRunner::inbox_purge_interval) (an hour), so the inbox
/// does not grow with the event log.
///
/// The runner decodes the types it is given and skips others (under the default
/// [`UnknownEventPolicy`](crate::UnknownEventPolicy)): derive them from the event sets the
/// projection reads ([`EventTypes::of`]) rather than list them by hand, so none is left out.
///
/// ```
/// # use cqrs_core::doc::{TicketOpened};
/// use cqrs_core::async_trait;
/// use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryUnit};
/// use cqrs_core::projection::{Projection, ProjectionRunner};
/// use cqrs_core::{EventEnvelope, EventRecord, EventTypes, ExpectedVersion, HandlerError, Metadata, event_set};
/// use cqrs_core::ports::EventStore;
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// // The ticket aggregate's events (usually declared next to the aggregate).
/// event_set! { pub enum TicketEvent { Opened(TicketOpened) } }
///
/// /// Counts opened tickets. Memory has no rollback: effects are staged in the unit and run
/// /// when it commits.
/// #[derive(Default)]
/// struct Opened(Arc<AtomicU64>);
///
/// #[async_trait]
/// impl Projection<InMemoryProjectionStore> for Opened {
///     fn name(&self) -> &str { "opened" }
///     async fn apply(&self, unit: &mut InMemoryUnit, event: &EventEnvelope) -> Result<(), HandlerError> {
///         if event.downcast_ref::<TicketOpened>().is_some() {
///             let count = self.0.clone();
///             unit.on_commit(move || { count.fetch_add(1, Ordering::SeqCst); });
///         }
///         Ok(())
///     }
///     async fn reset(&self, unit: &mut InMemoryUnit) -> Result<(), HandlerError> {
///         let count = self.0.clone();
///         unit.on_commit(move || count.store(0, Ordering::SeqCst));
///         Ok(())
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let events = Arc::new(InMemoryEventStore::new());
/// let opened = EventEnvelope::new(TicketOpened { ticket_id: "t1".into() }, Metadata::new());
/// events.append("ticket-t1", ExpectedVersion::NO_STREAM, vec![EventRecord::from_envelope(&opened)?]).await?;
///
/// // Every type of the set; `register_set` adds further sets, `upcaster` old versions.
/// let types = EventTypes::of::<TicketEvent>();
/// let projection = Arc::new(Opened::default());
/// let mut runner = ProjectionRunner::from_store(
///     Arc::new(InMemoryProjectionStore::new()), projection.clone(), events, Arc::new(types));
/// assert_eq!(runner.run_once().await?, 1);
/// assert_eq!(runner.run_once().await?, 0, "caught up");
/// assert_eq!(runner.rebuild().await?, 1);
/// assert_eq!(projection.0.load(Ordering::SeqCst), 1);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct ProjectionRunner<S: ProjectionStore, P: Projection<S>> {
    store: Arc<S>,
    projection: Arc<P>,
    events: Option<Arc<dyn EventStore>>,
    types: Arc<EventTypes>,
    source: Source,
    batch: usize,
    idle: Duration,
    name: String,
    /// Set while running as a worker: a fetch waiting for events gives up when it fires.
    stop: Option<Shutdown>,
    /// Set while running as a worker: where a stalled batch is reported.
    health: Option<HealthReporter>,
    inbox_retention: Duration,
    inbox_purge_interval: Duration,
    apply_timeout: Option<Duration>,
    stall_after: Duration,
    /// Set when a batch ran past `stall_after` (and was reported), until the next outcome.
    stalled: std::sync::atomic::AtomicBool,
    /// Whether the last step from a transport fetched a batch: a failure after that hands
    /// the batch back, to come again after the redelivery delay; one before it (making the
    /// consumer, fetching) leaves nothing to wait for.
    fetched_a_batch: bool,
    /// The events it handed back (nacked or deferred) that have not come again: the lag holds
    /// them (see [`HandedBack`]).
    handed_back: HandedBack,
    /// Events whose unit of their own panicked (outside `apply`): the next such panic of one
    /// is its fault, counted as an attempt. The newest [`MAX_SUSPECTS`].
    suspects: VecDeque<Uuid>,
    /// The store's checkpoint as this runner last saw it: where its next batch is read.
    read_from: std::sync::Mutex<Option<Position>>,
    /// Whether the event store was seen to reach the checkpoint (see `check_end`).
    end_checked: std::sync::atomic::AtomicBool,
    /// What the lag gauge is read against ([`clock`](Self::clock)).
    clock: Arc<dyn crate::clock::Clock>,
    /// Fed by the store: after this many steps in a row failed on one event, by its fault, the
    /// event is skipped ([`skip_after`](Self::skip_after)); `None`, never.
    skip_after: Option<u32>,
    /// The event the store-fed steps keep failing on by its fault, and how many times in a row.
    failing_on: Option<(Uuid, u32)>,
}

/// What one batch did: how many events took effect, whether the source had no more to give,
/// and, fed by a transport, the failure of an event set aside while the rest of its batch took
/// effect.
struct Stepped {
    applied: usize,
    caught_up: bool,
    set_aside: Option<ProjectionError>,
}

impl Stepped {
    const CAUGHT_UP: Stepped = Stepped {
        applied: 0,
        caught_up: true,
        set_aside: None,
    };
}

/// How many times a step reads its batch ahead of its unit before it reads inside the unit.
const READ_AHEAD_ATTEMPTS: usize = 3;
/// How long a runner keeps inbox entries by default: far longer than any redelivery.
const INBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a running runner purges its inbox by default.
const INBOX_PURGE_INTERVAL: Duration = Duration::from_secs(3600);
/// The shortest inbox retention.
const MIN_INBOX_RETENTION: Duration = Duration::from_secs(60);
/// The code of the error an `apply` past the runner's `apply_timeout` fails with.
const APPLY_TIMEOUT: &str = "apply_timeout";

impl<S: ProjectionStore, P: Projection<S>> fmt::Debug for ProjectionRunner<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("projection", &self.name)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl<S: ProjectionStore, P: Projection<S>> ProjectionRunner<S, P> {
    /// Feeds the projection from the event store's global order, decoding with `types` (see
    /// [`EventTypes::of`]). Under [`UnknownEventPolicy::Skip`](crate::UnknownEventPolicy::Skip)
    /// (or `Ignore`) the checkpoint moves past an event of a type `types` lacks.
    pub fn from_store(
        store: Arc<S>,
        projection: Arc<P>,
        events: Arc<dyn EventStore>,
        types: Arc<EventTypes>,
    ) -> Self {
        let name = projection.name().to_owned();
        Self {
            store,
            projection,
            events: Some(events),
            types,
            source: Source::Store,
            batch: 100,
            idle: Duration::from_millis(200),
            name,
            stop: None,
            health: None,
            inbox_retention: INBOX_RETENTION,
            inbox_purge_interval: INBOX_PURGE_INTERVAL,
            apply_timeout: None,
            stall_after: STALL_AFTER,
            stalled: std::sync::atomic::AtomicBool::new(false),
            fetched_a_batch: false,
            handed_back: HandedBack::default(),
            suspects: VecDeque::new(),
            read_from: std::sync::Mutex::new(None),
            end_checked: std::sync::atomic::AtomicBool::new(false),
            clock: Arc::new(crate::clock::SystemClock),
            skip_after: None,
            failing_on: None,
        }
    }

    /// Feeds the projection from consumer group `group` of `topic`, decoding with `types` (see
    /// [`EventTypes::of`]). Under [`UnknownEventPolicy::Skip`](crate::UnknownEventPolicy::Skip)
    /// (or `Ignore`) an event of a type `types` lacks is acknowledged without being applied.
    ///
    /// The checkpoint such a runner saves is the highest position it has applied, not a
    /// watermark: deliveries arrive out of global order (other keys, other instances of the
    /// group, an event set aside for redelivery), so events below it may not have taken effect
    /// yet. Its inbox, not its checkpoint, makes redeliveries take effect once; do not start a
    /// store-fed runner of the same name from it.
    pub fn from_transport(
        store: Arc<S>,
        projection: Arc<P>,
        transport: Arc<dyn EventTransport>,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
        types: Arc<EventTypes>,
    ) -> Self {
        let name = projection.name().to_owned();
        Self {
            store,
            projection,
            events: None,
            types,
            source: Source::Transport {
                transport,
                topic: topic.to_owned(),
                group: group.to_owned(),
                options,
                consumer: None,
            },
            batch: 100,
            idle: Duration::from_millis(200),
            name,
            stop: None,
            health: None,
            inbox_retention: INBOX_RETENTION,
            inbox_purge_interval: INBOX_PURGE_INTERVAL,
            apply_timeout: None,
            stall_after: STALL_AFTER,
            stalled: std::sync::atomic::AtomicBool::new(false),
            fetched_a_batch: false,
            handed_back: HandedBack::default(),
            suspects: VecDeque::new(),
            read_from: std::sync::Mutex::new(None),
            end_checked: std::sync::atomic::AtomicBool::new(false),
            clock: Arc::new(crate::clock::SystemClock),
            skip_after: None,
            failing_on: None,
        }
    }

    /// The event store to rebuild from (for a runner fed by a transport).
    pub fn with_event_store(mut self, events: Arc<dyn EventStore>) -> Self {
        self.events = Some(events);
        self
    }

    /// Events per batch (default 100).
    pub fn batch_size(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How long the worker waits after an empty batch from the store (default 200 ms). A
    /// transport-fed runner waits in the consumer's `block` instead. After a failed batch
    /// either waits `max(idle, 10 ms)`, doubling with each failure in a row up to 64 times
    /// that. At least 1 ms (zero would query the store without pause).
    pub fn idle_interval(mut self, idle: Duration) -> Self {
        self.idle = idle.max(Duration::from_millis(1));
        self
    }

    /// How long inbox entries are kept (default 7 days): an event delivered again after that
    /// is no longer recognised as a duplicate. For a transport-fed runner, keep it well above
    /// the consumer's redelivery delay, the idle time before a crashed consumer's entries are
    /// reclaimed, and how long a dead-lettered event may wait before it is replayed. A
    /// store-fed runner never reads below its checkpoint again, so any retention is safe for it.
    /// At least 1 minute (twice the default redelivery delay): a shorter retention (zero above
    /// all) is raised to that, since it would delete the whole inbox at each purge.
    pub fn inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention.max(MIN_INBOX_RETENTION);
        self
    }

    /// How often the running worker purges its inbox (default 1 hour; the first purge runs
    /// when the worker starts).
    pub fn inbox_purge_interval(mut self, interval: Duration) -> Self {
        self.inbox_purge_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long the projection's [`apply`](Projection::apply) of one event may take (no limit
    /// by default; at least 1 ms). Past it, the call is dropped (cancelled) and the batch fails
    /// on that event with a [`Timeout`](ErrorKind::Timeout) error (code `apply_timeout`), as
    /// if `apply` had refused it: the batch is rolled back and, fed by a transport, that event
    /// is handed back as an attempt, the later events of its chain (its key) are deferred, and
    /// the rest of the batch is applied again at once, so an event too slow every time is
    /// dead-lettered after `max_deliveries` and holds up only its own key. Fed by the store,
    /// the events before it in its batch are applied on their own and the runner stops at it,
    /// retrying it, as at an event it refuses. Cancelling `apply` midway is
    /// safe as far as the unit of work goes (it is rolled back), not for effects `apply` has
    /// outside it. It applies to [`rebuild`](Self::rebuild) too.
    ///
    /// ```
    /// # use cqrs_core::async_trait;
    /// # use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryUnit};
    /// # use cqrs_core::projection::{Projection, ProjectionRunner};
    /// # use cqrs_core::{EventEnvelope, EventTypes, HandlerError};
    /// # use std::sync::Arc;
    /// # struct Noop;
    /// # #[async_trait]
    /// # impl Projection<InMemoryProjectionStore> for Noop {
    /// #     fn name(&self) -> &str { "noop" }
    /// #     async fn apply(&self, _: &mut InMemoryUnit, _: &EventEnvelope) -> Result<(), HandlerError> { Ok(()) }
    /// #     async fn reset(&self, _: &mut InMemoryUnit) -> Result<(), HandlerError> { Ok(()) }
    /// # }
    /// use std::time::Duration;
    ///
    /// let runner = ProjectionRunner::from_store(
    ///     Arc::new(InMemoryProjectionStore::new()),
    ///     Arc::new(Noop),
    ///     Arc::new(InMemoryEventStore::new()),
    ///     Arc::new(EventTypes::new()),
    /// )
    /// .apply_timeout(Duration::from_secs(30))
    /// .stall_after(Duration::from_secs(120));
    /// ```
    pub fn apply_timeout(mut self, timeout: Duration) -> Self {
        self.apply_timeout = Some(timeout.max(Duration::from_millis(1)));
        self
    }

    /// How long a batch may run before the running worker reports [`Health::Unhealthy`],
    /// naming how long it has been running (default 5 minutes, as
    /// [`ConsumeLoop::stall_after`]; `Duration::MAX` never reports; at least 1 ms). A
    /// transport-fed batch keeps its deliveries alive while it runs, so without this a hung
    /// `apply` would stop the projection for good while it looked healthy. The batch's outcome
    /// replaces the report when it ends. Batches that keep failing, none succeeding for this
    /// long, are reported unhealthy too (a store-fed runner retries an event whose `apply`
    /// fails or times out every time for ever, unless it fails and
    /// [`skip_after`](Self::skip_after) says otherwise: it has no dead letters).
    pub fn stall_after(mut self, after: Duration) -> Self {
        self.stall_after = after.max(Duration::from_millis(1));
        self
    }

    /// Fed by the store, skips an event that the projection failed on `failures` steps in a row
    /// (at least 1), instead of retrying it for ever while every later event waits. Off by
    /// default: a read model then misses what the event would have done, which only a
    /// [`rebuild`](Self::rebuild) after a fix mends, and some read models would rather stop.
    ///
    /// Only failures that are the event's fault count: an event that does not decode (not one
    /// that waits for a newer build), and a refusal of [`apply`](Projection::apply) (or a
    /// panic in it, or in its effects at commit) whose kind is not retryable. A read model
    /// that is away, busy or slow (`Unavailable`, `RateLimited`, `Timeout`, the runner's own
    /// `apply_timeout` among them) is waited for, whatever this says: were a slow read model
    /// to time out on every event, each would be skipped in turn. A step that succeeds, or
    /// fails on another event, starts the count again. The count is this runner's: with
    /// several instances taking turns at the projection, each counts its own steps.
    ///
    /// A skipped event is marked processed and the checkpoint moved past it, in a unit of its
    /// own (unless the checkpoint moved meanwhile: another instance or a rebuild went on). It
    /// is logged at `error` with its id, type, position and the last failure, and counted in
    /// `cqrs_projection_skipped_total{projection, event_type, reason}` (`reason`: `decode` or
    /// `apply`): alert on it. The step that skips returns `Ok(0)` from
    /// [`run_once`](Self::run_once). The event stays in
    /// the event store. Fed by a transport this changes nothing: the consumer dead-letters an
    /// event after its `max_deliveries` instead. A rebuild skips nothing: it fails on the
    /// event.
    ///
    /// ```
    /// # use cqrs_core::async_trait;
    /// # use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryUnit};
    /// # use cqrs_core::projection::{Projection, ProjectionRunner};
    /// # use cqrs_core::{EventEnvelope, EventTypes, HandlerError};
    /// # use std::sync::Arc;
    /// # struct Noop;
    /// # #[async_trait]
    /// # impl Projection<InMemoryProjectionStore> for Noop {
    /// #     fn name(&self) -> &str { "noop" }
    /// #     async fn apply(&self, _: &mut InMemoryUnit, _: &EventEnvelope) -> Result<(), HandlerError> { Ok(()) }
    /// #     async fn reset(&self, _: &mut InMemoryUnit) -> Result<(), HandlerError> { Ok(()) }
    /// # }
    /// let runner = ProjectionRunner::from_store(
    ///     Arc::new(InMemoryProjectionStore::new()),
    ///     Arc::new(Noop),
    ///     Arc::new(InMemoryEventStore::new()),
    ///     Arc::new(EventTypes::new()),
    /// )
    /// .skip_after(10);
    /// ```
    pub fn skip_after(mut self, failures: u32) -> Self {
        self.skip_after = Some(failures.max(1));
        self
    }

    /// The clock `cqrs_projection_lag_seconds` is read against: how long before its `now`
    /// the oldest event waiting occurred. The system's by default; a
    /// [`ManualClock`](crate::clock::ManualClock) makes the gauge exact in a test.
    pub fn clock(mut self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// A [`ProjectionWatch`] on this projection's checkpoint in its store, to wait (anywhere,
    /// before the runner is handed to a runtime too) until it has taken effect up to a write.
    /// Meaningful for a runner fed from the event store only: see [`ProjectionWatch`].
    pub fn watch(&self) -> ProjectionWatch<S> {
        ProjectionWatch::new(self.store.clone(), self.name.clone())
    }

    /// Where a stalled batch is reported: only while running as a worker.
    fn stall(&self) -> Option<Stall<'_>> {
        Stall::of_projection(self.health.as_ref(), self.stall_after, &self.stalled)
    }

    /// Deletes this projection's inbox entries older than its
    /// [`inbox_retention`](Self::inbox_retention) now, and returns how many. The worker calls
    /// it once per [`inbox_purge_interval`](Self::inbox_purge_interval).
    pub async fn purge_inbox(&self) -> Result<u64, ProjectionError> {
        Ok(self
            .store
            .purge_inbox(&self.name, self.inbox_retention)
            .await?)
    }

    async fn apply_records(
        &self,
        unit: &mut S::Unit,
        records: &[EventRecord],
    ) -> Result<Applied, ProjectionError> {
        apply_records(
            &*self.store,
            &*self.projection,
            &self.types,
            &self.name,
            self.apply_timeout,
            unit,
            records,
        )
        .await
    }

    /// Applies one batch. Returns how many events took effect: 0 when caught up, but also
    /// when every event of the batch was a duplicate or of a type the projection does not
    /// register (skipped): to run until the end of the source, call
    /// [`catch_up`](Self::catch_up), not `run_once` until it returns 0.
    ///
    /// Fed by a transport, an event the projection refuses, cannot decode, or answers
    /// `Unavailable` or `RateLimited` for (the first such event of the batch) is set aside with
    /// the later events of its chain, and the rest of the batch is applied again at once: the
    /// error is still returned, although those other events took effect. One no redelivery
    /// mends (refused with an error marked [`permanent`](HandlerError::permanent), or that
    /// does not decode, not for want of a newer build) is dead-lettered at once when no earlier
    /// event of its key waits in the batch, and otherwise when it comes back.
    pub async fn run_once(&mut self) -> Result<usize, ProjectionError> {
        self.outside_a_run();
        let stepped = self.step().await?;
        match stepped.set_aside {
            None => Ok(stepped.applied),
            Some(e) => Err(e),
        }
    }

    /// Applies batches until the source has no more to give, and returns how many events took
    /// effect. A batch of duplicates or skipped types (which applies none) does not stop it,
    /// where a loop on [`run_once`](Self::run_once) until it returns 0 would stop there.
    /// Stops at the first error, as `run_once` does. Fed by a transport, "no more" is a fetch
    /// that brought nothing within the consumer's `block` (with `Duration::MAX`, never); a
    /// long run of entries the transport dead-letters by itself (undecodable ones, on Redis)
    /// can end one so too.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryUnit};
    /// # use cqrs_core::projection::{Projection, ProjectionRunner};
    /// # use cqrs_core::{EventEnvelope, EventTypes, HandlerError, async_trait};
    /// # struct Noop;
    /// # #[async_trait]
    /// # impl Projection<InMemoryProjectionStore> for Noop {
    /// #     fn name(&self) -> &str { "noop" }
    /// #     async fn apply(&self, _: &mut InMemoryUnit, _: &EventEnvelope) -> Result<(), HandlerError> { Ok(()) }
    /// #     async fn reset(&self, _: &mut InMemoryUnit) -> Result<(), HandlerError> { Ok(()) }
    /// # }
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut runner = ProjectionRunner::from_store(
    ///     Arc::new(InMemoryProjectionStore::new()),
    ///     Arc::new(Noop),
    ///     Arc::new(InMemoryEventStore::new()),
    ///     Arc::new(EventTypes::new()),
    /// );
    /// let applied = runner.catch_up().await?;
    /// assert_eq!(applied, 0, "an empty store");
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run()).unwrap();
    /// ```
    pub async fn catch_up(&mut self) -> Result<usize, ProjectionError> {
        self.outside_a_run();
        let mut applied = 0usize;
        loop {
            let stepped = self.step().await?;
            if let Some(e) = stepped.set_aside {
                return Err(e);
            }
            applied = applied.saturating_add(stepped.applied);
            if stepped.caught_up {
                return Ok(applied);
            }
        }
    }

    /// Forgets the shutdown signal and health reporter of a [`run`](Worker::run) whose future
    /// was dropped (a caller's timeout) before it cleared them: a call of its own (`&mut`, so
    /// no run is going on) must not stop its fetch on that run's shutdown, nor report to its
    /// health.
    fn outside_a_run(&mut self) {
        self.stop = None;
        self.health = None;
    }

    /// One batch: how many events took effect, and whether the source had no more to give
    /// (a batch of skipped types or duplicates still moves on: it is not "caught up").
    async fn step(&mut self) -> Result<Stepped, ProjectionError> {
        match &self.source {
            Source::Store => {
                let mut kept = tokio::time::Instant::now();
                let stepped = keep_alive_while(
                    None,
                    &[],
                    &mut kept,
                    self.stall(),
                    self.run_once_from_store(),
                )
                .await;
                match stepped {
                    Ok((applied, caught_up)) => {
                        self.failing_on = None;
                        Ok(Stepped {
                            applied,
                            caught_up,
                            set_aside: None,
                        })
                    }
                    Err(error) => self.after_a_failed_step(error).await,
                }
            }
            // A batch that brought events, all duplicates or skipped, is not "caught up": it
            // proves the store works (its unit committed), so it clears a failure's health.
            Source::Transport { .. } => self.run_once_from_transport().await,
        }
    }

    /// Counts a store-fed step's failure against the event at fault, and skips the event once
    /// it failed [`skip_after`](Self::skip_after) steps in a row. Returns `error` unless the
    /// event was skipped: then the step moved on without applying anything.
    async fn after_a_failed_step(
        &mut self,
        error: ProjectionError,
    ) -> Result<Stepped, ProjectionError> {
        let Some(limit) = self.skip_after else {
            return Err(error);
        };
        // The event at fault, and the skip metric's `reason`.
        let (event_id, reason) = match &error {
            ProjectionError::Decode { event_id, source } if !source.waits_for_another_build() => {
                (*event_id, "decode")
            }
            ProjectionError::Apply {
                event_id, source, ..
            } if !source.kind().is_retryable() => (*event_id, "apply"),
            // Not the event's fault (a store away, a read model busy): it neither counts nor
            // starts the count again.
            _ => return Err(error),
        };
        let failures = match self.failing_on {
            Some((id, failures)) if id == event_id => failures.saturating_add(1),
            _ => 1,
        };
        self.failing_on = Some((event_id, failures));
        if failures < limit {
            return Err(error);
        }
        match self.skip(event_id, reason, failures, &error).await {
            Ok(true) => {
                self.failing_on = None;
                Ok(Stepped {
                    applied: 0,
                    caught_up: false,
                    set_aside: None,
                })
            }
            // Not the next event (the events before it did not commit, or the checkpoint
            // moved past it): tried again after its next failure, if there is one.
            Ok(false) => Err(error),
            // Tried again after the next failure on it.
            Err(skip_error) => {
                tracing::warn!(projection = %self.name, %event_id, error = %skip_error, "could not skip an event the projection keeps failing on; trying again after its next failure");
                Err(error)
            }
        }
    }

    /// Marks `event_id` processed and moves the checkpoint past it, when it is the next event
    /// after the checkpoint; does nothing, and returns `false`, when it is not.
    async fn skip(
        &self,
        event_id: Uuid,
        reason: &'static str,
        failures: u32,
        last: &ProjectionError,
    ) -> Result<bool, ProjectionError> {
        let events = self
            .events
            .as_ref()
            .ok_or_else(|| ProjectionError::NoEventStore(self.name.clone()))?;
        // Read before the unit is opened, as a batch is: a Postgres unit holds a pooled
        // connection, and reading while holding it would take a second one.
        let Some(seen) = *self.lock_read_from() else {
            return Ok(false);
        };
        let next = events.read_all(seen, 1).await?;
        let Some((record, position)) = next
            .first()
            .filter(|r| r.event_id == event_id)
            .and_then(|r| Some((r, r.position?)))
        else {
            return Ok(false);
        };
        let (mut unit, after) = self.begin_at_checkpoint().await?;
        if after != seen {
            // Another instance, or a rebuild, moved the checkpoint meanwhile.
            drop(unit);
            return Ok(false);
        }
        self.store
            .mark_processed(&mut unit, &self.name, event_id)
            .await?;
        self.store
            .save_checkpoint(&mut unit, &self.name, position)
            .await?;
        self.store.commit(unit).await?;
        *self.lock_read_from() = Some(position);
        tracing::error!(
            projection = %self.name,
            %event_id,
            event_type = %record.event_type,
            position = %position,
            failures,
            error = %last,
            "skipped an event the projection failed on this many steps in a row (skip_after); the read model misses it until a rebuild (the event stays in the store)"
        );
        metrics::counter!(
            "cqrs_projection_skipped_total",
            "projection" => self.name.clone(),
            "event_type" => DEAD_LETTER_TYPE_LABELS.label(&record.event_type),
            "reason" => reason
        )
        .increment(1);
        Ok(true)
    }

    async fn run_once_from_store(&self) -> Result<(usize, bool), ProjectionError> {
        let events = self
            .events
            .as_ref()
            .ok_or_else(|| ProjectionError::NoEventStore(self.name.clone()))?;
        // The batch is read before the unit is opened, from where the checkpoint was last
        // seen: a runner that read while holding its unit would hold two connections of a
        // Postgres pool at once, and runners each holding one while waiting for a second can
        // starve a small or busy pool. The unit then confirms the checkpoint is still there
        // (another instance, or a rebuild, may have moved it) and the batch is read again if
        // it is not.
        for _ in 0..READ_AHEAD_ATTEMPTS {
            let seen = *self.lock_read_from();
            let page = match seen {
                Some(after) => {
                    let page =
                        crate::ports::read_up_to_undecodable(events.as_ref(), after, self.batch)
                            .await
                            .inspect_err(|_| report_unmeasured_lag(&self.name))?;
                    if page.records.is_empty() {
                        self.check_end(events.as_ref(), after)
                            .await
                            .inspect_err(|_| report_unmeasured_lag(&self.name))?;
                    }
                    Some(page)
                }
                None => None,
            };
            let (unit, after) = self
                .begin_at_checkpoint()
                .await
                .inspect_err(|_| report_unmeasured_lag(&self.name))?;
            *self.lock_read_from() = Some(after);
            if let Some(page) = page
                && seen == Some(after)
            {
                report_lag(&self.name, &page.records, None, self.clock.now());
                return self.apply_batch(unit, after, &page.records, page.cut).await;
            }
            self.store.commit(unit).await?;
        }
        // The checkpoint kept moving under this runner (other instances are faster): read
        // inside the unit this once, so the step makes progress.
        let (unit, after) = self
            .begin_at_checkpoint()
            .await
            .inspect_err(|_| report_unmeasured_lag(&self.name))?;
        let page = crate::ports::read_up_to_undecodable(events.as_ref(), after, self.batch)
            .await
            .inspect_err(|_| report_unmeasured_lag(&self.name))?;
        report_lag(&self.name, &page.records, None, self.clock.now());
        self.apply_batch(unit, after, &page.records, page.cut).await
    }

    /// Once per runner, the first time it finds nothing after its checkpoint: an event store
    /// whose events end below the checkpoint (restored from an older backup or recreated
    /// without the projections' checkpoints) would be read past its end for ever, the runner
    /// reporting itself caught up and every new event at or below the checkpoint skipped. A
    /// checkpoint is the position of an event the projection applied, so the store holds one
    /// at it or past it.
    async fn check_end(
        &self,
        events: &dyn EventStore,
        after: Position,
    ) -> Result<(), ProjectionError> {
        use std::sync::atomic::Ordering::Relaxed;
        if after == Position::START || self.end_checked.load(Relaxed) {
            return Ok(());
        }
        let at_or_past = events.read_all(Position::new(after.get() - 1), 1).await?;
        if at_or_past.is_empty() {
            // `after` is where this runner last saw the checkpoint: read it again next time,
            // as a rebuild elsewhere (what the error says to do) may have moved it.
            *self.lock_read_from() = None;
            return Err(ProjectionError::CheckpointAhead {
                projection: self.name.clone(),
                checkpoint: after,
            });
        }
        self.end_checked.store(true, Relaxed);
        Ok(())
    }

    /// A unit of work (holding the projection's lock) and the checkpoint it reads.
    async fn begin_at_checkpoint(&self) -> Result<(S::Unit, Position), ProjectionError> {
        let mut unit = self.store.begin(&self.name).await?;
        let after = self
            .store
            .checkpoint(&mut unit, &self.name)
            .await?
            .unwrap_or(Position::START);
        Ok((unit, after))
    }

    /// Applies `records` (read after the unit's checkpoint) in `unit`, moves the checkpoint
    /// past them and commits.
    ///
    /// A commit that panics (an effect staged by one event's `apply`, run at commit) may have
    /// run the effects of the events before it: they are committed one unit each, so each
    /// takes effect once more at most, up to the event whose effect panics, which fails the
    /// step. (The panic unwound out of the worker, and each restart ran the same batch, and
    /// the effects before it once more, again and again.) A unit the store refuses for good
    /// goes one unit per event too, to find the event at fault.
    async fn apply_batch(
        &self,
        unit: S::Unit,
        after: Position,
        records: &[EventRecord],
        cut: bool,
    ) -> Result<(usize, bool), ProjectionError> {
        // A page cut before an event the store cannot read is short, and not the end.
        let caught_up = records.len() < self.batch && !cut;
        let panic = match self.apply_and_commit(unit, records).await {
            Ok(Committed::Applied(applied)) => return Ok((applied, caught_up)),
            Ok(Committed::Panicked(panic)) if records.len() > 1 => panic,
            Ok(Committed::Panicked(panic)) => {
                return Err(self.commit_panicked(&records[0], &panic));
            }
            // The store refused the unit for good, for no event it names (a projection went
            // on after a failed statement, and the unit's later statements fail): one by one,
            // the events before the one at fault take effect and the step fails naming it,
            // instead of the whole batch rolling back at every retry.
            Err(ProjectionError::Store(error)) if !error.kind().is_retryable() => {
                if records.len() == 1 {
                    return Err(self.refused_alone(&records[0], error).await);
                }
                tracing::warn!(projection = %self.name, %error, events = records.len(), "the store refused a batch's unit; applying its events one by one to find the one at fault");
                return Ok((self.commit_one_by_one(after, records).await?, caught_up));
            }
            Err(error) => return Err(self.apply_before(after, records, error).await),
        };
        tracing::warn!(projection = %self.name, %panic, events = records.len(), "a batch's commit panicked; committing its events one by one");
        Ok((self.commit_one_by_one(after, records).await?, caught_up))
    }

    /// Applies `records` (read after `after`) one unit each, after a unit of them together
    /// failed (its commit panicked, or the store refused it for good): each event's effects
    /// run once more at most, up to the event at fault, which fails. Stops, with what it
    /// applied, if the checkpoint went back meanwhile (a rebuild): the next step reads from
    /// there, and no event is applied past a gap.
    async fn commit_one_by_one(
        &self,
        after: Position,
        records: &[EventRecord],
    ) -> Result<usize, ProjectionError> {
        let mut applied = 0;
        let mut expected = after;
        for record in records {
            let (unit, now) = self.begin_at_checkpoint().await?;
            // Another instance may have moved on meanwhile.
            if record.position.is_none_or(|p| p <= now) {
                self.store.commit(unit).await?;
                expected = now;
                continue;
            }
            if now != expected {
                drop(unit);
                return Ok(applied);
            }
            expected = record.position.unwrap_or(now);
            match self
                .apply_and_commit(unit, std::slice::from_ref(record))
                .await
            {
                Ok(Committed::Applied(n)) => applied += n,
                Ok(Committed::Panicked(panic)) => {
                    return Err(self.commit_panicked(record, &panic));
                }
                Err(ProjectionError::Store(error)) if !error.kind().is_retryable() => {
                    return Err(self.refused_alone(record, error).await);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(applied)
    }

    /// After `error` on one event of `records` (read after `after`), applies the events before
    /// it in a unit of their own, so that an event the projection cannot take holds back only
    /// itself and what follows it in the store's order, not the rest of its batch. Returns
    /// `error` (the step fails at that event, and is retried from it).
    async fn apply_before(
        &self,
        after: Position,
        records: &[EventRecord],
        error: ProjectionError,
    ) -> ProjectionError {
        let failed = match &error {
            // A read model that is away or busy: the events before would most likely fail as
            // well, and the step backs off anyway. Not the runner's own `apply_timeout`, the
            // event's fault as far as it can tell: the events before it go on without it.
            ProjectionError::Apply { source, .. }
                if source.kind().is_retryable() && source.code() != APPLY_TIMEOUT =>
            {
                return error;
            }
            ProjectionError::Decode { event_id, .. } | ProjectionError::Apply { event_id, .. } => {
                *event_id
            }
            _ => return error,
        };
        let before = match records.iter().position(|r| r.event_id == failed) {
            Some(0) | None => return error,
            Some(at) => &records[..at],
        };
        let (unit, now) = match self.begin_at_checkpoint().await {
            Ok(begun) => begun,
            Err(_) => return error,
        };
        // Another instance, or a rebuild, moved the checkpoint meanwhile: the next step reads
        // from where it is now.
        if now != after {
            drop(unit);
            return error;
        }
        // As a batch of their own: a commit that panics goes one by one, so no effect runs
        // again at every retry. (Boxed: `apply_batch` calls back here.)
        match Box::pin(self.apply_batch(unit, after, before, false)).await {
            Ok(_) => error,
            // Alone, an event before fails for good (a projection that went on after a failed
            // statement broke the unit, and the next event's statement met it): the step is
            // stuck there, not at the event that met the broken unit. (A passing failure
            // there, a timeout, does not hide the refusal.)
            Err(earlier @ ProjectionError::Decode { .. }) => earlier,
            Err(earlier @ ProjectionError::Apply { .. }) if matches!(&earlier, ProjectionError::Apply { source, .. } if !source.kind().is_retryable()) => {
                earlier
            }
            Err(other) => {
                tracing::warn!(projection = %self.name, error = %other, %failed, "the events before the one that failed could not be applied either");
                error
            }
        }
    }

    /// `apply_batch`'s work, with a commit that panics caught.
    async fn apply_and_commit(
        &self,
        mut unit: S::Unit,
        records: &[EventRecord],
    ) -> Result<Committed, ProjectionError> {
        let Some(last) = records.last().and_then(|r| r.position) else {
            return Ok(Committed::Applied(0));
        };
        let applied = self.apply_records(&mut unit, records).await?;
        self.store
            .save_checkpoint(&mut unit, &self.name, last)
            .await?;
        let commit = crate::panic::CatchUnwind::new(async { self.store.commit(unit).await });
        match commit.await {
            Ok(committed) => committed?,
            Err(panic) => return Ok(Committed::Panicked(panic)),
        }
        *self.lock_read_from() = Some(last);
        Ok(Committed::Applied(applied.committed(&self.name)))
    }

    /// The error of a unit of `record` alone that the store refused for good: the event's,
    /// unless the store's own writes are refused for good without it too (a missing table, a
    /// permission), then the store's. The trial unit is rolled back: it writes nothing, and a
    /// store that refuses only at commit is still taken for the event's fault.
    async fn refused_alone(&self, record: &EventRecord, error: StoreError) -> ProjectionError {
        let without_it = async {
            let (mut unit, now) = self.begin_at_checkpoint().await?;
            self.store
                .mark_processed(&mut unit, &self.name, Uuid::now_v7())
                .await?;
            self.store
                .save_checkpoint(&mut unit, &self.name, now)
                .await?;
            drop(unit);
            Ok::<_, ProjectionError>(())
        };
        match without_it.await {
            Err(ProjectionError::Store(trial)) if !trial.kind().is_retryable() => {
                ProjectionError::Store(error)
            }
            // The store's writes work, or failed only in passing: the event's.
            _ => event_error(&self.name, record, HandlerError::from(error)),
        }
    }

    /// The error of a unit of `record` alone whose commit panicked.
    fn commit_panicked(&self, record: &EventRecord, panic: &str) -> ProjectionError {
        let source = HandlerError::internal(format!("the commit panicked: {panic}"));
        event_error(&self.name, record, source)
    }

    /// Where the next batch from the store is read: the checkpoint as last seen.
    fn lock_read_from(&self) -> std::sync::MutexGuard<'_, Option<Position>> {
        self.read_from.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One fetched batch: how many events took effect, and whether the fetch brought nothing.
    async fn run_once_from_transport(&mut self) -> Result<Stepped, ProjectionError> {
        // Field by field: the consumer is borrowed mutably while the batch is applied.
        let Self {
            store,
            projection,
            types,
            source,
            batch,
            name,
            stop,
            health,
            apply_timeout,
            stall_after,
            stalled,
            suspects,
            fetched_a_batch,
            handed_back,
            clock,
            ..
        } = self;
        *fetched_a_batch = false;
        let Source::Transport {
            transport,
            topic,
            group,
            options,
            consumer,
        } = source
        else {
            return Ok(Stepped::CAUGHT_UP);
        };
        if consumer.is_none() {
            let made = transport.consumer(topic, group, options.clone()).await;
            *consumer = Some(made.inspect_err(|_| report_unmeasured_lag(name))?);
        }
        let Some(consumer) = consumer.as_mut() else {
            return Ok(Stepped::CAUGHT_UP);
        };
        // A fetch may wait long (its `block`, up to forever): shutdown does not wait for it.
        let fetched = match stop {
            Some(stop) => tokio::select! {
                deliveries = consumer.fetch(*batch) => deliveries,
                _ = stop.requested() => return Ok(Stepped::CAUGHT_UP),
            },
            None => consumer.fetch(*batch).await,
        };
        let deliveries = fetched.inspect_err(|_| report_unmeasured_lag(name))?;
        handed_back.fetched(&deliveries, Some(options.redelivery_delay));
        if deliveries.is_empty() {
            report_lag(name, &[], handed_back.oldest(), clock.now());
            return Ok(Stepped::CAUGHT_UP);
        }
        *fetched_a_batch = true;
        // When the deliveries were fetched, then last kept alive: across every pass below.
        let mut kept = tokio::time::Instant::now();
        let mut ids: Vec<DeliveryId> = Vec::with_capacity(deliveries.len());
        let mut order_keys: Vec<Option<String>> = Vec::with_capacity(deliveries.len());
        let mut records: Vec<EventRecord> = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            ids.push(d.id);
            order_keys.push(d.order_key);
            records.push(d.record);
        }
        report_lag(name, &records, handed_back.oldest(), clock.now());
        // The error of the first event set aside, returned once the rest took effect.
        let mut set_aside: Option<ProjectionError> = None;
        let mut passes = 0;
        // One event per unit, after a panic no event was blamed for or a refusal of the store
        // (a commit's effect, say): the one at fault is then found, and each other event takes
        // effect once more at most.
        let mut one_by_one = false;
        // Applied by the units of this batch that committed (one by one).
        let mut applied_before = 0;
        // Whether a unit of one event panicked in this step already.
        let mut lone_panic = false;
        // Whether a unit of one event committed in this step.
        let mut committed_alone = false;
        // The error of an event set aside because its `apply` waits (its backend away or
        // busy): the step still fails with it once the rest took effect (not with the first
        // error set aside, which may be of another kind, a panic's, that the worker reports
        // otherwise), so the worker backs off and reports it as failing; and a second such
        // failure says the backend is away, not one event: the batch is then handed back whole.
        let mut waited_error: Option<ProjectionError> = None;
        let consumer = consumer.as_mut();
        loop {
            // One by one, each failing pass hands one event back: that bounds the passes.
            if !one_by_one {
                passes += 1;
            }
            let taken = if one_by_one { 1 } else { records.len() };
            let work = async {
                let (store, name) = (&**store, name.as_str());
                let records = &records[..taken];
                let mut unit = store.begin(name).await?;
                let applied = apply_records(
                    store,
                    &**projection,
                    types,
                    name,
                    *apply_timeout,
                    &mut unit,
                    records,
                )
                .await?;
                if let Some(last) = records.iter().filter_map(|r| r.position).max() {
                    let current = store.checkpoint(&mut unit, name).await?;
                    if current.is_none_or(|c| c < last) {
                        store.save_checkpoint(&mut unit, name, last).await?;
                    }
                }
                store.commit(unit).await?;
                Ok::<_, ProjectionError>(applied.committed(name))
            };
            // A panic outside the projection's own `apply` (which `apply_records` guards per
            // event), in the store's commit say, fails the unit like a store error (below:
            // which event's it is, if any), instead of the panic escaping with the batch
            // unanswered, so each came back later with a delivery counted that no handler
            // finished (with `max_deliveries(1)`: dead-lettered, never applied).
            let work = async {
                match crate::panic::CatchUnwind::new(work).await {
                    Ok(result) => (result, false),
                    Err(panic) => (
                        Err(ProjectionError::Store(StoreError::Backend {
                            backend: "projection store",
                            source: format!("panicked: {panic}").into(),
                        })),
                        true,
                    ),
                }
            };
            let stall = Stall::of_projection(health.as_ref(), *stall_after, stalled);
            // All the batch's deliveries are kept, those waiting their turn one by one too.
            let (result, panicked) =
                keep_alive_while(Some(&mut *consumer), &ids, &mut kept, stall, work).await;
            let e = match result {
                Ok(applied) if taken < ids.len() => {
                    // One of a batch taken one by one: acknowledged, and on to the next.
                    stalled.store(false, std::sync::atomic::Ordering::Relaxed);
                    if let Err(error) = consumer.ack(&ids[..taken]).await {
                        // The rest goes back without an attempt; the panic is still told.
                        handed_back.note(&records[taken..]);
                        if let Err(error) = consumer.defer(&ids[taken..]).await {
                            tracing::warn!(projection = %name, %error, "could not hand back the rest of a batch taken one by one; it comes back after its redelivery delay");
                        }
                        if let Some(first) = &set_aside {
                            tracing::warn!(projection = %name, error = %first, "a batch's unit panicked; taking its events one by one stopped at a failed acknowledgement");
                        }
                        return Err(error.into());
                    }
                    applied_before += applied;
                    committed_alone = true;
                    ids.drain(..taken);
                    order_keys.drain(..taken);
                    records.drain(..taken);
                    continue;
                }
                Ok(applied) => {
                    let applied = applied_before + applied;
                    // The batch took effect, however long it ran: a failed ack is no stall.
                    stalled.store(false, std::sync::atomic::Ordering::Relaxed);
                    if let Err(error) = consumer.ack(&ids).await {
                        // The ack's error is the step's; the set-aside event's would be lost.
                        if let Some(first) = &set_aside {
                            tracing::warn!(projection = %name, error = %first, "projection set an event aside; the rest of its batch took effect");
                        }
                        return Err(error.into());
                    }
                    if let Some(waiting) = waited_error.take() {
                        if let Some(first) = &set_aside {
                            tracing::warn!(projection = %name, error = %first, "projection set an event aside; the rest of its batch took effect");
                        }
                        return Err(waiting);
                    }
                    // The others took effect; the worker still reports what was set aside.
                    return Ok(Stepped {
                        applied,
                        caught_up: false,
                        set_aside,
                    });
                }
                Err(e) => e,
            };
            // The store refusing the unit for good (a constraint an event's effect breaks at
            // the commit, a statement its `apply` let fail): no retry of the same unit mends
            // it, and handed back whole the batch came back whole, for ever, holding every key
            // in it, its event never charged an attempt. (A conflict passes on a retry.)
            let refused = !panicked
                && matches!(&e, ProjectionError::Store(store_error)
                    if !store_error.kind().is_retryable() && store_error.kind() != ErrorKind::Conflict);
            // A panic outside the projection's `apply` (its own panics are blamed per event),
            // or such a refusal, in a unit of several events: which one's (a commit that runs
            // each event's staged effect) is found by taking them one by one. Their effects
            // may have run before the failure: in this step each takes effect once more at
            // most.
            if (panicked || refused) && taken > 1 {
                tracing::warn!(projection = %name, error = %e, deliveries = taken, "a batch's unit panicked or was refused outside the projection's apply; taking its events one by one");
                one_by_one = true;
                // Reported (the worker is degraded) once the rest took effect.
                set_aside.get_or_insert(e);
                continue;
            }
            // Refused alone: the event's fault if the unit's writes work without it (a trial
            // unit, kept alive and guarded like the real one), else the store's (a table
            // missing, a permission, or a trial that could not tell), and no event is charged.
            let e = match e {
                ProjectionError::Store(error) if refused => {
                    let trial = async {
                        crate::panic::CatchUnwind::new(works_without_it(&**store, name))
                            .await
                            .unwrap_or(false)
                    };
                    let stall = Stall::of_projection(health.as_ref(), *stall_after, stalled);
                    let works =
                        keep_alive_while(Some(&mut *consumer), &ids, &mut kept, stall, trial).await;
                    if works {
                        event_error(name, &records[0], HandlerError::from(error))
                    } else {
                        ProjectionError::Store(error)
                    }
                }
                e => e,
            };
            // The batch is rolled back. Only an event at fault is handed back as an attempt,
            // so a poison event does not use up (and dead-letter) the deliveries of its batch
            // mates, and a store that is down or busy (a rebuild holding the lock)
            // dead-letters nothing. A unit of one event that panicked is that event's fault
            // when it panicked before: alone already, or in a unit of several in this step (the
            // first lone panic of the step only: a second says the store panics, not an event).
            // A single panic of a lone event may be the store's passing fault: no attempt.
            let reason = e.to_string();
            let waits_now =
                matches!(&e, ProjectionError::Apply { source, .. } if waits(source.kind()));
            let blamed = if waits_now && waited_error.is_some() {
                None
            } else {
                blamed(&e)
            };
            let blamed = blamed.or_else(|| {
                if !panicked || taken != 1 {
                    return None;
                }
                let id = records[0].event_id;
                let suspect = suspects.contains(&id);
                let at_fault = suspect || (one_by_one && !lone_panic);
                lone_panic = true;
                if !suspect {
                    if suspects.len() == MAX_SUSPECTS {
                        suspects.pop_front();
                    }
                    suspects.push_back(id);
                }
                at_fault.then_some((id, true))
            });
            let mut failed = vec![false; ids.len()];
            // The later deliveries of a failed one's chain wait with it: acknowledging them
            // first would break their key's order.
            let mut failed_chains: Vec<&String> = Vec::new();
            let mut held = vec![false; ids.len()];
            for (i, record) in records.iter().enumerate() {
                if let Some(key) = &order_keys[i]
                    && failed_chains.contains(&key)
                {
                    held[i] = true;
                } else if blamed.is_some_and(|(event_id, _)| event_id == record.event_id) {
                    failed[i] = true;
                    failed_chains.extend(order_keys[i].as_ref());
                }
            }
            let attempt = blamed.is_some_and(|(_, attempt)| attempt);
            let isolate = failed.contains(&true)
                && passes < MAX_PASSES_PER_BATCH
                && held.iter().zip(&failed).any(|(h, f)| !h && !f);
            // The failed event is handed back (as an attempt, unless only a newer build can
            // read it), and so are its chain's later deliveries. Isolated, the others are kept
            // and applied again at once, in a new unit: other keys' events do not wait with it
            // for its redeliveries (or for that build). Otherwise they are handed back too.
            let mut waiting = Vec::new();
            let mut kept = 0;
            let give_up = attempt && given_up(&e);
            for i in 0..ids.len() {
                if failed[i] && give_up && first_of_its_key(&order_keys, i) {
                    // No redelivery mends it: to the dead letters now, not after
                    // `max_deliveries` redelivery delays holding up its key. Only when nothing
                    // of its key before it waits in this batch: out of the pending list, it
                    // would let its key's later events pass those (it is handed back instead,
                    // and given up when it comes back first of its key).
                    match consumer.dead_letter(&ids[i], &reason).await {
                        Ok(()) => {
                            tracing::warn!(projection = %name, error = %e, "no redelivery mends this event: dead-lettered at once");
                            metrics::counter!(
                                "cqrs_projection_dead_lettered_total",
                                "projection" => name.clone(),
                                "event_type" => DEAD_LETTER_TYPE_LABELS.label(&records[i].event_type)
                            )
                            .increment(1);
                        }
                        Err(error) => {
                            tracing::warn!(projection = %name, %error, "could not dead-letter an event no redelivery mends; it comes back after its redelivery delay");
                        }
                    }
                } else if failed[i] && attempt {
                    handed_back.note(std::slice::from_ref(&records[i]));
                    if let Err(error) = consumer.nack_with_reason(&ids[i], &reason).await {
                        tracing::warn!(projection = %name, %error, "could not hand a failed event back; it comes back after its redelivery delay");
                    }
                } else if failed[i] || held[i] || !isolate {
                    handed_back.note(std::slice::from_ref(&records[i]));
                    waiting.push(ids[i].clone());
                } else {
                    ids.swap(kept, i);
                    order_keys.swap(kept, i);
                    records.swap(kept, i);
                    kept += 1;
                }
            }
            if let Err(error) = consumer.defer(&waiting).await {
                // They come back after the redelivery delay, each counted as an attempt.
                tracing::warn!(projection = %name, %error, deliveries = waiting.len(), "could not hand back the deliveries of a failed batch; they come back after their redelivery delay");
            }
            if !isolate {
                // Taken one by one, the last event found at fault while others took effect:
                // as when it is set aside before them (the worker is degraded, not failing).
                if one_by_one && blamed.is_some() && committed_alone {
                    if waits_now || waited_error.is_some() {
                        return Err(waited_error.unwrap_or(e));
                    }
                    return Ok(Stepped {
                        applied: applied_before,
                        caught_up: false,
                        set_aside: set_aside.or(Some(e)),
                    });
                }
                // The first event's error names the cause; a later failure that is no event's
                // (the store went down) says more about now.
                return Err(match (set_aside, blamed) {
                    (Some(first), Some(_)) => first,
                    _ => e,
                });
            }
            ids.truncate(kept);
            order_keys.truncate(kept);
            records.truncate(kept);
            // Isolated, a wait is the step's first: a second is blamed on no event.
            if waits_now {
                waited_error = Some(e);
            } else {
                set_aside.get_or_insert(e);
            }
        }
    }

    /// Clears the read model, its inbox and its checkpoint, and replays every event of the
    /// store, in one unit of work that holds the projection's lock (the live runner waits).
    /// Returns how many events took effect. It replays up to the end of the store as it finds
    /// it (a page shorter than the batch size); events appended later are the live runner's,
    /// from the checkpoint the rebuild saves.
    ///
    /// All or nothing: the first event whose `apply` fails, or that does not decode, fails the
    /// rebuild and rolls it back, also one a transport-fed runner dead-lettered long ago (it
    /// is still in the store). Make `apply` take such an event (skip what it cannot use) before
    /// rebuilding.
    pub async fn rebuild(&self) -> Result<usize, ProjectionError> {
        let events = self
            .events
            .as_ref()
            .ok_or_else(|| ProjectionError::NoEventStore(self.name.clone()))?;
        let mut unit = self.store.begin(&self.name).await?;
        self.store.reset(&mut unit, &self.name).await?;
        self.projection
            .reset(&mut unit)
            .await
            .map_err(|source| ProjectionError::Rebuild {
                projection: self.name.clone(),
                step: "reset",
                source,
            })?;
        let mut after = Position::START;
        let mut applied = Applied::default();
        loop {
            let records = events.read_all(after, self.batch).await?;
            let Some(last) = records.last().and_then(|r| r.position) else {
                break;
            };
            applied.merge(self.apply_records(&mut unit, &records).await?);
            after = last;
            // A short page reached the end of the store. Reading on until a page comes back
            // empty would never end while events keep arriving (each read finding the few
            // appended meanwhile), holding the lock and growing one unit of work; what comes
            // after the checkpoint saved below is the live runner's.
            if records.len() < self.batch {
                break;
            }
        }
        self.projection
            .rebuilt(&mut unit)
            .await
            .map_err(|source| ProjectionError::Rebuild {
                projection: self.name.clone(),
                step: "rebuilt",
                source,
            })?;
        if after > Position::START {
            self.store
                .save_checkpoint(&mut unit, &self.name, after)
                .await?;
        }
        self.store.commit(unit).await?;
        *self.lock_read_from() = Some(after);
        Ok(applied.committed(&self.name))
    }
}

#[async_trait]
impl<S: ProjectionStore, P: Projection<S>> Worker for ProjectionRunner<S, P> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        // A gap in the upcasters is this build's bug: say so at start, not at the first event
        // that needs the missing one.
        self.types.validate()?;
        self.stop = Some(ctx.shutdown.clone());
        self.health = Some(ctx.health.clone());
        let result = self.run_until_shutdown(&ctx).await;
        self.stop = None;
        self.health = None;
        let closed = match &mut self.source {
            Source::Transport {
                consumer: Some(consumer),
                ..
            } => consumer.close().await,
            _ => Ok(()),
        };
        result?;
        // What a failed close keeps (entries held back for their keys' turn) comes back after
        // the redelivery delay: the worker reports it.
        Ok(closed?)
    }
}

impl<S: ProjectionStore, P: Projection<S>> ProjectionRunner<S, P> {
    async fn run_until_shutdown(&mut self, ctx: &WorkerContext) -> Result<(), BoxError> {
        let mut failures = 0u32;
        // A stall reported before a restart (the batch then panicked) is not this run's.
        self.stalled
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // When the first of the batches failing since the last success ended.
        let mut failing_since: Option<tokio::time::Instant> = None;
        // When the last failing batch ended.
        let mut last_failure: Option<tokio::time::Instant> = None;
        let mut purge = InboxPurge {
            store: self.store.clone(),
            name: self.name.clone(),
            retention: self.inbox_retention,
            interval: self.inbox_purge_interval,
            next: tokio::time::Instant::now(),
            running: None,
            started: tokio::time::Instant::now(),
        };
        while !ctx.shutdown.is_requested() {
            // The purge runs in a task of its own when due, also while a fetch waits, and
            // without holding up the batch. Checked here too: a step that never waits (stores
            // in memory, a fetch that returns at once) wins the biased race below every time.
            purge.start_if_due();
            let stepped = {
                let step = self.step();
                tokio::pin!(step);
                loop {
                    tokio::select! {
                        biased;
                        stepped = &mut step => break stepped,
                        _ = tokio::time::sleep_until(purge.next) => purge.start(),
                    }
                }
            };
            match stepped {
                Ok(Stepped {
                    set_aside: Some(e), ..
                }) => {
                    // The rest of the batch took effect: progress, so no backoff and no
                    // failure count (a run of such batches is not "failing"), but degraded
                    // until a batch passes whole (or, with nothing to fetch, twice the
                    // redelivery delay later, as after a failed batch).
                    tracing::warn!(projection = %self.name, error = %e, "projection set an event aside; the rest of its batch took effect");
                    failures = 0;
                    failing_since = None;
                    last_failure = Some(tokio::time::Instant::now());
                    self.stalled
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    ctx.health.set(Health::Degraded(e.to_string()));
                }
                Ok(Stepped {
                    applied, caught_up, ..
                }) => {
                    // An empty fetch proves the transport, not the store: a batch that failed
                    // comes back only after the redelivery delay. Until then (twice it, so a
                    // late redelivery is not missed) health and the failure count stay as
                    // they are, so a store that stays down is reported, not hidden by the
                    // empty fetches in between. After that the failed batch is gone (handled
                    // elsewhere, or dead-lettered): healthy again.
                    let awaiting_redelivery = match &self.source {
                        Source::Transport { options, .. } if caught_up && applied == 0 => {
                            last_failure.is_some_and(|at: tokio::time::Instant| {
                                at.elapsed() < options.redelivery_delay.saturating_mul(2)
                            })
                        }
                        _ => false,
                    };
                    if !awaiting_redelivery {
                        failures = 0;
                        failing_since = None;
                        last_failure = None;
                        self.stalled
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        ctx.health.set(Health::Healthy);
                    }
                    match self.source {
                        Source::Store if caught_up => {
                            let idle = tokio::time::sleep(self.idle);
                            tokio::pin!(idle);
                            loop {
                                tokio::select! {
                                    _ = &mut idle => break,
                                    _ = ctx.shutdown.requested() => break,
                                    _ = tokio::time::sleep_until(purge.next) => purge.start(),
                                }
                            }
                        }
                        // A fetch that returns at once when there is nothing (`block` of zero)
                        // must not keep the other tasks of its thread, shutdown among them,
                        // from running.
                        Source::Transport { .. } if caught_up => tokio::task::yield_now().await,
                        _ => {}
                    }
                }
                Err(e) => {
                    failures += 1;
                    // Only a batch handed back comes again after the redelivery delay: a
                    // consumer that could not be made or a fetch that failed leaves nothing to
                    // wait for, and the next empty fetch proves the transport is back.
                    if self.fetched_a_batch {
                        last_failure = Some(tokio::time::Instant::now());
                    }
                    tracing::warn!(projection = %self.name, error = %e, failures, "projection batch failed; retrying");
                    // Retried either way (a consumer name in use frees up when its holder
                    // stops), but only what can pass by itself is merely degraded, and only
                    // for `stall_after`: a store-fed runner has no dead letters, so an event
                    // whose `apply` fails (or times out) every time holds it for good.
                    // A batch that ran past `stall_after` before it failed is stuck already
                    // (the stall was reported; a merely degraded report would hide it again).
                    // Time spent waiting for events before a failure (a long blocking fetch,
                    // the idle interval) is not counted.
                    let stalled = self
                        .stalled
                        .swap(false, std::sync::atomic::Ordering::Relaxed);
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    let stuck = stalled || since.elapsed() >= self.stall_after;
                    ctx.health.set(if passes(&e) && !stuck {
                        Health::Degraded(e.to_string())
                    } else if stuck {
                        // No count: the reason stays the same from one readiness check to
                        // the next, as a server logs each new one.
                        Health::Unhealthy(format!(
                            "batches keep failing since the last success: {e}",
                        ))
                    } else {
                        Health::Unhealthy(e.to_string())
                    });
                    // From the idle interval, but from 10 ms at least: a transport-fed runner
                    // does not otherwise use `idle`, and a zero one retried every millisecond.
                    let backoff = self
                        .idle
                        .max(Duration::from_millis(10))
                        .saturating_mul(2u32.saturating_pow((failures - 1).min(6)));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = ctx.shutdown.requested() => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// The running worker's inbox housekeeping.
struct InboxPurge<S> {
    store: Arc<S>,
    name: String,
    retention: Duration,
    interval: Duration,
    next: tokio::time::Instant,
    running: Option<tokio::task::JoinHandle<()>>,
    /// When the running purge started.
    started: tokio::time::Instant,
}

/// A purge in flight stops with its worker's run, however that ends (returned, panicked,
/// aborted at shutdown): it must not outlive it, nor overlap the purge of a restarted run.
impl<S> Drop for InboxPurge<S> {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.abort();
        }
    }
}

impl<S: ProjectionStore> InboxPurge<S> {
    /// Starts a purge when one is due.
    fn start_if_due(&mut self) {
        if tokio::time::Instant::now() >= self.next {
            self.start();
        }
    }

    /// Starts a purge unless the last one is still running, and schedules the next.
    fn start(&mut self) {
        let now = tokio::time::Instant::now();
        // An interval too long to add means never again (about 30 years is as good).
        self.next = now
            .checked_add(self.interval)
            .unwrap_or_else(|| now + Duration::from_secs(1 << 30));
        if self.running.as_ref().is_some_and(|r| !r.is_finished()) {
            // Said at every interval it goes on: a purge that never ends (a lock it waits
            // for, a silent server) would otherwise leave the inbox growing without a word.
            tracing::warn!(
                projection = %self.name,
                running_for = ?now.duration_since(self.started),
                "the last inbox purge is still running; no other starts until it ends"
            );
            return;
        }
        self.started = now;
        let (store, name, retention) = (self.store.clone(), self.name.clone(), self.retention);
        self.running = Some(tokio::spawn(async move {
            // A failure is logged and tried again next interval: it does not stop the
            // projection. Nobody awaits this task, so a panic in the store's purge is caught
            // here to be logged like a failure, not only printed by the panic hook.
            let purge = std::panic::AssertUnwindSafe(store.purge_inbox(&name, retention));
            match futures_util::FutureExt::catch_unwind(purge).await {
                Ok(Ok(0)) => {}
                Ok(Ok(purged)) => {
                    tracing::debug!(projection = %name, purged, "purged old inbox entries");
                }
                Ok(Err(e)) => {
                    tracing::warn!(projection = %name, error = %e, "inbox purge failed; trying again next interval");
                }
                Err(payload) => {
                    let panic = crate::panic::into_message(payload);
                    tracing::error!(projection = %name, %panic, "inbox purge panicked; trying again next interval");
                }
            }
        }));
    }
}

/// The events a consumer handed back (nacked, or deferred behind one of their key) that have
/// not been fetched again: still to handle, though the fetches until their redelivery (30 s
/// by default) come back empty or with other keys' events. The lag gauges hold the oldest,
/// which would otherwise read near 0 while an event fails every time. One is dropped when it
/// is fetched again (its batch's lag covers it, and a new failure notes it again), or twice
/// the redelivery delay after it was handed back (dead-lettered, or taken by another
/// instance: it will not come here again).
#[derive(Debug, Default)]
struct HandedBack {
    waiting: HashMap<Uuid, (chrono::DateTime<chrono::Utc>, tokio::time::Instant)>,
}

/// The most events [`HandedBack`] keeps: past it, newer ones are not held (the lag shows the
/// oldest anyway).
const MOST_HANDED_BACK: usize = 4096;

impl HandedBack {
    /// `records` were handed back just now.
    fn note(&mut self, records: &[EventRecord]) {
        for record in records {
            self.note_one(record.event_id, record.metadata.occurred_at);
        }
    }

    /// Event `id`, which occurred at `occurred`, was handed back just now.
    fn note_one(&mut self, id: Uuid, occurred: chrono::DateTime<chrono::Utc>) {
        if self.waiting.len() >= MOST_HANDED_BACK && !self.waiting.contains_key(&id) {
            return;
        }
        self.waiting
            .insert(id, (occurred, tokio::time::Instant::now()));
    }

    /// `deliveries` were fetched: those among them come again. Drops, with `redelivery` (the
    /// consumer's delay), the events handed back twice that long ago.
    fn fetched(&mut self, deliveries: &[Delivery], redelivery: Option<Duration>) {
        if self.waiting.is_empty() {
            return;
        }
        for delivery in deliveries {
            self.waiting.remove(&delivery.record.event_id);
        }
        if let Some(delay) = redelivery {
            let limit = delay.saturating_mul(2);
            self.waiting.retain(|_, (_, at)| at.elapsed() < limit);
        }
    }

    /// When the oldest event still handed back occurred.
    fn oldest(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.waiting.values().map(|(occurred, _)| *occurred).min()
    }
}

/// Sets `cqrs_projection_lag_seconds{projection}` as a read of `records` (events the projection
/// has not applied yet) finds it: how long ago the oldest of them occurred, 0 for none. A
/// projection stuck on an event reads it again at each retry, so its lag keeps growing; one
/// caught up reads nothing, 0. A delivery already applied (redelivered) counts until it is
/// read, and a projection catching up from the first event shows that event's age. An event
/// handed back (`handed_back`: [`HandedBack::oldest`]) counts too.
fn report_lag(
    projection: &str,
    records: &[EventRecord],
    handed_back: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) {
    let lag = lag_of_times(
        now,
        records
            .iter()
            .map(|r| r.metadata.occurred_at)
            .chain(handed_back),
    );
    metrics::gauge!("cqrs_projection_lag_seconds", "projection" => projection.to_owned()).set(lag);
}

/// How far `now` is behind the oldest of `times`, in seconds; 0 without any.
fn lag_of_times(
    now: chrono::DateTime<chrono::Utc>,
    times: impl IntoIterator<Item = chrono::DateTime<chrono::Utc>>,
) -> f64 {
    times.into_iter().min().map_or(0.0, |oldest| {
        // An event stamped ahead of this clock (another host's) is not behind: 0.
        (now - oldest)
            .to_std()
            .map_or(0.0, |behind| behind.as_secs_f64())
    })
}

/// Sets `cqrs_projection_lag_seconds{projection}` to NaN: the events waiting could not be read
/// (the store or the transport away). A value kept from before (0, say) would say the
/// projection is up to date while it falls behind (alert on `x != x`, as for the outbox's
/// backlog gauges).
fn report_unmeasured_lag(projection: &str) {
    metrics::gauge!("cqrs_projection_lag_seconds", "projection" => projection.to_owned())
        .set(f64::NAN);
}

/// Projection `name` failed on `record`, for `source`.
fn event_error(name: &str, record: &EventRecord, source: HandlerError) -> ProjectionError {
    ProjectionError::Apply {
        projection: name.to_owned(),
        event_id: record.event_id,
        event_type: record.event_type.clone(),
        source,
    }
}

/// Applies records in `unit`: each one not yet processed is decoded and handed to the
/// projection. Returns those that took effect, to be counted once the unit commits.
async fn apply_records<S: ProjectionStore, P: Projection<S>>(
    store: &S,
    projection: &P,
    types: &EventTypes,
    name: &str,
    timeout: Option<Duration>,
    unit: &mut S::Unit,
    records: &[EventRecord],
) -> Result<Applied, ProjectionError> {
    let mut applied = Applied::default();
    // A panic (in the projection; an upcaster's is a decode error) is this event's fault,
    // like an error: it must fail the batch with the event named, so that only it is handed
    // back as an attempt.
    // Unwinding past the runner instead would hand none back, and the whole batch would reach
    // its maximum deliveries together and be dead-lettered, the innocent events with it.
    let panicked = |record: &EventRecord, message: String| {
        event_error(
            name,
            record,
            HandlerError::internal(format!("panicked: {message}")),
        )
    };
    for record in records {
        if !store.mark_processed(unit, name, record.event_id).await? {
            continue;
        }
        // A `Deserialize` that panics is a decode error already (`EventTypes::decode`).
        let envelope = types
            .decode(record)
            .map_err(|source| ProjectionError::Decode {
                event_id: record.event_id,
                source,
            })?;
        if let Some(envelope) = envelope {
            // The call inside the guarded future: a hand-written (not `#[async_trait]`) `apply`
            // may panic before it returns its future.
            let applying =
                crate::panic::CatchUnwind::new(async { projection.apply(unit, &envelope).await });
            crate::panic::within(timeout, applying)
                .await
                .unwrap_or_else(|| {
                    // The event's fault as far as the runner can tell: handed back as an
                    // attempt, so one too slow every time ends in the dead letters.
                    Ok(Err(HandlerError::new(
                        ErrorKind::Timeout,
                        APPLY_TIMEOUT,
                        format!(
                            "apply did not finish within {:?} (the runner's apply_timeout) and was cancelled",
                            rounded(timeout.unwrap_or_default())
                        ),
                    )))
                })
                .map_err(|message| panicked(record, message))?
                .map_err(|source| ProjectionError::Apply {
                    projection: name.to_owned(),
                    event_id: record.event_id,
                    event_type: record.event_type.clone(),
                    source,
                })?;
            applied.add(envelope.name());
        }
    }
    Ok(applied)
}

/// How a store-fed unit's commit ended: how many events took effect, or the panic's message.
enum Committed {
    Applied(usize),
    Panicked(String),
}

/// The events a unit of work applied, by type: counted in `cqrs_events_handled_total` only
/// once the unit committed, since a unit rolled back (and applied again) took no effect.
#[derive(Debug, Default)]
struct Applied {
    total: usize,
    // A batch holds a handful of types: a scan beats a map, and nothing is allocated for a
    // unit that applied nothing.
    by_type: Vec<(&'static str, u64)>,
}

impl Applied {
    fn add(&mut self, event_type: &'static str) {
        self.count(event_type, 1);
    }

    fn merge(&mut self, other: Applied) {
        for (event_type, n) in other.by_type {
            self.count(event_type, n);
        }
    }

    fn count(&mut self, event_type: &'static str, n: u64) {
        self.total += n as usize;
        match self.by_type.iter_mut().find(|(t, _)| *t == event_type) {
            Some((_, m)) => *m += n,
            None => self.by_type.push((event_type, n)),
        }
    }

    /// Counts them for `projection`, once their unit committed; returns how many.
    fn committed(self, projection: &str) -> usize {
        for (event_type, n) in self.by_type {
            metrics::counter!(
                "cqrs_events_handled_total",
                "projection" => projection.to_owned(),
                "event_type" => event_type
            )
            .increment(n);
        }
        self.total
    }
}

/// Whether a failure of this kind says "not now" rather than anything about the event: a
/// backend away or refusing for now. A `Timeout` is not among them: an event that is too slow
/// to handle every time must end in the dead letters, not loop.
fn waits(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Unavailable | ErrorKind::RateLimited)
}

/// Whether an event bus's refusal says "not now" rather than anything about the event: every
/// handler that failed can succeed later (a backend away), or a layer refused before any
/// handler ran for such a reason (a rate limiter, a layer whose backend is away).
fn says_not_now(error: &DispatchError) -> bool {
    match error {
        DispatchError::Publish(e) => {
            !e.failures.is_empty() && e.failures.iter().all(|f| waits(f.error.kind()))
        }
        other => waits(other.kind()),
    }
}

/// Whether a failed batch may pass by itself, so the runner is only degraded: an event's
/// failure (redelivered, dead-lettered, or waiting for the build that knows it), a backend
/// away or slow, a conflict that a retry resolves. Not a refusal that comes again unchanged
/// until someone acts (a consumer name in use in the group, a misconfigured or broken
/// backend, no event store to rebuild from): the runner is then unhealthy, as an
/// [`EventBusConsumer`] whose run fails is.
fn passes(error: &ProjectionError) -> bool {
    let passes = |kind: ErrorKind| kind.is_retryable() || kind == ErrorKind::Conflict;
    match error {
        ProjectionError::Store(e) => passes(e.kind()),
        ProjectionError::Transport(e) => passes(e.kind()),
        ProjectionError::Decode { .. } | ProjectionError::Apply { .. } => true,
        // A rebuild's, never a batch's; as the batch's own would be, a retryable one passes.
        ProjectionError::Rebuild { source, .. } => passes(source.kind()),
        ProjectionError::NoEventStore(_) | ProjectionError::CheckpointAhead { .. } => false,
    }
}

/// How many times one fetched batch is applied: after a pass fails on an event at fault, the
/// event (and its chain's later deliveries) is set aside and the rest applied again at once.
/// Bounded, since each pass applies the rest anew: a batch with more failing events than this
/// hands the rest back to wait, as a failed batch does.
const MAX_PASSES_PER_BATCH: usize = 8;

/// Events a runner remembers whose unit of their own panicked.
const MAX_SUSPECTS: usize = 1024;

/// The event a failed batch can go on without, and whether its failure counts as an attempt
/// on it: one [`at_fault`] (an attempt), one only a newer build can decode, or one whose
/// `apply` answered that it [`waits`] (no attempt: it waits for that build, or for its
/// backend, without its batch mates of other keys). The step blames no second event that
/// waits: two say the backend is away, and the batch is handed back.
fn blamed(error: &ProjectionError) -> Option<(Uuid, bool)> {
    match error {
        ProjectionError::Decode {
            source, event_id, ..
        } if source.waits_for_another_build() => Some((*event_id, false)),
        ProjectionError::Apply {
            source, event_id, ..
        } if waits(source.kind()) => Some((*event_id, false)),
        _ => at_fault(error).map(|event_id| (event_id, true)),
    }
}

/// The event a failed batch is blamed on, if any: one the projection refused or that cannot
/// be decoded (a missing upcaster included). Not one a newer build must decode
/// ([`DecodeError::waits_for_another_build`]), nor one whose failure [`waits`], nor any for a
/// store or transport failure.
fn at_fault(error: &ProjectionError) -> Option<Uuid> {
    match error {
        ProjectionError::Decode { source, .. } if source.waits_for_another_build() => None,
        ProjectionError::Decode { event_id, .. } => Some(*event_id),
        ProjectionError::Apply { source, .. } if waits(source.kind()) => None,
        ProjectionError::Apply { event_id, .. } => Some(*event_id),
        _ => None,
    }
}

/// Whether no redelivery mends `error`'s event: it does not decode (and not for want of a
/// newer build), or the projection refused it [permanently](HandlerError::permanent).
fn given_up(error: &ProjectionError) -> bool {
    match error {
        ProjectionError::Decode { source, .. } => !source.waits_for_another_build(),
        ProjectionError::Apply { source, .. } => source.is_permanent(),
        _ => false,
    }
}

/// Whether the delivery at `i` is the first of its key among `order_keys` (one without a key
/// is: it waits for nothing).
fn first_of_its_key(order_keys: &[Option<String>], i: usize) -> bool {
    order_keys[i]
        .as_ref()
        .is_none_or(|key| !order_keys[..i].iter().any(|k| k.as_ref() == Some(key)))
}

/// A duration cut to the millisecond, for messages (`1.5s`, not `1.500000042s`, with `{:?}`).
fn rounded(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// Where a batch that runs too long is reported, and after how long.
struct Stall<'a> {
    health: &'a HealthReporter,
    after: Duration,
    /// What runs, for the message ("a batch").
    what: &'static str,
    /// Set once the stall is reported, for a caller that reports the batch's outcome itself.
    reported: Option<&'a std::sync::atomic::AtomicBool>,
}

impl<'a> Stall<'a> {
    /// A projection runner's: reported only while it runs as a worker (with a `health`).
    fn of_projection(
        health: Option<&'a HealthReporter>,
        after: Duration,
        reported: &'a std::sync::atomic::AtomicBool,
    ) -> Option<Self> {
        health.map(|health| Stall {
            health,
            after,
            what: "a projection batch",
            reported: Some(reported),
        })
    }
}

/// Runs `work` while calling [`Consumer::keep_alive`] for `ids` every
/// [`keep_alive_interval`](Consumer::keep_alive_interval), so deliveries whose handling takes
/// longer than the redelivery delay are not handed out again elsewhere meanwhile; and, once it
/// has run `stall.after`, reporting the worker unhealthy (refreshed while it runs on), since a
/// batch kept alive is otherwise invisible however long it hangs.
///
/// `kept` is when the deliveries were fetched or last kept alive, and is moved on by each
/// keep-alive: a batch worked through in several calls (pass after pass, unit after unit) is
/// kept alive on time across them, though no single call lasts an interval. The stall bound
/// counts from this call: each call is one unit of the batch's progress.
///
/// A keep-alive runs beside the work, which goes on meanwhile: one that takes its time (a
/// backend slow to answer, up to its command timeout) must not pause the handlers. The next
/// one starts once it is done; the work's outcome is returned once it is done too.
async fn keep_alive_while<T>(
    consumer: Option<&mut dyn Consumer>,
    ids: &[DeliveryId],
    kept: &mut tokio::time::Instant,
    stall: Option<Stall<'_>>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let started = tokio::time::Instant::now();
    // For the stall's reason: a time, not a duration, so the reason stays the same from one
    // readiness check to the next (a server logs each new one).
    let started_at = chrono::Utc::now();
    let mut stall_warned = false;
    // A period too long for the clock (a redelivery delay or a stall bound of `Duration::MAX`,
    // "never") asks for ticks that never come due; `Instant + every` would overflow.
    let ticker = |since: tokio::time::Instant, every: Duration, first: Duration| {
        let first = since.checked_add(first)?;
        let mut ticks = tokio::time::interval_at(first, every.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(ticks)
    };
    let mut keep = consumer
        .as_ref()
        .and_then(|c| c.keep_alive_interval())
        .map(|every| every.max(Duration::from_millis(1)))
        .and_then(|every| ticker(*kept, every, every));
    let mut stalled = stall
        .as_ref()
        .and_then(|s| ticker(started, s.after.min(STALL_REPORT_EVERY), s.after));
    // The consumer while no keep-alive runs; a keep-alive in flight holds it, and gives it back.
    let mut idle = consumer;
    let mut keeping: Option<KeepingAlive<'_>> = None;
    // The work's outcome, returned once no keep-alive is in flight: the caller acknowledges
    // next, with the consumer back. A stall is still reported meanwhile.
    let mut finished = None;
    tokio::pin!(work);
    loop {
        if keeping.is_none()
            && let Some(done) = finished.take()
        {
            return done;
        }
        tokio::select! {
            done = &mut work, if finished.is_none() => finished = Some(done),
            (consumer, outcome) = in_flight(&mut keeping) => {
                keeping = None;
                idle = Some(consumer);
                log_keep_alive(outcome);
            }
            _ = next_tick(&mut keep), if keeping.is_none() && finished.is_none() => {
                *kept = tokio::time::Instant::now();
                if let Some(consumer) = idle.take() {
                    keeping = Some(Box::pin(async move {
                        let outcome = consumer.keep_alive(ids).await;
                        (consumer, outcome)
                    }));
                }
            }
            _ = next_tick(&mut stalled) => {
                if let Some(stall) = &stall {
                    let what = match ids.len() {
                        0 => stall.what.to_owned(),
                        n => format!("{} of {n} deliveries", stall.what),
                    };
                    let reason = format!(
                        "{what} has been running since {}, past the stall bound of {:?}: a handler may be hung, or waiting (for a lock, a backend)",
                        started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        rounded(stall.after),
                    );
                    // Once a batch: the report is refreshed every tick, the line need not be.
                    if !stall_warned {
                        stall_warned = true;
                        tracing::warn!(%reason, running_for = ?rounded(started.elapsed()), "a batch is stalled");
                    }
                    stall.health.set(Health::Unhealthy(reason));
                    if let Some(reported) = stall.reported {
                        reported.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// A keep-alive in flight: it gives the consumer back with its outcome.
type KeepingAlive<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (&'a mut dyn Consumer, Result<(), TransportError>)>
            + Send
            + 'a,
    >,
>;

/// The outcome of the keep-alive in flight; never, without one.
async fn in_flight<'a>(
    keeping: &mut Option<KeepingAlive<'a>>,
) -> (&'a mut dyn Consumer, Result<(), TransportError>) {
    match keeping {
        Some(keeping) => keeping.as_mut().await,
        None => std::future::pending().await,
    }
}

fn log_keep_alive(outcome: Result<(), TransportError>) {
    if let Err(error) = outcome {
        tracing::warn!(%error, "could not keep a long batch's deliveries; they may be redelivered");
    }
}

/// The next tick of `ticks`; never, without.
async fn next_tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// What a delivery handler decided about one delivery.
#[derive(Debug)]
#[non_exhaustive]
pub enum Handled {
    /// Done: acknowledge it.
    Done,
    /// Failed for now: hand it back with the reason, to be delivered again. Counts as an
    /// attempt: past `max_deliveries` the delivery is dead-lettered.
    Retry(String),
    /// Not handled, through no fault of its own (a backend that is away, an event type this
    /// build does not know yet): hand it back without counting an attempt
    /// ([`Consumer::defer`]), so waiting does not dead-letter it. It comes back after the
    /// redelivery delay, like a retry, and the rest of its chain waits for it.
    Later(String),
    /// Failed for good (an event that cannot be decoded, a handler that refuses it
    /// [permanently](crate::HandlerError::permanent)): no redelivery would mend it, so it goes
    /// to the dead letters at once, with the reason ([`Consumer::dead_letter`]), instead of
    /// holding its key for `max_deliveries` redelivery delays first. The rest of its chain is
    /// handed back, as after a [`Retry`](Self::Retry), and follows it.
    DeadLetter(String),
}

/// How [`consume_until_shutdown`] fetches and handles.
///
/// ```
/// use cqrs_core::projection::ConsumeLoop;
/// use std::time::Duration;
///
/// let consume = ConsumeLoop::default()
///     .concurrency(4)
///     .handler_timeout(Duration::from_secs(60))
///     .stall_after(Duration::from_secs(120));
/// assert_eq!(consume.handler_timeout, Some(Duration::from_secs(60)));
/// assert_eq!(ConsumeLoop::default().handler_timeout, None, "no limit by default");
/// assert_eq!(ConsumeLoop::default().stall_after, Duration::from_secs(300));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumeLoop {
    /// Deliveries fetched at a time. Default 64.
    pub batch: usize,
    /// Chains (deliveries of one [`order_key`](Delivery::order_key)) handled at once; within
    /// a chain, one delivery after another. Default 8.
    pub concurrency: usize,
    /// How long the handling of one delivery may take. Past it, the handler's future is
    /// dropped (cancelled) and the delivery fails like a [`Handled::Retry`]: handed back as an
    /// attempt, so it is redelivered and, every time too slow, dead-lettered after
    /// `max_deliveries`; the rest of its chain is handed back, and the batch's other chains are
    /// acknowledged. `None` (the default): no limit, since cancelling a handler midway is only
    /// safe for handlers that tolerate it; a hung handler is then reported by
    /// [`stall_after`](Self::stall_after) but holds its batch, kept alive, until the process
    /// stops.
    pub handler_timeout: Option<Duration>,
    /// How long a batch may run before the worker reports [`Health::Unhealthy`], naming how
    /// long it has been running (the report is refreshed while it runs on, and the batch's
    /// outcome replaces it when it ends). Default 5 minutes; `Duration::MAX` never reports.
    pub stall_after: Duration,
}

/// How long a batch runs before its worker reports a stall, by default.
const STALL_AFTER: Duration = Duration::from_secs(300);
/// How often a stall report is refreshed, at most (and at least once per `stall_after`).
const STALL_REPORT_EVERY: Duration = Duration::from_secs(10);

impl Default for ConsumeLoop {
    fn default() -> Self {
        Self {
            batch: 64,
            concurrency: 8,
            handler_timeout: None,
            stall_after: STALL_AFTER,
        }
    }
}

impl ConsumeLoop {
    /// Sets how many deliveries are fetched at a time (at least 1).
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Sets how many chains are handled at once (at least 1; 1 handles a batch one delivery
    /// at a time).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sets how long the handling of one delivery may take before it is cancelled and handed
    /// back as a failed attempt (see [`handler_timeout`](Self#structfield.handler_timeout);
    /// no limit by default). At least 1 ms.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = Some(timeout.max(Duration::from_millis(1)));
        self
    }

    /// Sets how long a batch may run before the worker reports itself unhealthy (see
    /// [`stall_after`](Self#structfield.stall_after); 5 minutes by default). At least 1 ms.
    pub fn stall_after(mut self, after: Duration) -> Self {
        self.stall_after = after.max(Duration::from_millis(1));
        self
    }
}

/// What became of one delivery of a batch.
enum Outcome {
    Done,
    Retry(String),
    Later(String),
    DeadLetter(String),
    /// Not handled: an earlier delivery of its chain (this event id) failed.
    Skipped(Uuid),
}

/// The loop of a consuming worker: fetch up to `batch` deliveries, hand each to `handle`,
/// acknowledge or hand back what it decided, until shutdown is requested or the consumer
/// fails; then close the consumer (after a failure too, best effort, and return the
/// failure).
///
/// Deliveries of one [`order_key`](Delivery::order_key) form a chain, handled one after
/// another in batch order; up to `concurrency` chains run at once, so events of different keys
/// are handled in parallel and events of one key in order. When a delivery fails
/// ([`Handled::Retry`]) or is given up ([`Handled::DeadLetter`]), the rest of its chain is
/// handed back unhandled ([`Consumer::defer`]), to come back after it.
/// The handled deliveries of a batch are acknowledged together once every chain finished;
/// meanwhile the loop calls [`Consumer::keep_alive`] every
/// [`keep_alive_interval`](Consumer::keep_alive_interval), so a batch that takes longer than
/// the redelivery delay is not handed out again elsewhere.
/// A delivery given up is dead-lettered ([`Consumer::dead_letter`]) after the batch's
/// acknowledgement, once that succeeded (handed back instead, with its reason, when it failed:
/// it must not leave the pending list before an earlier delivery of its key).
/// Deliveries already fetched are finished and acknowledged even when shutdown comes. A
/// retried or dead-lettered delivery is logged and marks the worker degraded until the next
/// batch that succeeds, or, for a consumer that reports its
/// [`redelivery_delay`](Consumer::redelivery_delay), until twice that passed with nothing to
/// fetch (the delivery was dead-lettered or handled elsewhere: it will not come back).
///
/// A batch that runs longer than [`ConsumeLoop::stall_after`] marks the worker unhealthy,
/// naming how long it has been running, until it ends. A handler that runs longer than
/// [`ConsumeLoop::handler_timeout`] (when set) is cancelled and its delivery handed back as a
/// failed attempt, so one hung handler does not hold its batch mates, kept alive, for ever.
pub async fn consume_until_shutdown<F, Fut>(
    consumer: &mut dyn Consumer,
    ctx: &WorkerContext,
    options: ConsumeLoop,
    handle: F,
) -> Result<(), TransportError>
where
    F: Fn(Delivery) -> Fut + Sync,
    Fut: std::future::Future<Output = Handled> + Send,
{
    consume_and_close(consumer, ctx, options, &handle, None).await
}

/// [`consume_until_shutdown`], reporting `cqrs_consumer_lag_seconds{topic, group}` for
/// `lag_of` (`(topic, group)`) when given.
async fn consume_and_close<F, Fut>(
    consumer: &mut dyn Consumer,
    ctx: &WorkerContext,
    options: ConsumeLoop,
    handle: &F,
    lag_of: Option<(&str, &str)>,
) -> Result<(), TransportError>
where
    F: Fn(Delivery) -> Fut + Sync,
    Fut: std::future::Future<Output = Handled> + Send,
{
    ctx.health.set(Health::Healthy);
    let consumed = consume(consumer, ctx, options, handle, lag_of).await;
    // Closed on an error too (best effort): what the consumer holds is released at once,
    // instead of waiting out the redelivery delay, its lane behind it, to be reclaimed with a
    // delivery counted that no handler got.
    let closed = consumer.close().await;
    match consumed {
        Ok(()) => closed,
        Err(error) => {
            if let Err(close_error) = closed {
                tracing::debug!(%close_error, "could not close the consumer after its error");
            }
            Err(error)
        }
    }
}

/// The loop of [`consume_until_shutdown`], without the close.
async fn consume<F, Fut>(
    consumer: &mut dyn Consumer,
    ctx: &WorkerContext,
    options: ConsumeLoop,
    handle: &F,
    lag_of: Option<(&str, &str)>,
) -> Result<(), TransportError>
where
    F: Fn(Delivery) -> Fut + Sync,
    Fut: std::future::Future<Output = Handled> + Send,
{
    let report_lag = |lag: f64| {
        if let Some((topic, group)) = lag_of {
            metrics::gauge!(
                "cqrs_consumer_lag_seconds",
                "topic" => topic.to_owned(),
                "group" => group.to_owned()
            )
            .set(lag);
        }
    };
    // When a batch last left the worker degraded.
    let mut degraded_at: Option<tokio::time::Instant> = None;
    // The events handed back (failed, or behind one of their key that did) that have not come
    // again: still to handle, the lag holds them (see `HandedBack`).
    let mut handed_back = HandedBack::default();
    while !ctx.shutdown.is_requested() {
        let fetched = tokio::select! {
            d = consumer.fetch(options.batch.max(1)) => d,
            _ = ctx.shutdown.requested() => break,
        };
        // NaN while the transport cannot be read: a value kept from before would say the
        // handlers are up to date while they fall behind.
        let deliveries = fetched.inspect_err(|_| report_lag(f64::NAN))?;
        handed_back.fetched(&deliveries, consumer.redelivery_delay());
        let records = deliveries.iter().map(|d| d.record.metadata.occurred_at);
        report_lag(lag_of_times(
            chrono::Utc::now(),
            records.chain(handed_back.oldest()),
        ));
        if deliveries.is_empty() {
            // A failed delivery comes back within the redelivery delay; one that has not in
            // twice that was dead-lettered or handled elsewhere: the failure is over. (On an
            // idle topic no batch would ever come to say so.)
            let over = |at: tokio::time::Instant| {
                consumer
                    .redelivery_delay()
                    .is_some_and(|delay| at.elapsed() >= delay.saturating_mul(2))
            };
            if degraded_at.is_some_and(over) {
                degraded_at = None;
                ctx.health.set(Health::Healthy);
            }
            // A fetch that returns at once when there is nothing (`block` of zero) must not
            // keep the other tasks of this thread, the shutdown among them, from running.
            tokio::task::yield_now().await;
            continue;
        }
        // Each delivery's id, cloned once: for keeping the batch alive, then for the answers
        // (outcomes name their delivery by index).
        let mut ids: Vec<DeliveryId> = deliveries.iter().map(|d| d.id.clone()).collect();
        let batch = handle_batch(
            deliveries,
            options.concurrency,
            options.handler_timeout,
            handle,
        );
        // The batch is acknowledged when it is all done, so it may take longer than the
        // redelivery delay in total.
        let stall = Stall {
            health: &ctx.health,
            after: options.stall_after,
            what: "a batch",
            reported: None,
        };
        let mut kept = tokio::time::Instant::now();
        let outcomes = keep_alive_while(Some(consumer), &ids, &mut kept, Some(stall), batch).await;
        let mut done = Vec::with_capacity(outcomes.len());
        let (mut failed, mut skipped, mut waiting) = (Vec::new(), Vec::new(), None);
        let mut given_up = Vec::new();
        for Answer {
            index,
            event_id,
            attempt,
            occurred_at,
            outcome,
        } in outcomes
        {
            let id = std::mem::replace(&mut ids[index], DeliveryId(String::new()));
            if matches!(
                outcome,
                Outcome::Retry(_) | Outcome::Later(_) | Outcome::Skipped(_)
            ) {
                handed_back.note_one(event_id, occurred_at);
            }
            match outcome {
                Outcome::Done => done.push(id),
                Outcome::Retry(reason) => {
                    tracing::warn!(%event_id, attempt, error = %reason.escape_debug(), "handling failed; it will be redelivered");
                    failed.push((id, reason));
                }
                Outcome::Later(reason) => {
                    tracing::warn!(%event_id, error = %reason.escape_debug(), "not handled for now; it will be redelivered without counting an attempt");
                    waiting = Some(reason);
                    skipped.push(id);
                }
                Outcome::DeadLetter(reason) => {
                    tracing::warn!(%event_id, attempt, error = %reason.escape_debug(), "handling failed for good; it is dead-lettered");
                    given_up.push((id, reason));
                }
                Outcome::Skipped(first) => {
                    tracing::debug!(%event_id, failed = %first, "not handled: an earlier event of its key failed");
                    skipped.push(id);
                }
            }
        }
        // Every answer is tried, the first error returned after: a failed ack must not keep
        // the deferred deliveries from being handed back without an attempt (they would come
        // back by timeout, each counted as one, towards the dead letters).
        let mut answered = Ok(());
        if !done.is_empty() {
            answered = consumer.ack(&done).await;
        }
        // Whether the acks went through: one dead letter that fails does not make the next
        // (another key's) a nack.
        let acked = answered.is_ok();
        // After the acks (those of its key before it were handled first); nothing of its key
        // after it is acknowledged in this batch (handed back): a dead letter that fails
        // leaves it pending, redelivered before them. With the acks failed, handed back
        // instead: out of the pending list before an earlier delivery of its key, it would let
        // the ones after it pass that one.
        for (id, reason) in &given_up {
            let given_up = if acked {
                consumer.dead_letter(id, reason).await
            } else {
                consumer.nack_with_reason(id, reason).await
            };
            answered = answered.and(given_up);
        }
        for (id, reason) in &failed {
            answered = answered.and(consumer.nack_with_reason(id, reason).await);
        }
        if !skipped.is_empty() {
            answered = answered.and(consumer.defer(&skipped).await);
        }
        answered?;
        match failed
            .first()
            .or(given_up.first())
            .map(|(_, reason)| reason)
            .or(waiting.as_ref())
        {
            Some(reason) => {
                degraded_at = Some(tokio::time::Instant::now());
                ctx.health.set(Health::Degraded(reason.clone()));
            }
            None => {
                degraded_at = None;
                ctx.health.set(Health::Healthy);
            }
        }
    }
    Ok(())
}

/// A delivery's outcome, with what the consume loop needs of the delivery, which went to its
/// handler.
struct Answer {
    /// The delivery's index in its batch.
    index: usize,
    event_id: Uuid,
    attempt: u32,
    occurred_at: chrono::DateTime<chrono::Utc>,
    outcome: Outcome,
}

/// Handles one batch: its chains concurrently, each chain in order. Returns every delivery's
/// outcome, by its index in `deliveries`.
async fn handle_batch<F, Fut>(
    deliveries: Vec<Delivery>,
    concurrency: usize,
    timeout: Option<Duration>,
    handle: &F,
) -> Vec<Answer>
where
    F: Fn(Delivery) -> Fut + Sync,
    Fut: std::future::Future<Output = Handled> + Send,
{
    use futures_util::StreamExt;
    let count = deliveries.len();
    let mut chains: Vec<Vec<(usize, Delivery)>> = Vec::new();
    let mut chain_of: HashMap<String, usize> = HashMap::new();
    // Copies of one event without an order key (a relay shipped it twice) go in one chain,
    // one after the other: run at once, two copies would both pass a handler's "seen this
    // id?" check, and the event would take effect twice.
    let mut copies_of: HashMap<Uuid, usize> = HashMap::new();
    for (index, delivery) in deliveries.into_iter().enumerate() {
        match delivery.order_key.as_ref() {
            Some(key) => match chain_of.get(key) {
                Some(&i) => chains[i].push((index, delivery)),
                None => {
                    chain_of.insert(key.clone(), chains.len());
                    chains.push(vec![(index, delivery)]);
                }
            },
            None => match copies_of.get(&delivery.record.event_id) {
                Some(&i) => chains[i].push((index, delivery)),
                None => {
                    copies_of.insert(delivery.record.event_id, chains.len());
                    chains.push(vec![(index, delivery)]);
                }
            },
        }
    }
    let mut outcomes = Vec::with_capacity(count);
    let mut runs = futures_util::stream::iter(chains)
        .map(|chain| run_chain(chain, timeout, handle))
        .buffer_unordered(concurrency.max(1));
    while let Some(chain) = runs.next().await {
        outcomes.extend(chain);
    }
    outcomes
}

async fn run_chain<F, Fut>(
    chain: Vec<(usize, Delivery)>,
    timeout: Option<Duration>,
    handle: &F,
) -> Vec<Answer>
where
    F: Fn(Delivery) -> Fut + Sync,
    Fut: std::future::Future<Output = Handled> + Send,
{
    let mut out = Vec::with_capacity(chain.len());
    let mut failed = None;
    for (index, delivery) in chain {
        let (event_id, attempt) = (delivery.record.event_id, delivery.attempt);
        let occurred_at = delivery.record.metadata.occurred_at;
        let answer = |outcome| Answer {
            index,
            event_id,
            attempt,
            occurred_at,
            outcome,
        };
        if let Some(first) = failed {
            out.push(answer(Outcome::Skipped(first)));
            continue;
        }
        // A handler that panics fails its own delivery, as an error would: unwinding past
        // the loop would hand nothing back, and the whole batch would come back counted.
        // The call inside the guarded future: a closure may panic before its `async` block.
        let handled = crate::panic::within(
            timeout,
            crate::panic::CatchUnwind::new(async { handle(delivery).await }),
        )
        .await;
        let outcome = match handled {
            Some(Ok(handled)) => handled,
            Some(Err(message)) => Handled::Retry(format!("the handler panicked: {message}")),
            // Cancelled: it counts as an attempt, so a delivery too slow every time ends in
            // the dead letters instead of holding its key for ever.
            None => Handled::Retry(format!(
                "the handler did not finish within {:?} (the consume loop's handler_timeout) and was cancelled",
                rounded(timeout.unwrap_or_default())
            )),
        };
        let outcome = match outcome {
            Handled::Done => Outcome::Done,
            // The rest of its chain waits for the dead letter to be written.
            Handled::DeadLetter(reason) => {
                failed = Some(event_id);
                Outcome::DeadLetter(reason)
            }
            Handled::Retry(reason) => {
                failed = Some(event_id);
                Outcome::Retry(reason)
            }
            Handled::Later(reason) => {
                failed = Some(event_id);
                Outcome::Later(reason)
            }
        };
        out.push(answer(outcome));
    }
    out
}

/// Delivers events from a durable transport to an in-process [`EventBus`], at least once:
/// a delivery is acknowledged after every handler succeeded and handed back (nacked) when one
/// failed, so handlers must tolerate a repeat (dedupe by event id, or use a [`Projection`]).
///
/// A failure no redelivery mends is dead-lettered at once ([`Consumer::dead_letter`]), with
/// the error, instead of holding its key for `max_deliveries` redelivery delays: an event
/// every failed handler refused [permanently](crate::HandlerError::permanent), or one that
/// does not decode (a payload that is not its type's, a missing upcaster); each decision is
/// counted in `cqrs_event_bus_dead_lettered_total` by `event_type` (one whose dead letter
/// could not be written comes back and is counted again). One that waits for a newer build,
/// or whose handlers' backend is away, is handed back without counting an attempt; any other
/// failure is redelivered.
///
/// When this consumer gets an event back after some of its handlers failed on it, it hands it
/// only to those ([`EventBus::publish_to`]): the others took it already and are not asked
/// twice. It remembers that for the last 10,000 events that failed here, in memory; an event
/// redelivered to another instance, or after a restart, goes to all of its handlers again. One
/// whose publish [`ConsumeLoop::handler_timeout`] cut off goes again to every handler it was
/// handed (all of them, unless an earlier failure here named some): cancelled whole, the
/// publish leaves no word of which had finished. Give each handler its budget on the bus
/// ([`EventBusBuilder::handler_timeout`](crate::EventBusBuilder::handler_timeout)), which
/// records the one that ran past it, and keep the consume loop's as a backstop above it.
///
/// Events of different keys are published to the bus concurrently (see [`ConsumeLoop`]:
/// 8 at a time by default), events of one key in order.
///
/// It is a runtime [`Worker`]: give it to a [`Runtime`](crate::runtime::Runtime), next to the
/// relay that feeds its topic (a [`StoreRelay`](crate::relay::StoreRelay), or an adapter's
/// outbox relay). Here in one process, on the in-memory transport (a Redis stream transport
/// across instances), with the event published by hand where a relay would ship it:
///
/// ```
/// use cqrs_core::memory::InMemoryTransport;
/// use cqrs_core::ports::{ConsumerOptions, EventTransport};
/// use cqrs_core::projection::EventBusConsumer;
/// use cqrs_core::runtime::Runtime;
/// use cqrs_core::{
///     Event, EventBus, EventContext, EventEnvelope, EventHandler, EventRecord, HandlerError,
///     Metadata,
/// };
/// use serde::{Deserialize, Serialize};
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::time::Duration;
///
/// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
/// #[cqrs(name = "TicketOpened")]
/// pub struct TicketOpened { pub ticket_id: String }
///
/// /// Counts the tickets opened. Delivery is at least once: a handler with effects dedupes
/// /// by the event's id, `ctx.metadata().message_id`.
/// #[derive(Clone, Default)]
/// struct NotifyAgents(Arc<AtomicUsize>);
///
/// #[cqrs_core::async_trait]
/// impl EventHandler<TicketOpened> for NotifyAgents {
///     async fn handle(&self, _event: &TicketOpened, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
///         self.0.fetch_add(1, Ordering::SeqCst);
///         Ok(())
///     }
///
///     fn name(&self) -> &str {
///         "notify_agents"
///     }
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let transport = Arc::new(InMemoryTransport::new());
///     let notify = NotifyAgents::default();
///     let events = EventBus::builder().handler(notify.clone()).build()?;
///
///     // Group `notifications` of topic `tickets` feeds the bus's handlers.
///     let runtime = Runtime::builder()
///         .worker(EventBusConsumer::new(
///             events,
///             transport.clone(),
///             "tickets",
///             "notifications",
///             ConsumerOptions::default(),
///         ))
///         .start();
///
///     let opened = TicketOpened { ticket_id: "t1".into() };
///     let record = EventRecord::from_envelope(&EventEnvelope::new(opened, Metadata::new()))?;
///     transport.publish("tickets", &[record]).await?;
///
///     tokio::time::timeout(Duration::from_secs(5), async {
///         while notify.0.load(Ordering::SeqCst) == 0 {
///             tokio::time::sleep(Duration::from_millis(10)).await;
///         }
///     })
///     .await?;
///     runtime.shutdown(Duration::from_secs(5)).await?;
///     Ok(())
/// }
/// ```
pub struct EventBusConsumer {
    name: String,
    bus: EventBus,
    types: Arc<EventTypes>,
    transport: Arc<dyn EventTransport>,
    topic: String,
    group: String,
    options: ConsumerOptions,
    consume: ConsumeLoop,
    /// Made at the first run and kept across restarts, as a [`ProjectionRunner`]'s is: a run
    /// ended by an error (Redis away) whose close failed too leaves in it what it read and
    /// never handed out; the next run's consumer takes that over, where a new one would leave
    /// it to a reclaim after the redelivery delay, a delivery counted that no handler got
    /// (dead-lettered unseen with `max_deliveries(1)`).
    consumer: Option<Box<dyn Consumer>>,
    /// The handlers that failed on recent events, kept across restarts too: a redelivery after
    /// one still goes only to them.
    failed_handlers: FailedHandlers,
}

impl fmt::Debug for EventBusConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBusConsumer")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl EventBusConsumer {
    /// Consumes `topic` in group `group` into `bus`.
    ///
    /// It decodes every event type the bus has handlers for ([`EventBus::event_types`]); add
    /// upcasters or set the unknown-event policy with [`event_types`](Self::event_types). A
    /// record of a type no handler takes follows the
    /// [`UnknownEventPolicy`](crate::UnknownEventPolicy) (by default skipped and acknowledged:
    /// nobody here handles it).
    pub fn new(
        bus: EventBus,
        transport: Arc<dyn EventTransport>,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Self {
        Self {
            name: format!("event-bus:{topic}:{group}"),
            types: Arc::new(bus.event_types()),
            bus,
            transport,
            topic: topic.to_owned(),
            group: group.to_owned(),
            options,
            consume: ConsumeLoop::default(),
            consumer: None,
            failed_handlers: FailedHandlers::new(FAILED_HANDLERS_KEPT),
        }
    }

    /// Decodes with `types` (its upcasters, its unknown-event policy, further types) as well as
    /// the bus's own types, which are added to it: a type the bus handles is never skipped for
    /// want of being listed.
    ///
    /// # Panics
    ///
    /// When `types` registers a wire name for another Rust type than the bus's handlers
    /// take (see [`EventTypes::register`]).
    pub fn event_types(mut self, mut types: EventTypes) -> Self {
        types.merge(&self.bus.event_types());
        self.types = Arc::new(types);
        self
    }

    /// How deliveries are fetched and handled: batch size, concurrency, a handler timeout
    /// and the bound past which a running batch is reported as stalled (see [`ConsumeLoop`]).
    pub fn consume_loop(mut self, consume: ConsumeLoop) -> Self {
        self.consume = consume;
        self
    }
}

#[async_trait]
impl Worker for EventBusConsumer {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        // A gap in the upcasters is this build's bug: say so at start.
        self.types.validate()?;
        let consumer = match &mut self.consumer {
            Some(consumer) => consumer,
            None => {
                let made = self
                    .transport
                    .consumer(&self.topic, &self.group, self.options.clone())
                    .await?;
                self.consumer.insert(made)
            }
        };
        let (bus, types, remaining) = (&self.bus, &self.types, &self.failed_handlers);
        consume_and_close(
            consumer.as_mut(),
            &ctx,
            self.consume,
            &|delivery| async move {
                let handled = match types.decode(&delivery.record) {
                    Ok(Some(envelope)) => {
                        let (event_id, name) = (delivery.record.event_id, envelope.name());
                        let only = remaining.of(event_id, name);
                        match publish_chosen(bus, envelope, only.as_ref()).await {
                            Ok(_) => {
                                remaining.handled(event_id);
                                Handled::Done
                            }
                            Err(e) => {
                                remaining.failed(event_id, name, &e);
                                // Waiting for it is no attempt.
                                if says_not_now(&e) {
                                    Handled::Later(e.to_string())
                                } else if e.refused_for_good() {
                                    Handled::DeadLetter(e.to_string())
                                } else {
                                    Handled::Retry(e.to_string())
                                }
                            }
                        }
                    }
                    Ok(None) => Handled::Done,
                    // Written by a newer build: wait for it. Anything else (a missing
                    // upcaster, a payload that is not the type's) no redelivery mends: to
                    // the dead letters at once, not blocking its key meanwhile.
                    Err(e) if e.waits_for_another_build() => Handled::Later(e.to_string()),
                    Err(e) => Handled::DeadLetter(e.to_string()),
                };
                if let Handled::DeadLetter(_) = handled {
                    metrics::counter!(
                        "cqrs_event_bus_dead_lettered_total",
                        "event_type" => DEAD_LETTER_TYPE_LABELS.label(&delivery.record.event_type)
                    )
                    .increment(1);
                }
                handled
            },
            Some((&self.topic, &self.group)),
        )
        .await?;
        Ok(())
    }
}

/// Whether a transport-fed unit's writes work without its event: a trial unit writes what a
/// real one does (an inbox entry, the checkpoint) and is rolled back. Any error, a passing one
/// too, tells nothing about the event: `false`.
async fn works_without_it<S: ProjectionStore>(store: &S, name: &str) -> bool {
    let trial = async {
        let mut unit = store.begin(name).await?;
        store
            .mark_processed(&mut unit, name, Uuid::now_v7())
            .await?;
        let at = store
            .checkpoint(&mut unit, name)
            .await?
            .unwrap_or(Position::START);
        store.save_checkpoint(&mut unit, name, at).await?;
        drop(unit);
        Ok::<_, StoreError>(())
    };
    trial.await.is_ok()
}

/// Publishes `envelope` to the handlers `only` names, or to all of them. A choice that reaches
/// none (names no handler of this bus: a layer passed on another bus's failure) goes to all:
/// handed to no handler, the event would pass unhandled.
async fn publish_chosen(
    bus: &EventBus,
    envelope: EventEnvelope,
    only: Option<&HandlerNames>,
) -> Result<crate::Published, DispatchError> {
    let Some(only) = only else {
        return bus.publish(envelope).await;
    };
    match bus.publish_to(envelope.clone(), only).await {
        Ok(published) if published.handlers == 0 => bus.publish(envelope).await,
        chosen => chosen,
    }
}

/// How many events an [`EventBusConsumer`] remembers the failed handlers of.
const FAILED_HANDLERS_KEPT: usize = 10_000;

/// The handlers that failed on an event, by event id (and type: a record that reuses another's
/// id for another event is not taken for it), for the events that failed last: the only ones
/// a redelivery is handed to. Sound however stale: a handler left out took the event once
/// already, and at least once asks no more.
struct FailedHandlers {
    kept: usize,
    /// Whether `by_event` holds anything: a first delivery that succeeds takes no lock.
    any: std::sync::atomic::AtomicBool,
    inner: std::sync::Mutex<FailedHandlersInner>,
}

#[derive(Default)]
struct FailedHandlersInner {
    /// The entry's number in `order`, the event's type and its failed handlers.
    by_event: HashMap<Uuid, (u64, &'static str, HandlerNames)>,
    /// Event ids in the order they failed, with their number: the oldest goes first. An id
    /// whose entry was removed or renewed since is skipped (its number differs).
    order: VecDeque<(u64, Uuid)>,
    next: u64,
}

impl FailedHandlers {
    fn new(kept: usize) -> Self {
        Self {
            kept,
            any: std::sync::atomic::AtomicBool::new(false),
            inner: std::sync::Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FailedHandlersInner> {
        // Nothing here panics midway; a poisoned lock holds consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handlers that failed on event `event_id` of type `event_type` here, if it failed
    /// here.
    fn of(&self, event_id: Uuid, event_type: &str) -> Option<HandlerNames> {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        match self.lock().by_event.get(&event_id) {
            Some((_, of_type, names)) if *of_type == event_type => Some(names.clone()),
            _ => None,
        }
    }

    /// Every handler it was handed to took it.
    fn handled(&self, event_id: Uuid) {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut inner = self.lock();
        inner.by_event.remove(&event_id);
        if inner.by_event.is_empty() {
            inner.order.clear();
            self.any.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Remembers the handlers `error` names. A failure that names none (a layer's, a timeout
    /// around the whole publish) leaves what was remembered: the same handlers get it again.
    fn failed(&self, event_id: Uuid, event_type: &'static str, error: &DispatchError) {
        let Some(names) = failed_handlers(error) else {
            return;
        };
        let mut inner = self.lock();
        let number = inner.next;
        inner.next += 1;
        inner.by_event.insert(event_id, (number, event_type, names));
        inner.order.push_back((number, event_id));
        while inner.by_event.len() > self.kept {
            let Some((number, oldest)) = inner.order.pop_front() else {
                break;
            };
            if inner
                .by_event
                .get(&oldest)
                .is_some_and(|(n, ..)| *n == number)
            {
                inner.by_event.remove(&oldest);
            }
        }
        // Ids removed or renewed since they were queued: dropped once they are half the queue.
        if inner.order.len() > 2 * inner.by_event.len() + 64 {
            let FailedHandlersInner {
                by_event, order, ..
            } = &mut *inner;
            order.retain(|(n, id)| by_event.get(id).is_some_and(|(kept, ..)| kept == n));
        }
        self.any.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The handlers a failed publish names: those that failed on the event. `None` for a failure
/// of the whole publish (a layer's), which names none; also for a `PublishError` listing no
/// failure (a layer's own making): handed to no handler, the event would pass unhandled.
fn failed_handlers(error: &DispatchError) -> Option<HandlerNames> {
    match error {
        DispatchError::Publish(failed) if !failed.failures.is_empty() => {
            Some(failed.failures.iter().map(|f| f.handler.clone()).collect())
        }
        _ => None,
    }
}

/// Hands the events a relay ships to an in-process [`EventBus`], one after the other in the
/// order shipped: the feed for a bus whose handlers must see every committed event, in the
/// store's order, on any backend, without a consumer group.
///
/// Give it to a relay of its own (a [`StoreRelay`](crate::relay::StoreRelay), or an adapter's
/// outbox relay, under a name of its own, so with a checkpoint of its own). One relay per
/// transport: its clones (one is the relay's [`HealthCheck`](crate::runtime::HealthCheck))
/// share what it remembers of the failures it retries, kept by position in the one feed it
/// follows, so a second relay given a clone would have each wipe the other's retries; make
/// a second feed with [`new`](Self::new). The relay brings
/// what a consumer group would not: one relay of a name ships at a time, even across
/// instances, in the event store's global order, from a checkpoint kept in the store's
/// database, so the feed is the same with or without a broker and survives adding or removing
/// one. What it gives up against an [`EventBusConsumer`]: events are handled one at a time, by
/// one instance at a time, and there are no dead letters (an event whose handlers keep failing
/// is given up, below).
///
/// * **At least once.** The relay moves its checkpoint after `publish` returned, so an event
///   whose handlers ran just before a crash is handed to them again. Handlers dedupe by the
///   event's id (`ctx.metadata().message_id`) where a repeat matters.
/// * **A failure** of any handler is retried in the same call: the event is handed again, to
///   the handlers that failed on it ([`EventBus::publish_to`]; those that took it are not asked
///   twice), after a pause ([`backoff`](Self::backoff), logged at warn level), for up
///   to [`retry_within`](Self::retry_within), while the relay holds its lease (on several
///   instances the attempts stay with one instance); this transport's
///   [`HealthCheck`](crate::runtime::HealthCheck) is degraded meanwhile, naming the event and
///   the failure. Past that the call fails: the relay
///   retries from that event with its backoff, possibly on another instance, and its health
///   says which handler failed and why. The events before it that this transport handed on
///   are not handed on again by this process's retries (it remembers them, in memory, until
///   a call that holds them succeeds or a later one starts past them), but another instance
///   that takes the relay over hands them on again: with several instances, give the relay
///   batches of one event where that matters. Of the failed event, only the handlers that
///   failed on it get it again from this process, also in the relay's later calls; an
///   instance that takes the relay over hands it to all of them. (A failure of the whole
///   publish, a layer's rather than a handler's, names none: the same handlers get it
///   again.)
/// * **Given up.** A failure that says "not now" (every failed handler `Unavailable` or
///   `RateLimited`: a backend away) is retried for as long as it lasts. Any other failure
///   counts as an attempt, and after [`max_attempts`](Self::max_attempts) of them (10 by
///   default), or at once when every failed handler refused it
///   [permanently](crate::HandlerError::permanent), the event is given up: counted in
///   `cqrs_event_bus_given_up_total` (label `event_type`) and refused with [`TransportError::Refused`], so the relay skips it as it
///   does an event it cannot encode (logged at error level with its position, stream, id and
///   the last error, counted in the relay's skipped events) and the feed goes on. It stays in
///   the event store, and a replay of it (the relay's checkpoint moved back) hands it on
///   again. Attempts are counted in memory, by the process whose relay is active. An attempt
///   the relay cuts short (its publish timeout) is not counted: give the bus a
///   [`handler_timeout`](crate::EventBusBuilder::handler_timeout) well below the relay's
///   publish timeout (and below [`retry_within`](Self::retry_within)), so a handler that
///   hangs every time fails as timed out, an attempt like any other, named, and alone handed
///   the event again (a [`TimeoutLayer`](crate::middleware::TimeoutLayer) around the whole
///   publish names no handler, so all of them would get it again).
/// * **Decoding.** Types no handler takes are passed over without a word, and not counted as
///   unknown (unless [`event_types`](Self::event_types) gives the policy
///   [`UnknownEventPolicy::Fail`](crate::UnknownEventPolicy::Fail): the feed then waits at
///   them; or [`AwaitNewerBuild`](crate::UnknownEventPolicy::AwaitNewerBuild): it waits at
///   those of types no part of this build knows). An event written by a newer build (a schema version above this build's) fails
///   the call as unavailable, so the feed waits for the newer build to take it; one that cannot be decoded at all (a payload that does not
///   match its type, a missing upcaster) fails it with [`TransportError::Codec`], which the
///   relays skip and log.
/// * It only publishes: [`consumer`](EventTransport::consumer) fails with
///   [`TransportError::Invalid`]. Its capabilities say so: not persistent, no consumer groups,
///   ordered.
///
/// ```
/// use cqrs_core::doc::{CountOpened, TicketOpened};
/// use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore};
/// use cqrs_core::ports::EventStore;
/// use cqrs_core::projection::EventBusTransport;
/// use cqrs_core::relay::StoreRelay;
/// use cqrs_core::{EventBus, EventEnvelope, EventRecord, ExpectedVersion, Metadata};
/// use std::sync::Arc;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = Arc::new(InMemoryEventStore::new());
/// let count = CountOpened::default();
/// let bus = EventBus::builder().handler(count.clone()).build()?;
///
/// // A relay of its own: the name `event-bus` keeps its checkpoint. Run it as a worker of a
/// // `Runtime`; here one batch by hand.
/// let relay = StoreRelay::new(
///     "event-bus",
///     store.clone(),
///     Arc::new(InMemoryProjectionStore::new()),
///     Arc::new(EventBusTransport::new(bus)),
///     "event-bus",
/// );
///
/// let opened = EventEnvelope::new(TicketOpened { ticket_id: "t1".into() }, Metadata::new());
/// store.append("ticket-t1", ExpectedVersion::NO_STREAM, vec![EventRecord::from_envelope(&opened)?]).await?;
/// assert_eq!(relay.relay_once().await?, 1);
/// assert_eq!(count.count(), 1);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct EventBusTransport {
    bus: EventBus,
    types: Arc<EventTypes>,
    max_attempts: u32,
    retry_within: Duration,
    backoff: (Duration, Duration),
    retrying: Arc<std::sync::Mutex<Retrying>>,
}

/// What calls that failed leave for their retries, by event id, with each event's position:
/// an entry below the first position of a later call is one the relay has moved past (or is
/// about to: a batch that fails to commit after that hands its events on again, which at
/// least once allows).
#[derive(Default)]
struct Retrying {
    /// The first position of the last call: a call starting below it is a replay (the
    /// checkpoint moved back), which starts afresh.
    first: Option<Position>,
    /// Events whose handlers all succeeded in a call that failed after them: not handed on
    /// again.
    handled: HashMap<Uuid, Option<Position>>,
    /// Failed attempts that count, per event.
    attempts: HashMap<Uuid, (Option<Position>, u32)>,
    /// The handlers that failed on an event, per event: the only ones it is handed to again
    /// (those that took it are not asked twice).
    remaining: HashMap<Uuid, (Option<Position>, HandlerNames)>,
    /// Events given up, with why: refused again when the relay asks for them alone.
    given_up: HashMap<Uuid, (Option<Position>, String)>,
    /// The event being handed on again, since when, and its last failure: what the health
    /// check reports.
    failing: Option<Failing>,
}

/// Names of event handlers ([`EventHandler::name`](crate::EventHandler::name)).
type HandlerNames = Arc<[Arc<str>]>;

/// An event being handed to the handlers again.
struct Failing {
    event_id: Uuid,
    event_type: &'static str,
    /// When it first failed, in the health reason: a time, not a duration, so the reason
    /// stays the same from one readiness check to the next (a server logs each new one).
    since: chrono::DateTime<chrono::Utc>,
    error: String,
}

impl Retrying {
    /// Forgets what lies below `first`, the first position of a call: the relay has moved its
    /// checkpoint past it. All of it, when the call starts below the last one's.
    fn forget_below(&mut self, first: Option<Position>) {
        let Some(first) = first else { return };
        if self.first.replace(first).is_some_and(|last| first < last) {
            *self = Retrying {
                first: Some(first),
                failing: self.failing.take(),
                ..Retrying::default()
            };
            return;
        }
        let kept = |position: &Option<Position>| position.is_none_or(|p| p >= first);
        self.handled.retain(|_, position| kept(position));
        self.attempts.retain(|_, (position, _)| kept(position));
        self.remaining.retain(|_, (position, _)| kept(position));
        self.given_up.retain(|_, (position, _)| kept(position));
    }
}

/// Clears the health check's failure when a call ends, however it ends: a call that fails is
/// the relay's to report (and it may go to another instance, whose check reports its own),
/// and one its publish timeout drops mid-retry would leave the failure reported for good.
struct EndOfCall<'a>(&'a EventBusTransport);

impl Drop for EndOfCall<'_> {
    fn drop(&mut self) {
        self.0.retrying().failing = None;
    }
}

/// Why one event was not handed on.
enum NotHanded {
    /// The call fails with this; the relay retries it, or skips the event on a refusal.
    Fails(TransportError),
    /// Its handlers failed `max_attempts` times: given up, with why.
    GivenUp(String),
}

impl fmt::Debug for EventBusTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBusTransport")
            .field("max_attempts", &self.max_attempts)
            .field("retry_within", &self.retry_within)
            .finish_non_exhaustive()
    }
}

impl EventBusTransport {
    /// Hands what it is given to `bus`, decoding every type the bus has handlers for
    /// ([`EventBus::event_types`]) and passing over the others without a word: a relay ships
    /// every type of the store, most of them handled elsewhere.
    pub fn new(bus: EventBus) -> Self {
        Self {
            types: Arc::new(bus.event_types()),
            bus,
            max_attempts: 10,
            retry_within: Duration::from_secs(15),
            backoff: (Duration::from_millis(100), Duration::from_secs(2)),
            retrying: Arc::default(),
        }
    }

    /// Decodes with `types` (its upcasters, its unknown-event policy) as well as the bus's own
    /// types, which are added to it, as [`EventBusConsumer::event_types`] does. Under
    /// [`UnknownEventPolicy::Fail`](crate::UnknownEventPolicy::Fail), the feed waits at an
    /// event of a type `types` lacks until a build that knows it takes over; under
    /// [`AwaitNewerBuild`](crate::UnknownEventPolicy::AwaitNewerBuild), at one of a type no
    /// part of this build knows.
    ///
    /// # Panics
    ///
    /// When `types` registers a wire name for another Rust type than the bus's handlers
    /// take (see [`EventTypes::register`]).
    pub fn event_types(mut self, mut types: EventTypes) -> Self {
        types.merge(&self.bus.event_types());
        self.types = Arc::new(types);
        self
    }

    /// Failed attempts on one event after which it is given up (default 10, at least 1).
    /// Failures that say "not now" do not count. The relay's backoff paces the attempts.
    /// They are counted in memory: a process that restarts counts afresh.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// How long one call may keep handing a failing event to the handlers again, pausing
    /// between attempts (default 15 s; zero: one attempt per call). Meanwhile the relay holds
    /// its lease, so on several instances the attempts, their pauses and their count stay with
    /// one instance, instead of the next call going to another instance, which would count
    /// afresh and pause on its own. An attempt starts only within it, and may then run as long
    /// as the handlers take: keep it below the relay's publish timeout (30 s by default, which
    /// cuts the call short, uncounted) by more than the handlers' own timeout. Past it the
    /// call fails, and the relay retries after its own backoff. It counts from the start of
    /// the call, and the events before the failing one use it up too: give the relay batches
    /// of one event for each event to have it all.
    pub fn retry_within(mut self, within: Duration) -> Self {
        self.retry_within = within;
        self
    }

    /// The pause between two attempts within one call: from `min` (at least 1 ms), doubling up
    /// to `max` (default 100 ms to 2 s: the default 10 attempts take about 11 s of pauses, within
    /// [`retry_within`](Self::retry_within)'s 15 s when the handlers fail fast).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        self.backoff = (min, max.max(min));
        self
    }

    fn retrying(&self) -> std::sync::MutexGuard<'_, Retrying> {
        self.retrying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands one record to the bus, again after a pause while it fails and `deadline` allows:
    /// `Ok` when it is done with (handled, or passed over).
    async fn deliver(
        &self,
        record: &EventRecord,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), NotHanded> {
        // Most types of a store are handled elsewhere: not worth a warning or the unknown
        // events' metric, which says a newer build wrote one.
        if !self.types.knows(&record.event_type)
            && !self.types.holds_unregistered(&record.event_type)
        {
            return Ok(());
        }
        let envelope = match self.types.decode(record) {
            Ok(Some(envelope)) => envelope,
            Ok(None) => return Ok(()),
            Err(e) if e.waits_for_another_build() => {
                return Err(NotHanded::Fails(TransportError::Unavailable {
                    backend: "event bus",
                    source: Box::new(e),
                }));
            }
            Err(e) => return Err(NotHanded::Fails(TransportError::Codec(Box::new(e)))),
        };
        let name = envelope.name();
        let mut pause = self.backoff.0;
        // The handlers that failed on it in an earlier call, if one did.
        let mut only = self
            .retrying()
            .remaining
            .get(&record.event_id)
            .map(|(_, only)| only.clone());
        loop {
            let published = publish_chosen(&self.bus, envelope.clone(), only.as_ref()).await;
            let error = match published {
                Ok(_) => {
                    let mut retrying = self.retrying();
                    retrying.failing = None;
                    retrying.remaining.remove(&record.event_id);
                    return Ok(());
                }
                Err(error) => error,
            };
            {
                let mut retrying = self.retrying();
                // The others took it: only the failed ones get it again. (A failure of the
                // whole publish, a layer's, names none: the same handlers get it again.)
                if let Some(failed) = failed_handlers(&error) {
                    only = Some(failed.clone());
                    retrying
                        .remaining
                        .insert(record.event_id, (record.position, failed));
                }
                let since = match &retrying.failing {
                    Some(failing) if failing.event_id == record.event_id => failing.since,
                    _ => chrono::Utc::now(),
                };
                retrying.failing = Some(Failing {
                    event_id: record.event_id,
                    event_type: name,
                    since,
                    error: error.to_string(),
                });
            }
            let failure = if says_not_now(&error) {
                TransportError::Unavailable {
                    backend: "event bus",
                    source: Box::new(error),
                }
            } else {
                let attempts = {
                    let mut retrying = self.retrying();
                    let entry = retrying
                        .attempts
                        .entry(record.event_id)
                        .or_insert((record.position, 0));
                    entry.1 += 1;
                    entry.1
                };
                // A permanent refusal gives it up at once: no attempt would mend it.
                let permanent = error.refused_for_good();
                if attempts >= self.max_attempts || permanent {
                    let mut retrying = self.retrying();
                    retrying.failing = None;
                    retrying.remaining.remove(&record.event_id);
                    drop(retrying);
                    metrics::counter!("cqrs_event_bus_given_up_total", "event_type" => name)
                        .increment(1);
                    let why = if permanent {
                        "its handlers refused it for good".to_owned()
                    } else {
                        format!("the event bus's handlers failed on it {attempts} times")
                    };
                    return Err(NotHanded::GivenUp(format!(
                        "{why}, and it is given up (the feed goes on without it): {error}"
                    )));
                }
                TransportError::Backend {
                    backend: "event bus",
                    source: Box::new(error),
                }
            };
            let resumes = tokio::time::Instant::now().checked_add(pause);
            if deadline.is_some_and(|deadline| resumes.is_none_or(|at| at > deadline)) {
                return Err(NotHanded::Fails(failure));
            }
            tracing::warn!(event_id = %record.event_id, event_type = name, error = %failure, ?pause, "the event bus's handlers failed on an event; handing it to them again after a pause");
            tokio::time::sleep(pause).await;
            pause = pause.saturating_mul(2).min(self.backoff.1);
        }
    }
}

#[async_trait]
impl EventTransport for EventBusTransport {
    /// Not persistent, no consumer groups; delivers in the order given.
    fn capabilities(&self) -> crate::ports::TransportCapabilities {
        crate::ports::TransportCapabilities::NONE.ordered_per_key(true)
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        crate::ports::validate_topic(topic)?;
        crate::ports::validate_payloads(events)?;
        let _end = EndOfCall(self);
        // `None`, a span too long for the clock: no limit.
        let deadline = tokio::time::Instant::now().checked_add(self.retry_within);
        self.retrying()
            .forget_below(events.first().and_then(|e| e.position));
        for record in events {
            {
                let mut retrying = self.retrying();
                if let Some((_, why)) = retrying.given_up.get(&record.event_id) {
                    let why = why.clone();
                    // Asked for alone: the relay skips it now, and a replay of it later (the
                    // cause fixed, the checkpoint moved back) hands it on again.
                    if events.len() == 1 {
                        retrying.given_up.remove(&record.event_id);
                    }
                    return Err(TransportError::Refused(why.into()));
                }
                if retrying.handled.contains_key(&record.event_id) {
                    continue;
                }
            }
            match self.deliver(record, deadline).await {
                Ok(()) => {
                    self.retrying()
                        .handled
                        .insert(record.event_id, record.position);
                }
                Err(NotHanded::Fails(error)) => return Err(error),
                Err(NotHanded::GivenUp(why)) => {
                    let mut retrying = self.retrying();
                    retrying.attempts.remove(&record.event_id);
                    // Refused again when the relay asks for it alone, to find it; asked for
                    // alone already, the relay skips it now.
                    if events.len() > 1 {
                        retrying
                            .given_up
                            .insert(record.event_id, (record.position, why.clone()));
                    }
                    return Err(TransportError::Refused(why.into()));
                }
            }
        }
        // All through: the relay moves past them. Only this call's: the relay may be
        // publishing a batch it found too large, or failing, one part at a time.
        let mut retrying = self.retrying();
        for record in events {
            retrying.handled.remove(&record.event_id);
            retrying.attempts.remove(&record.event_id);
        }
        Ok(())
    }

    async fn consumer(
        &self,
        topic: &str,
        _group: &str,
        _options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        crate::ports::validate_topic(topic)?;
        Err(TransportError::Invalid(format!(
            "cannot consume `{topic}`: an event bus transport only publishes (to its bus's \
             handlers); consume the event store or a durable transport instead"
        )))
    }
}

/// Degraded while an event's handlers fail and it is handed to them again (naming the event,
/// since when, and the last failure), healthy otherwise: the relay reports a failure only
/// when its call gives up, [`retry_within`](EventBusTransport::retry_within) later. Register
/// it as a non-critical check of the runtime that runs the relay
/// ([`RuntimeBuilder::check`](crate::runtime::RuntimeBuilder::check)). It tells this
/// process's state: on several instances, the one whose relay is active.
#[async_trait]
impl crate::runtime::HealthCheck for EventBusTransport {
    async fn check(&self) -> Health {
        match &self.retrying().failing {
            None => Health::Healthy,
            Some(Failing {
                event_id,
                event_type,
                since,
                error,
            }) => Health::Degraded(format!(
                "the event handlers have failed on event {event_id} ({event_type}) since {}, \
                 and it is handed to them again: {error}",
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::DeliveryId;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A projection's error tells its class, as the store's and the transport's do: an
    /// event a newer build must read is worth waiting for, a missing upcaster is not.
    #[test]
    fn a_projection_error_tells_whether_a_retry_may_help() {
        let decode = |source| ProjectionError::Decode {
            event_id: Uuid::nil(),
            source,
        };
        let future = decode(DecodeError::FutureVersion {
            event_type: "Opened".into(),
            found: 3,
            current: 2,
        });
        assert_eq!(future.kind(), ErrorKind::Unavailable);
        let gap = decode(DecodeError::MissingUpcaster {
            event_type: "Opened".into(),
            found: 1,
        });
        assert_eq!(gap.kind(), ErrorKind::Internal);
        let refused = ProjectionError::Apply {
            projection: "stats".into(),
            event_id: Uuid::nil(),
            event_type: "Opened".into(),
            source: HandlerError::conflict("version_conflict", "try again"),
        };
        assert_eq!(refused.kind(), ErrorKind::Conflict);
        let timeout = ProjectionError::from(TransportError::Timeout { backend: "redis" });
        assert_eq!(timeout.kind(), ErrorKind::Timeout);
        assert_eq!(
            ProjectionError::NoEventStore("stats".into()).kind(),
            ErrorKind::Invalid
        );
    }

    /// Two copies of one event without an order key (a relay shipped it twice, both in one
    /// batch) used to run at once, each in a chain of its own: both passed a handler's "seen
    /// this id?" check. They now run one after the other.
    #[tokio::test]
    async fn copies_of_one_event_in_a_batch_run_one_after_the_other() {
        let record = crate::testing::event_store::record(1).with_partition_key(None);
        let other = crate::testing::event_store::record(2).with_partition_key(None);
        let deliveries = vec![
            Delivery::new(DeliveryId("1".into()), record.clone(), 1),
            Delivery::new(DeliveryId("2".into()), other, 1),
            Delivery::new(DeliveryId("3".into()), record.clone(), 1),
        ];
        let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let handle = |delivery: Delivery| {
            let copy = delivery.record.event_id == record.event_id;
            let (running, most) = (&running, &most);
            async move {
                if copy {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                }
                // Let the other chains run meanwhile.
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                if copy {
                    running.fetch_sub(1, Ordering::SeqCst);
                }
                Handled::Done
            }
        };
        let outcomes = handle_batch(deliveries, 8, None, &handle).await;
        assert_eq!(outcomes.len(), 3);
        assert_eq!(most.load(Ordering::SeqCst), 1, "two copies ran at once");
    }

    /// A delivery given up for good holds the rest of its chain back, as a failed one does:
    /// nothing after it is acknowledged before its dead letter is written.
    #[tokio::test]
    async fn a_dead_lettered_delivery_hands_the_rest_of_its_chain_back() {
        let record = crate::testing::event_store::record(1).with_partition_key(None);
        let deliveries = vec![
            Delivery::new(DeliveryId("1".into()), record.clone(), 1),
            Delivery::new(DeliveryId("2".into()), record.clone(), 1),
        ];
        let handle = |_: Delivery| async { Handled::DeadLetter("for good".into()) };
        let mut outcomes = handle_batch(deliveries, 8, None, &handle).await;
        outcomes.sort_by_key(|answer| answer.index);
        assert!(matches!(outcomes[0].outcome, Outcome::DeadLetter(_)));
        assert!(matches!(outcomes[1].outcome, Outcome::Skipped(id) if id == record.event_id));
    }

    /// A publish that failed in the handlers named.
    fn failed_in(names: &[&str]) -> DispatchError {
        DispatchError::Publish(crate::PublishError {
            event: "Added",
            handlers: names.len() + 1,
            failures: names
                .iter()
                .map(|name| crate::HandlerFailure {
                    handler: Arc::from(*name),
                    error: DispatchError::Handler(HandlerError::internal("boom")),
                })
                .collect(),
        })
    }

    fn names(of: Option<HandlerNames>) -> Option<Vec<String>> {
        of.map(|names| names.iter().map(|n| n.to_string()).collect())
    }

    /// What failed is remembered until it is handled, the latest failure counts, a failure that
    /// names no handler leaves it, and past the bound the oldest are forgotten: never a renewed
    /// one, and the queue of ids stays bounded too.
    #[test]
    fn failed_handlers_are_remembered_within_a_bound() {
        let kept = FailedHandlers::new(2);
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(names(kept.of(a, "Added")), None);
        kept.failed(a, "Added", &failed_in(&["x", "y"]));
        assert_eq!(
            names(kept.of(a, "Added")),
            Some(vec!["x".into(), "y".into()])
        );
        kept.failed(a, "Added", &failed_in(&["y"]));
        kept.failed(
            a,
            "Added",
            &DispatchError::Timeout {
                kind: crate::MessageKind::Event,
                name: "Added",
                after: Duration::from_secs(1),
            },
        );
        assert_eq!(
            names(kept.of(a, "Added")),
            Some(vec!["y".into()]),
            "the latest, kept"
        );
        kept.failed(a, "Added", &failed_in(&[]));
        assert_eq!(
            names(kept.of(a, "Added")),
            Some(vec!["y".into()]),
            "a failure naming no handler leaves it"
        );
        assert_eq!(
            names(kept.of(a, "Other")),
            None,
            "another event under the same id"
        );
        kept.failed(b, "Added", &failed_in(&["x"]));
        // `a` renewed: `b` is now the oldest.
        kept.failed(a, "Added", &failed_in(&["y"]));
        kept.failed(c, "Added", &failed_in(&["x"]));
        assert_eq!(
            names(kept.of(b, "Added")),
            None,
            "the oldest forgotten past the bound"
        );
        assert!(kept.of(a, "Added").is_some() && kept.of(c, "Added").is_some());
        kept.handled(a);
        assert_eq!(names(kept.of(a, "Added")), None);
        for _ in 0..1_000 {
            let id = Uuid::now_v7();
            kept.failed(id, "Added", &failed_in(&["x"]));
            kept.handled(id);
        }
        let inner = kept.lock();
        assert_eq!(inner.by_event.len(), 1, "c alone");
        // Compacted past twice the entries and 64, and each failure above had two entries.
        assert!(inner.order.len() <= 2 * 2 + 64, "{}", inner.order.len());
        drop(inner);
        kept.handled(c);
        assert!(!kept.any.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(kept.lock().order.len(), 0);
    }
}
