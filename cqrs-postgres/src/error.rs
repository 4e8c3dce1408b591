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
    /// crate. Usually a deployment problem: check the migration table in the schema.
    #[error("could not migrate schema `{schema}`: {source}")]
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

impl PgError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PgError::InvalidOptions(_) => ErrorKind::Invalid,
            PgError::Migrate { source, .. } => match source {
                sqlx::migrate::MigrateError::Execute(e) => match classify(e) {
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
/// in text or jsonb) is `Rejected`; anything else `Backend`. For applications
/// that run their own SQL in a [`PgUnitOfWork`](crate::PgUnitOfWork).
///
/// Unique violations are not special here: callers that expect one (a taken name, a version
/// conflict) check for SQLSTATE 23505 first.
///
/// ```
/// use cqrs_core::ErrorKind;
///
/// let err = cqrs_postgres::store_error(sqlx::Error::PoolTimedOut);
/// assert_eq!(err.kind(), ErrorKind::Unavailable);
/// ```
pub fn store_error(error: sqlx::Error) -> StoreError {
    match classify(&error) {
        Class::Unavailable => StoreError::Unavailable {
            backend: BACKEND,
            source: Box::new(error),
        },
        Class::Timeout => StoreError::Timeout {
            backend: BACKEND,
            source: Box::new(error),
        },
        Class::Codec => StoreError::Codec(Box::new(error)),
        Class::Rejected => StoreError::Rejected {
            backend: BACKEND,
            source: Box::new(error),
        },
        Class::Backend => StoreError::Backend {
            backend: BACKEND,
            source: Box::new(error),
        },
    }
}

fn classify(error: &sqlx::Error) -> Class {
    use sqlx::Error as E;
    match error {
        E::PoolTimedOut
        | E::PoolClosed
        | E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::WorkerCrashed
        | E::BeginFailed => Class::Unavailable,
        E::Database(db) => match db.code().as_deref() {
            // statement_timeout, lock_timeout, an administrator's cancel.
            Some("57014") | Some("55P03") => Class::Timeout,
            Some(code) if retryable_sqlstate(code) => Class::Unavailable,
            // Text the server cannot hold: U+0000 in `text` (22021) or `jsonb` (22P05).
            Some("22021") | Some("22P05") => Class::Rejected,
            _ => Class::Backend,
        },
        E::ColumnDecode { .. } | E::Decode(_) | E::Encode(_) => Class::Codec,
        _ => Class::Backend,
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
