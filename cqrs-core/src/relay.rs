//! Relaying the event store's global order to a durable transport.

use crate::ports::{EventStore, EventTransport, ProjectionStore, StoreError, TransportError};
use crate::runtime::{Health, Worker, WorkerContext};
use crate::{BoxError, ErrorKind, EventRecord, Position};
use async_trait::async_trait;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Why a relay batch failed. What the batch had not passed yet is retried; what it had (a
/// batch cut short while publishing its events one at a time) is committed first.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Taking the lease, reading events or the checkpoint, or saving it failed.
    #[error("store relay `{relay}` could not read or advance: {source}")]
    Store {
        /// The relay's name.
        relay: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The transport failed with any error but `Codec` or `Refused`: retried, also when not
    /// retryable (it would refuse every event alike); those two skip that event instead.
    #[error("store relay `{relay}` could not publish to `{topic}`: {source}")]
    Transport {
        /// The relay's name.
        relay: String,
        /// The topic.
        topic: String,
        /// The transport's error.
        #[source]
        source: TransportError,
    },
    /// The transport did not answer within the publish timeout.
    #[error("store relay `{relay}`: publishing to `{topic}` took longer than {after:?}")]
    PublishTimeout {
        /// The relay's name.
        relay: String,
        /// The topic.
        topic: String,
        /// The timeout.
        after: Duration,
    },
}

impl RelayError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RelayError::Store { source, .. } => source.kind(),
            RelayError::Transport { source, .. } => source.kind(),
            RelayError::PublishTimeout { .. } => ErrorKind::Timeout,
        }
    }
}

/// How far a publish pass got: the first `handled` events of the batch are published or
/// refused (those in `refused`, by index and error), and `failure` cut it short, if anything
/// did.
struct Pass {
    handled: usize,
    refused: Vec<(usize, TransportError)>,
    failure: Option<RelayError>,
}

impl Pass {
    fn failed(failure: RelayError) -> Self {
        Self {
            handled: 0,
            refused: Vec::new(),
            failure: Some(failure),
        }
    }
}

/// What one batch did: how many events the checkpoint moved past, and the failure that cut it
/// short (what was passed before it is committed).
struct Batch {
    passed: usize,
    /// Whether the read brought as many events as it asked for (more may be waiting).
    full: bool,
    failure: Option<RelayError>,
}

impl Batch {
    /// A batch that moved nothing and found nothing wrong: nothing to ship, or stopped.
    const NOTHING: Batch = Batch {
        passed: 0,
        full: false,
        failure: None,
    };

    fn failed(failure: RelayError) -> Self {
        Self {
            passed: 0,
            full: false,
            failure: Some(failure),
        }
    }
}

/// Why one publish did not go through.
enum PublishFailure {
    /// Worth retrying: this event is not passed, nor any after it.
    Retry(RelayError),
    /// The transport will never take it.
    Refused(TransportError),
}

/// The `event_type` labels of the relays' metrics: 256 distinct names at most, then `other`.
static EVENT_TYPE_LABELS: crate::record::EventTypeLabels<256> =
    crate::record::EventTypeLabels::new();

/// Ships every event of an [`EventStore`], in global order, to a topic of an
/// [`EventTransport`], recording how far it got as a checkpoint in a [`ProjectionStore`].
///
/// Each batch: read the events after the checkpoint as the relay last saw it, take the relay's
/// lease (`ProjectionStore::begin`, so only one relay of a name ships at a time, even across
/// instances sharing the store) and confirm the checkpoint is still there (read again, under
/// the lease, if another instance moved it; the relay's first batch, with no checkpoint seen
/// yet, is read under the lease), publish them in order, then commit the new checkpoint.
/// Hence:
///
/// * **At least once.** A relay that dies after publishing and before committing publishes
///   the batch again; consumers dedupe by event id.
/// * **Order** holds per stream (the global order includes each stream's order); an event
///   without a partition key is published with its stream id as the key, so an ordered
///   transport keeps each aggregate's events in order.
/// * **Retries.** When the transport fails (for any reason but an event it cannot encode or
///   refuses for good) or
///   runs past [`publish_timeout`](Self::publish_timeout), the batch fails and the worker retries with
///   exponential backoff; nothing is lost, since the checkpoint did not move past the event
///   that failed. A batch cut short while publishing one event at a time (below) first commits
///   the checkpoint past the events it already published or skipped, so a transport too slow
///   to take a whole batch one event at a time within the timeout still gets through it, a
///   part per batch (degraded, the worker goes on after its idle interval, without backoff).
///   A batch that runs out of the timeout with nothing through makes the next ones half as
///   large, down to one event, and they grow back, up to the batch size, once a full batch
///   goes through in under a quarter of the timeout: a transport too slow for a whole batch
///   still gets through the backlog, instead of being sent the same batch on every retry.
/// * **An event the transport cannot encode** (a [`TransportError::Codec`] error), or refuses
///   for good ([`TransportError::Refused`]), would stop
///   the relay for ever, so it is skipped: the relay publishes the batch's events one at a
///   time, in order, to find it, logs it at error level (position, stream, id, reason),
///   counts it, and moves the checkpoint past it. It stays in the event store, to be replayed
///   once the cause is fixed; consumers of its stream see a gap. Other errors that are not
///   retryable (`Invalid`, `Backend`: a missing permission, a topic the broker refuses, a
///   full server) would refuse every event alike, so the relay does not skip on them: it
///   retries with backoff and its health reports the error until the cause is fixed.
/// * **The lease is held while publishing.** With a lease store whose unit is a transaction
///   (`PgProjectionStore`), a publish longer than the server's idle-in-transaction timeout
///   would end the session and free the lease for another instance mid-batch; the publish
///   timeout stops that.
/// * **Shutdown** is looked at between batches and once more after a batch is read, before it
///   is published: a relay asked to stop while it reads publishes nothing (its lease is rolled
///   back) and returns, instead of starting a publish that may outlast the runtime's grace and
///   be aborted part-way. A publish already under way runs to its end or its timeout: give
///   the runtime a grace above [`publish_timeout`](Self::publish_timeout) to let it.
///
/// An event the store cannot decode (a row written around its append) fails `read_all` for
/// its whole page: this relay then reads the events before it in pages half as long each time
/// one fails (a few reads, not one per event), ships them, and stops at it, retrying
/// (degraded, then unhealthy after [`unhealthy_after`](Self::unhealthy_after) failed
/// batches); `PgOutboxRelay` reads rows itself and skips it.
///
/// Metrics (`metrics` facade, labels `relay` and `event_type`): `cqrs_events_published_total`,
/// and `cqrs_events_skipped_total` (with `reason` = `refused`). `event_type` is the type's
/// name for the first 256 distinct names the process's relays ship, then `other` (and
/// `invalid` for a name that does not look like a wire name): names come from storage, and
/// ever new ones must not make ever new metric series.
///
/// Servers whose events live in an event store without a separate outbox use this; an adapter
/// may ship its own outbox relay instead.
///
/// A runtime [`Worker`]: run it next to the consumers of its topic, such as an
/// [`EventBusConsumer`](crate::projection::EventBusConsumer) that hands the events to an
/// [`EventBus`](crate::EventBus). Here all in one process, in memory:
///
/// ```
/// use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryTransport};
/// use cqrs_core::ports::{ConsumerOptions, EventStore};
/// use cqrs_core::projection::EventBusConsumer;
/// use cqrs_core::relay::StoreRelay;
/// use cqrs_core::runtime::Runtime;
/// use cqrs_core::{
///     Event, EventBus, EventContext, EventEnvelope, EventHandler, EventRecord, ExpectedVersion,
///     HandlerError, Metadata,
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
///     let store = Arc::new(InMemoryEventStore::new());
///     let transport = Arc::new(InMemoryTransport::new());
///     let notify = NotifyAgents::default();
///     let events = EventBus::builder().handler(notify.clone()).build()?;
///
///     let runtime = Runtime::builder()
///         // The store's events go to topic `tickets`; the relay keeps its checkpoint, under
///         // its name `tickets-relay`, in the projection store.
///         .worker(StoreRelay::new(
///             "tickets-relay",
///             store.clone(),
///             Arc::new(InMemoryProjectionStore::new()),
///             transport.clone(),
///             "tickets",
///         ))
///         // Group `notifications` of that topic feeds the bus's handlers.
///         .worker(EventBusConsumer::new(
///             events,
///             transport.clone(),
///             "tickets",
///             "notifications",
///             ConsumerOptions::default(),
///         ))
///         .start();
///
///     // What a command appends (through an `AggregateRepository`, for instance).
///     let opened = TicketOpened { ticket_id: "t1".into() };
///     let record = EventRecord::from_envelope(&EventEnvelope::new(opened, Metadata::new()))?;
///     store.append("ticket-t1", ExpectedVersion::NO_STREAM, vec![record]).await?;
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
pub struct StoreRelay<S: ProjectionStore> {
    name: String,
    events: Arc<dyn EventStore>,
    checkpoints: Arc<S>,
    transport: Arc<dyn EventTransport>,
    topic: String,
    batch: usize,
    idle: Duration,
    max_backoff: Duration,
    publish_timeout: Duration,
    /// How long one call to the event store or the checkpoint store may take.
    store_timeout: Duration,
    /// Batches in a row that passed nothing, failing, after which the relay reports itself
    /// unhealthy.
    unhealthy_after: u32,
    /// The most events one batch reads and publishes: `batch` until a batch that got nothing
    /// through ran out of the publish timeout; then half that batch, and so on down to one,
    /// so a transport too slow for a whole batch still takes part of each. Doubles again, up
    /// to `batch`, after a full batch that took under a quarter of the timeout.
    limit: std::sync::atomic::AtomicUsize,
    /// The checkpoint as this relay last saw it: where its next batch is read, before it
    /// takes the lease.
    read_from: std::sync::Mutex<Option<Position>>,
}

impl<S: ProjectionStore> fmt::Debug for StoreRelay<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreRelay")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl<S: ProjectionStore> StoreRelay<S> {
    /// A relay named `name` (its checkpoint key) from `events` to `topic`.
    ///
    /// Projection runners keep their checkpoints under their projections' names in the same
    /// kind of store: over one store, give a relay a name no projection has (`relay.tickets`,
    /// say), or the two would move one checkpoint, and each would skip the other's events.
    pub fn new(
        name: &str,
        events: Arc<dyn EventStore>,
        checkpoints: Arc<S>,
        transport: Arc<dyn EventTransport>,
        topic: &str,
    ) -> Self {
        Self {
            name: name.to_owned(),
            events,
            checkpoints,
            transport,
            topic: topic.to_owned(),
            batch: 100,
            idle: Duration::from_millis(50),
            max_backoff: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            // With the publish's 30 s, the lease waits idle at most 40 s: below the 60 s after
            // which `PgProjectionStore`'s server ends an idle transaction.
            store_timeout: Duration::from_secs(10),
            unhealthy_after: 10,
            limit: std::sync::atomic::AtomicUsize::new(usize::MAX),
            read_from: std::sync::Mutex::new(None),
        }
    }

    /// Events per batch (default 100).
    pub fn batch_size(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How long to wait when caught up (default 50 ms), and the longest backoff after
    /// failures (default 10 s). Both at least 1 ms (zero would query the store, or retry a
    /// failing one, in a tight loop), and `max_backoff` at least `idle`.
    pub fn intervals(mut self, idle: Duration, max_backoff: Duration) -> Self {
        self.idle = idle.max(Duration::from_millis(1));
        self.max_backoff = max_backoff.max(self.idle);
        self
    }

    /// How long publishing one batch may take, the relay's lease held meanwhile (default
    /// 30 s). Keep it well below the lease store's idle-in-transaction timeout (60 s for
    /// `PgProjectionStore`'s pool by default): past it the server ends the lease's session, and
    /// another instance's relay would ship the same batch concurrently. The lease also waits
    /// idle while the batch is read from the event store, when the relay could not read it
    /// ahead (its first batch, or after another instance moved the checkpoint), for up to
    /// [`store_timeout`](Self::store_timeout): keep the two together below that timeout.
    /// The one-at-a-time pass that looks for an event the transport refuses shares the
    /// batch's deadline, and reads the checkpoint in the lease's unit before each publish
    /// after its first: a lease found lost (its session ended) stops it.
    /// A publish that runs out fails the batch, which is retried, after committing what that
    /// pass already published or skipped. At least 1 ms (zero would never ship anything).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long one call to the event store or the checkpoint store (a read, the lease, the
    /// checkpoint's save and commit) may take (default 10 s, at least 1 ms). Past it the batch
    /// fails as a `Timeout` and is retried, and the relay's health says so: a store that
    /// stopped answering (a network path that drops packets, with no statement timeout)
    /// would otherwise hold the relay for ever while its health still read healthy.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// After how many failed batches in a row, none of which passed an event, the relay
    /// reports itself [`Unhealthy`](Health::Unhealthy) instead of `Degraded` (default 10; at
    /// least 1). It keeps retrying with its backoff either way: a store or transport that
    /// comes back is caught up with. A batch that passes anything, or one that finds nothing
    /// to ship, ends the streak.
    pub fn unhealthy_after(mut self, failures: u32) -> Self {
        self.unhealthy_after = failures.max(1);
        self
    }

    fn store_error(&self, source: StoreError) -> RelayError {
        RelayError::Store {
            relay: self.name.clone(),
            source,
        }
    }

    /// A store call bounded by the store timeout; `what` names it in the timeout's error.
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, RelayError> {
        match tokio::time::timeout(self.store_timeout, call).await {
            Ok(result) => result.map_err(|e| self.store_error(e)),
            Err(_) => Err(self.store_error(StoreError::Timeout {
                backend: "store",
                source: format!("{what} took longer than {:?}", self.store_timeout).into(),
            })),
        }
    }

    /// Ships one batch. Returns how many events the checkpoint moved past (0 when caught up):
    /// those published, and those the transport could not encode or refused (skipped).
    ///
    /// A batch cut short (a publish that fails retryably or runs past the publish timeout
    /// while the relay publishes a refused batch one event at a time) commits the checkpoint
    /// past the events it already published or skipped, then returns the failure: the next
    /// batch starts after them, so a transport too slow for a whole batch one event at a time
    /// still gets through it.
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        match self.ship(None).await {
            Batch {
                passed,
                failure: None,
                ..
            } => Ok(passed),
            Batch {
                failure: Some(failure),
                ..
            } => Err(failure),
        }
    }

    fn lock_read_from(&self) -> std::sync::MutexGuard<'_, Option<Position>> {
        self.read_from.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One batch. With `shutdown` requested by the time the batch is read, it stops before
    /// publishing: the publish, with its timeout, may outlast the runtime's grace (which would
    /// abort it part-way); the events are shipped by the next relay to run instead.
    async fn ship(&self, shutdown: Option<&crate::runtime::Shutdown>) -> Batch {
        let limit = self
            .limit
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(self.batch);
        // The batch is read before the lease is taken, from where the checkpoint was last
        // seen: read under the lease, it would hold two connections of a pool at once (the
        // lease's and the read's), and the lease would sit idle while the read waited for
        // one. The lease then confirms the checkpoint is still there; if another instance
        // moved it, the batch is read again, under the lease.
        let seen = *self.lock_read_from();
        let ahead = match seen {
            Some(after) => match self
                .bounded(
                    "reading the event store",
                    crate::ports::read_up_to_undecodable(self.events.as_ref(), after, limit),
                )
                .await
            {
                Ok(records) => Some(records),
                Err(e) => return Batch::failed(e),
            },
            None => None,
        };
        let mut unit = match self
            .bounded("taking the lease", self.checkpoints.begin(&self.name))
            .await
        {
            Ok(unit) => unit,
            Err(e) => return Batch::failed(e),
        };
        let after = match self
            .bounded(
                "reading the checkpoint",
                self.checkpoints.checkpoint(&mut unit, &self.name),
            )
            .await
        {
            Ok(after) => after.unwrap_or(Position::START),
            Err(e) => return Batch::failed(e),
        };
        *self.lock_read_from() = Some(after);
        let crate::ports::Page { mut records, cut } = match ahead {
            Some(page) if seen == Some(after) => page,
            _ => match self
                .bounded(
                    "reading the event store",
                    crate::ports::read_up_to_undecodable(self.events.as_ref(), after, limit),
                )
                .await
            {
                Ok(page) => page,
                Err(e) => return Batch::failed(e),
            },
        };
        if records.last().and_then(|r| r.position).is_none() {
            return Batch::NOTHING;
        }
        if shutdown.is_some_and(crate::runtime::Shutdown::is_requested) {
            // Dropping the lease's unit rolls it back: nothing moves.
            return Batch::NOTHING;
        }
        // A page cut before an event the store cannot read is not the end: the next batch
        // comes at once, and fails on it.
        let full = records.len() >= limit || cut;
        for record in &mut records {
            // An aggregate's events keep their order on an ordered transport, and consumers
            // handle them one after another, even when the handler recorded no key.
            if record.partition_key.is_none() {
                record.partition_key.clone_from(&record.stream_id);
            }
        }
        // One deadline for the whole batch, the one-at-a-time pass included: the lease waits
        // idle meanwhile.
        let started = Instant::now();
        let deadline = started.checked_add(self.publish_timeout);
        let pass = self.publish(&records, deadline, &mut unit, after).await;
        self.adapt_limit(limit, records.len(), &pass, started);
        // What was handled stays handled, in order: the checkpoint moves past the last of it.
        let handled = &records[..pass.handled];
        let Some(through) = handled.last().and_then(|r| r.position) else {
            return Batch {
                passed: 0,
                full,
                failure: pass.failure,
            };
        };
        if let Err(e) = self
            .bounded(
                "saving the checkpoint",
                self.checkpoints
                    .save_checkpoint(&mut unit, &self.name, through),
            )
            .await
        {
            return Batch::failed(e);
        }
        if let Err(e) = self
            .bounded("committing the checkpoint", self.checkpoints.commit(unit))
            .await
        {
            return Batch::failed(e);
        }
        *self.lock_read_from() = Some(through);
        // Logged and counted once committed: a batch that fails earlier finds them again.
        let mut refused = pass.refused.into_iter().peekable();
        for (i, record) in handled.iter().enumerate() {
            let event_type = EVENT_TYPE_LABELS.label(&record.event_type);
            if let Some((_, error)) = refused.next_if(|(r, _)| *r == i) {
                tracing::error!(
                    relay = %self.name,
                    topic = %self.topic,
                    position = ?record.position.map(Position::get),
                    stream = %record.stream_id.as_deref().unwrap_or_default().escape_debug(),
                    event_id = %record.event_id,
                    event_type = %record.event_type.escape_debug(),
                    error = %error,
                    "the transport refused an event for good (it cannot encode it, or its consumers gave up on it); skipped it (it stays in the event store)"
                );
                metrics::counter!(
                    "cqrs_events_skipped_total",
                    "relay" => self.name.clone(),
                    "event_type" => event_type,
                    "reason" => "refused"
                )
                .increment(1);
            } else {
                metrics::counter!(
                    "cqrs_events_published_total",
                    "relay" => self.name.clone(),
                    "event_type" => event_type
                )
                .increment(1);
            }
        }
        if let Some(failure) = &pass.failure {
            tracing::warn!(relay = %self.name, topic = %self.topic, passed = handled.len(), error = %failure, "shipped part of a batch; the rest goes with the next");
        }
        Batch {
            passed: handled.len(),
            full,
            failure: pass.failure,
        }
    }

    /// Halves the limit (`limit` when the batch was read, `len` events long) when the batch
    /// got nothing through before a timeout ran out (the relay's publish timeout, or the
    /// transport's own, a command timeout shorter than it); doubles it, up to the batch size,
    /// after a full batch that went through in under a quarter of the timeout.
    fn adapt_limit(&self, limit: usize, len: usize, pass: &Pass, started: Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        match &pass.failure {
            Some(e) if e.kind() == ErrorKind::Timeout && pass.handled == 0 && len > 1 => {
                let halved = len / 2;
                self.limit.store(halved, Relaxed);
                tracing::warn!(
                    relay = %self.name,
                    events = len,
                    error = %e,
                    "a batch timed out before any of it went out; publishing at most {halved} at a time"
                );
            }
            // A full batch: a short one (a trickle) says nothing about a backlog's.
            None if pass.handled == len
                && len == limit
                && limit < self.batch
                && started.elapsed() < self.publish_timeout / 4 =>
            {
                self.limit.store((limit * 2).min(self.batch), Relaxed);
            }
            _ => {}
        }
    }

    /// Publishes `records` in order by `deadline`. When the transport cannot encode them or
    /// refuses them, publishes them one at a time, in order, to find those it refuses, checking
    /// before each that the lease (`unit`, which read the checkpoint at `after`) still holds.
    /// Returns how far it got (see [`Pass`]).
    async fn publish(
        &self,
        records: &[EventRecord],
        deadline: Option<Instant>,
        unit: &mut S::Unit,
        after: Position,
    ) -> Pass {
        let error = match self.publish_by(records, deadline).await {
            Ok(()) => {
                return Pass {
                    handled: records.len(),
                    refused: Vec::new(),
                    failure: None,
                };
            }
            Err(PublishFailure::Retry(e)) => return Pass::failed(e),
            Err(PublishFailure::Refused(e)) => e,
        };
        if records.len() == 1 {
            return Pass {
                handled: 1,
                refused: vec![(0, error)],
                failure: None,
            };
        }
        // The batch error does not say which event is at fault (or whether any is: a batch
        // too large for the broker): one at a time, in order, finds out.
        tracing::warn!(relay = %self.name, topic = %self.topic, error = %error, "the transport refused a batch as one it cannot encode or refuses for good (or too large for it); publishing its events one at a time to find which");
        let mut refused = Vec::new();
        for (i, record) in records.iter().enumerate() {
            // A pass of many publishes may outlast the lease (its session ended by the server,
            // and another instance's relay shipping the same events meanwhile): it stops at the
            // first check that finds it gone, as the outbox relay does, instead of publishing
            // the rest behind that relay's copies.
            if i > 0
                && let Err(e) = self.lease_held(unit, after).await
            {
                return Pass {
                    handled: i,
                    refused,
                    failure: Some(e),
                };
            }
            match self
                .publish_by(std::slice::from_ref(record), deadline)
                .await
            {
                Ok(()) => {}
                Err(PublishFailure::Refused(e)) => refused.push((i, e)),
                Err(PublishFailure::Retry(e)) => {
                    return Pass {
                        handled: i,
                        refused,
                        failure: Some(e),
                    };
                }
            }
        }
        Pass {
            handled: records.len(),
            refused,
            failure: None,
        }
    }

    /// Whether the lease still holds: its unit reads the checkpoint it read at the start of
    /// the batch. An error when the read fails (the lease's session is gone) or finds another
    /// checkpoint (another relay holds the lease and moved it).
    async fn lease_held(&self, unit: &mut S::Unit, after: Position) -> Result<(), RelayError> {
        let now = self
            .bounded(
                "checking the lease",
                self.checkpoints.checkpoint(unit, &self.name),
            )
            .await?
            .unwrap_or(Position::START);
        if now == after {
            return Ok(());
        }
        Err(self.store_error(StoreError::Unavailable {
            backend: "store",
            source: format!(
                "the relay's lease was lost while it published one event at a time: its \
                 checkpoint moved from {after} to {now} (another instance's relay holds it)"
            )
            .into(),
        }))
    }

    async fn publish_by(
        &self,
        records: &[EventRecord],
        deadline: Option<Instant>,
    ) -> Result<(), PublishFailure> {
        let publish = self.transport.publish(&self.topic, records);
        let outcome = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, publish).await,
            // A timeout too long for the clock: no limit.
            None => Ok(publish.await),
        };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) if source.is_about_the_events() => Err(PublishFailure::Refused(source)),
            Ok(Err(source)) => Err(PublishFailure::Retry(RelayError::Transport {
                relay: self.name.clone(),
                topic: self.topic.clone(),
                source,
            })),
            Err(_) => Err(PublishFailure::Retry(RelayError::PublishTimeout {
                relay: self.name.clone(),
                topic: self.topic.clone(),
                after: self.publish_timeout,
            })),
        }
    }

    /// How many events the relay has not shipped yet.
    ///
    /// It reads the checkpoint in a unit of the checkpoint store, which holds the relay's
    /// lease (a lock, on Postgres): while a batch is publishing, this waits for it, up to the
    /// publish timeout. Bound it with a timeout of your own where it feeds a readiness check.
    pub async fn backlog(&self) -> Result<u64, RelayError> {
        let mut unit = self
            .checkpoints
            .begin(&self.name)
            .await
            .map_err(|e| self.store_error(e))?;
        let mut after = self
            .checkpoints
            .checkpoint(&mut unit, &self.name)
            .await
            .map_err(|e| self.store_error(e))?
            .unwrap_or(Position::START);
        drop(unit);
        let mut count = 0;
        loop {
            let page = self
                .events
                .read_all(after, BACKLOG_PAGE)
                .await
                .map_err(|e| self.store_error(e))?;
            let Some(last) = page.last().and_then(|r| r.position) else {
                return Ok(count);
            };
            count += page.len() as u64;
            // A short page is the end: reading until an empty one would count for as long as
            // events keep arriving.
            if page.len() < BACKLOG_PAGE {
                return Ok(count);
            }
            after = last;
        }
    }
}

/// How many events [`StoreRelay::backlog`] reads at a time.
const BACKLOG_PAGE: usize = 1000;

#[async_trait]
impl<S: ProjectionStore> Worker for StoreRelay<S> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        let mut backoff = self.idle;
        let mut failures = 0u32;
        while !ctx.shutdown.is_requested() {
            let batch = self.ship(Some(&ctx.shutdown)).await;
            let wait = match batch.failure {
                None => {
                    ctx.health.set(Health::Healthy);
                    failures = 0;
                    backoff = self.idle;
                    if batch.full {
                        continue;
                    }
                    self.idle
                }
                // Cut short after passing some: degraded, but moving, so no backoff.
                Some(e) if batch.passed > 0 => {
                    ctx.health.set(Health::Degraded(e.to_string()));
                    failures = 0;
                    backoff = self.idle;
                    self.idle
                }
                Some(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(relay = %self.name, error = %e, ?backoff, failures, "relay batch failed; retrying");
                    // A relay stuck for good (a permission gone, a store away) is not merely
                    // degraded: the events it should ship wait until someone acts.
                    ctx.health.set(if failures >= self.unhealthy_after {
                        // No count: the reason stays the same from one readiness check to
                        // the next, as a server logs each new one.
                        Health::Unhealthy(format!(
                            "{} or more batches in a row failed with nothing shipped; the last: \
                             {e}",
                            self.unhealthy_after
                        ))
                    } else {
                        Health::Degraded(e.to_string())
                    });
                    let wait = backoff;
                    // At least 1 ms: a zero start would never slow down.
                    backoff = backoff
                        .saturating_mul(2)
                        .max(Duration::from_millis(1))
                        .min(self.max_backoff);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = ctx.shutdown.requested() => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryTransport};

    /// The lease waits idle while a batch is read (up to `store_timeout`) and published (up
    /// to `publish_timeout`): by default, together, less than the 60 s after which
    /// `PgProjectionStore`'s server ends an idle transaction, as `publish_timeout` tells users
    /// to keep them. At 30 s + 30 s a slow read and a slow publish ended the lease under a
    /// batch still being shipped.
    #[test]
    fn the_default_budgets_keep_the_lease_inside_postgres_idle_timeout() {
        let relay = StoreRelay::new(
            "relay",
            Arc::new(InMemoryEventStore::new()),
            Arc::new(InMemoryProjectionStore::new()),
            Arc::new(InMemoryTransport::new()),
            "events",
        );
        let idle = relay.store_timeout + relay.publish_timeout;
        assert!(idle <= Duration::from_secs(45), "{idle:?}");
    }
}
