//! Postgres errors as the core's `StoreError`, for plugins that run their own SQL.

use cqrs_core::ports::StoreError;
use cqrs_postgres::sqlx;

/// A sqlx error as the core's `StoreError`, classified as `cqrs-postgres` classifies its own:
/// a lost connection, an exhausted pool, a server shutting down, a serialization failure or a
/// deadlock are `Unavailable` (503, retryable); `statement_timeout` and `lock_timeout` are
/// `Timeout`; a row that does not decode is `Codec`; anything else `Backend`.
///
/// (`cqrs-postgres` keeps its own classification private; this mirrors it.)
pub fn store_error(error: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    const BACKEND: &str = "postgres";
    let unavailable = |error: sqlx::Error| StoreError::Unavailable {
        backend: BACKEND,
        source: Box::new(error),
    };
    match error {
        E::PoolTimedOut
        | E::PoolClosed
        | E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::WorkerCrashed
        | E::BeginFailed => unavailable(error),
        E::Database(ref db) => match db.code().as_deref() {
            Some("57014" | "55P03") => StoreError::Timeout {
                backend: BACKEND,
                source: Box::new(error),
            },
            Some(code) if retryable_sqlstate(code) => unavailable(error),
            _ => StoreError::Backend {
                backend: BACKEND,
                source: Box::new(error),
            },
        },
        E::ColumnDecode { .. } | E::Decode(_) | E::Encode(_) => StoreError::Codec(Box::new(error)),
        other => StoreError::Backend {
            backend: BACKEND,
            source: Box::new(other),
        },
    }
}

fn retryable_sqlstate(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" // shutdown, cannot connect now
                | "40001" | "40P01" // serialization failure, deadlock
                | "25006" // read-only transaction
        )
}
