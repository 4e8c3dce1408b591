//! The transaction of one command, as its handler sees it.

use crate::PgDatabase;
use crate::PgTransaction;
use crate::error::{commit_error, commit_store_error, store_error};
use crate::event_store::{Completion, append_on};
use crate::idempotency::{self, Outcome, complete_on};
use cqrs_core::ports::{ExpectedVersion, StoreError, StoredResponse};
use cqrs_core::{
    Aggregate, AggregateError, AggregateRepository, CommandContext, Decided, ErrorKind,
    EventRecord, HandlerError, Metadata, Position,
};
use sqlx::postgres::PgConnection;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// One command's transaction, put in the handler's context by
/// [`PgCommandLayer`](crate::PgCommandLayer).
///
/// Everything the handler writes through [`connection`](Self::connection) commits together
/// with the events it appends ([`append`](Self::append)) or records (`ctx.record(..)`), and
/// with the idempotency record when the command runs through
/// [`PgCommandExecutor::execute_idempotent`](crate::PgCommandExecutor::execute_idempotent).
/// If the handler fails or panics, the transaction rolls back: no rows, no events.
///
/// Events reach the event store at commit: the unit of work keeps them until then and
/// appends them in the last statement before `COMMIT`. That is when they get their positions,
/// under the schema's append lock, so the lock is held for one statement and the commit, not
/// for the whole command, and positions follow commit order (see
/// [`PgEventStore`](crate::PgEventStore)). A version conflict found then fails the command
/// with [`StoreError::Conflict`] and rolls everything back.
///
/// Because events wait for the commit, a read in the same command does not see the ones it
/// appended or recorded: a handler that changes one aggregate twice carries the state it
/// decided on from the first change to the second, instead of loading it again (a second
/// [`append`](Self::append) at the version it loaded again would conflict at commit, every
/// time). At commit, the `append` batches go first, in the order made, then the recorded
/// events, in the order recorded.
///
/// The transaction begins lazily, at the first [`connection`](Self::connection): a handler
/// that only records events costs one round trip in all.
///
/// ```no_run
/// use cqrs_core::{async_trait, CommandContext, CommandHandler, HandlerError};
/// use cqrs_postgres::PgUnitOfWork;
/// # use cqrs_core::doc::{OpenTicket, TicketOpened};
///
/// struct OpenTicketHandler;
///
/// #[async_trait]
/// impl CommandHandler<OpenTicket> for OpenTicketHandler {
///     async fn handle(&self, cmd: OpenTicket, ctx: &mut CommandContext) -> Result<String, HandlerError> {
///         let uow = PgUnitOfWork::from_context(ctx)?;
///         // Named with its schema (here `cqrs`): nothing sets `search_path`.
///         sqlx::query("INSERT INTO cqrs.tickets (id, title) VALUES ($1, $2)")
///             .bind("t1")
///             .bind(&cmd.title)
///             .execute(uow.connection().await?)
///             .await
///             .map_err(|e| HandlerError::from(cqrs_postgres::store_error(e)))?;
///         // Appended to the event store in the same transaction, at commit.
///         ctx.record_keyed("t1", TicketOpened { ticket_id: "t1".into() });
///         Ok("t1".into())
///     }
/// }
/// ```
pub struct PgUnitOfWork {
    db: PgDatabase,
    // A std Mutex only to make the value `Sync` (the context's extensions require it); it is
    // never locked: every access goes through `&mut self` and `Mutex::get_mut`.
    state: Mutex<State>,
    /// Set by the [`PgCommandLayer`](crate::PgCommandLayer) that will commit it (or hand it
    /// back to its executor). A unit of work a caller put in a dispatch that no layer runs
    /// would never commit, so a handler must not find it.
    layered: bool,
}

#[derive(Default)]
struct State {
    tx: Option<PgTransaction>,
    /// Ids of the events in `pending`: an event appended and also recorded is stored once.
    staged: HashSet<Uuid>,
    claim: Option<ClaimedKey>,
    response: Option<StoredResponse>,
    /// Appends to run at commit, in order.
    pending: Vec<Pending>,
}

struct Pending {
    stream: String,
    expected: ExpectedVersion,
    events: Vec<EventRecord>,
}

struct ClaimedKey {
    scope: String,
    key: String,
    ttl: Duration,
}

impl std::fmt::Debug for PgUnitOfWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgUnitOfWork")
            .field("schema", &self.db.schema())
            .finish_non_exhaustive()
    }
}

impl PgUnitOfWork {
    /// A unit of work on `db`, for code that runs outside the command bus (the layer makes
    /// one per command). Nothing happens until it is used; [`commit`](Self::commit) it, or
    /// drop it to roll back.
    pub fn new(db: PgDatabase) -> Self {
        Self {
            db,
            state: Mutex::new(State::default()),
            layered: false,
        }
    }

    /// Marks this unit of work as run by a layer, which commits it or hands it back.
    pub(crate) fn layered(mut self) -> Self {
        self.layered = true;
        self
    }

    /// Whether a layer runs this unit of work.
    pub(crate) fn is_layered(&self) -> bool {
        self.layered
    }

    /// The unit of work in a handler's context; an internal error naming the fix when the bus
    /// has no [`PgCommandLayer`](crate::PgCommandLayer).
    pub fn from_context(ctx: &mut CommandContext) -> Result<&mut PgUnitOfWork, HandlerError> {
        ctx.extensions_mut()
            .get_mut::<PgUnitOfWork>()
            .filter(|uow| uow.layered)
            .ok_or_else(|| {
                HandlerError::new(
                    ErrorKind::Internal,
                    "no_unit_of_work",
                    "the command has no Postgres unit of work: build the command bus with \
                 `.layer(db.command_layer())`",
                )
            })
    }

    /// The database this unit of work writes to.
    pub fn database(&self) -> &PgDatabase {
        &self.db
    }

    fn state(&mut self) -> &mut State {
        self.state.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// The transaction's connection, for the handler's own SQL. Begins the transaction on
    /// first use (one round trip).
    ///
    /// Fails once the transaction has ended under the unit of work: a savepoint whose
    /// `begin()` failed or was given up ends it (sqlx 0.9 sends a plain `ROLLBACK`), so
    /// return such a `begin()`'s error rather than go on; the commit fails too.
    pub async fn connection(&mut self) -> Result<&mut PgConnection, StoreError> {
        let db = &self.db;
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if state.tx.is_none() {
            state.tx = Some(crate::sql::begin(db).await.map_err(|e| db.store_error(e))?);
        }
        match state.tx.as_mut() {
            Some(tx) => {
                still_in_transaction(tx, UNIT_OF_WORK_ENDED)?;
                Ok(&mut **tx)
            }
            None => Err(StoreError::Backend {
                backend: crate::error::BACKEND,
                source: "the unit of work lost its transaction".into(),
            }),
        }
    }

    /// Appends `events` to `stream_id` at commit, if the stream is then at `expected`: for
    /// event-sourced handlers. Costs no round trip now. Events appended here and also recorded
    /// on the context are stored once.
    pub fn append(&mut self, stream_id: &str, expected: ExpectedVersion, events: Vec<EventRecord>) {
        let state = self.state();
        state.staged.extend(events.iter().map(|e| e.event_id));
        state.pending.push(Pending {
            stream: stream_id.to_owned(),
            expected,
            events,
        });
    }

    /// [`AggregateRepository::execute`] in this unit of work: loads aggregate `id` in the
    /// command's transaction, lets it decide on `command` (stamped with `repo`'s clock, read
    /// with its event types), and [appends](Self::append) the new events at the version it
    /// loaded, so they commit with the handler's other writes, or not at all. Returns what
    /// was decided: the new state, and the records as they will be appended; its `version` is
    /// the one loaded, [`Decided::version_after`] the one after the new events.
    ///
    /// With `expected_version`, a stream at another version is a conflict before anything is
    /// decided; a writer that appends to the stream after the load makes the commit fail
    /// with a conflict (the command fails, and nothing of it is stored: run it again). A
    /// decision with no events stages nothing, so nothing is checked at commit then: for a
    /// guard, [`append`](Self::append) no events at `ExpectedVersion::Exactly(decided.version)`.
    /// The load reads the database's event store (`repo`'s is not used), replays the whole
    /// stream in the transaction, without the repository's snapshots, and no snapshot is
    /// saved (the events are not stored yet). An aggregate that already has events staged in
    /// this unit of work ([`append`](Self::append) or `execute`) is refused: the load would
    /// not see them (see the type's docs). Events recorded on the context (`ctx.record`) are
    /// staged only after the handler returns: one recorded for the aggregate's stream is
    /// neither seen nor refused here, so record an aggregate's events through `execute` alone.
    ///
    /// ```no_run
    /// # use cqrs_core::doc::{Ticket, TicketCommand};
    /// # async fn run(
    /// #     ctx: &mut cqrs_core::CommandContext,
    /// #     repo: &cqrs_core::AggregateRepository<Ticket>,
    /// # ) -> Result<(), cqrs_core::HandlerError> {
    /// use cqrs_postgres::PgUnitOfWork;
    ///
    /// let metadata = ctx.metadata().clone();
    /// let uow = PgUnitOfWork::from_context(ctx)?;
    /// let decided = uow.execute(repo, "t-1", None, TicketCommand::Open, &metadata).await?;
    /// // Rows of your own, in the same transaction. `store_error` keeps the failure's kind:
    /// // a deadlock or serialization failure stays retryable, not a 500.
    /// sqlx::query("UPDATE counters SET open = open + 1")
    ///     .execute(uow.connection().await?)
    ///     .await
    ///     .map_err(|e| cqrs_core::HandlerError::from(cqrs_postgres::store_error(e)))?;
    /// assert!(decided.state.open);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn execute<A: Aggregate>(
        &mut self,
        repo: &AggregateRepository<A>,
        id: &str,
        expected_version: Option<u64>,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Decided<A>, AggregateError<A::Error>> {
        let stream = AggregateRepository::<A>::stream_id(id);
        // Its events staged here are not stored yet, so a load would not see them: deciding
        // again on the state before them would stage a second batch at the same version,
        // which conflicts at every commit.
        // (An empty batch, a guard, hides nothing.)
        let staged = |p: &Pending| p.stream == stream && !p.events.is_empty();
        if self.state().pending.iter().any(staged) {
            return Err(AggregateError::Store(StoreError::Backend {
                backend: "PgUnitOfWork::execute",
                source: format!(
                    "`{stream}` already has events staged in this unit of work, which a load \
                     does not see: decide the second change with `repo.decide_on` on a \
                     `Loaded` made of the first one's `Decided::state` at \
                     `decided.version_after()`, then `append` its records at \
                     `ExpectedVersion::Exactly` that version"
                )
                .into(),
            }));
        }
        let store = self.db.event_store();
        let records = store.load_in(self.connection().await?, &stream, 0).await?;
        let loaded = repo.rebuild(id, records)?;
        let decided = repo.decide_on(loaded, expected_version, command, metadata)?;
        if !decided.records.is_empty() {
            self.append(
                &decided.stream_id,
                ExpectedVersion::Exactly(decided.version),
                decided.records.clone(),
            );
        }
        Ok(decided)
    }

    /// Claims an idempotency key in this transaction (begins it), waiting at most the
    /// database's claim wait for a duplicate's holder.
    pub(crate) async fn claim(
        &mut self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        ttl: Duration,
    ) -> Result<Outcome, StoreError> {
        // On a task of its own, as `PgIdempotencyStore::claim`'s: the statement may wait on
        // the server for the key's holder, another command's transaction, and given up in
        // the middle it would keep its connection busy until that ended. Not held open: the
        // command runs in this transaction.
        let start = match self.state().tx.take() {
            Some(tx) => Ok(tx),
            None => Err(self
                .db
                .pool
                .acquire()
                .await
                .map_err(|e| self.db.store_error(e))?),
        };
        let (tx, outcome) =
            idempotency::claim_detached(&self.db, start, false, (scope, key, fingerprint), ttl)
                .await
                .inspect_err(|e| self.db.retire_if_refused_as_read_only(e))?;
        self.state().tx = Some(tx);
        if let Outcome::New = outcome {
            self.state().claim = Some(ClaimedKey {
                scope: scope.to_owned(),
                key: key.to_owned(),
                ttl,
            });
        }
        Ok(outcome)
    }

    /// The response to store for the claimed key at commit.
    pub(crate) fn set_response(&mut self, response: StoredResponse) {
        self.state().response = Some(response);
    }

    /// Stages recorded events for commit, at any version, skipping those already staged.
    pub(crate) fn stage_recorded(&mut self, events: Vec<EventRecord>, stream_for: &StreamFor) {
        let state = self.state();
        for event in events {
            if !state.staged.insert(event.event_id) {
                continue;
            }
            let stream = stream_for(&event);
            match state.pending.last_mut() {
                // Versions continue after the previous batch of the stream.
                Some(last) if last.stream == stream => last.events.push(event),
                _ => state.pending.push(Pending {
                    stream,
                    expected: ExpectedVersion::Any,
                    events: vec![event],
                }),
            }
        }
    }

    /// Rolls back now. Dropping the unit of work rolls back too, a moment later.
    pub async fn rollback(mut self) {
        if let Some(tx) = self.state().tx.take() {
            idempotency::end_read_only(tx).await;
        }
    }

    /// Appends the staged events, stores the idempotency response, and commits. Returns the
    /// global position of the last event it stored (`None` when it stored none): what a reader
    /// of a projection waits for to see this write
    /// ([`ProjectionWatch`](cqrs_core::projection::ProjectionWatch)). Events a handler appended
    /// on the unit's connection itself ([`PgEventStore::append_in`](crate::PgEventStore::append_in))
    /// are not counted: their records carry their positions.
    ///
    /// Round trips: none when nothing was written; one when the only writes are events of one
    /// stream (a single statement, its own transaction); otherwise one per stream's batch (the
    /// first also stores the idempotency response), one more per empty batch at a version (a
    /// guard: it takes the append lock, see [`PgEventStore::append_in`](crate::PgEventStore::append_in)),
    /// and `COMMIT`, after a `BEGIN` when the handler opened no transaction (events of two
    /// streams and nothing else: 4). A transaction with the handler's own writes and no events or response
    /// costs one more (`SELECT`), which fails if one of its statements failed.
    ///
    /// Fails, and commits nothing, when a statement in the transaction failed (Postgres then
    /// rolls the whole transaction back), even if the handler went on: a handler must return
    /// such an error, or run the statement in a savepoint of its own.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: dropped before it returns (a `tokio::time::timeout` around it, a
    /// `select!`), the outcome is unknown, since `COMMIT` may have reached the server. Retrying
    /// with new event ids could then apply the change twice. To have the commit finish however
    /// long the caller waits, run it in a task of its own, as the crate's command layer does:
    /// `tokio::spawn(uow.commit()).await`.
    pub async fn commit(mut self) -> Result<Option<Position>, StoreError> {
        let state = std::mem::take(self.state());
        // Refused because the server takes no writes: a failover or cutover may have left the
        // pool on the old primary (see `PgDatabase::store_error`).
        commit_state(&self.db, state)
            .await
            .inspect_err(|e| self.db.retire_if_refused_as_read_only(e))
    }
}

/// [`PgUnitOfWork::commit`]'s work, on the unit's state taken out of it.
///
/// Its statements, once it has a connection, are bounded by `answer_timeout`
/// ([`commit_within`](crate::sql::commit_within)).
async fn commit_state(db: &PgDatabase, state: State) -> Result<Option<Position>, StoreError> {
    let limit = db.answer_timeout;
    let State {
        tx,
        claim,
        response,
        pending,
        ..
    } = state;
    let (sql, clock) = (&db.sql, &db.clock);
    let mut completion = match (&claim, &response) {
        (Some(c), Some(r)) => Some(Completion {
            scope: &c.scope,
            key: &c.key,
            status: i32::from(r.status),
            body: &r.body,
            expires_at: idempotency::expiry(clock.now(), c.ttl),
        }),
        // Committing a claim without its response would commit an "in progress" row
        // (status NULL), which nothing ever completes: roll back instead (`tx` drops).
        (Some(c), None) => {
            return Err(StoreError::Backend {
                backend: crate::error::BACKEND,
                source: format!(
                    "refusing to commit idempotency key {}/{} without its response",
                    c.scope, c.key
                )
                .into(),
            });
        }
        (None, _) => None,
    };
    let mut tx = match tx {
        // Before any append: on a connection out of its transaction, each would commit
        // on its own.
        Some(tx) => {
            still_in_transaction(&tx, UNIT_OF_WORK_ENDED)?;
            tx
        }
        None if pending.is_empty() => return Ok(None),
        None if pending.len() == 1 && completion.is_none() => {
            // One statement is its own transaction: no BEGIN, no COMMIT. So it is the
            // commit, and a lost answer is an unknown outcome, as for a `COMMIT`.
            let mut conn = db.acquire_for_store().await?;
            let append = async {
                let mut last = None;
                for p in pending {
                    let stored =
                        append_on(&mut conn, db, sql, &p.stream, p.expected, p.events, None)
                            .await
                            .map_err(commit_store_error)?;
                    last = last.max(last_position(&stored));
                }
                Ok(last)
            };
            return crate::sql::commit_within(limit, "the commit", append).await;
        }
        None => crate::sql::begin(db).await.map_err(|e| db.store_error(e))?,
    };
    // Whether a statement of ours runs in the transaction before `COMMIT`: it fails if a
    // statement of the handler's failed (SQLSTATE 25P02), where `COMMIT` would not.
    let checked = !pending.is_empty() || completion.is_some();
    let finish = async move {
        let mut last = None;
        for p in pending {
            // A conflict returns early: the transaction is dropped and rolls back.
            let stored = append_on(
                &mut tx,
                db,
                sql,
                &p.stream,
                p.expected,
                p.events,
                completion.take().as_ref(),
            )
            .await?;
            last = last.max(last_position(&stored));
        }
        if let Some(c) = completion {
            let response =
                StoredResponse::new(u16::try_from(c.status).unwrap_or(500), c.body.clone());
            complete_on(&mut tx, sql, c.scope, c.key, &response, c.expires_at).await?;
        }
        if !checked {
            ensure_not_aborted(
                &mut tx,
                "the command's transaction was aborted by a statement that failed earlier, so \
             nothing was committed: a handler must return the error of a failed statement \
             (or run it in a savepoint), not go on",
            )
            .await?;
        }
        tx.commit().await.map_err(commit_error)?;
        Ok(last)
    };
    crate::sql::commit_within(limit, "the commit", finish).await
}

/// The highest position among `stored`.
fn last_position(stored: &[EventRecord]) -> Option<Position> {
    stored.iter().filter_map(|record| record.position).max()
}

/// Fails when a statement in `tx` failed. Postgres answers `COMMIT` in such a transaction
/// with a rollback and no error, and sqlx reports that as a commit: a handler that went on
/// after a failed statement of its own (a unique violation taken as "already there") would
/// see its command succeed with nothing stored. Any statement there fails (SQLSTATE 25P02):
/// then the error says `why`.
pub(crate) async fn ensure_not_aborted(
    tx: &mut PgConnection,
    why: &'static str,
) -> Result<(), StoreError> {
    match sqlx::raw_sql("SELECT").execute(tx).await {
        Ok(_) => Ok(()),
        Err(e) if crate::error::sqlstate(&e).as_deref() == Some("25P02") => {
            Err(StoreError::Backend {
                backend: crate::error::BACKEND,
                source: why.into(),
            })
        }
        Err(e) => Err(store_error(e)),
    }
}

/// Why a unit of work whose transaction ended under it fails.
const UNIT_OF_WORK_ENDED: &str = "the command's transaction was ended under its unit of work: \
     its writes until then were rolled back and its events are not stored, but statements run \
     on the connection since then committed one by one; a savepoint whose `begin()` failed or \
     was given up rolls back the whole transaction (sqlx 0.9), so a handler must return the \
     error of a savepoint's `begin()`, not go on";

/// Fails when `conn`'s transaction has ended, though its owner still holds it: sqlx (0.9)
/// answers a savepoint's `begin()` that failed (in an aborted transaction) or was dropped in
/// flight with a plain `ROLLBACK`, which ends the enclosing transaction too. Statements on
/// the connection then commit one by one, and a `commit()` of the transaction does nothing
/// and succeeds. Costs no round trip: sqlx counts the depth it began.
pub(crate) fn still_in_transaction(
    conn: &PgConnection,
    why: &'static str,
) -> Result<(), StoreError> {
    if sqlx::Connection::is_in_transaction(conn) {
        Ok(())
    } else {
        Err(StoreError::Backend {
            backend: crate::error::BACKEND,
            source: why.into(),
        })
    }
}

/// Names the stream a recorded event is appended to.
pub(crate) type StreamFor = dyn Fn(&EventRecord) -> String + Send + Sync;

/// Put beside a claimed unit of work in a dispatch's extensions by
/// [`PgCommandExecutor`](crate::PgCommandExecutor) (through
/// [`CommandBus::execute_with_extensions`](cqrs_core::CommandBus::execute_with_extensions)):
/// the layer returns the unit of work through it instead of committing, and the executor
/// commits after it has staged the idempotency response.
///
/// The layer takes the unit of work out of the dispatch's extensions to run the handler in
/// it, so it does not ride back in the reply: the shared slot is its way back. Only the
/// outermost [`PgCommandLayer`](crate::PgCommandLayer) of the store takes the unit of work and
/// the slot; inner ones of the same store pass the dispatch through, so none commits the claim
/// early.
#[derive(Clone, Default)]
pub(crate) struct HandBack(Arc<Mutex<Option<PgUnitOfWork>>>);

impl HandBack {
    // A std Mutex: it is locked only to move a value in or out, never across an await.
    pub(crate) fn put(&self, uow: PgUnitOfWork) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(uow);
    }

    pub(crate) fn take(&self) -> Option<PgUnitOfWork> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}
