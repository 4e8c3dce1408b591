//! The idempotency store.

use crate::PgDatabase;
use crate::PgTransaction;
use crate::error::{BACKEND, commit_error, store_error};
use crate::sql::{IdempotencyLocks, Sql};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::ports::{
    Claim, ClaimWaitElapsed, IdempotencyGuard, IdempotencyStore, StoreError, StoredResponse,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, Postgres};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Row};
use std::time::Duration;
use tracing::Instrument;

/// Idempotency keys in Postgres, held by the transaction that does the work.
///
/// A claim runs `idempotency_claim` in a transaction. A new key's row is inserted by that
/// transaction and committed with the response (and, through
/// [`PgCommandExecutor`](crate::PgCommandExecutor), with the command's own writes and
/// events); there is never a committed "in progress" row, so a crash strands nothing. While
/// the work runs, a concurrent claim with the same fingerprint waits on the claim's
/// transaction-scoped lock and then replays the stored response, or claims the key itself if
/// the first transaction rolled back (the guard was dropped). A concurrent claim with another
/// fingerprint fails at once with [`StoreError::FingerprintMismatch`], however many run
/// together: every claim marks its fingerprint with an advisory lock, and a claim that finds
/// the key's lock taken reads the holder's marks in `pg_locks`, failing when they show another
/// fingerprint and waiting for the key's lock otherwise (see `IDEMPOTENCY_CLAIM` in the
/// crate's `sql` module for why this holds under concurrency). Replays of one key take its
/// lock in turn, each for a statement and a `ROLLBACK`.
///
/// Expiry is `ttl` after completion, measured on the handle's clock
/// ([`PgDatabase::with_clock`]); [`purge_expired`](IdempotencyStore::purge_expired)
/// deletes expired keys.
///
/// A claim holds a pool connection until it is completed or dropped, and a waiting duplicate
/// one while it waits: a request that claims here and then runs its command in a transaction
/// of its own (through [`PgCommandLayer`](crate::PgCommandLayer)) holds two at once. Size the
/// pool for that, or claim in the command's own transaction with
/// [`PgCommandExecutor::execute_idempotent`](crate::PgCommandExecutor::execute_idempotent).
///
/// ```no_run
/// use cqrs_core::ports::{Claim, IdempotencyStore, StoredResponse};
/// use std::time::Duration;
///
/// # async fn run(db: cqrs_postgres::PgDatabase) -> Result<(), cqrs_core::ports::StoreError> {
/// let store = db.idempotency_store();
/// let day = Duration::from_secs(24 * 3600);
/// match store.claim("tickets", "key-1", "sha256-of-the-request", day).await? {
///     Claim::New(guard) => {
///         // ... do the work ...
///         let response = StoredResponse::new(201, serde_json::json!({ "id": "t1" }));
///         if let Err(error) = guard.complete(response).await {
///             // The work ran: answer it all the same (a retry with the key would run it again).
///             eprintln!("the response was not stored under its key: {error}");
///         }
///     }
///     Claim::Replay(response) => println!("again: {response:?}"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PgIdempotencyStore {
    db: PgDatabase,
}

impl PgIdempotencyStore {
    /// The idempotency store of `db`'s schema, on `db`'s clock.
    pub fn new(db: PgDatabase) -> Self {
        Self { db }
    }
}

/// What claiming a key in a transaction found.
pub(crate) enum Outcome {
    New,
    Replay(StoredResponse),
    Mismatch,
}

pub(crate) fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|ttl| now.checked_add_signed(ttl))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Claims a key in the transaction on `conn`, waiting at most `wait` (`None`: as the session's
/// `lock_timeout` allows) for a duplicate's holder. With [`Outcome::New`], the transaction
/// holds the key until it ends.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn claim_on(
    conn: &mut PgConnection,
    sql: &Sql,
    wait: Option<Duration>,
    scope: &str,
    key: &str,
    fingerprint: &str,
    now: DateTime<Utc>,
    ttl: Duration,
) -> Result<Outcome, StoreError> {
    let locks = sql.idempotency_locks(scope, key, fingerprint);
    claim_with(conn, sql, wait, &locks, scope, key, fingerprint, now, ttl).await
}

/// [`claim_on`] with the locks given.
#[allow(clippy::too_many_arguments)]
async fn claim_with(
    conn: &mut PgConnection,
    sql: &Sql,
    wait: Option<Duration>,
    locks: &IdempotencyLocks,
    scope: &str,
    key: &str,
    fingerprint: &str,
    now: DateTime<Utc>,
    ttl: Duration,
) -> Result<Outcome, StoreError> {
    let row = sqlx::query(AssertSqlSafe(sql.idempotency_claim.clone()))
        .bind(scope)
        .bind(key)
        .bind(fingerprint)
        .bind(now)
        .bind(expiry(now, ttl))
        .bind(locks.key.0)
        .bind(locks.key.1)
        .bind(locks.claimer)
        .bind(locks.owner_key)
        .bind(locks.owner_fingerprint)
        // `lock_timeout`, in milliseconds, for the claim's own lock waits only.
        .bind(wait.map(|wait| wait.as_millis().clamp(1, i32::MAX as u128).to_string()))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| claim_error(e, wait))?;
    let outcome: String = row.try_get(0).map_err(store_error)?;
    match outcome.as_str() {
        "new" => Ok(Outcome::New),
        "mismatch" => Ok(Outcome::Mismatch),
        "replay" => Ok(replay(row.try_get(1), row.try_get(2))?),
        // The key is held for another fingerprint: a mismatch, unless the key completed for
        // ours, which a newer snapshot than the claim's shows.
        "differs" => {
            let row = sqlx::query(AssertSqlSafe(sql.idempotency_read.clone()))
                .bind(scope)
                .bind(key)
                .bind(now)
                .fetch_optional(&mut *conn)
                .await
                .map_err(store_error)?;
            match row {
                Some(row) if row.try_get::<String, _>(0).map_err(store_error)? == fingerprint => {
                    Ok(replay(row.try_get(1), row.try_get(2))?)
                }
                _ => Ok(Outcome::Mismatch),
            }
        }
        other => Err(StoreError::Backend {
            backend: BACKEND,
            source: format!(
                "idempotency_claim answered `{other}`; the schema's functions are not this crate's"
            )
            .into(),
        }),
    }
}

/// A claim's error: its wait for the key's holder running out is a busy key, which a retry
/// (after the holder finished) replays; anything else as [`store_error`]. The wait ends at the
/// claim wait (`lock_timeout`, 55P03), or earlier at a shorter `statement_timeout` (57014):
/// the claim's statement does nothing else that takes time.
fn claim_error(error: sqlx::Error, wait: Option<Duration>) -> StoreError {
    let busy = |db: &dyn sqlx::error::DatabaseError| {
        matches!(db.code().as_deref(), Some("55P03" | "57014"))
    };
    match (&error, wait) {
        (sqlx::Error::Database(db), Some(wait)) if busy(db.as_ref()) => StoreError::Unavailable {
            backend: BACKEND,
            source: Box::new(ClaimWaitElapsed::new(wait).with_source(crate::SqlxError(error))),
        },
        _ => store_error(error),
    }
}

/// A stored response, from its `status` and `body` columns.
fn replay(
    status: Result<Option<i32>, sqlx::Error>,
    body: Result<Option<serde_json::Value>, sqlx::Error>,
) -> Result<Outcome, StoreError> {
    let status = status.map_err(store_error)?;
    let body = body.map_err(store_error)?;
    let status = status.and_then(|s| u16::try_from(s).ok()).unwrap_or(500);
    Ok(Outcome::Replay(StoredResponse::new(
        status,
        body.unwrap_or(serde_json::Value::Null),
    )))
}

/// Stores the response of a claimed key in the claiming transaction.
pub(crate) async fn complete_on(
    conn: &mut PgConnection,
    sql: &Sql,
    scope: &str,
    key: &str,
    response: &StoredResponse,
    expires_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    crate::row::readable_json(&response.body, crate::row::MAX_JSON_DEPTH, || {
        format!("the response stored for idempotency key `{key}`")
    })?;
    sqlx::query(AssertSqlSafe(sql.idempotency_complete.clone()))
        .bind(i32::from(response.status))
        .bind(Json(&response.body))
        .bind(expires_at)
        .bind(scope)
        .bind(key)
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    Ok(())
}

/// Ends a transaction that only read: a failed rollback means the connection is gone, and
/// the server rolls back by itself, so the error is only logged.
pub(crate) async fn end_read_only(tx: PgTransaction) {
    if let Err(e) = tx.rollback().await {
        tracing::debug!(error = %e, "rollback after an idempotency replay failed");
    }
}

struct PgIdempotencyGuard {
    tx: PgTransaction,
    db: PgDatabase,
    scope: String,
    key: String,
    ttl: Duration,
}

#[async_trait]
impl IdempotencyGuard for PgIdempotencyGuard {
    async fn complete(self: Box<Self>, response: StoredResponse) -> Result<(), StoreError> {
        let PgIdempotencyGuard {
            mut tx,
            db,
            scope,
            key,
            ttl,
        } = *self;
        // The work has run: a body Postgres cannot store (or could not read back) is no
        // reason to release the key, which would let a retry run the work again. Its status
        // is kept, with a note for a body.
        let (response, why) = response.storable();
        if let Some(why) = why {
            tracing::warn!(scope = %scope, key = %key, %why, "stored a note in place of a response Postgres cannot store");
        }
        // In a task of its own, as the command layer's commit: the work the key guards has
        // run, so a caller that gives up mid-`COMMIT` (its time budget spent) must not roll
        // the key back, which would let a retry run the work a second time.
        let completed = tokio::spawn(
            async move {
                let complete = async {
                    let expires_at = expiry(db.clock.now(), ttl);
                    complete_on(&mut tx, &db.sql, &scope, &key, &response, expires_at).await?;
                    tx.commit().await.map_err(commit_error)
                };
                // Bounded as a unit of work's commit is (`PgOptions::answer_timeout`).
                crate::sql::commit_within(db.answer_timeout, "the key's completion", complete).await
            }
            .in_current_span(),
        );
        match completed.await {
            Ok(completed) => completed,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The work has run and the commit may have reached the server: the outcome is
            // unknown, not "retry" (a retry with the key replays it if it committed).
            Err(e) => Err(crate::error::commit_cancelled(&e)),
        }
    }
}

#[async_trait]
impl IdempotencyStore for PgIdempotencyStore {
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        // The wait for a connection runs here: a caller that gives up meanwhile leaves the
        // pool's queue, instead of its claim taking the key for no one once a connection
        // frees up (and running four statements ahead of the callers still waiting).
        let connection = self
            .db
            .pool
            .acquire()
            .await
            .map_err(|e| self.db.store_error(e))?;
        let (tx, outcome) = claim_detached(
            &self.db,
            Err(connection),
            true,
            (scope, key, fingerprint),
            ttl,
        )
        .await?;
        match outcome {
            Outcome::New => Ok(Claim::New(Box::new(PgIdempotencyGuard {
                tx,
                db: self.db.clone(),
                scope: scope.to_owned(),
                key: key.to_owned(),
                ttl,
            }))),
            Outcome::Replay(response) => {
                end_read_only(tx).await;
                Ok(Claim::Replay(response))
            }
            Outcome::Mismatch => {
                end_read_only(tx).await;
                Err(StoreError::FingerprintMismatch {
                    scope: scope.to_owned(),
                    key: key.to_owned(),
                })
            }
        }
    }

    /// A batch of rows per statement, until none is left (see
    /// [`PgProjectionStore`](crate::PgProjectionStore)'s `purge_inbox`).
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = self.db.clock.now();
        crate::sql::purge_in_batches(&self.db, || {
            sqlx::query(AssertSqlSafe(self.db.sql.idempotency_purge.clone()))
                .bind(now)
                .bind(crate::sql::PURGE_BATCH)
                .execute(&self.db.pool)
        })
        .await
    }
}

/// Claims a key in a task of its own, which its caller giving up does not stop: the
/// statement may wait on the server for the key's holder (up to the claim wait), and a
/// statement given up mid-wait left sqlx unable, now and then, to give its connection back to
/// the pool at all. Finished with nobody to take it, the task's transaction is dropped between
/// statements (rolled back), the way every dropped claim ends.
///
/// `start`: a transaction already begun, or a connection to begin one on (acquired by the
/// caller, so that a caller that gives up while it waits leaves the pool's queue instead of
/// its claim taking the key for no one). `hold_open`: lift the server's idle timeouts for the
/// transaction, whose work runs outside it (see [`PgDatabase::held_open`]).
pub(crate) async fn claim_detached(
    db: &PgDatabase,
    start: Result<PgTransaction, PoolConnection<Postgres>>,
    hold_open: bool,
    (scope, key, fingerprint): (&str, &str, &str),
    ttl: Duration,
) -> Result<(PgTransaction, Outcome), StoreError> {
    let identity = (scope.to_owned(), key.to_owned(), fingerprint.to_owned());
    // Bounded as a commit is (`PgOptions::answer_timeout`), beyond the wait for a duplicate's
    // holder. Given up, the claim's transaction is dropped in the task (nothing was claimed),
    // and its connection closed on release.
    let limit = db.answer_timeout.saturating_add(db.claim_wait);
    let claim = claim_in_a_transaction(db.clone(), start, hold_open, identity, ttl);
    let bounded = async move {
        tokio::time::timeout(limit, claim)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable {
                    backend: BACKEND,
                    source: Box::new(crate::sql::no_answer(
                        limit,
                        "the claim",
                        crate::sql::CLOSED_ON_RELEASE,
                    )),
                })
            })
    };
    let claimed = tokio::spawn(bounded.in_current_span());
    match claimed.await {
        Ok(claimed) => claimed,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(StoreError::Unavailable {
            backend: BACKEND,
            source: format!("the runtime is shutting down: {e}").into(),
        }),
    }
}

/// [`claim_detached`]'s transaction and claim, owned, for its task.
async fn claim_in_a_transaction(
    db: PgDatabase,
    start: Result<PgTransaction, PoolConnection<Postgres>>,
    hold_open: bool,
    (scope, key, fingerprint): (String, String, String),
    ttl: Duration,
) -> Result<(PgTransaction, Outcome), StoreError> {
    let tx = match start {
        Ok(tx) => Ok(tx),
        Err(connection) => match crate::sql::begin_on(connection, db.answer_timeout).await {
            // A store claim's transaction stays open, idle, while the caller does the work
            // outside it: ended by the server's idle timeouts mid-work, it would let a waiting
            // duplicate take the key and run the work a second time. It holds no append lock,
            // only this key's; the caller's guard bounds it.
            Ok(tx) if hold_open => PgDatabase::held_open(tx).await,
            began => began,
        },
    };
    let mut tx = tx.map_err(|e| db.store_error(e))?;
    let (now, wait) = (db.clock.now(), Some(db.claim_wait));
    let outcome = claim_on(&mut tx, &db.sql, wait, &scope, &key, &fingerprint, now, ttl).await?;
    Ok((tx, outcome))
}

#[cfg(test)]
mod tests {
    //! Needs private access: the key lock a client's key hashes to is handed in, so a test
    //! can aim it at the append lock without inverting FNV-1a.

    use super::*;
    use cqrs_core::ports::{EventStore, ExpectedVersion};

    /// A claim whose key (and key-and-fingerprint) hash equals the schema's append lock key,
    /// held open as a claim is while its request runs, does not stop an append.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_whose_key_hashes_to_the_append_lock_does_not_stop_appends() {
        let Some(db) = crate::test_support::migrated_schema("claim_aimed_at_the_append_lock").await
        else {
            return;
        };

        cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
            let sql = &db.sql;
            let aimed = IdempotencyLocks::from_hashes(
                sql.append_lock,
                sql.append_lock,
                sql.append_lock,
                crate::lock::key(&[&sql.schema, "idempotency claimer"]),
            );
            let mut claim = crate::sql::begin(&db).await.unwrap();
            let now = db.clock.now();
            let day = Duration::from_secs(24 * 3600);
            let outcome = claim_with(&mut claim, sql, None, &aimed, "s", "k", "fp", now, day)
                .await
                .unwrap();
            assert!(matches!(outcome, Outcome::New), "the claim takes the key");

            // The claim stays open, as it does while its request runs.
            let store = db.event_store();
            let append = store.append(
                "s",
                ExpectedVersion::Any,
                vec![crate::test_support::record()],
            );
            let stored = tokio::time::timeout(Duration::from_secs(10), append)
                .await
                .expect("an append went through while the claim was held")
                .unwrap();
            assert_eq!(stored[0].stream_version, Some(1));
            claim.rollback().await.unwrap();
        })
        .await;
        db.drop_schema().await.expect("drop the test schema");
    }

    async fn lock_timeout(tx: &mut PgTransaction) -> String {
        sqlx::query_scalar("SHOW lock_timeout")
            .fetch_one(&mut **tx)
            .await
            .unwrap()
    }

    /// A claim bounds its own lock waits with `lock_timeout` and sets it back, on each of its
    /// paths, so the command's statements after it in the transaction keep their setting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_leaves_the_transaction_lock_timeout_as_it_found_it() {
        let Some(db) = crate::test_support::migrated_schema("claim_lock_timeout").await else {
            return;
        };
        cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
            let (sql, now) = (&db.sql, db.clock.now());
            let (wait, day) = (
                Some(Duration::from_millis(250)),
                Duration::from_secs(24 * 3600),
            );
            // Taking the key (the function's path).
            let mut holder = crate::sql::begin(&db).await.unwrap();
            sqlx::query("SET LOCAL lock_timeout = '7s'")
                .execute(&mut *holder)
                .await
                .unwrap();
            let outcome = claim_on(&mut holder, sql, wait, "s", "k", "fp-1", now, day).await;
            assert!(matches!(outcome, Ok(Outcome::New)));
            assert_eq!(lock_timeout(&mut holder).await, "7s");

            // Another fingerprint while the key is held (the `differs` path).
            let mut other = crate::sql::begin(&db).await.unwrap();
            let outcome = claim_on(&mut other, sql, wait, "s", "k", "fp-2", now, day).await;
            assert!(matches!(outcome, Ok(Outcome::Mismatch)));
            assert_eq!(lock_timeout(&mut other).await, "0", "the server's default");
            other.rollback().await.unwrap();

            // The same fingerprint waits for the holder, at most `wait`.
            let mut duplicate = crate::sql::begin(&db).await.unwrap();
            let outcome = claim_on(&mut duplicate, sql, wait, "s", "k", "fp-1", now, day).await;
            let Err(error) = outcome else {
                panic!("a duplicate of a held key answered before its holder ended");
            };
            assert_eq!(error.kind(), cqrs_core::ErrorKind::Unavailable, "{error}");
            let elapsed =
                std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .find_map(|e| e.downcast_ref::<ClaimWaitElapsed>())
                .unwrap_or_else(|| panic!("no ClaimWaitElapsed among the sources of {error}"));
            assert_eq!(elapsed.wait(), Duration::from_millis(250), "{error}");
            assert!(error.to_string().contains("waited up to 250ms"), "{error}");
            holder.rollback().await.unwrap();
        })
        .await;
        db.drop_schema().await.expect("drop the test schema");
    }
}
