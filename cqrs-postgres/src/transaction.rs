//! Connections and transactions that go back to the pool within `answer_timeout`, or are
//! closed at once.
//!
//! sqlx (0.9) gives a connection back to its pool by reading whatever answers it still owes
//! (a statement whose caller gave up, the `ROLLBACK` of a dropped transaction), with no
//! deadline. The pool's release hook bounds that wait, but a connection it then refuses is
//! closed gracefully, and over TLS that close never ends on a network that drops packets (the
//! rustls socket waits to read when it flushes): the pool keeps the connection's place until
//! TCP gives up, about 15 minutes; and once it owes nothing, sqlx pings it before pooling it
//! again, with no deadline either. A connection this crate holds is settled here instead, on a
//! task of its own, and given back through sqlx's release within `answer_timeout`; one that
//! does not answer in time is detached from the pool and dropped, which closes its socket
//! without a word to the server.

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgTransactionManager};
use sqlx::{Postgres, SqlSafeStr};
use sqlx_core::transaction::TransactionManager;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::time::Duration;
use tracing::Instrument;

/// How many errors of statements dropped in flight a connection given back may hold before
/// it is closed instead (each dropped statement leaves one at most).
const MAX_UNREAD_ERRORS: usize = 4;

/// Reads the answers `conn` still owes (statements dropped in flight, a queued `ROLLBACK`):
/// `true` once it owes none, `false` when it is broken or holds more errors than a few
/// dropped statements leave.
///
/// The errors of statements dropped in flight that the server then failed are read and
/// dropped, like their callers: sqlx's own release check would read such an error, take the
/// connection for broken and close it.
pub(crate) async fn read_owed_answers(conn: &mut PgConnection) -> bool {
    for _ in 0..MAX_UNREAD_ERRORS {
        // sqlx's `flush` (hidden from its docs) sends what is buffered and reads up to the
        // last answer owed, without a round trip of its own (a compile error here after an
        // upgrade means: find its successor).
        match sqlx::Connection::flush(&mut *conn).await {
            Ok(()) => return true,
            Err(sqlx::Error::Database(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// A connection of the database's pool ([`PgDatabase::acquire`]), given back settled when
/// dropped: within [`answer_timeout`](crate::PgOptions::answer_timeout), or closed. Derefs
/// to the connection, so `&mut *conn` runs statements on it.
///
/// Statements run straight on [`PgDatabase::pool`](crate::PgDatabase::pool) go back through
/// sqlx's release instead: on a network that drops packets, one whose caller gave up (a
/// request that ran out of time, a client gone) keeps its connection out of the pool until
/// TCP gives up, about 15 minutes, over TLS even once the pool's release hook gave up on it
/// (sqlx 0.9's rustls socket waits to read as it closes). Given back from here, such a
/// connection is detached from the pool and dropped at `answer_timeout`, which closes its
/// socket without a close handshake; the pool opens a replacement. A connection that owes
/// nothing costs no extra round trip. The crate's own reads and transactions
/// ([`PgTransaction`]) hold their connections the same way.
///
/// [`PgDatabase::acquire`]: crate::PgDatabase::acquire
///
/// ```no_run
/// # async fn demo(db: cqrs_postgres::PgDatabase) -> Result<(), sqlx::Error> {
/// let mut conn = db.acquire().await?;
/// let open: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity")
///     .fetch_one(&mut *conn)
///     .await?;
/// # Ok(()) }
/// ```
pub struct PgPooledConnection {
    /// `None` only once dropped.
    conn: Option<PoolConnection<Postgres>>,
    answer_timeout: Duration,
    /// A `BEGIN` was given up before its answer: once answered, its transaction (which sqlx
    /// does not count) is rolled back before the connection goes back.
    end_begin: bool,
    /// Closed when dropped, not given back (see [`close_on_drop`](Self::close_on_drop)).
    close: bool,
}

impl PgPooledConnection {
    pub(crate) fn new(conn: PoolConnection<Postgres>, answer_timeout: Duration) -> Self {
        Self {
            conn: Some(conn),
            answer_timeout,
            end_begin: false,
            close: false,
        }
    }

    /// Runs `begin`, which sends a `BEGIN` on this connection, with the connection marked
    /// until it succeeded: given up before its answer (the future dropped), or failed (the
    /// error may be an earlier statement's, read before the `BEGIN`'s answer, and the server
    /// then ran the `BEGIN`), the connection rolls back, as it settles, the transaction sqlx
    /// does not count (a `ROLLBACK` with none open only draws a warning). Begun, sqlx counts
    /// it and rolls it back on drop.
    async fn begin_marked<'c, T, F>(
        &'c mut self,
        begin: impl FnOnce(&'c mut PgConnection) -> F,
    ) -> Result<T, sqlx::Error>
    where
        F: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        // Two fields borrowed apart: what `begin` returns may hold the connection while the
        // mark is cleared.
        let Self {
            conn, end_begin, ..
        } = self;
        let conn = conn
            .as_mut()
            .expect("a held connection is taken out only when dropped");
        *end_begin = true;
        let began = begin(conn).await;
        if began.is_ok() {
            *end_begin = false;
        }
        began
    }

    /// Closes the connection when it is dropped instead of giving it back (what it holds for
    /// its session, a session-level advisory lock, goes with it): sqlx's close, which gives
    /// up after 5 s.
    pub(crate) fn close_on_drop(&mut self) {
        self.close = true;
    }
}

impl Deref for PgPooledConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("a held connection is taken out only when dropped")
    }
}

impl DerefMut for PgPooledConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("a held connection is taken out only when dropped")
    }
}

impl AsRef<PgConnection> for PgPooledConnection {
    fn as_ref(&self) -> &PgConnection {
        self
    }
}

impl AsMut<PgConnection> for PgPooledConnection {
    fn as_mut(&mut self) -> &mut PgConnection {
        self
    }
}

/// As for sqlx's `PoolConnection`: `acquire` lends the connection, `begin` opens a
/// transaction on it (sqlx's, rolled back when dropped uncommitted).
///
/// A `begin` given up before the server answered it (a timeout around it, a caller gone)
/// leaves a transaction sqlx (0.9) does not count, nor ends: the connection, given back, then
/// rolls it back first, as [`PgTransaction`]'s does. Statements run on the connection after
/// such a `begin` run in that transaction, and are rolled back with it: give a connection
/// whose `begin` was given up back to the pool. `sqlx::Connection::begin(&mut *conn)` goes
/// around this: use `sqlx::Acquire::begin(&mut conn)` (or [`PgDatabase::begin`]). Unlike
/// `PgDatabase::begin`, this `begin` waits for its answer without the `answer_timeout`
/// bound: put a timeout around it where the network may drop packets.
///
/// [`PgDatabase::begin`]: crate::PgDatabase::begin
impl<'c> sqlx::Acquire<'c> for &'c mut PgPooledConnection {
    type Database = Postgres;
    type Connection = &'c mut PgConnection;

    fn acquire(self) -> BoxFuture<'c, Result<Self::Connection, sqlx::Error>> {
        Box::pin(std::future::ready(Ok(&mut **self)))
    }

    fn begin(self) -> BoxFuture<'c, Result<sqlx::Transaction<'c, Postgres>, sqlx::Error>> {
        Box::pin(self.begin_marked(sqlx::Connection::begin))
    }
}

impl fmt::Debug for PgPooledConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgPooledConnection")
            .field("answer_timeout", &self.answer_timeout)
            .finish_non_exhaustive()
    }
}

impl Drop for PgPooledConnection {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if self.close {
            conn.close_on_drop();
            return;
        }
        match tokio::runtime::Handle::try_current() {
            // One task per connection given back, as sqlx's own release spawns.
            Ok(runtime) => {
                let settling = settle(conn, self.answer_timeout, self.end_begin);
                drop(runtime.spawn(settling.in_current_span()));
            }
            // Outside a runtime (dropped by a thread of its own), where sqlx's release could
            // not run either: closed now.
            Err(_) => drop(conn.detach()),
        }
    }
}

/// `patience` from now; one too long to add (a `Duration::MAX`) as the longest timeout the
/// options take, which is as good as none (it panicked on every connection given back).
fn deadline_after(patience: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(patience)
        .unwrap_or_else(|| now + crate::options::MAX_TIMEOUT)
}

/// Gives `conn` back to the pool once it owes nothing (and, with `end_begin`, a `BEGIN`'s
/// transaction is rolled back), through sqlx's release (the pool's release hook, then a
/// ping), all within `patience`; or closes it, past that or when it is broken.
async fn settle(mut conn: PoolConnection<Postgres>, patience: Duration, end_begin: bool) {
    let deadline = deadline_after(patience);
    let settled = tokio::time::timeout_at(deadline, async {
        if !read_owed_answers(&mut conn).await {
            return false;
        }
        // The server answered the `BEGIN` whose caller gave up: sqlx did not count the
        // transaction, nor queue its end. (A `BEGIN` that failed or never went out leaves
        // none: the server warns, and the connection is as clean.)
        !end_begin || sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.is_ok()
    })
    .await;
    match settled {
        Ok(true) => {
            // sqlx's release, hidden from its docs (a compile error here after an upgrade
            // means: find its successor), takes the connection out of `conn` before it runs:
            // given up at the deadline, the connection is dropped with it (its socket closed,
            // no close handshake) and its place in the pool freed.
            let release = conn.return_to_pool();
            if tokio::time::timeout_at(deadline, release).await.is_err() {
                no_answer_in_time(patience, "to its ping");
            }
        }
        Ok(false) => drop(conn.detach()),
        Err(_) => {
            no_answer_in_time(patience, "to what it had sent");
            // Detached, the pool opens a replacement, and the connection's socket closes as
            // it drops: no close handshake to wait on.
            drop(conn.detach());
        }
    }
}

/// Logs a connection closed because it did not answer within `patience` (`what`: to what).
pub(crate) fn no_answer_in_time(patience: Duration, what: &str) {
    tracing::warn!(
        waited = ?patience,
        "a connection given back got no answer {what} within answer_timeout (a statement or \
         transaction its caller stopped waiting for, or the pool's check); it is closed: the \
         server or the network between may be down"
    );
}

/// A transaction this crate began on a connection of the pool ([`PgDatabase::begin`]).
/// Derefs to the connection, so `&mut *tx` runs statements in it.
///
/// Like sqlx's `Transaction`, dropping it uncommitted rolls it back; unlike it, its
/// connection goes back to the pool within the database's
/// [`answer_timeout`](crate::PgOptions::answer_timeout), or is closed: on a network that
/// drops packets, sqlx's transaction kept its connection out of the pool for as long as TCP
/// waited (about 15 minutes) when its statements, its `COMMIT` or its `ROLLBACK` got no
/// answer, over TLS even once the pool gave up on it. And a caller that gives up while
/// the `BEGIN` waits for its answer leaves nothing open: once answered, its transaction is
/// rolled back before the connection goes back.
///
/// A savepoint is sqlx's: `sqlx::Acquire::begin(&mut tx)` (or `sqlx::Connection::begin(&mut
/// *tx)`). Return the error of a savepoint's `begin()`: sqlx (0.9) answers one that fails or is
/// given up in flight with a plain `ROLLBACK`, which ends this whole transaction;
/// [`commit`](Self::commit) then fails instead of reporting what ran after it as committed.
///
/// [`PgDatabase::begin`]: crate::PgDatabase::begin
///
/// ```no_run
/// # async fn demo(db: cqrs_postgres::PgDatabase) -> Result<(), sqlx::Error> {
/// let mut tx = db.begin().await?;
/// sqlx::query("SELECT 1").execute(&mut *tx).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub struct PgTransaction {
    held: PgPooledConnection,
}

impl PgTransaction {
    /// Begins a transaction with `statement` on `conn`, waiting at most `answer_timeout` for
    /// the server's answer.
    pub(crate) async fn begin(
        conn: PoolConnection<Postgres>,
        statement: &'static str,
        answer_timeout: Duration,
    ) -> Result<Self, sqlx::Error> {
        let mut tx = Self {
            held: PgPooledConnection::new(conn, answer_timeout),
        };
        // Given up at the bound below, or by a caller, `tx` is dropped still marked.
        let begin = tx
            .held
            .begin_marked(|conn| PgTransactionManager::begin(conn, Some(statement.into_sql_str())));
        let began = tokio::time::timeout(answer_timeout, begin).await;
        match began {
            Ok(began) => began.map(|()| tx),
            Err(_) => Err(sqlx::Error::Io(crate::sql::no_answer(
                answer_timeout,
                "BEGIN",
                "its connection is closed unless the answer comes in time (and the \
                 transaction is then rolled back)",
            ))),
        }
    }

    /// Commits the transaction, waiting at most the `answer_timeout` for the server's answer.
    ///
    /// Without an answer in time (a timed-out I/O error), with the connection lost before it,
    /// or given up before it (a timeout around this call), the outcome is unknown: the commit
    /// may have taken effect. The transaction is then dropped, and its connection closed
    /// unless the answer comes within a second `answer_timeout`. Such an error is an I/O
    /// error that [`store_error`](crate::store_error) and
    /// [`PgDatabase::store_error`](crate::PgDatabase::store_error) make a `Timeout` ("may or
    /// may not have taken effect"), never `Unavailable` ("retry"), which would invite a retry
    /// that runs the work twice.
    ///
    /// Fails, committing nothing, when the transaction was ended under it (a savepoint's
    /// `begin()` that failed or was given up rolled it all back; statements run on the
    /// connection since then were committed one by one).
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        if PgTransactionManager::get_transaction_depth(&self.held) == 0 {
            return Err(sqlx::Error::InvalidArgument(
                "this transaction was rolled back under it, by a savepoint's begin() that \
                 failed or was given up (sqlx 0.9 answers those with a plain ROLLBACK): nothing \
                 of it is committed, and the statements run on its connection since then \
                 committed one by one; return a savepoint's begin() error instead of going on"
                    .into(),
            ));
        }
        let limit = self.held.answer_timeout;
        let commit = PgTransactionManager::commit(&mut *self.held);
        crate::sql::answered_within(limit, "COMMIT", "it may have taken effect", commit)
            .await
            .map_err(crate::error::marked_commit_error)
    }

    /// Rolls the transaction back, waiting at most the `answer_timeout` for the server's
    /// answer (past it, the transaction is dropped: the rollback goes on as the connection
    /// settles, and the connection is closed unless it is answered in time).
    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        let limit = self.held.answer_timeout;
        let rollback = PgTransactionManager::rollback(&mut *self.held);
        let then = "the server rolls the transaction back by itself once the connection closes";
        crate::sql::answered_within(limit, "ROLLBACK", then, rollback).await
    }
}

impl Deref for PgTransaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.held
    }
}

impl DerefMut for PgTransaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.held
    }
}

impl AsRef<PgConnection> for PgTransaction {
    fn as_ref(&self) -> &PgConnection {
        self
    }
}

impl AsMut<PgConnection> for PgTransaction {
    fn as_mut(&mut self) -> &mut PgConnection {
        self
    }
}

/// As for sqlx's `Transaction`: `acquire` lends the connection, `begin` opens a savepoint.
impl<'t> sqlx::Acquire<'t> for &'t mut PgTransaction {
    type Database = Postgres;
    type Connection = &'t mut PgConnection;

    fn acquire(self) -> BoxFuture<'t, Result<Self::Connection, sqlx::Error>> {
        Box::pin(std::future::ready(Ok(&mut **self)))
    }

    fn begin(self) -> BoxFuture<'t, Result<sqlx::Transaction<'t, Postgres>, sqlx::Error>> {
        Box::pin(sqlx::Connection::begin(&mut **self))
    }
}

impl Drop for PgTransaction {
    fn drop(&mut self) {
        // As sqlx's transaction does: the `ROLLBACK` (of each savepoint left open, then of
        // the transaction) is queued, sent as the connection settles.
        let conn: &mut PgConnection = &mut self.held;
        while PgTransactionManager::get_transaction_depth(conn) > 0 {
            PgTransactionManager::start_rollback(conn);
        }
    }
}

impl fmt::Debug for PgTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransaction").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::deadline_after;
    use std::time::Duration;

    /// A patience too long to add to now is the longest the options take, not a panic in
    /// every connection's settling (`PgDatabase::with_answer_timeout(Duration::MAX)`).
    #[tokio::test]
    async fn a_patience_too_long_to_add_is_the_longest_timeout() {
        let now = tokio::time::Instant::now();
        let far = deadline_after(Duration::MAX);
        assert!(far >= now + crate::options::MAX_TIMEOUT);
        let near = deadline_after(Duration::from_secs(1));
        assert!(near <= tokio::time::Instant::now() + Duration::from_secs(1));
    }
}
