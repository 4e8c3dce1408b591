//! Connections and transactions that go back to the pool within `answer_timeout`, or are
//! closed at once.
//!
//! sqlx (0.9) gives a connection back to its pool by reading whatever answers it still owes
//! (a statement whose caller gave up, the `ROLLBACK` of a dropped transaction), with no
//! deadline. The pool's release hook bounds that wait, but a connection it then refuses is
//! closed gracefully, and over TLS that close never ends on a network that drops packets (the
//! rustls socket waits to read when it flushes): the pool keeps the connection's place until
//! TCP gives up, about 15 minutes. A connection this crate holds is settled here instead, on a
//! task of its own, and one that does not answer in time is detached from the pool and
//! dropped, which closes its socket without a word to the server.

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgTransactionManager};
use sqlx::{Postgres, SqlSafeStr};
use sqlx_core::transaction::TransactionManager;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
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

/// A connection of the pool that this crate holds: given back settled, within
/// `answer_timeout`, or closed (see the module's docs). Derefs to the connection.
pub(crate) struct HeldConnection {
    /// `None` only once dropped.
    conn: Option<PoolConnection<Postgres>>,
    answer_timeout: Duration,
    /// A `BEGIN` was given up before its answer: once answered, its transaction (which sqlx
    /// does not count) is rolled back before the connection goes back.
    end_begin: bool,
}

impl HeldConnection {
    pub(crate) fn new(conn: PoolConnection<Postgres>, answer_timeout: Duration) -> Self {
        Self {
            conn: Some(conn),
            answer_timeout,
            end_begin: false,
        }
    }

    /// The pooled connection itself, for what only it offers (`close_on_drop`).
    pub(crate) fn pooled(&mut self) -> &mut PoolConnection<Postgres> {
        self.conn
            .as_mut()
            .expect("a held connection is taken out only when dropped")
    }
}

impl Deref for HeldConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("a held connection is taken out only when dropped")
    }
}

impl DerefMut for HeldConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.pooled()
    }
}

impl fmt::Debug for HeldConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldConnection")
            .field("answer_timeout", &self.answer_timeout)
            .finish_non_exhaustive()
    }
}

/// Whether a look, without waiting, finds `conn` owing nothing: `None` when it is broken.
fn owes_nothing(conn: &mut PgConnection) -> Option<bool> {
    let mut cx = Context::from_waker(Waker::noop());
    let flush = pin!(sqlx::Connection::flush(conn));
    match flush.poll(&mut cx) {
        Poll::Ready(Ok(())) => Some(true),
        // An answer not here yet, or a dropped statement's error: read on the settling task.
        Poll::Pending | Poll::Ready(Err(sqlx::Error::Database(_))) => Some(false),
        Poll::Ready(Err(_)) => None,
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        match owes_nothing(&mut conn) {
            // The usual case: back to the pool as it is (sqlx's release follows).
            Some(true) if !self.end_begin => {}
            Some(_) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let settling = settle(conn, self.answer_timeout, self.end_begin);
                    drop(runtime.spawn(settling.in_current_span()));
                }
                // No runtime to wait on (a runtime shutting down): sqlx's own release.
                Err(_) => drop(conn),
            },
            // Broken: closed now, not handed to a release that would try to close it
            // gracefully.
            None => drop(conn.detach()),
        }
    }
}

/// Gives `conn` back to the pool once it owes nothing (and, with `end_begin`, a `BEGIN`'s
/// transaction is rolled back), or closes it when that takes longer than `patience`.
async fn settle(mut conn: PoolConnection<Postgres>, patience: Duration, end_begin: bool) {
    let settled = tokio::time::timeout(patience, async {
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
        Ok(true) => drop(conn),
        Ok(false) => drop(conn.detach()),
        Err(_) => {
            tracing::warn!(
                waited = ?patience,
                "a connection given back got no answer to what it had sent (a statement or \
                 transaction its caller stopped waiting for) within answer_timeout; it is \
                 closed: the server or the network between may be down"
            );
            // Detached, the pool opens a replacement, and the connection's socket closes as
            // it drops: no close handshake to wait on.
            drop(conn.detach());
        }
    }
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
/// A savepoint is sqlx's: `sqlx::Connection::begin(&mut *tx)`.
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
    held: HeldConnection,
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
            held: HeldConnection::new(conn, answer_timeout),
        };
        // Until answered: a caller that gives up (or the bound below) drops `tx` with it set.
        tx.held.end_begin = true;
        let begin = PgTransactionManager::begin(&mut *tx.held, Some(statement.into_sql_str()));
        let began = tokio::time::timeout(answer_timeout, begin).await;
        match began {
            Ok(began) => {
                // Answered: a transaction sqlx counts (rolled back on drop), or none.
                tx.held.end_begin = false;
                began.map(|()| tx)
            }
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
    /// Without an answer in time (a timed-out I/O error), or given up before it (a timeout
    /// around this call), the outcome is unknown: the commit may have taken effect. The
    /// transaction is then dropped, and its connection closed unless the answer comes within
    /// a second `answer_timeout`.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let limit = self.held.answer_timeout;
        let committed =
            tokio::time::timeout(limit, PgTransactionManager::commit(&mut *self.held)).await;
        committed.unwrap_or_else(|_| {
            Err(sqlx::Error::Io(crate::sql::no_answer(
                limit,
                "COMMIT",
                "the commit may have taken effect",
            )))
        })
    }

    /// Rolls the transaction back, waiting at most the `answer_timeout` for the server's
    /// answer (past it, the transaction is dropped: the rollback goes on as the connection
    /// settles, and the connection is closed unless it is answered in time).
    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        let limit = self.held.answer_timeout;
        let rolled_back =
            tokio::time::timeout(limit, PgTransactionManager::rollback(&mut *self.held)).await;
        rolled_back.unwrap_or_else(|_| {
            Err(sqlx::Error::Io(crate::sql::no_answer(
                limit,
                "ROLLBACK",
                "the server rolls the transaction back by itself once the connection closes",
            )))
        })
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
