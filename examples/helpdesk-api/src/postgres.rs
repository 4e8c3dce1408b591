//! Postgres errors as the core's `StoreError`, for plugins that run their own SQL.

pub use cqrs_postgres::store_error;
