//! Inbox and checkpoints: the projection store.

use crate::PgDatabase;
use crate::PgTransaction;
use crate::error::{commit_error, store_error};
use crate::row::{to_i64, to_u64};
use async_trait::async_trait;
use cqrs_core::Position;
use cqrs_core::ports::{ProjectionStore, StoreError};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;
use std::time::Duration;
use uuid::Uuid;

/// Inbox entries and checkpoints in Postgres, in the consumer's own transaction.
///
/// A unit of work ([`PgProjectionUnit`]) is a transaction that holds the consumer's advisory
/// lock (`pg_advisory_xact_lock`) from `begin` until it commits or is dropped: two units of one
/// consumer never overlap, across every instance sharing the schema, so a rebuild pauses the
/// live projection. The projection writes its read model through
/// [`PgProjectionUnit::connection`], in the same transaction as the inbox entries and the
/// checkpoint: a redelivered event takes effect once.
///
/// ```no_run
/// use cqrs_core::ports::ProjectionStore;
///
/// # async fn run(db: cqrs_postgres::PgDatabase, event_id: uuid::Uuid) -> Result<(), cqrs_core::ports::StoreError> {
/// let store = db.projection_store();
/// let mut unit = store.begin("open-tickets").await?;
/// if store.mark_processed(&mut unit, "open-tickets", event_id).await? {
///     // Named with its schema (here `cqrs`): nothing sets `search_path`.
///     sqlx::query("UPDATE cqrs.open_tickets SET count = count + 1")
///         .execute(unit.connection())
///         .await
///         // `store_error` keeps the kind: a lost connection is `Unavailable` (retried, not
///         // counted against the event), not `Internal`.
///         .map_err(cqrs_postgres::store_error)?;
/// }
/// store.commit(unit).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PgProjectionStore {
    db: PgDatabase,
}

impl PgProjectionStore {
    /// The projection store of `db`'s schema.
    pub fn new(db: PgDatabase) -> Self {
        Self { db }
    }
}

/// A unit of work of the [`PgProjectionStore`]: a transaction holding the consumer's lock.
/// Dropping it rolls back and releases the lock.
pub struct PgProjectionUnit {
    tx: PgTransaction,
}

impl std::fmt::Debug for PgProjectionUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgProjectionUnit").finish_non_exhaustive()
    }
}

impl PgProjectionUnit {
    /// The transaction's connection, for the projection's own reads and writes.
    ///
    /// A savepoint whose `begin()` fails or is given up ends the whole transaction (sqlx 0.9
    /// sends a plain `ROLLBACK`): return its error. The store's calls on this unit fail from
    /// then on, and it commits nothing.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// The transaction itself.
    pub fn transaction(&mut self) -> &mut PgTransaction {
        &mut self.tx
    }

    /// Fails once the unit's transaction has ended under it (see
    /// [`still_in_transaction`](crate::unit_of_work::still_in_transaction)): the consumer's
    /// lock went with it, and an inbox entry or checkpoint written now would commit on its
    /// own, beside another instance's unit of the same consumer.
    fn ensure_open(&self) -> Result<(), StoreError> {
        crate::unit_of_work::still_in_transaction(
            &self.tx,
            "the projection's transaction was ended under its unit of work: its writes until \
             then were rolled back and its inbox entries and checkpoint are not stored, but \
             statements run on the connection since then committed one by one; a savepoint \
             whose `begin()` failed or was given up rolls back the whole transaction (sqlx \
             0.9), so a projection must return the error of a savepoint's `begin()`, not go on",
        )
    }
}

/// How long one slice of a wait for a consumer's lock lasts: how long a connection stays
/// blocked on the server after its caller gave up.
const LOCK_WAIT_SLICE_MS: u64 = 1000;

/// Waits for the advisory lock `key` in `tx`, in statements that each wait at most
/// [`LOCK_WAIT_SLICE_MS`] (`lock_timeout`, inside a savepoint that a slice which ran out rolls
/// back to), until one gets it or the caller (`locked`'s receiver) is gone. A single statement
/// waiting for the holder would keep the connection out of the pool until the holder ends,
/// even after its caller gave up; and a statement dropped in flight leaves sqlx a connection
/// it cannot take back while the server still runs it. Between two slices nothing is in
/// flight. A `lock_timeout` of the session's own (not `0`) bounds one plain wait, as it did
/// before; a `statement_timeout` shorter than a slice ends the wait with its error.
///
/// Every statement is bounded by `answer_timeout` beyond the wait it asks for: on a network
/// that has gone silent, the task (which nobody cuts off) gives the transaction up, and its
/// connection is closed, instead of waiting until TCP gives up (about 15 minutes).
async fn wait_for_lock<T>(
    tx: &mut PgTransaction,
    key: i64,
    locked: &tokio::sync::oneshot::Sender<T>,
    answer_timeout: Duration,
) -> Result<(), sqlx::Error> {
    let slice = Duration::from_millis(LOCK_WAIT_SLICE_MS);
    let (own, own_secs): (String, f64) = answered(
        answer_timeout,
        sqlx::query_as(
            "SELECT current_setting('lock_timeout'), \
             extract(epoch FROM current_setting('lock_timeout')::interval)::float8",
        )
        .fetch_one(&mut **tx),
    )
    .await?;
    let lock = format!("SELECT pg_advisory_xact_lock({key})");
    if own != "0" {
        let own = Duration::try_from_secs_f64(own_secs).unwrap_or(slice);
        answered(
            own.saturating_add(answer_timeout),
            sqlx::query(AssertSqlSafe(lock)).execute(&mut **tx),
        )
        .await?;
        return Ok(());
    }
    answered(
        answer_timeout,
        sqlx::query(AssertSqlSafe(format!(
            "SELECT set_config('lock_timeout', '{LOCK_WAIT_SLICE_MS}ms', true)"
        )))
        .execute(&mut **tx),
    )
    .await?;
    // One savepoint for every slice: `ROLLBACK TO` keeps it, and a second `SAVEPOINT` of the
    // name would nest a new one inside it, each slice one level deeper (past 64, every
    // session's snapshots slow down while the unit is open).
    answered(
        answer_timeout,
        sqlx::query("SAVEPOINT cqrs_consumer_lock").execute(&mut **tx),
    )
    .await?;
    loop {
        match answered(
            slice.saturating_add(answer_timeout),
            sqlx::query(AssertSqlSafe(lock.clone())).execute(&mut **tx),
        )
        .await
        {
            Ok(_) => break,
            // `lock_not_available`: the slice ran out; the holder still holds it.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                answered(
                    answer_timeout,
                    sqlx::query("ROLLBACK TO SAVEPOINT cqrs_consumer_lock").execute(&mut **tx),
                )
                .await?;
                if locked.is_closed() {
                    return Err(sqlx::Error::Protocol(
                        "the caller stopped waiting for the consumer's lock".into(),
                    ));
                }
            }
            Err(e) => return Err(e),
        }
    }
    // The lock taken in the savepoint stays with the transaction once the savepoint is
    // released; the projection's own statements get the session's `lock_timeout` back.
    answered(
        answer_timeout,
        sqlx::raw_sql(
            "RELEASE SAVEPOINT cqrs_consumer_lock; SELECT set_config('lock_timeout', '0', true)",
        )
        .execute(&mut **tx),
    )
    .await?;
    Ok(())
}

/// `statement`'s outcome, or past `limit` the timed-out I/O error of a server that did not
/// answer the consumer lock's wait.
async fn answered<T>(
    limit: Duration,
    statement: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    let what = "the wait for a consumer's lock";
    crate::sql::answered_within(limit, what, crate::sql::CLOSED_ON_RELEASE, statement).await
}

#[async_trait]
impl ProjectionStore for PgProjectionStore {
    type Unit = PgProjectionUnit;

    /// `BEGIN`, then the consumer's lock as a statement of the open transaction: if the lock
    /// wait fails (a statement or lock timeout, a cancel) or the caller drops this future
    /// while it waits, sqlx rolls the transaction back before the connection goes back to
    /// the pool. (Sent as one `BEGIN; SELECT pg_advisory_xact_lock(..)` query, a failure
    /// there left the pooled connection inside an aborted or open transaction.)
    ///
    /// A lock another unit holds is waited for on a task of its own, in statements of a
    /// second at most (`lock_timeout`, in a savepoint): a caller that gives up (a relay's
    /// store timeout, a readiness probe's deadline) leaves the wait to end at the slice's
    /// end, and the connection then goes back to the pool, instead of staying out of it until
    /// the holder commits.
    async fn begin(&self, consumer: &str) -> Result<PgProjectionUnit, StoreError> {
        let mut tx = crate::sql::begin(&self.db)
            .await
            .map_err(|e| self.db.store_error(e))?;
        // The key is a number computed here, not text from the caller: safe to inline.
        let key = self.db.sql.consumer_lock(consumer);
        // Free (the usual case): taken in one round trip, as a plain wait would.
        let taken: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT pg_try_advisory_xact_lock({key})"
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(store_error)?;
        if !taken {
            use tracing::Instrument;
            let answer_timeout = self.db.answer_timeout;
            let (locked, caller) = tokio::sync::oneshot::channel();
            let wait = async move {
                let waited = wait_for_lock(&mut tx, key, &locked, answer_timeout).await;
                // A caller gone meanwhile drops the unit here: rolled back, lock released.
                let _ = locked.send(waited.map(|()| tx));
            };
            tokio::spawn(wait.in_current_span());
            tx = match caller.await {
                Ok(waited) => waited.map_err(store_error)?,
                // The task ended without an answer: the runtime is shutting down (or the
                // wait panicked).
                Err(_) => return Err(store_error(sqlx::Error::WorkerCrashed)),
            };
        }
        Ok(PgProjectionUnit { tx })
    }

    async fn mark_processed(
        &self,
        unit: &mut PgProjectionUnit,
        consumer: &str,
        id: Uuid,
    ) -> Result<bool, StoreError> {
        unit.ensure_open()?;
        let done = sqlx::query(AssertSqlSafe(self.db.sql.inbox_insert.clone()))
            .bind(consumer)
            .bind(id)
            .execute(&mut *unit.tx)
            .await
            .map_err(store_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn checkpoint(
        &self,
        unit: &mut PgProjectionUnit,
        consumer: &str,
    ) -> Result<Option<Position>, StoreError> {
        unit.ensure_open()?;
        let position: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(self.db.sql.checkpoint_load.clone()))
                .bind(consumer)
                .fetch_optional(&mut *unit.tx)
                .await
                .map_err(store_error)?;
        Ok(position.map(|p| Position::new(to_u64(p))))
    }

    async fn committed_checkpoint(&self, consumer: &str) -> Result<Option<Position>, StoreError> {
        // Outside any transaction: a plain read sees the last commit and waits for no lock.
        // A waiter gives it up at its deadline, maybe mid-statement: the connection then is
        // closed, not handed back to wait for the answer.
        let mut held = crate::database::ClosedUnlessReturned::acquire(&self.db)
            .await
            .map_err(|e| self.db.store_error(e))?;
        let position: Result<Option<i64>, _> =
            sqlx::query_scalar(AssertSqlSafe(self.db.sql.checkpoint_load.clone()))
                .bind(consumer)
                .fetch_optional(&mut *held.connection)
                .await;
        held.give_back();
        let position = position.map_err(|e| self.db.store_error(e))?;
        Ok(position.map(|p| Position::new(to_u64(p))))
    }

    async fn save_checkpoint(
        &self,
        unit: &mut PgProjectionUnit,
        consumer: &str,
        position: Position,
    ) -> Result<(), StoreError> {
        unit.ensure_open()?;
        sqlx::query(AssertSqlSafe(self.db.sql.checkpoint_save.clone()))
            .bind(consumer)
            .bind(to_i64(position.get()))
            .execute(&mut *unit.tx)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// In the unit's transaction, a batch of inbox entries per statement (as many as a purge
    /// statement deletes), repeated until the inbox is empty: a rebuild of a consumer with
    /// millions of entries runs statements that each stay inside a `statement_timeout`, and
    /// still forgets all or nothing.
    async fn reset(&self, unit: &mut PgProjectionUnit, consumer: &str) -> Result<(), StoreError> {
        // From the smallest id on (the nil UUID sorts first), then from where each batch
        // ended.
        unit.ensure_open()?;
        let mut from = uuid::Uuid::nil();
        loop {
            let (selected, last): (i64, Option<uuid::Uuid>) =
                sqlx::query_as(AssertSqlSafe(self.db.sql.consumer_reset.clone()))
                    .bind(consumer)
                    .bind(crate::sql::PURGE_BATCH)
                    .bind(from)
                    .fetch_one(&mut *unit.tx)
                    .await
                    .map_err(store_error)?;
            match last {
                Some(last) if selected >= crate::sql::PURGE_BATCH => from = last,
                _ => return Ok(()),
            }
        }
    }

    async fn commit(&self, mut unit: PgProjectionUnit) -> Result<(), StoreError> {
        unit.ensure_open()?;
        let commit = async move {
            // Postgres answers `COMMIT` in an aborted transaction with a rollback, which sqlx
            // reports as a commit: the runner would acknowledge a batch that left nothing.
            crate::unit_of_work::ensure_not_aborted(
                &mut unit.tx,
                "the projection's unit of work was aborted by a statement that failed earlier, \
                 so nothing was committed: a projection must return the error of a failed \
                 statement (or run it in a savepoint), not go on",
            )
            .await?;
            // A commit whose connection failed may have gone through: `Timeout`, not "retry".
            unit.tx.commit().await.map_err(commit_error)
        };
        // Bounded as a command's commit is (`PgOptions::answer_timeout`): a silent network
        // would otherwise hold the runner, its batch kept alive, for ~15 minutes.
        crate::sql::commit_within(self.db.answer_timeout, "the projection's commit", commit).await
    }

    /// By the server's clock (`processed_at` is the `clock_timestamp()` of `mark_processed`,
    /// not the start of the unit's transaction, which may have waited for the consumer's
    /// lock), with an index on `(consumer, processed_at)`, a batch of rows per statement: a
    /// large backlog is worked off in statements that each stay short (under a
    /// `statement_timeout`, and holding few row locks at a time).
    async fn purge_inbox(
        &self,
        consumer: &str,
        older_than: std::time::Duration,
    ) -> Result<u64, StoreError> {
        crate::sql::purge_in_batches(&self.db, || {
            sqlx::query(AssertSqlSafe(self.db.sql.inbox_purge.clone()))
                .bind(consumer)
                // About 3,000 years at most: further back is out of `timestamptz`'s range.
                .bind(older_than.as_secs_f64().min(1e11))
                .bind(crate::sql::PURGE_BATCH)
                .execute(&self.db.pool)
        })
        .await
    }
}
