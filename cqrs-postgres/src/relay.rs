//! The outbox relay: ships committed events to an event transport.

use crate::PgDatabase;
use crate::database::ClosedUnlessReturned;
use crate::error::{commit_error, store_error};
use crate::row::{self, RowError, to_i64, to_u64};
use async_trait::async_trait;
use cqrs_core::ports::{EventTransport, StoreError, TransportError, validate_topic};
use cqrs_core::runtime::{Health, Worker, WorkerContext};
use cqrs_core::{BoxError, ErrorKind, EventRecord, Position};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnection, PgListener, PgRow};
use sqlx::{AssertSqlSafe, Row};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

type TopicFor = dyn Fn(&EventRecord) -> String + Send + Sync;

/// Ships committed events from the event store (the outbox) to an [`EventTransport`], in
/// global order, and keeps its place in the table `relay_checkpoints`.
///
/// Each batch is one transaction: lock this relay's checkpoint row and read up to
/// `batch_size` events after it (one statement), publish them, advance the checkpoint,
/// commit. Hence:
///
/// * **Order.** Events are published in global order, which includes each stream's order;
///   events without a partition key get their stream id as key, so an ordered transport keeps
///   each stream in order.
/// * **Nothing lost.** The checkpoint moves only after the transport took the batch, and the
///   global order never lets an event commit behind a position already read.
/// * **Nothing stuck.** One event that can never be shipped would stop the relay for ever, so
///   it is skipped: a row whose content cannot be decoded (its `metadata` or `payload` JSON
///   not what an event needs: written around the append function, say, without the metadata
///   an event needs), or an event the transport cannot encode or refuses for good (a
///   `TransportError::Codec` or `Refused` error; to find it, the relay publishes the run the transport
///   refused one event at a time, in order), or an event whose topic, chosen from its data
///   by [`topic_for`](Self::topic_for), no transport takes. It is logged at error level (position, stream,
///   id, reason), counted, and the checkpoint moves past it; it stays in the event store, to
///   be replayed once the cause is fixed, and consumers of its stream see a gap. Other errors
///   that are not retryable (`Invalid`, `Backend`: a missing permission, a full server) would
///   refuse every event alike, so they are retried, not skipped. So are columns that cannot be
///   read at all (one missing, or of a type this build does not read: the schema migrated by
///   another version of this crate): every row would fail alike, and skipping would pass the
///   whole outbox.
/// * **Several instances.** The checkpoint row is locked `FOR UPDATE SKIP LOCKED` for the
///   length of a batch, so one relay of a name ships at a time and the others stand by; if
///   the active one dies, its transaction rolls back and another takes over at the next poll.
///   Nothing is shipped twice in the normal case. The lock lasts as long as the batch's
///   session, so `run` refuses a `publish_timeout` that the server's
///   `idle_in_transaction_session_timeout` would cut short
///   ([`check_session_settings`](Self::check_session_settings)), and a batch confirms its
///   session (`SELECT 1`) before each further publish, stopping uncommitted if it is gone:
///   only the publish in flight when a session ended is shipped again by the next holder.
/// * **At least once.** A relay that dies after publishing and before committing leaves the
///   checkpoint where it was: the next relay ships that batch again. Consumers dedupe by event
///   id (the inbox of [`PgProjectionStore`](crate::PgProjectionStore) does).
/// * **Retries.** A batch the transport failed (for any reason but an event it cannot
///   encode or refuses for good), or that ran past the publish timeout, is retried with exponential backoff from `min` to `max`;
///   after `max_attempts` failures in a row, `run` returns the error and the runtime restarts
///   the relay with its own backoff. Health is degraded while retrying. A batch cut short
///   after it published or skipped some events commits the checkpoint past those, then fails
///   like any other (degraded, backoff), but it moved, so it does not count toward
///   `max_attempts`: it starts the count of failures in a row afresh.
/// * **Wake-ups.** Every append notifies the schema's channel at commit; the relay listens on
///   it (one pooled connection) and also polls every `poll_interval`, so a lost notification
///   only delays. A `LISTEN` the server does not answer (a pooled connection whose peer is
///   gone, a frozen server) is left under way, and the relay polls meanwhile.
///
/// Metrics (`metrics` facade, label `relay`): `cqrs_outbox_published_total`,
/// `cqrs_outbox_publish_failures_total` (failed batches, with `cause` = `postgres`,
/// `transport`, or `timeout` for a batch that ran out of its publish timeout, waiting on the
/// broker or on the check of its own session), `cqrs_outbox_skipped_total` (with `reason` =
/// `undecodable`, `refused` or `invalid_topic`), and every `metrics_interval` the gauges
/// `cqrs_outbox_unpublished` and `cqrs_outbox_oldest_unpublished_seconds`
/// (see [`backlog`](Self::backlog); NaN while the backlog cannot be measured).
///
/// ```no_run
/// use cqrs_core::memory::InMemoryTransport;
/// use cqrs_core::runtime::Runtime;
/// use cqrs_postgres::PgOutboxRelay;
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// # async fn run(db: cqrs_postgres::PgDatabase) {
/// let relay = PgOutboxRelay::new(db, Arc::new(InMemoryTransport::new()))
///     .topic("helpdesk.events")
///     .poll_interval(Duration::from_secs(1));
/// let runtime = Runtime::builder().worker(relay).start();
/// # }
/// ```
pub struct PgOutboxRelay {
    db: PgDatabase,
    transport: Arc<dyn EventTransport>,
    relay: String,
    worker_name: String,
    topic_for: Arc<TopicFor>,
    /// The topic of every event, when not chosen per event: checked when `run` starts.
    fixed_topic: Option<String>,
    batch_size: usize,
    poll_interval: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    max_attempts: u32,
    publish_timeout: Duration,
    metrics_interval: Duration,
    backlog_count_limit: u64,
    start_from: Position,
    listen: bool,
    /// The most events published in one call: `batch_size` until a run of one topic that had
    /// the whole `publish_timeout` to itself ran out of it with nothing through; then half
    /// that run, and so on down to one, so a broker too slow for a whole batch still takes
    /// part of each. Doubles again, up to `batch_size`, after a run of that many that took
    /// under a quarter of the timeout.
    run_limit: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for PgOutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOutboxRelay")
            .field("schema", &self.db.schema())
            .field("relay", &self.relay)
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

/// What one batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayBatch {
    /// This relay moved its checkpoint past this many events (0: nothing was waiting): those
    /// it published, and those it skipped because they can never be shipped.
    Shipped(usize),
    /// Another relay of the same name holds the checkpoint: this one stands by.
    Standby,
}

/// How far a relay is behind.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Backlog {
    /// Committed events not shipped yet: counted up to the relay's
    /// [`backlog_count_limit`](PgOutboxRelay::backlog_count_limit), estimated beyond it.
    pub unpublished: u64,
    /// Whether [`unpublished`](Self::unpublished) was counted. A backlog longer than the
    /// count limit is estimated as the span of positions past the checkpoint, an upper bound
    /// (appends that rolled back leave gaps in the positions).
    pub exact: bool,
    /// How long the oldest of them has been stored; `None` when there is none.
    pub oldest_age: Option<Duration>,
}

/// Why a relay batch failed. Nothing was lost: what the batch had not shipped is retried
/// (what it had published or skipped before it failed is committed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Reading events or advancing the checkpoint failed.
    #[error("outbox relay `{relay}` could not read or advance: {source}")]
    Store {
        /// The relay's name.
        relay: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The transport failed with any error but `Codec` or `Refused`: retried, also when not
    /// retryable (it would refuse every event alike); those two skip that event instead.
    #[error("outbox relay `{relay}` could not publish to `{topic}`: {source}")]
    Transport {
        /// The relay's name.
        relay: String,
        /// The topic.
        topic: String,
        /// The transport's error.
        #[source]
        source: TransportError,
    },
    /// The batch ran out of its publish timeout: the transport did not answer within it, or
    /// the check of the batch's session before publishing to `topic` did not. What the batch
    /// shipped before is committed (the commit fails, and nothing moves, if the session is
    /// gone).
    #[error("outbox relay `{relay}`: publishing to `{topic}` took longer than {after:?}")]
    PublishTimeout {
        /// The relay's name.
        relay: String,
        /// The topic.
        topic: String,
        /// The timeout.
        after: Duration,
    },
    /// The batch's hold on the checkpoint could not be confirmed before publishing its next
    /// run: its session ended (the server's `idle_in_transaction_session_timeout`, keepalives
    /// after a network cut, an administrator), so another relay may have taken over. The
    /// batch stopped without committing: what it published goes out again (at least once),
    /// and nothing more was published behind the other relay's back. Retried like any failed
    /// batch. (A session that did not answer before the publish timeout ran out ends the
    /// batch with [`PublishTimeout`](Self::PublishTimeout) instead: what it shipped is
    /// committed, if the session is still there to commit it.)
    #[error(
        "outbox relay `{relay}` lost its hold on the checkpoint mid-batch; it stopped publishing and committed nothing: {source}"
    )]
    LeaseLost {
        /// The relay's name.
        relay: String,
        /// Why the hold could not be confirmed.
        #[source]
        source: StoreError,
    },
    /// A batch got no answer from Postgres for four times the publish timeout, plus the
    /// pool's acquire timeout (a hung server, a network that drops packets silently), and was
    /// given up, its connection closed: what it published goes out again (at least once),
    /// unless it was given up in its `COMMIT` and that went through (the outcome is unknown,
    /// hence the `Timeout` kind). Retried like any failed batch, on another connection.
    #[error(
        "outbox relay `{relay}` gave up on a batch after {after:?} (four times the publish timeout, plus the pool's acquire timeout): Postgres or the network to it is not answering; retrying on another connection"
    )]
    Unresponsive {
        /// The relay's name.
        relay: String,
        /// How long the batch ran.
        after: Duration,
    },
    /// Starting up (the check of the server's session settings, the creation of the
    /// checkpoint row) got no answer from Postgres for four times the publish timeout, plus
    /// the pool's acquire timeout, and was given up, its connection closed. Nothing was
    /// written that a retry would not write again: `run` returns it, and the runtime's
    /// restart starts again on another connection.
    #[error(
        "outbox relay `{relay}` gave up starting after {after:?} (four times the publish timeout, plus the pool's acquire timeout): Postgres or the network to it is not answering"
    )]
    StartUnresponsive {
        /// The relay's name.
        relay: String,
        /// How long starting up ran.
        after: Duration,
    },
    /// The relay's settings do not fit the server's: `publish_timeout` is not below a
    /// timeout that ends the batch's session while it publishes (which would let a second
    /// relay ship the same events at the same time); or its fixed topic is one no transport
    /// takes ([`validate_topic`]). Fix the configuration; `run` returns it at start.
    #[error("outbox relay `{relay}` refuses to start: {problem}")]
    Settings {
        /// The relay's name.
        relay: String,
        /// What to change.
        problem: String,
    },
}

impl RelayError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RelayError::Store { source, .. } => source.kind(),
            RelayError::Transport { source, .. } => source.kind(),
            RelayError::PublishTimeout { .. } => ErrorKind::Timeout,
            RelayError::LeaseLost { source, .. } => source.kind(),
            // The batch may have committed before its answer was lost.
            RelayError::Unresponsive { .. } => ErrorKind::Timeout,
            // Nothing to be unsure of: starting up only reads, or inserts what is not there.
            RelayError::StartUnresponsive { .. } => ErrorKind::Unavailable,
            RelayError::Settings { .. } => ErrorKind::Invalid,
        }
    }

    /// Which side failed, the `cause` label of `cqrs_outbox_publish_failures_total`.
    fn cause(&self) -> &'static str {
        match self {
            RelayError::Store { .. }
            | RelayError::LeaseLost { .. }
            | RelayError::Unresponsive { .. }
            | RelayError::StartUnresponsive { .. } => "postgres",
            RelayError::Transport { .. } => "transport",
            // The broker's answer, or the check of the batch's own session, ran out of time.
            RelayError::PublishTimeout { .. } => "timeout",
            // `run` refuses bad settings before its loop: never counted.
            RelayError::Settings { .. } => "settings",
        }
    }
}

impl PgOutboxRelay {
    /// A relay named `default` that ships every event of `db`'s schema to `transport`, on the
    /// topic `events`.
    pub fn new(db: PgDatabase, transport: Arc<dyn EventTransport>) -> Self {
        Self {
            db,
            transport,
            relay: "default".to_owned(),
            worker_name: "outbox-relay-default".to_owned(),
            topic_for: Arc::new(|_| "events".to_owned()),
            fixed_topic: Some("events".to_owned()),
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_attempts: 10,
            publish_timeout: Duration::from_secs(30),
            metrics_interval: Duration::from_secs(10),
            backlog_count_limit: 100_000,
            start_from: Position::START,
            listen: true,
            run_limit: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }
    }

    /// The relay's name: relays of one name share one checkpoint and one of them is active;
    /// relays of different names (to different transports) are independent. Default
    /// `default`.
    pub fn relay_name(mut self, name: impl Into<String>) -> Self {
        self.relay = name.into();
        self.worker_name = format!("outbox-relay-{}", self.relay);
        self
    }

    /// Publishes every event on this topic. Default `events`. `run` refuses to start with one
    /// that [`validate_topic`] refuses.
    pub fn topic(self, topic: impl Into<String>) -> Self {
        let topic = topic.into();
        let mut relay = self.topic_for({
            let topic = topic.clone();
            move |_| topic.clone()
        });
        relay.fixed_topic = Some(topic);
        relay
    }

    /// Chooses each event's topic (by event type, by stream prefix, ...). Events of one
    /// stream should share a topic, or their order holds only per topic. An event whose topic
    /// [`validate_topic`] refuses (empty, or with a brace: from a stream id a client chose,
    /// say) is skipped like one the transport cannot encode, with the reason `invalid_topic`.
    pub fn topic_for(mut self, f: impl Fn(&EventRecord) -> String + Send + Sync + 'static) -> Self {
        self.topic_for = Arc::new(f);
        self.fixed_topic = None;
        self
    }

    /// The most events per batch (and per transaction). Default 100.
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// How often an idle relay looks for events without a notification, and how often a
    /// standby relay checks whether the active one is gone. Default 1 s; at least 1 ms (zero
    /// would query Postgres in a tight loop).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The backoff between retries of a failed batch: doubles from `min` to `max`, and starts
    /// again from `min` after a batch that shipped some of its events before it failed.
    /// Default 100 ms to 10 s; at least 1 ms.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min.max(Duration::from_millis(1));
        self.max_backoff = max.max(self.min_backoff);
        self
    }

    /// Failures in a row after which `run` returns the error (the runtime restarts the
    /// relay). Default 10. Only batches that moved nothing count: one cut short after it
    /// shipped some events is degraded and backs off, and the count starts again after it.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// How long publishing one batch (all its runs of one topic) may take. Default 30 s. It
    /// must stay below the sessions' `idle_in_transaction_session_timeout` (the pool's
    /// `idle_in_transaction_timeout`, 60 s by default) and `transaction_timeout` (Postgres
    /// 17): the batch's transaction waits idle while it publishes, and its session is what
    /// holds the checkpoint; [`run`](Worker::run) refuses to start otherwise (see
    /// [`check_session_settings`](Self::check_session_settings)). Leave headroom below them
    /// (the default's half): the batch still commits after the deadline. When it runs out, the batch
    /// fails and is retried after the backoff; what the transport took before is shipped
    /// (committed: the checkpoint moves past it), so the retry starts after it. At least 1 ms
    /// (zero would never ship anything).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How often the backlog gauges are refreshed (a `count(*)` over the backlog, up to
    /// [`backlog_count_limit`](Self::backlog_count_limit)). Default 10 s; at least 1 ms.
    pub fn metrics_interval(mut self, interval: Duration) -> Self {
        self.metrics_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How many events [`backlog`](Self::backlog) counts at most; past them it estimates the
    /// backlog from the span of positions. Every relay of a name measures its backlog, the
    /// standbys too, so an uncapped count over a backlog of millions (a long catch-up) would
    /// scan them in every instance every [`metrics_interval`](Self::metrics_interval). Default
    /// 100,000; at least 1.
    pub fn backlog_count_limit(mut self, limit: u64) -> Self {
        self.backlog_count_limit = limit.max(1);
        self
    }

    /// Where a relay name that has no checkpoint yet starts. Default the beginning: every
    /// stored event is shipped.
    pub fn start_from(mut self, position: Position) -> Self {
        self.start_from = position;
        self
    }

    /// Whether to LISTEN for append notifications (else only poll). Default `true`.
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }

    fn lease_lost(&self, source: StoreError) -> RelayError {
        RelayError::LeaseLost {
            relay: self.relay.clone(),
            source,
        }
    }

    fn store_error(&self, source: StoreError) -> RelayError {
        RelayError::Store {
            relay: self.relay.clone(),
            source,
        }
    }

    /// Creates this relay's checkpoint row if it has none. `run` does it; call it before
    /// [`relay_once`](Self::relay_once) when driving the relay yourself. (A row deleted
    /// while relays run is created again by the next batch that finds none.)
    pub async fn ensure_checkpoint(&self) -> Result<(), RelayError> {
        self.create_checkpoint().await.map(drop)
    }

    /// Creates the checkpoint row, at `start_from`, unless it exists; returns whether it did.
    async fn create_checkpoint(&self) -> Result<bool, RelayError> {
        let fail = |e| self.store_error(self.db.store_error(e));
        // Part of a batch, which may be given up mid-statement.
        let mut held = ClosedUnlessReturned::acquire(&self.db)
            .await
            .map_err(fail)?;
        let done = sqlx::query(AssertSqlSafe(self.db.sql.relay_ensure.clone()))
            .bind(&self.relay)
            .bind(to_i64(self.start_from.get()))
            .execute(&mut *held.connection)
            .await;
        held.give_back();
        Ok(done.map_err(fail)?.rows_affected() > 0)
    }

    /// A fixed topic ([`topic`](Self::topic)) that [`validate_topic`] refuses is a
    /// configuration error.
    fn check_fixed_topic(&self) -> Result<(), RelayError> {
        match &self.fixed_topic {
            Some(topic) => validate_topic(topic).map_err(|e| RelayError::Settings {
                relay: self.relay.clone(),
                problem: e.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Checks that [`publish_timeout`](Self::publish_timeout) is below the timeouts after which
    /// the server ends a session in a transaction, `idle_in_transaction_session_timeout` and
    /// (Postgres 17) `transaction_timeout`, as a session of the pool has them. A batch's
    /// transaction sits idle while it publishes, and its session's lock on the checkpoint row
    /// is what keeps the other relays of its name standing by: ended mid-batch, another relay
    /// would ship the same events at the same time. `run` does it at start; call it before
    /// [`relay_once`](Self::relay_once) when driving the relay yourself. Fails with
    /// [`RelayError::Settings`] saying which setting to change.
    pub async fn check_session_settings(&self) -> Result<(), RelayError> {
        let fail = |e| self.store_error(self.db.store_error(e));
        // `run` may give it up mid-statement.
        let mut held = ClosedUnlessReturned::acquire(&self.db)
            .await
            .map_err(fail)?;
        let settings: Result<Vec<(String, i64)>, _> = sqlx::query_as(
            "SELECT name, setting::bigint FROM pg_catalog.pg_settings \
             WHERE name IN ('idle_in_transaction_session_timeout', 'transaction_timeout') \
             ORDER BY name",
        )
        .fetch_all(&mut *held.connection)
        .await;
        held.give_back();
        let settings = settings.map_err(fail)?;
        let problems: Vec<String> = settings
            .into_iter()
            // Both are in milliseconds; zero turns them off.
            .filter_map(|(name, millis)| {
                let limit = Duration::from_millis(u64::try_from(millis).ok().filter(|&m| m > 0)?);
                (self.publish_timeout >= limit).then(|| {
                    let pool_option = if name == "idle_in_transaction_session_timeout" {
                        " (`PgOptions::idle_in_transaction_timeout`)"
                    } else {
                        ""
                    };
                    format!(
                        "its publish_timeout ({:?}) is not below the sessions' {name} ({limit:?}), \
                         which would end a batch's session, and its hold on the checkpoint, \
                         while it publishes: lower `PgOutboxRelay::publish_timeout` below it, or \
                         raise {name}{pool_option} above it",
                        self.publish_timeout
                    )
                })
            })
            .collect();
        if problems.is_empty() {
            return Ok(());
        }
        Err(RelayError::Settings {
            relay: self.relay.clone(),
            problem: problems.join("; "),
        })
    }

    /// The position up to which this relay has shipped (the start of the store when it has
    /// no checkpoint row yet). Dropped before it returns (under a timeout of the caller's),
    /// it closes its connection rather than hand it back to a pool that would first ping it
    /// with no deadline.
    pub async fn checkpoint(&self) -> Result<Position, StoreError> {
        Ok(self.stored_checkpoint().await?.unwrap_or(Position::START))
    }

    /// This relay's checkpoint row, if it has one: `None` for a relay name that never ran (or
    /// whose row was deleted), which [`checkpoint`](Self::checkpoint) reads as the start.
    pub async fn stored_checkpoint(&self) -> Result<Option<Position>, StoreError> {
        let mut held = ClosedUnlessReturned::acquire(&self.db)
            .await
            .map_err(|e| self.db.store_error(e))?;
        let position: Result<Option<i64>, _> =
            sqlx::query_scalar(AssertSqlSafe(self.db.sql.relay_checkpoint.clone()))
                .bind(&self.relay)
                .fetch_optional(&mut *held.connection)
                .await;
        held.give_back();
        let position = position.map_err(|e| self.db.store_error(e))?;
        Ok(position.map(|p| Position::new(to_u64(p))))
    }

    /// How far this relay is behind: one query, a count over the backlog up to
    /// [`backlog_count_limit`](Self::backlog_count_limit) events, an estimate past them.
    pub async fn backlog(&self) -> Result<Backlog, StoreError> {
        // A measurement the relay gives up on (see `run`) leaves its connection closed.
        let mut held = ClosedUnlessReturned::acquire(&self.db)
            .await
            .map_err(|e| self.db.store_error(e))?;
        let row = sqlx::query(AssertSqlSafe(self.db.sql.relay_backlog.clone()))
            .bind(&self.relay)
            .bind(to_i64(self.backlog_count_limit))
            .fetch_one(&mut *held.connection)
            .await;
        held.give_back();
        let row = row.map_err(|e| self.db.store_error(e))?;
        let count: i64 = row.try_get(0).map_err(store_error)?;
        let age: Option<f64> = row.try_get(1).map_err(store_error)?;
        let span: Option<i64> = row.try_get(2).map_err(store_error)?;
        let exact = to_u64(count) < self.backlog_count_limit;
        let unpublished = if exact {
            to_u64(count)
        } else {
            to_u64(count).max(span.map_or(0, to_u64))
        };
        Ok(Backlog {
            unpublished,
            exact,
            // An infinite or absurd age (a row written around the functions with
            // `recorded_at = '-infinity'`) is no panic: it reads as the longest age there is.
            oldest_age: age
                .map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)),
        })
    }

    async fn report_backlog(&self) {
        match self.backlog().await {
            Ok(backlog) => {
                metrics::gauge!("cqrs_outbox_unpublished", "relay" => self.relay.clone())
                    .set(backlog.unpublished as f64);
                metrics::gauge!("cqrs_outbox_oldest_unpublished_seconds", "relay" => self.relay.clone())
                    .set(backlog.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
            }
            // NaN, not the last values: those may be small while the backlog grows (a
            // `statement_timeout` too short for the count, say), and an alert on the backlog
            // would stay quiet exactly while it cannot be measured. (As cqrs-redis's stream
            // gauges do.)
            Err(e) => {
                for gauge in [
                    "cqrs_outbox_unpublished",
                    "cqrs_outbox_oldest_unpublished_seconds",
                ] {
                    metrics::gauge!(gauge, "relay" => self.relay.clone()).set(f64::NAN);
                }
                tracing::warn!(relay = %self.relay, error = %e, "could not measure the outbox backlog; its gauges are NaN until it can")
            }
        }
    }

    /// Ships one batch, if this relay is the active one. The building block of `run`.
    ///
    /// A batch cut short (a publish that fails, or runs past the publish timeout, after the
    /// transport took some of its events; or a failing publish after rows that cannot be
    /// decoded) commits the checkpoint past what it published or skipped, then returns the
    /// failure: an `Err` does not mean nothing moved (see [`checkpoint`](Self::checkpoint)).
    /// The next batch starts after them.
    pub async fn relay_once(&self) -> Result<RelayBatch, RelayError> {
        self.batch().await.result
    }

    /// One batch: `relay_once`'s result and how many events it committed past (also when it
    /// failed).
    ///
    /// A batch that finds no checkpoint row to lock stands by: another relay of the name holds
    /// the row, or no row exists (an operator deleted it to start over). The second would
    /// stand by for ever, every relay of the name reporting itself healthy while nothing
    /// ships, so the row is created (at `start_from`) when it is missing, and the batch runs
    /// again.
    async fn batch(&self) -> BatchOutcome {
        let outcome = self.batch_once().await;
        if !matches!(outcome.result, Ok(RelayBatch::Standby)) {
            return outcome;
        }
        match self.create_checkpoint().await {
            Ok(false) => outcome,
            Ok(true) => {
                tracing::warn!(relay = %self.relay, start_from = self.start_from.get(), "the relay's checkpoint row was missing; created it again, so the relay ships from there");
                self.batch_once().await
            }
            Err(e) => BatchOutcome::failed(e),
        }
    }

    async fn batch_once(&self) -> BatchOutcome {
        // Refused for every event alike: not a reason to skip them all.
        if let Err(e) = self.check_fixed_topic() {
            return BatchOutcome::failed(e);
        }
        let mut held = match ClosedUnlessReturned::acquire(&self.db).await {
            Ok(held) => held,
            Err(e) => return BatchOutcome::failed(self.store_error(self.db.store_error(e))),
        };
        let outcome = self.batch_on(&mut held.connection).await;
        held.give_back();
        outcome
    }

    /// [`batch_once`](Self::batch_once) on `connection`, in a transaction of its own.
    async fn batch_on(&self, connection: &mut PgConnection) -> BatchOutcome {
        // Not `sql::begin_on`, whose transaction owns its connection and gives it back once
        // settled: dropped with a batch given up, this one must be closed (see
        // `ClosedUnlessReturned`).
        let begin = sqlx::Transaction::<'_, sqlx::Postgres>::begin(
            connection,
            Some(sqlx::SqlSafeStr::into_sql_str(
                crate::sql::BEGIN_READ_COMMITTED,
            )),
        );
        let mut tx = match begin.await {
            Ok(tx) => tx,
            Err(e) => return BatchOutcome::failed(self.store_error(self.db.store_error(e))),
        };
        let shipped = match self.ship(&mut tx).await {
            Ok(Some(shipped)) if shipped.passed() > 0 => shipped,
            outcome => {
                // Release the checkpoint row now rather than when the pool gets the
                // connection back, so a retry (or another relay) does not find it locked.
                if let Err(e) = tx.rollback().await {
                    tracing::debug!(relay = %self.relay, error = %e, "rollback failed; the server rolls back");
                }
                return match outcome {
                    Ok(None) => BatchOutcome::done(RelayBatch::Standby),
                    Ok(Some(_)) => BatchOutcome::done(RelayBatch::Shipped(0)),
                    Err(e) => BatchOutcome::failed(e),
                };
            }
        };
        // A commit whose connection failed may have gone through: `Timeout`, not "retry".
        if let Err(e) = tx.commit().await {
            return BatchOutcome::failed(self.store_error(commit_error(e)));
        }
        let passed = shipped.passed();
        metrics::counter!("cqrs_outbox_published_total", "relay" => self.relay.clone())
            .increment(shipped.published as u64);
        // Logged and counted once committed: a batch that rolls back finds them again.
        for skip in &shipped.skipped {
            tracing::error!(
                relay = %self.relay,
                position = skip.position.get(),
                stream = skip.stream_id.as_deref().unwrap_or_default(),
                event_id = ?skip.event_id,
                event_type = skip.event_type.as_deref().unwrap_or_default(),
                reason = skip.reason,
                error = %skip.error,
                "skipped an event the relay cannot ship; it stays in the event store"
            );
            metrics::counter!("cqrs_outbox_skipped_total", "relay" => self.relay.clone(), "reason" => skip.reason)
                .increment(1);
        }
        let result = match shipped.failure {
            None => Ok(RelayBatch::Shipped(passed)),
            Some(failure) => {
                // The run loop warns of the failure, with what shipped: once, not twice.
                tracing::debug!(relay = %self.relay, shipped = passed, error = %failure, "shipped part of a batch, then it failed; the rest is retried");
                Err(failure)
            }
        };
        BatchOutcome { result, passed }
    }

    /// Reads and publishes one batch in `tx` and moves the checkpoint (uncommitted). `None`:
    /// another relay holds the checkpoint. `Some` of nothing passed: nothing to ship (nothing
    /// to commit). `Some` with a failure: cut short after passing some (to commit, then
    /// report); `Err`: failed before passing any.
    async fn ship(&self, tx: &mut PgConnection) -> Result<Option<Shipped>, RelayError> {
        let rows = sqlx::query(AssertSqlSafe(self.db.sql.relay_lock_and_read.clone()))
            .bind(&self.relay)
            .bind(i64::try_from(self.batch_size).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            // The database's mapping: a server that takes no writes (`FOR UPDATE` refused,
            // 25006) has the pool's connections replaced, as the docs promise.
            .map_err(|e| self.store_error(self.db.store_error(e)))?;
        if rows.is_empty() {
            // Another relay holds the row (or it does not exist yet).
            return Ok(None);
        }
        let mut events = Vec::with_capacity(rows.len());
        // Rows that cannot be decoded, in position order.
        let mut undecodable = Vec::new();
        for r in &rows {
            let position: Option<i64> = r
                .try_get("position")
                .map_err(|e| self.store_error(store_error(e)))?;
            let Some(position) = position else {
                // The checkpoint's row alone: no event after it.
                continue;
            };
            match row::checked_event(r) {
                Ok(mut event) => {
                    if event.partition_key.is_none() {
                        event.partition_key = event.stream_id.clone();
                    }
                    events.push(event);
                }
                // This row's content: skipped, it would stop the relay for ever.
                Err(RowError::Content(error)) => {
                    undecodable.push(Skip::undecodable(r, Position::new(to_u64(position)), error))
                }
                // The columns: every row would fail alike (a schema migrated by another
                // version of this crate), and skipping would pass the whole outbox. Fail the
                // batch: retried, health degraded, until a build that reads them runs.
                Err(RowError::Columns(error)) => return Err(self.store_error(error)),
            }
        }
        // Runs of one topic, in order, all within one deadline: the batch's transaction waits
        // idle meanwhile, and must not outlive the server's idle-in-transaction timeout.
        let deadline = tokio::time::Instant::now().checked_add(self.publish_timeout);
        // The statement that read the batch just proved the hold on the checkpoint row.
        let mut lease = Lease {
            tx: &mut *tx,
            fresh: true,
        };
        // Events handled (published or refused, a prefix of `events`), and the refused ones.
        let mut handled = 0;
        let mut refused = Vec::new();
        let mut failure = None;
        while handled < events.len() {
            let topic = (self.topic_for)(&events[handled]);
            // Chosen per event (`topic_for`), from its data: no transport takes it, so it
            // would stop the relay for ever. (A fixed topic was checked before the batch.)
            if let Err(e) = validate_topic(&topic) {
                refused.push(Skip::invalid_topic(&events[handled], e));
                handled += 1;
                continue;
            }
            let limit = self.run_limit.load(Ordering::Relaxed).min(self.batch_size);
            let mut end = handled + 1;
            while end < events.len()
                && end - handled < limit
                && (self.topic_for)(&events[end]) == topic
            {
                end += 1;
            }
            let started = tokio::time::Instant::now();
            // A lost hold stops the batch uncommitted (`?`): another relay may be shipping.
            let (done, stopped) = self
                .publish_run(
                    &mut lease,
                    &topic,
                    &events[handled..end],
                    deadline,
                    &mut refused,
                )
                .await?;
            self.adapt_run_limit(limit, handled == 0, end - handled, done, &stopped, started);
            handled += done;
            if stopped.is_some() {
                failure = stopped;
                break;
            }
        }
        // What was handled stays handled (committed even when the batch failed): the next batch
        // starts after it, so a broker too slow for a whole batch still makes progress.
        let Some(reach) = reach(&events, handled, &undecodable) else {
            return match failure {
                Some(failure) => Err(failure),
                None => Ok(Some(Shipped::default())),
            };
        };
        // Every refused event is among the handled ones, all within reach.
        let published = handled - refused.len();
        let mut skipped: Vec<Skip> = undecodable
            .into_iter()
            .filter(|s| s.position <= reach)
            .chain(refused)
            .collect();
        skipped.sort_by_key(|s| s.position);
        let shipped = Shipped {
            published,
            skipped,
            failure,
        };
        self.advance(tx, reach).await?;
        Ok(Some(shipped))
    }

    /// Halves the run limit (`limit` when the run started) when a run of `len` events that
    /// had the whole timeout to itself (`first`: the batch's first) got nothing through before
    /// a timeout ran out (the relay's publish timeout, or the transport's own, a command
    /// timeout shorter than it); doubles it, up to the batch size, after a run of the limit's
    /// length that went through in under a quarter of the timeout.
    fn adapt_run_limit(
        &self,
        limit: usize,
        first: bool,
        len: usize,
        done: usize,
        stopped: &Option<RelayError>,
        started: tokio::time::Instant,
    ) {
        match stopped {
            Some(e) if e.kind() == ErrorKind::Timeout && first && done == 0 && len > 1 => {
                let halved = len / 2;
                self.run_limit.store(halved, Ordering::Relaxed);
                tracing::warn!(
                    relay = %self.relay,
                    events = len,
                    error = %e,
                    "a run of events timed out before any of it went out; publishing at most {halved} at a time"
                );
            }
            // A full run: a short one (a trickle) says nothing about a backlog's.
            None if done == len
                && len == limit
                && limit < self.batch_size
                && started.elapsed() < self.publish_timeout / 4 =>
            {
                self.run_limit
                    .store((limit * 2).min(self.batch_size), Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Publishes `events` (one run of `topic`) by `deadline`. When the transport refuses them
    /// (a `Codec` or `Refused` error), publishes them one at a time, in order, to find those it refuses
    /// (added to `refused`). Returns how many were handled (published or refused), and the failure
    /// that stopped it before the end; `Err` when the hold on the checkpoint is lost (the
    /// batch must stop without committing).
    async fn publish_run(
        &self,
        lease: &mut Lease<'_>,
        topic: &str,
        events: &[EventRecord],
        deadline: Option<Instant>,
        refused: &mut Vec<Skip>,
    ) -> Result<(usize, Option<RelayError>), RelayError> {
        let error = match self.publish_by(lease, topic, events, deadline).await {
            Ok(()) => return Ok((events.len(), None)),
            Err(PublishFailure::Retry(e)) => return Ok((0, Some(e))),
            Err(PublishFailure::LeaseLost(e)) => return Err(e),
            Err(PublishFailure::Refused(e)) => e,
        };
        if let [event] = events {
            refused.push(Skip::refused(event, error));
            return Ok((1, None));
        }
        // The run's error does not say which event is at fault (or whether any is: a run too
        // large for the broker): one at a time, in order, finds out.
        tracing::warn!(relay = %self.relay, topic, error = %error, "the transport refused a run as one it cannot encode or refuses for good (or too large for it); publishing its events one at a time to find which");
        for (i, event) in events.iter().enumerate() {
            match self
                .publish_by(lease, topic, std::slice::from_ref(event), deadline)
                .await
            {
                Ok(()) => {}
                Err(PublishFailure::Refused(e)) => refused.push(Skip::refused(event, e)),
                Err(PublishFailure::Retry(e)) => return Ok((i, Some(e))),
                Err(PublishFailure::LeaseLost(e)) => return Err(e),
            }
        }
        Ok((events.len(), None))
    }

    /// Publishes `events` by `deadline`, once the hold on the checkpoint is confirmed.
    async fn publish_by(
        &self,
        lease: &mut Lease<'_>,
        topic: &str,
        events: &[EventRecord],
        deadline: Option<Instant>,
    ) -> Result<(), PublishFailure> {
        let timed_out = || {
            PublishFailure::Retry(RelayError::PublishTimeout {
                relay: self.relay.clone(),
                topic: topic.to_owned(),
                after: self.publish_timeout,
            })
        };
        // Out of time: what was published so far is committed (under a hold confirmed before
        // it), and nothing more goes out. Checked first, so a lease check that could not
        // finish in no time is not mistaken for a lost hold.
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Err(timed_out());
        }
        match lease.confirm(deadline).await {
            Ok(()) => {}
            // Out of time during the check (its answer still on the way): the same as above.
            // Nothing more goes out, and what went out before is committed, so the retry
            // starts after it; rolling it back instead would ship the first run again on
            // every retry behind a transport that takes most of the timeout. Committing needs
            // no proof of the hold beforehand: the commit is the proof, as it fails if the
            // session, and with it the row lock, is gone.
            Err(Unconfirmed::OutOfTime) => return Err(timed_out()),
            Err(Unconfirmed::Lost(source)) => {
                return Err(PublishFailure::LeaseLost(self.lease_lost(source)));
            }
        }
        let publish = self.transport.publish(topic, events);
        let outcome = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, publish).await,
            None => Ok(publish.await),
        };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) if source.is_about_the_events() => Err(PublishFailure::Refused(source)),
            Ok(Err(source)) => Err(PublishFailure::Retry(RelayError::Transport {
                relay: self.relay.clone(),
                topic: topic.to_owned(),
                source,
            })),
            Err(_) => Err(timed_out()),
        }
    }

    /// Moves the checkpoint to `position` in the batch's transaction.
    async fn advance(&self, tx: &mut PgConnection, position: Position) -> Result<(), RelayError> {
        sqlx::query(AssertSqlSafe(self.db.sql.relay_advance.clone()))
            .bind(&self.relay)
            .bind(to_i64(position.get()))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.store_error(self.db.store_error(e)))?;
        Ok(())
    }

    /// Starts connecting a listener, unless the relay does not listen or already listens or
    /// connects one. The attempt owns what it needs, so it lives across the relay's waits and
    /// batches: it is not dropped half-way while the relay runs (a `LISTEN` cut off after it
    /// went out would hand a listening connection back to the pool, see
    /// `read_notifications`), and one the server does not answer holds up only itself. When
    /// `run` returns with one under way, sqlx's `PgListener` sends `UNLISTEN *` on a task of
    /// its own before it gives the connection back: a server that never answers keeps that
    /// connection out of the pool until TCP gives up.
    fn connect_listener(&self, wakeups: &mut Wakeups) {
        if !self.listen || wakeups.listener.is_some() || wakeups.connecting.is_some() {
            return;
        }
        let pool = self.db.pool.clone();
        let channel = self.db.channel().to_owned();
        let attempt = async move {
            let mut listener = PgListener::connect_with(&pool).await?;
            // A lost connection is reported (`try_recv` answers `None`), not replaced inside
            // the call: a reconnection cut off in the middle (the notifications read without
            // waiting before each batch, a poll interval running out) would hand its pooled
            // connection back with its LISTEN sent, and a pooled connection that listens fails
            // the next query it runs once a notification arrives ("unexpected message").
            // The relay connects a new listener itself, in its idle wait, to the end.
            listener.eager_reconnect(false);
            listener.listen(&channel).await?;
            Ok(listener)
        };
        wakeups.connecting = Some(Connecting {
            attempt: Box::pin(attempt),
            started: Instant::now(),
            reported: false,
        });
    }

    /// Takes the finished attempt's listener, or reports why there is none; the next idle
    /// wait tries again.
    fn connected(&self, wakeups: &mut Wakeups, result: Result<PgListener, sqlx::Error>) {
        wakeups.connecting = None;
        match result {
            Ok(listener) => wakeups.listener = Some(listener),
            Err(e) => {
                tracing::warn!(relay = %self.relay, error = %e, "could not LISTEN; polling only");
            }
        }
    }

    /// Warns, once an attempt, of a `LISTEN` still unanswered after a batch would be reported
    /// stalled ([`stalled_after`](Self::stalled_after)). Health is the batches' to say: they
    /// run on other connections, and ship by polling meanwhile.
    fn report_slow_listen(&self, wakeups: &mut Wakeups) {
        let stalled_after = self.stalled_after();
        if let Some(connecting) = &mut wakeups.connecting
            && !connecting.reported
            && connecting.started.elapsed() >= stalled_after
        {
            connecting.reported = true;
            tracing::warn!(
                relay = %self.relay,
                after = ?stalled_after,
                poll_interval = ?self.poll_interval,
                "LISTEN is not answered (Postgres or the network to it is not answering); polling every poll_interval meanwhile"
            );
        }
    }

    /// A batch, reported degraded while it runs past twice the publish timeout, and given up
    /// at four times, plus the pool's acquire timeout. Its statements take milliseconds and
    /// its publishes end by the publish timeout, so a batch still running then waits on a
    /// server that accepted a statement and never answered (a hung server, a network that
    /// drops packets silently): the client has no deadline of its own on a statement's
    /// answer, and without this the relay would look healthy, shipping nothing, until the
    /// connection's TCP gives up, which, with nothing left unacknowledged, it may never do.
    ///
    /// Given up, the batch is dropped and its connection closed (not handed back to the pool:
    /// see [`ClosedUnlessReturned`]): it fails as [`RelayError::Unresponsive`], and the next
    /// batch runs on another connection (after a failover, on the new server). If it was not
    /// committing, it committed nothing, and its transaction holds the checkpoint row until
    /// its server ends the session (`idle_in_transaction_session_timeout`): batches stand by
    /// meanwhile, then ship what it published again (at least once). One given up in its
    /// `COMMIT` may have committed.
    async fn watched_batch(&self, ctx: &WorkerContext) -> BatchOutcome {
        let batch = self.batch();
        tokio::pin!(batch);
        tokio::select! {
            outcome = &mut batch => return outcome,
            () = tokio::time::sleep(self.stalled_after()) => {}
        }
        self.report_stall(ctx, "a batch has run");
        // The wait for a pooled connection is the pool's to bound (its acquire timeout): a
        // busy pool is no silent server, and a batch that got its connection late still has
        // the whole time to ship.
        let acquire = self.db.pool.options().get_acquire_timeout();
        let more = self.stalled_after().saturating_add(acquire);
        match tokio::time::timeout(more, batch).await {
            Ok(outcome) => outcome,
            Err(_) => BatchOutcome::failed(RelayError::Unresponsive {
                relay: self.relay.clone(),
                after: self.stalled_after().saturating_add(more),
            }),
        }
    }

    /// How long a batch or a backlog measurement may take before the relay reports Postgres
    /// as not answering: twice the publish timeout.
    fn stalled_after(&self) -> Duration {
        self.publish_timeout.saturating_mul(2)
    }

    /// Reports the relay degraded: `what` (a batch, a backlog measurement) took longer than
    /// [`stalled_after`](Self::stalled_after).
    fn report_stall(&self, ctx: &WorkerContext, what: &str) {
        let reason = format!(
            "{what} for over {:?} (twice the publish timeout): Postgres or the network to it \
             is not answering",
            self.stalled_after()
        );
        tracing::warn!(relay = %self.relay, "{reason}");
        ctx.health.set(Health::Degraded(reason));
    }

    /// Reads, without waiting, the notifications that arrived while the relay was busy: the
    /// batch about to run ships what they announce. A relay that keeps shipping full batches
    /// (a backlog, failures after partial progress) never idles, and unread notifications would
    /// fill its LISTEN connection's socket; the server backend that cannot send them then holds
    /// up the cleanup of the server's whole notification queue, and once that is full (8 GB by
    /// default) every transaction that notifies, every append of every instance, fails.
    ///
    /// `try_recv`, not `recv`: on a lost connection `recv` reconnects, and a reconnection
    /// polled once and dropped would start again at every batch without ever finishing (and
    /// leave a listening connection in the pool each time). A lost connection drops the
    /// listener instead; the next idle wait connects a new one.
    fn read_notifications(&self, wakeups: &mut Wakeups) {
        // An attempt whose `LISTEN` went through listens from then on: its notifications are
        // read like those of a listener, not left to pile up while the relay is busy.
        if let Some(connecting) = &mut wakeups.connecting
            && let Some(result) = (&mut connecting.attempt).now_or_never()
        {
            self.connected(wakeups, result);
        }
        // Before every batch, whether the relay idled before it or not.
        self.report_slow_listen(wakeups);
        let Some(l) = &mut wakeups.listener else {
            return;
        };
        loop {
            match l.try_recv().now_or_never() {
                Some(Ok(Some(_))) => {}
                Some(lost) => {
                    self.drop_listener(wakeups, lost.err());
                    return;
                }
                None => return,
            }
        }
    }

    /// Drops a listener whose connection was lost (`error`: or failed); the next idle wait
    /// connects a new one, and until then the relay polls.
    fn drop_listener(&self, wakeups: &mut Wakeups, error: Option<sqlx::Error>) {
        match error {
            None => {
                tracing::warn!(relay = %self.relay, "the LISTEN connection was lost; polling until it reconnects")
            }
            Some(e) => {
                tracing::warn!(relay = %self.relay, error = %e, "LISTEN failed; polling until it reconnects")
            }
        }
        wakeups.listener = None;
    }

    /// Waits out the poll interval (or shutdown) while another relay holds the checkpoint:
    /// its appends' notifications say nothing about whether it is gone. Each of them would
    /// otherwise run a batch that finds the row held, on every standby instance. They are
    /// read and dropped meanwhile, so the server's notification queue does not wait on this
    /// listener.
    async fn stand_by(&self, wakeups: &mut Wakeups, ctx: &WorkerContext) {
        let until = self.poll_due();
        loop {
            let Some(l) = &mut wakeups.listener else {
                // A listener that connects meanwhile is read from then on.
                let connected = tokio::select! {
                    () = ctx.shutdown.requested() => return,
                    () = tokio::time::sleep_until(until) => return,
                    connected = Wakeups::attempt_done(&mut wakeups.connecting) => connected,
                };
                self.connected(wakeups, connected);
                continue;
            };
            tokio::select! {
                () = ctx.shutdown.requested() => return,
                () = tokio::time::sleep_until(until) => return,
                received = l.try_recv() => match received {
                    Ok(Some(_)) => {}
                    lost => self.drop_listener(wakeups, lost.err()),
                },
            }
        }
    }

    /// Waits for a notification, the poll interval, or shutdown.
    async fn idle(&self, wakeups: &mut Wakeups, ctx: &WorkerContext) {
        let until = self.poll_due();
        if wakeups.listener.is_none() {
            self.connect_listener(wakeups);
            // Without a listener (the relay polls only) this is the poll interval's wait.
            let connected = tokio::select! {
                () = ctx.shutdown.requested() => return,
                () = tokio::time::sleep_until(until) => return,
                connected = Wakeups::attempt_done(&mut wakeups.connecting) => connected,
            };
            self.connected(wakeups, connected);
            // Appends committed since the last batch and before the LISTEN notified no one:
            // a batch first, then the wait.
            if wakeups.listener.is_some() {
                return;
            }
        }
        match &mut wakeups.listener {
            Some(l) => {
                tokio::select! {
                    _ = ctx.shutdown.requested() => {}
                    received = tokio::time::timeout_at(until, l.try_recv()) => {
                        match received {
                            // One batch serves every notification already here: those
                            // sqlx has buffered and those waiting on the socket (each polled
                            // once, none waited for). Left there, each would start a batch of
                            // its own that finds nothing new: one per append under load.
                            Ok(Ok(Some(_))) => self.read_notifications(wakeups),
                            Ok(lost) => self.drop_listener(wakeups, lost.err()),
                            Err(_) => {}
                        }
                    }
                }
            }
            None => {
                tokio::select! {
                    _ = ctx.shutdown.requested() => {}
                    () = tokio::time::sleep_until(until) => {}
                }
            }
        }
    }

    /// When the next poll is due: a poll interval from now (as long as the clock goes, for
    /// an interval too long for it).
    fn poll_due(&self) -> Instant {
        let now = Instant::now();
        now.checked_add(self.poll_interval)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
    }
}

/// What wakes the relay before its poll interval runs out: its listener, or the attempt under
/// way to connect one.
#[derive(Default)]
struct Wakeups {
    listener: Option<PgListener>,
    connecting: Option<Connecting>,
}

/// A connection being taken and its `LISTEN` sent (see `PgOutboxRelay::connect_listener`).
struct Connecting {
    attempt: BoxFuture<'static, Result<PgListener, sqlx::Error>>,
    started: Instant,
    /// Whether `report_slow_listen` warned of this attempt.
    reported: bool,
}

impl Wakeups {
    /// The attempt's outcome once it has one; pending for ever without an attempt.
    async fn attempt_done(connecting: &mut Option<Connecting>) -> Result<PgListener, sqlx::Error> {
        match connecting {
            Some(connecting) => (&mut connecting.attempt).await,
            None => std::future::pending().await,
        }
    }
}

/// Why one publish did not go through.
enum PublishFailure {
    /// Worth retrying: the event is not passed.
    Retry(RelayError),
    /// The transport will never take it.
    Refused(TransportError),
    /// Not published: the batch no longer holds the checkpoint for certain.
    LeaseLost(RelayError),
}

/// A batch's hold on its relay's checkpoint: the row lock of its transaction, which lasts as
/// long as the transaction's session. The server may end the session while the batch
/// publishes (an `idle_in_transaction_session_timeout`, keepalives after a network cut, an
/// administrator); the lock is then gone and a standby relay starts over from the old
/// checkpoint, so a relay that went on publishing would ship events twice and out of order.
struct Lease<'a> {
    tx: &'a mut PgConnection,
    /// Proven by the statement that read the batch, and nothing published since.
    fresh: bool,
}

impl Lease<'_> {
    /// Proves that the session is still there, before a publish: `SELECT 1` in the batch's
    /// transaction (a round trip, which also restarts the server's idle timer), unless
    /// nothing was published since the read. At most one publish can then overlap another
    /// relay's: the one in flight when the session ended.
    async fn confirm(&mut self, deadline: Option<Instant>) -> Result<(), Unconfirmed> {
        if std::mem::take(&mut self.fresh) {
            return Ok(());
        }
        let ping = sqlx::query("SELECT 1").execute(&mut *self.tx);
        let answered = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, ping).await,
            None => Ok(ping.await),
        };
        match answered {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Unconfirmed::Lost(store_error(e))),
            Err(_) => Err(Unconfirmed::OutOfTime),
        }
    }
}

/// Why a lease check did not confirm the hold.
enum Unconfirmed {
    /// The publish deadline passed before the session answered: maybe slow, maybe gone.
    OutOfTime,
    /// The session failed: the hold is gone, or cannot be told.
    Lost(StoreError),
}

/// An event the relay passes without publishing it.
struct Skip {
    position: Position,
    stream_id: Option<String>,
    event_id: Option<Uuid>,
    event_type: Option<String>,
    /// `undecodable`, `refused` or `invalid_topic`: the metric's label.
    reason: &'static str,
    error: BoxError,
}

impl Skip {
    fn undecodable(row: &PgRow, position: Position, error: StoreError) -> Self {
        Self {
            position,
            // Whatever of the row still reads, to find it.
            stream_id: row.try_get("stream_id").ok(),
            event_id: row.try_get("event_id").ok(),
            event_type: row.try_get("event_type").ok(),
            reason: "undecodable",
            error: Box::new(error),
        }
    }

    fn refused(event: &EventRecord, error: TransportError) -> Self {
        Self::passed(event, "refused", error)
    }

    fn invalid_topic(event: &EventRecord, error: TransportError) -> Self {
        Self::passed(event, "invalid_topic", error)
    }

    fn passed(event: &EventRecord, reason: &'static str, error: TransportError) -> Self {
        Self {
            position: event.position.unwrap_or_default(),
            stream_id: event.stream_id.clone(),
            event_id: Some(event.event_id),
            event_type: Some(event.event_type.clone()),
            reason,
            error: Box::new(error),
        }
    }
}

/// What one batch passed, uncommitted.
#[derive(Default)]
struct Shipped {
    published: usize,
    skipped: Vec<Skip>,
    /// What cut the batch short after it passed these: reported once they are committed.
    failure: Option<RelayError>,
}

impl Shipped {
    fn passed(&self) -> usize {
        self.published + self.skipped.len()
    }
}

/// What one batch did: `relay_once`'s result, and how many events it committed past (which a
/// failed batch may have done too).
struct BatchOutcome {
    result: Result<RelayBatch, RelayError>,
    passed: usize,
}

impl BatchOutcome {
    fn done(batch: RelayBatch) -> Self {
        Self {
            result: Ok(batch),
            passed: 0,
        }
    }

    fn failed(error: RelayError) -> Self {
        Self {
            result: Err(error),
            passed: 0,
        }
    }
}

/// How far the checkpoint may move once the first `handled` events are published or
/// refused: past them, and past the undecodable rows before the next event. `None`: nowhere.
fn reach(events: &[EventRecord], handled: usize, undecodable: &[Skip]) -> Option<Position> {
    let next = events.get(handled).and_then(|e| e.position);
    let event = handled
        .checked_sub(1)
        .and_then(|last| events[last].position);
    let row = undecodable
        .iter()
        .map(|s| s.position)
        .filter(|&p| next.is_none_or(|next| p < next))
        .max();
    event.max(row)
}

#[async_trait]
impl Worker for PgOutboxRelay {
    fn name(&self) -> &str {
        &self.worker_name
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        // Both need a connection, which a busy pool or a slow server may not give for a
        // while: shutdown must not wait for it. Bounded like a batch: a server that took the
        // statement and went silent is reported, then given up on, not waited on for ever by
        // a relay still `Starting`.
        self.check_fixed_topic()?;
        let started = async {
            self.check_session_settings().await?;
            self.ensure_checkpoint().await
        };
        tokio::pin!(started);
        let first = tokio::select! {
            () = ctx.shutdown.requested() => return Ok(()),
            started = tokio::time::timeout(self.stalled_after(), &mut started) => started,
        };
        if let Ok(started) = first {
            started?;
        } else {
            self.report_stall(&ctx, "starting up has run");
            let more = self
                .stalled_after()
                .saturating_add(self.db.pool.options().get_acquire_timeout());
            tokio::select! {
                () = ctx.shutdown.requested() => return Ok(()),
                started = tokio::time::timeout(more, &mut started) => {
                    started.map_err(|_| RelayError::StartUnresponsive {
                        relay: self.relay.clone(),
                        after: self.stalled_after().saturating_add(more),
                    })??;
                }
            }
        }
        // Listening before the first batch, so every append from then on wakes the relay; but
        // a `LISTEN` not answered within a poll interval is left under way, and the relay
        // polls.
        let mut wakeups = Wakeups::default();
        self.connect_listener(&mut wakeups);
        if wakeups.connecting.is_some() {
            let connected = tokio::select! {
                () = ctx.shutdown.requested() => return Ok(()),
                connected = tokio::time::timeout_at(
                    self.poll_due(),
                    Wakeups::attempt_done(&mut wakeups.connecting),
                ) => connected,
            };
            if let Ok(connected) = connected {
                self.connected(&mut wakeups, connected);
            }
        }
        let mut failures = 0u32;
        let mut backoff = self.min_backoff;
        // `None` once the interval is too long for the clock (`Duration::MAX`): never again.
        let mut next_metrics = Some(Instant::now());
        while !ctx.shutdown.is_requested() {
            if next_metrics.is_some_and(|at| Instant::now() >= at) {
                // Bounded like a batch: a server that does not answer it is reported, not
                // waited on for ever by a relay that looks healthy.
                if tokio::time::timeout(self.stalled_after(), self.report_backlog())
                    .await
                    .is_err()
                {
                    self.report_stall(&ctx, "measuring the backlog has run");
                }
                next_metrics = Instant::now().checked_add(self.metrics_interval);
            }
            self.read_notifications(&mut wakeups);
            let BatchOutcome { result, passed } = self.watched_batch(&ctx).await;
            match result {
                Ok(batch) => {
                    failures = 0;
                    backoff = self.min_backoff;
                    ctx.health.set(Health::Healthy);
                    if batch == RelayBatch::Shipped(self.batch_size) {
                        // More may be waiting: no pause.
                        continue;
                    }
                    if batch == RelayBatch::Standby {
                        self.stand_by(&mut wakeups, &ctx).await;
                        continue;
                    }
                }
                Err(e) => {
                    metrics::counter!(
                        "cqrs_outbox_publish_failures_total",
                        "relay" => self.relay.clone(),
                        "cause" => e.cause()
                    )
                    .increment(1);
                    if passed > 0 {
                        // Cut short after shipping some (committed): failing, so degraded and
                        // backing off, but moving, so no step toward giving up, and the
                        // shortest backoff: doubling it a relay that ships a little each
                        // batch (a flaky broker) would wait up to `max` between batches.
                        failures = 0;
                        backoff = self.min_backoff;
                    } else {
                        failures += 1;
                        if failures >= self.max_attempts {
                            ctx.health.set(Health::Unhealthy(e.to_string()));
                            return Err(e.into());
                        }
                    }
                    tracing::warn!(relay = %self.relay, error = %e, attempt = failures, shipped = passed, ?backoff, "outbox batch failed; retrying");
                    ctx.health.set(Health::Degraded(e.to_string()));
                    tokio::select! {
                        _ = ctx.shutdown.requested() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = backoff.saturating_mul(2).min(self.max_backoff);
                    continue;
                }
            }
            self.idle(&mut wakeups, &ctx).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::PgOptions;
    use serde_json::Value;
    use sqlx::AssertSqlSafe;
    use std::time::Duration;

    /// Rows a plan node and those under it read from `relation`: what each node returned over
    /// all its loops, and what its own filter threw away.
    fn rows_read(node: &Value, relation: &str) -> f64 {
        let own = if node["Relation Name"] == relation {
            let loops = node["Actual Loops"].as_f64().unwrap_or(1.0);
            node["Actual Rows"].as_f64().unwrap_or(0.0) * loops
                + node["Rows Removed by Filter"].as_f64().unwrap_or(0.0)
        } else {
            0.0
        };
        let below = node["Plans"].as_array().map_or(0.0, |plans| {
            plans.iter().map(|p| rows_read(p, relation)).sum()
        });
        own + below
    }

    /// The backlog's statement, run every few seconds by each relay (and each standby), reads
    /// the events past the checkpoint up to the count limit, not the table: with 20,000 events,
    /// a few rows more than a backlog of 10, or than the limit of 1,000 for a backlog of
    /// 10,000. (Comparing the checkpoint to each event in a join made Postgres walk the whole
    /// table in order, filtering row by row: 20,001 rows read to report a backlog of 10.)
    #[tokio::test]
    async fn the_backlog_reads_only_the_events_past_the_checkpoint() {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = cqrs_core::testing::test_id("backlog_plan");
        let connected = PgOptions::new(url.clone())
            .schema(&schema)
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(3))
            .connect()
            .await;
        let db = match connected {
            Ok(db) => db,
            Err(e) => {
                cqrs_core::testing::require_services("postgres", &url, false);
                eprintln!("skipped: {e}");
                return;
            }
        };
        db.migrate().await.expect("migrate the test schema");
        let s = format!("\"{schema}\"");
        for statement in [
            format!(
                "INSERT INTO {s}.events (stream_id, stream_version, event_id, event_type, \
                 schema_version, payload, metadata) SELECT 'plan', g, gen_random_uuid(), \
                 'Noted', 1, '{{}}', '{{}}' FROM generate_series(1, 20000) g"
            ),
            format!("ANALYZE {s}.events"),
        ] {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&db.pool)
                .await
                .expect("fill the events table");
        }
        let last: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT max(position) FROM {s}.events"
        )))
        .fetch_one(&db.pool)
        .await
        .expect("the last position");
        // Caught up but for 10 events, then 10,000 events behind: either way at most a few
        // rows more than the backlog, or than the count limit of 1,000, are read.
        let mut failures = Vec::new();
        for (checkpoint, most) in [(last - 10, 100.0), (last - 10_000, 1_100.0)] {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {s}.relay_checkpoints (relay, position) VALUES ('plan', $1) \
                 ON CONFLICT (relay) DO UPDATE SET position = excluded.position"
            )))
            .bind(checkpoint)
            .execute(&db.pool)
            .await
            .expect("set the checkpoint");
            let plan: Value = sqlx::query_scalar(AssertSqlSafe(format!(
                "EXPLAIN (ANALYZE, FORMAT JSON) {}",
                db.sql.relay_backlog
            )))
            .bind("plan")
            .bind(1_000_i64)
            .fetch_one(&db.pool)
            .await
            .expect("explain the backlog's statement");
            let read = rows_read(&plan[0]["Plan"], "events");
            if read > most {
                failures.push(format!(
                    "{} events behind, it read {read} rows of events: {plan}",
                    last - checkpoint
                ));
            }
        }
        db.drop_schema().await.expect("drop the test schema");
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
