//! Errors: how sqlx's errors map to the core's kinds, and what set-up reports.

use cqrs_core::ErrorKind;
use cqrs_core::ports::StoreError;

pub(crate) const BACKEND: &str = "postgres";

/// What connecting and migrating report. Store operations report the core's
/// [`StoreError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The options are invalid; every problem is listed. Fix the configuration.
    #[error("invalid postgres options: {}", .0.join("; "))]
    InvalidOptions(Vec<String>),
    /// A migration failed, or the schema was migrated by a newer or different version of this
    /// crate. Usually a deployment problem: check the migration table in the schema
    /// (`{schema}._sqlx_migrations`). A version mismatch, or a migration missing or newer than
    /// this version knows, means another version of this crate migrated the schema: run that
    /// version (or a newer one) everywhere, or use a new schema. A dirty migration (a row with
    /// `success = false`) failed half-way: fix its cause, delete its row and migrate again. The
    /// message says which applies.
    #[error(
        "could not migrate schema `{schema}`: {}; {}",
        migrate_text(source),
        migrate_advice(schema, source)
    )]
    Migrate {
        /// The schema.
        schema: String,
        /// sqlx's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// The database failed; its kind says whether to retry (an unreachable server is
    /// [`ErrorKind::Unavailable`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A failed migration as sqlx says it, but a server's error told as [`SqlxError`] tells it
/// (without the ` at line N` of the server's C source).
fn migrate_text(error: &sqlx::migrate::MigrateError) -> String {
    use sqlx::migrate::MigrateError as M;
    match error {
        M::Execute(e) => format!("while executing migrations: {}", Described(e)),
        M::ExecuteMigration(e, version) => {
            format!("while executing migration {version}: {}", Described(e))
        }
        other => other.to_string(),
    }
}

/// What to do about a failed migration, by its cause.
fn migrate_advice(schema: &str, error: &sqlx::migrate::MigrateError) -> String {
    use sqlx::migrate::MigrateError as M;
    let table = format!("`{schema}._sqlx_migrations`");
    match error {
        M::Execute(e) | M::ExecuteMigration(e, _)
            if matches!(classify(e), Class::Unavailable | Class::Timeout) =>
        {
            "the server could not be reached or did not answer: migrate again once it is back"
                .to_owned()
        }
        // 42P07, duplicate_table: a table of one of this crate's names that it did not make.
        M::Execute(e) | M::ExecuteMigration(e, _) if sqlstate(e).as_deref() == Some("42P07") => {
            format!(
                "the schema `{schema}` already holds a table of that name that this migration \
                 did not make: give cqrs-postgres a schema of its own (`PgOptions::schema`), \
                 apart from your tables"
            )
        }
        M::VersionMismatch(version) => format!(
            "a deployment problem: migration {version} recorded in {table} differs from this \
             version's, so another version of cqrs-postgres migrated this schema: run the \
             version that migrated it everywhere the schema is used, or use a new schema \
             (do not edit the recorded checksum)"
        ),
        M::Dirty(version) => format!(
            "a deployment problem: migration {version} failed half-way: fix its cause, delete \
             its row (`success = false`) from {table}, and migrate again"
        ),
        M::VersionMissing(_)
        | M::VersionNotPresent(_)
        | M::VersionTooOld(..)
        | M::VersionTooNew(..) => format!(
            "a deployment problem: the schema was migrated by a newer or different version of \
             cqrs-postgres (check {table}): run that version (or a newer one), or use a new \
             schema"
        ),
        _ => format!(
            "usually a deployment problem: check {table} (a version mismatch means another \
             version of cqrs-postgres migrated this schema: run that version, or use a new \
             schema; a row with `success = false` is a migration that failed half-way: fix \
             its cause, delete the row, and migrate again)"
        ),
    }
}

impl PgError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PgError::InvalidOptions(_) => ErrorKind::Invalid,
            PgError::Migrate { source, .. } => match source {
                sqlx::migrate::MigrateError::Execute(e)
                | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => match classify(e) {
                    Class::Unavailable => ErrorKind::Unavailable,
                    Class::Timeout => ErrorKind::Timeout,
                    // A migration is our own SQL: a value it cannot store is a bug too.
                    Class::Codec | Class::Rejected | Class::Backend => ErrorKind::Internal,
                },
                _ => ErrorKind::Internal,
            },
            PgError::Store(e) => e.kind(),
        }
    }
}

/// Maps a sqlx error to the core's [`StoreError`], as this crate does for its own queries:
/// a lost connection, an exhausted pool, a server shutting down, a serialization failure or a
/// deadlock are `Unavailable` (retryable); `statement_timeout` and `lock_timeout` are
/// `Timeout`; a row that does not decode is `Codec`; a value the server cannot hold (U+0000
/// in text or jsonb, a key too large for its index) is `Rejected`; anything else `Backend`. For applications
/// that run their own SQL in a [`PgUnitOfWork`](crate::PgUnitOfWork).
///
/// Unique violations are not special here: callers that expect one (a taken name, a version
/// conflict) check for SQLSTATE 23505 first. For errors of statements run on a pool,
/// [`PgDatabase::store_error`](crate::PgDatabase::store_error) says more about a pool timeout.
///
/// ```
/// use cqrs_core::ErrorKind;
///
/// let err = cqrs_postgres::store_error(sqlx::Error::PoolTimedOut);
/// assert_eq!(err.kind(), ErrorKind::Unavailable);
/// ```
pub fn store_error(error: sqlx::Error) -> StoreError {
    let class = classify(&error);
    let source: cqrs_core::BoxError = match sqlstate(&error).as_deref() {
        Some("25P02") => Box::new(Explained {
            explanation: ABORTED,
            source: SqlxError(error),
        }),
        Some("42P01" | "3F000") => Box::new(Explained {
            explanation: NOT_MIGRATED,
            source: SqlxError(error),
        }),
        _ => Box::new(SqlxError(error)),
    };
    store_error_from_class(class, source)
}

/// sqlx's error, the source of the [`StoreError`]s and [`PgError`]s this crate returns, with a
/// Postgres server's error told as an operator reads it: its message, its SQLSTATE, where in the
/// statement it points and the server's hint, without the ` at line N` sqlx appends (the line
/// of the server's C source that raised it, which reads as a line of the caller's SQL), and
/// once (sqlx's error and its source each print the server's message). The detail, which may
/// quote a row's values, is left out. Any other error reads as sqlx says, its causes kept.
///
/// [`get_ref`](Self::get_ref) gives sqlx's error itself, for its fields (the constraint, the
/// table, the detail):
///
/// ```
/// use cqrs_postgres::SqlxError;
///
/// let error = cqrs_postgres::store_error(sqlx::Error::PoolTimedOut);
/// let source = std::error::Error::source(&error).and_then(|e| e.downcast_ref::<SqlxError>());
/// assert!(matches!(source.map(SqlxError::get_ref), Some(sqlx::Error::PoolTimedOut)));
/// ```
#[derive(Debug)]
pub struct SqlxError(pub(crate) sqlx::Error);

impl SqlxError {
    /// sqlx's error.
    pub fn get_ref(&self) -> &sqlx::Error {
        &self.0
    }

    /// sqlx's error, taken out.
    pub fn into_inner(self) -> sqlx::Error {
        self.0
    }
}

/// SQLSTATE `read_only_sql_transaction`: a write on a server that takes none.
pub(crate) const READ_ONLY_TRANSACTION: &str = "25006";

/// Whether `error`, or one of its sources, is a write the server refused because it takes
/// none (SQLSTATE 25006), however it was wrapped: by [`store_error`], or by a handler
/// (`HandlerError::internal(sqlx_error)`).
pub(crate) fn refused_as_read_only(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        let sqlx_error = error
            .downcast_ref::<SqlxError>()
            .map(SqlxError::get_ref)
            .or_else(|| error.downcast_ref::<sqlx::Error>());
        if sqlx_error.is_some_and(|e| sqlstate(e).as_deref() == Some(READ_ONLY_TRANSACTION)) {
            return true;
        }
        next = error.source();
    }
    false
}

impl From<sqlx::Error> for SqlxError {
    fn from(error: sqlx::Error) -> Self {
        Self(error)
    }
}

impl std::fmt::Display for SqlxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Described(&self.0).fmt(f)
    }
}

impl std::error::Error for SqlxError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0 {
            // Told whole above.
            sqlx::Error::Database(_) => None,
            other => other.source(),
        }
    }
}

/// `error` as [`SqlxError`] tells it, borrowed: for messages that quote it.
pub(crate) struct Described<'a>(pub(crate) &'a sqlx::Error);

impl std::fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_database_error() {
            Some(server) => write!(f, "error returned from database: {}", ServerSaid(server)),
            None => self.0.fmt(f),
        }
    }
}

/// A server's error: its message and SQLSTATE, where in the statement it points, its hint.
pub(crate) struct ServerSaid<'a>(pub(crate) &'a dyn sqlx::error::DatabaseError);

impl std::fmt::Display for ServerSaid<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(pg) = self.0.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() else {
            return f.write_str(self.0.message());
        };
        write!(f, "{} (SQLSTATE {}", pg.message(), pg.code())?;
        if let Some(sqlx::postgres::PgErrorPosition::Original(at)) = pg.position() {
            write!(f, ", at character {at} of the statement")?;
        }
        f.write_str(")")?;
        if let Some(hint) = pg.hint() {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// The SQLSTATE of a database error.
pub(crate) fn sqlstate(error: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    error.as_database_error().and_then(|db| db.code())
}

/// Postgres's "current transaction is aborted, commands ignored until end of transaction
/// block" names neither the statement that failed nor what to do.
const ABORTED: &str = "a statement earlier in this unit of work failed and its error was not \
    returned, so the transaction is aborted and runs nothing more: return the error of a \
    failed statement (a projection's `apply`, a handler) instead of going on, or run the \
    statement in a savepoint";

/// A table or schema that does not exist: most often a schema this crate's tables were never
/// made in.
const NOT_MIGRATED: &str = "if it is one of cqrs-postgres's tables (events, snapshots, \
    relay_checkpoints, idempotency, inbox, checkpoints), run `PgDatabase::migrate()` on this schema at start-up; \
    if it is one of yours, create it (in your own migrations)";

/// A database error with what it means and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{source}; {explanation}")]
struct Explained {
    explanation: &'static str,
    #[source]
    source: SqlxError,
}

/// [`store_error`] for an operation on `pool`: a pool timeout (sqlx says only "pool timed
/// out while waiting for an open connection") names where the pool connects (`target`), what
/// the pool looked like, and what to do.
pub(crate) fn pool_error(error: sqlx::Error, pool: &sqlx::PgPool, target: &str) -> StoreError {
    if !matches!(error, sqlx::Error::PoolTimedOut) {
        return store_error(error);
    }
    let options = pool.options();
    let (max, size, idle) = (options.get_max_connections(), pool.size(), pool.num_idle());
    // sqlx counts connections being opened in `size`: a full pool may be one whose every
    // slot waits on a server that does not answer, so that case gives both pieces of advice.
    let (state, advice) = if size >= max && idle == 0 {
        (
            format!("all {max} of the pool's connections were in use or being opened"),
            "if the server answers, the load needs more connections than the pool has, or \
             some are held for long (long transactions: see pg_stat_activity): raise the \
             pool's max_connections (within the server's) or its acquire_timeout, or shorten \
             what holds them; if it does not, check that it runs there and is reachable",
        )
    } else {
        (
            format!("{size} of the pool's {max} connections were open and none came free"),
            "no new connection could be opened in time: check that the server runs there and \
             is reachable, and that the URL's host, port, database and credentials are right",
        )
    };
    StoreError::Unavailable {
        backend: BACKEND,
        source: Box::new(NoConnection {
            target: target.to_owned(),
            waited: options.get_acquire_timeout(),
            state,
            advice,
            source: error,
        }),
    }
}

/// The pool gave no connection within its `acquire_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("no connection to {target} within {waited:?} ({state}): {advice}")]
struct NoConnection {
    target: String,
    waited: std::time::Duration,
    state: String,
    advice: &'static str,
    #[source]
    source: sqlx::Error,
}

/// A failed `COMMIT`, or a failed statement that was its own transaction. When the
/// connection failed (reset, closed, a broken stream, or a connection exception a pooler
/// answers with, class 08: PgBouncer's `server conn crashed?` is 08P01) or the session was
/// ended under it (an administrator's or a crash shutdown, 57P01 / 57P02: a backend ended
/// while waiting for a synchronous standby has already committed locally), the server may
/// have committed: the
/// outcome is unknown, so it is `Timeout` ("may or may not have taken effect"), never
/// `Unavailable` ("retry"), which would invite a retry that runs the command twice. Other
/// errors the server answered with (a serialization failure, a deadlock, a full disk) mean
/// nothing committed, and are classified like [`store_error`].
pub(crate) fn commit_error(error: sqlx::Error) -> StoreError {
    let error = unmarked(error);
    if outcome_unknown(&error) {
        StoreError::Timeout {
            backend: BACKEND,
            source: Box::new(CommitUnknown(SqlxError(error))),
        }
    } else {
        store_error(error)
    }
}

/// Whether a failed `COMMIT` (or a statement that was its own transaction) may have
/// committed: see [`commit_error`].
fn outcome_unknown(error: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match error {
        E::Io(_) | E::Tls(_) | E::Protocol(_) | E::WorkerCrashed => true,
        E::Database(_) => sqlstate(error)
            .is_some_and(|code| code.starts_with("08") || matches!(&*code, "57P01" | "57P02")),
        _ => false,
    }
}

/// A [`PgTransaction::commit`](crate::PgTransaction::commit) error: one whose outcome is unknown
/// is handed on as an I/O error carrying [`CommitOutcomeUnknown`], which [`store_error`] (and
/// so [`PgDatabase::store_error`](crate::PgDatabase::store_error)) tells apart as `Timeout`;
/// others as they are.
pub(crate) fn marked_commit_error(error: sqlx::Error) -> sqlx::Error {
    if !outcome_unknown(&error) {
        return error;
    }
    let kind = match &error {
        sqlx::Error::Io(io) => io.kind(),
        _ => std::io::ErrorKind::Other,
    };
    sqlx::Error::Io(std::io::Error::new(
        kind,
        CommitOutcomeUnknown(SqlxError(error)),
    ))
}

/// A `COMMIT` the server may or may not have carried out: its answer was lost or never came.
#[derive(Debug, thiserror::Error)]
#[error("the commit's outcome is unknown: {0}")]
struct CommitOutcomeUnknown(#[source] SqlxError);

/// `error` without the mark of [`marked_commit_error`]: the commit's own error.
fn unmarked(error: sqlx::Error) -> sqlx::Error {
    match error {
        sqlx::Error::Io(io) if is_marked_commit(&io) => {
            let kind = io.kind();
            match io
                .into_inner()
                .map(|inner| inner.downcast::<CommitOutcomeUnknown>())
            {
                Some(Ok(marked)) => marked.0.0,
                Some(Err(other)) => sqlx::Error::Io(std::io::Error::new(kind, other)),
                None => sqlx::Error::Io(kind.into()),
            }
        }
        other => other,
    }
}

/// Whether `error` is a commit's unknown outcome marked by [`marked_commit_error`].
fn is_marked_commit(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<CommitOutcomeUnknown>())
}

/// The error of a commit whose task the runtime's shutdown cancelled: it may have
/// reached the server, so the outcome is unknown (`Timeout`), never "retry".
pub(crate) fn commit_cancelled(error: &tokio::task::JoinError) -> StoreError {
    StoreError::Timeout {
        backend: BACKEND,
        source: format!("the commit was cancelled ({error}); it may have taken effect").into(),
    }
}

/// [`commit_error`] for an error already made a [`StoreError`] (by code shared with other
/// callers): an `Unavailable` whose cause is a lost connection becomes the unknown outcome.
pub(crate) fn commit_store_error(error: StoreError) -> StoreError {
    match error {
        StoreError::Unavailable { backend, source } => match source.downcast::<SqlxError>() {
            Ok(sqlx_error) => commit_error(sqlx_error.0),
            Err(source) => StoreError::Unavailable { backend, source },
        },
        other => other,
    }
}

/// A `COMMIT` whose answer was lost.
#[derive(Debug, thiserror::Error)]
#[error(
    "the connection failed while committing, so whether it committed is unknown (retry with \
     the same idempotency key, which replays if it did, or check before retrying): {0}"
)]
struct CommitUnknown(#[source] SqlxError);

/// A failed connect, classified like [`store_error`], whose message says where it tried to
/// connect (`target`: host, port and database, never the password).
pub(crate) fn connect_error(error: sqlx::Error, target: String) -> StoreError {
    let class = classify(&error);
    let refused_startup_parameter = refuses_startup_parameter(&error);
    let advice = match error {
        _ if refused_startup_parameter => {
            "a connection pooler in front of the server refuses the startup parameters this \
             client sends (the server settings of `PgOptions::session_settings`, and a \
             `statement_timeout`): turn them off with `PgOptions::session_settings(false)` \
             and set them on the role or database instead (not by listing `options` in \
             PgBouncer's `ignore_startup_parameters`, which drops them unannounced, timeouts \
             included); retrying does not help"
        }
        // The server answered, and refused: no role, a wrong password, no such database.
        sqlx::Error::Database(_)
            if matches!(
                sqlstate(&error).as_deref(),
                Some("28000" | "28P01" | "3D000")
            ) =>
        {
            "the server answered and refused the connection: check the URL's user, password \
             and database (and the server's pg_hba.conf); retrying does not help"
        }
        _ if is_tls_failure(&error) => {
            "check that the server accepts TLS, that a CA this client trusts signed its \
             certificate (one of the system's root certificates, or the one in the URL's \
             sslrootcert), with sslmode=verify-full that the certificate names the URL's host, \
             and, if the server asks for a client certificate, that the URL's sslcert and \
             sslkey give one it accepts"
        }
        _ => {
            "check that the server runs there and that the URL's host, port, database and \
             credentials are right"
        }
    };
    store_error_from_class(
        class,
        Box::new(ConnectFailed {
            target,
            advice,
            source: SqlxError(error),
        }),
    )
}

/// Whether `error` is a failed TLS handshake: sqlx's own TLS error, or what rustls reported
/// during the handshake (a refused certificate), which sqlx passes on as an I/O error.
fn is_tls_failure(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Tls(_) => true,
        #[cfg(feature = "tls")]
        sqlx::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>()),
        _ => false,
    }
}

/// A connect that failed, and where it went.
#[derive(Debug, thiserror::Error)]
#[error("could not connect to {target}: {source}; {advice}")]
struct ConnectFailed {
    target: String,
    advice: &'static str,
    #[source]
    source: SqlxError,
}

fn store_error_from_class(class: Class, source: cqrs_core::BoxError) -> StoreError {
    match class {
        Class::Unavailable => StoreError::Unavailable {
            backend: BACKEND,
            source,
        },
        Class::Timeout => StoreError::Timeout {
            backend: BACKEND,
            source,
        },
        Class::Codec => StoreError::Codec(source),
        Class::Rejected => StoreError::Rejected {
            backend: BACKEND,
            source,
        },
        Class::Backend => StoreError::Backend {
            backend: BACKEND,
            source,
        },
    }
}

/// Whether a connection pooler refused the startup `options` parameter (PgBouncer, unless told
/// to ignore it): a protocol violation, of the connection-exception class, that no retry
/// changes, whether on the first connect or on one a pool opens later.
fn refuses_startup_parameter(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => {
            e.code().as_deref() == Some("08P01") && e.message().contains("startup parameter")
        }
        _ => false,
    }
}

fn classify(error: &sqlx::Error) -> Class {
    use sqlx::Error as E;
    if refuses_startup_parameter(error) {
        return Class::Backend;
    }
    match error {
        // A commit that may have taken effect: never "retry".
        E::Io(e) if is_marked_commit(e) => Class::Timeout,
        E::PoolTimedOut
        | E::PoolClosed
        | E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::WorkerCrashed
        | E::BeginFailed => Class::Unavailable,
        E::Database(_) => match sqlstate(error).as_deref() {
            // statement_timeout, lock_timeout, an administrator's cancel.
            Some("57014") | Some("55P03") => Class::Timeout,
            Some(code) if retryable_sqlstate(code) => Class::Unavailable,
            // The server's queue of notifications is full (a listener somewhere stopped
            // reading; every append notifies): program_limit_exceeded too, but no fault of the
            // value, and nothing committed; it clears once that listener reads or goes.
            Some("54000") if is_notify_queue_full(error) => Class::Unavailable,
            // Text the server cannot hold: U+0000 in `text` (22021) or `jsonb` (22P05); a
            // value too large for an index (54000, program_limit_exceeded: a key of 20 KB).
            Some("22021") | Some("22P05") | Some("54000") => Class::Rejected,
            _ => Class::Backend,
        },
        E::ColumnDecode { .. } | E::Decode(_) | E::Encode(_) => Class::Codec,
        _ => Class::Backend,
    }
}

/// Postgres's "too many notifications in the NOTIFY queue", at a commit that notifies: raised
/// in `async.c` (its only 54000), which a server whose messages are in another language still
/// names; the English message stands in when the error does not say where it was raised.
fn is_notify_queue_full(error: &sqlx::Error) -> bool {
    let Some(db) = error.as_database_error() else {
        return false;
    };
    match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        Some(pg) if pg.file().is_some() => pg.file() == Some("async.c"),
        _ => db.message().contains("NOTIFY queue"),
    }
}

enum Class {
    Unavailable,
    Timeout,
    Codec,
    Rejected,
    Backend,
}

/// SQLSTATEs after which the same operation may succeed later: lost or refused connections,
/// a server shutting down or starting, a session the server ended for sitting idle, too many
/// connections, serialization failures and deadlocks, out of resources.
fn retryable_sqlstate(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, disk full)
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" // admin / crash shutdown, cannot connect now
                | "25P03" | "57P05" // the server ended an idle (in-transaction) session
                | "25P04" // the server ended a transaction past `transaction_timeout` (PG 17)
                | "40001" | "40P01" // serialization failure, deadlock
                | "25006" // read-only transaction (a failover promoted nothing yet)
        )
}

/// Whether the error is a unique violation of `constraint` (SQLSTATE 23505).
pub(crate) fn is_unique_violation(error: &sqlx::Error, constraint: &str) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.is_unique_violation() && e.constraint().is_some_and(|c| c == constraint))
}

/// A JSON column that does not hold what this crate wrote.
pub(crate) fn codec(error: impl Into<cqrs_core::BoxError>) -> StoreError {
    StoreError::Codec(error.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions the server ends under a transaction (idle, idle in it, or past Postgres 17's
    /// `transaction_timeout`, 25P04, which was an internal error) are retryable; a refused
    /// statement is not.
    #[test]
    fn sessions_the_server_ended_are_retryable() {
        for code in ["25P03", "25P04", "57P05", "57P01", "08006", "40001"] {
            assert!(retryable_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "25P02", "22012"] {
            assert!(!retryable_sqlstate(code), "{code}");
        }
    }

    /// A database error with this SQLSTATE and message, as the server (or a pooler) answers.
    #[derive(Debug)]
    struct Said(&'static str, &'static str);

    /// A database error with this SQLSTATE.
    fn coded(code: &'static str) -> Said {
        Said(code, "answered with an error")
    }

    impl std::fmt::Display for Said {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.1)
        }
    }

    impl std::error::Error for Said {}

    impl sqlx::error::DatabaseError for Said {
        fn message(&self) -> &str {
            self.1
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    /// A full NOTIFY queue (54000, program_limit_exceeded, at the commit of an append, which
    /// notifies) is retryable: nothing committed, and it clears once the listener that
    /// stopped reading reads or goes. A value too large for an index (54000 too) is refused.
    #[test]
    fn a_full_notify_queue_is_retryable_and_an_oversize_key_is_refused() {
        let error =
            |code, message| store_error(sqlx::Error::Database(Box::new(Said(code, message))));
        let full = error("54000", "too many notifications in the NOTIFY queue");
        assert_eq!(full.kind(), ErrorKind::Unavailable, "{full}");
        let oversize = error(
            "54000",
            "index row size 2712 exceeds btree version 4 maximum 2704 for index \"events_pkey\"",
        );
        assert_eq!(oversize.kind(), ErrorKind::Invalid, "{oversize}");
    }

    /// A `COMMIT` answered with a connection exception (class 08, as a pooler whose server
    /// connection died answers) or a shutdown may have committed: an unknown outcome
    /// (`Timeout`), never "retry"; a serialization failure or a deadlock committed nothing.
    #[test]
    fn a_commit_lost_with_its_connection_has_an_unknown_outcome() {
        let commit = |code| commit_error(sqlx::Error::Database(Box::new(coded(code))));
        for code in ["08P01", "08006", "08003", "57P01", "57P02"] {
            let error = commit(code);
            assert_eq!(error.kind(), ErrorKind::Timeout, "{code}: {error}");
            assert!(
                error
                    .to_string()
                    .contains("whether it committed is unknown"),
                "{code}: {error}"
            );
        }
        for code in ["40001", "40P01"] {
            assert_eq!(commit(code).kind(), ErrorKind::Unavailable, "{code}");
        }
    }

    /// `PgTransaction::commit` marks an unknown outcome so `store_error` says `Timeout`, not
    /// `Unavailable`; a commit that certainly failed keeps its kind, and `commit_error` reads
    /// the marked error as the commit's own (its message said once).
    #[test]
    fn a_marked_commit_error_maps_to_an_unknown_outcome() {
        let lost = || {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            ))
        };
        assert_eq!(store_error(lost()).kind(), ErrorKind::Unavailable);
        let marked = store_error(marked_commit_error(lost()));
        assert_eq!(marked.kind(), ErrorKind::Timeout, "{marked}");
        assert!(
            marked.to_string().contains("outcome is unknown"),
            "{marked}"
        );
        for code in ["08006", "57P01"] {
            let error = sqlx::Error::Database(Box::new(coded(code)));
            assert_eq!(
                store_error(marked_commit_error(error)).kind(),
                ErrorKind::Timeout
            );
        }
        for code in ["40001", "23505"] {
            let error = marked_commit_error(sqlx::Error::Database(Box::new(coded(code))));
            assert!(
                matches!(error, sqlx::Error::Database(_)),
                "{code}: left as it was"
            );
        }
        let again = commit_error(marked_commit_error(lost()));
        assert_eq!(again.kind(), ErrorKind::Timeout);
        let said = again.to_string();
        assert!(
            !said.contains("outcome is unknown"),
            "unmarked first: {said}"
        );
        assert!(said.contains("connection reset by peer"), "{said}");
    }

    /// A failed migration says what to do, by its cause (it only quoted sqlx's error).
    #[test]
    fn a_failed_migration_says_what_to_do() {
        use sqlx::migrate::MigrateError as M;
        let message = |source| {
            PgError::Migrate {
                schema: "app".to_owned(),
                source,
            }
            .to_string()
        };
        let mismatch = message(M::VersionMismatch(3));
        for part in [
            "could not migrate schema `app`: migration 3 was previously applied but has been \
             modified; a deployment problem",
            "`app._sqlx_migrations`",
            "another version of cqrs-postgres migrated this schema",
            "or use a new schema",
        ] {
            assert!(mismatch.contains(part), "{part:?} in {mismatch}");
        }
        let dirty = message(M::Dirty(4));
        for part in [
            "migration 4 failed half-way",
            "delete its row (`success = false`) from `app._sqlx_migrations`",
            "migrate again",
        ] {
            assert!(dirty.contains(part), "{part:?} in {dirty}");
        }
        let newer = message(M::VersionTooNew(5, 7));
        assert!(newer.contains("check `app._sqlx_migrations`"), "{newer}");
        let other = message(M::Source("no migrations".into()));
        assert!(
            other.contains("usually a deployment problem: check `app._sqlx_migrations`"),
            "{other}"
        );
        let down = PgError::Migrate {
            schema: "app".to_owned(),
            source: M::Execute(sqlx::Error::PoolTimedOut),
        };
        assert_eq!(down.kind(), ErrorKind::Unavailable);
        assert!(
            down.to_string().ends_with("migrate again once it is back"),
            "{down}"
        );
        // The same cause while one migration's script runs: retryable too, with the same
        // advice.
        let down_midway = PgError::Migrate {
            schema: "app".to_owned(),
            source: M::ExecuteMigration(sqlx::Error::PoolTimedOut, 6),
        };
        assert_eq!(down_midway.kind(), ErrorKind::Unavailable);
        assert!(
            down_midway
                .to_string()
                .ends_with("migrate again once it is back"),
            "{down_midway}"
        );
    }

    /// A failed connect says where it went, and keeps the kind and the cause.
    #[test]
    fn a_connect_error_names_its_target_and_keeps_its_kind() {
        let io = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        let error = connect_error(io, "postgres at db:5432, database `app`".to_owned());
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        let message = error.to_string();
        assert!(
            message.starts_with("postgres is unavailable: could not connect to postgres at db:5432, database `app`: "),
            "{message}"
        );
        assert!(message.contains("refused"), "{message}");
        let cause = std::error::Error::source(&error).expect("the cause");
        assert!(
            std::error::Error::source(cause).is_some(),
            "sqlx's error is kept"
        );
    }

    #[test]
    fn connection_failures_are_unavailable_and_keep_their_source() {
        let io = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        let mapped = store_error(io);
        assert_eq!(mapped.kind(), ErrorKind::Unavailable);
        assert!(std::error::Error::source(&mapped).is_some());
        assert_eq!(
            store_error(sqlx::Error::PoolTimedOut).kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(
            store_error(sqlx::Error::RowNotFound).kind(),
            ErrorKind::Internal
        );
    }
}
