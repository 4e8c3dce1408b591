//! Postgres adapters for `cqrs-core`: an event store with a global order in commit order
//! (a reader never skips an event that commits late; positions may have holes, left by
//! appends that rolled back),
//! transactional command execution with an outbox, an outbox relay, idempotency keys held by
//! the command's transaction, and inbox and checkpoints for projections.
//!
//! ```no_run
//! use cqrs_core::memory::InMemoryTransport;
//! use cqrs_core::runtime::Runtime;
//! use cqrs_core::{async_trait, CommandBus, CommandContext, CommandHandler, HandlerError};
//! use cqrs_postgres::{PgOptions, PgOutboxRelay, PgUnitOfWork};
//! # use cqrs_core::doc::{OpenTicket, TicketOpened};
//! use std::sync::Arc;
//!
//! struct OpenTicketHandler;
//!
//! #[async_trait]
//! impl CommandHandler<OpenTicket> for OpenTicketHandler {
//!     async fn handle(&self, cmd: OpenTicket, ctx: &mut CommandContext) -> Result<String, HandlerError> {
//!         // The command's transaction: the handler's writes, its events and the outbox
//!         // commit together, or not at all. The application's table (which its own
//!         // migration creates) is named with its schema (here `cqrs`, beside this crate's
//!         // tables): nothing sets `search_path`. sqlx as re-exported here, so the versions
//!         // match.
//!         let uow = PgUnitOfWork::from_context(ctx)?;
//!         cqrs_postgres::sqlx::query("INSERT INTO cqrs.tickets (id, title) VALUES ('t1', $1)")
//!             .bind(&cmd.title)
//!             .execute(uow.connection().await?)
//!             .await
//!             .map_err(|e| HandlerError::from(cqrs_postgres::store_error(e)))?;
//!         ctx.record_keyed("t1", TicketOpened { ticket_id: "t1".into() });
//!         Ok("t1".into())
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // DATABASE_URL, schema `cqrs`, a pool sized for a small machine.
//! let db = PgOptions::from_env().connect().await?;
//! db.migrate().await?;
//!
//! let bus = CommandBus::builder()
//!     .layer(db.command_layer())
//!     .handler(OpenTicketHandler)
//!     .build()?;
//!
//! // Ships committed events to a transport (Redis Streams in production).
//! let transport = Arc::new(InMemoryTransport::new());
//! let runtime = Runtime::builder()
//!     .worker(PgOutboxRelay::new(db.clone(), transport))
//!     .check("postgres", Arc::new(db.clone()), true)
//!     .start();
//!
//! bus.dispatch(OpenTicket { title: "Printer on fire".into() }).await?;
//!
//! // Keep `runtime` while the server runs (dropped, it stops its workers at once); at the end:
//! runtime.shutdown(std::time::Duration::from_secs(10)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What is here
//!
//! | type | port or role |
//! |------|--------------|
//! | [`PgOptions`], [`PgDatabase`] | a URL, a schema (default `cqrs`), pool bounds; [`PgDatabase::migrate`] |
//! | [`PgEventStore`], [`PgSnapshotStore`] | [`EventStore`](cqrs_core::ports::EventStore), [`SnapshotStore`](cqrs_core::ports::SnapshotStore) |
//! | [`PgCommandLayer`], [`PgUnitOfWork`] | one transaction per command, events appended to the outbox in it |
//! | [`PgCommandExecutor`] | idempotent commands whose response commits with their effects |
//! | [`PgOutboxRelay`] | a [`Worker`](cqrs_core::runtime::Worker) shipping events to an [`EventTransport`](cqrs_core::ports::EventTransport) |
//! | [`PgIdempotencyStore`] | [`IdempotencyStore`](cqrs_core::ports::IdempotencyStore) |
//! | [`PgProjectionStore`] | [`ProjectionStore`](cqrs_core::ports::ProjectionStore): inbox and checkpoints in the consumer's transaction |
//!
//! Every table of this crate lives in one Postgres schema; tests use one schema each. The
//! application's own tables may sit beside them, created by the application (`migrate`
//! creates only this crate's) and named with the schema, since nothing sets `search_path`. `docs/postgres.md` describes each table, the guarantees, the global-order
//! mechanism, the round trips per command, and how several instances share one database.
//!
//! Errors are the core's [`StoreError`](cqrs_core::ports::StoreError): a version conflict is
//! `Conflict` with the actual version, a lost connection or an exhausted pool is
//! `Unavailable` with its cause, a `statement_timeout` is `Timeout`.
//!
//! Only runtime queries are used: building never needs a database.
//!
//! # Feature flags
//!
//! * `tls` (off by default): TLS connections (`sslmode=require`, `verify-ca`, `verify-full`)
//!   with rustls and ring, trusting the system's root certificates and the URL's `sslrootcert`.
//!   Without it a URL whose `sslmode` insists on TLS is refused as invalid options.

#![deny(missing_docs)]

mod command;
mod database;
mod error;
mod event_store;
mod idempotency;
mod lock;
mod metric_catalog;
mod options;
mod projection;
mod relay;
mod row;
mod snapshot;
mod sql;
mod transaction;
mod unit_of_work;

pub use command::{IdempotencyKey, Idempotent, PgCommand, PgCommandExecutor, PgCommandLayer};
/// The core's, here too: a claim that waited its whole claim wait has it among its sources.
pub use cqrs_core::ports::ClaimWaitElapsed;
pub use database::PgDatabase;
pub use error::{PgError, SqlxError, store_error};
pub use event_store::PgEventStore;
pub use idempotency::PgIdempotencyStore;
pub use metric_catalog::{METRICS, describe_metrics};
pub use options::{DEFAULT_URL, PgOptions};
pub use projection::{PgProjectionStore, PgProjectionUnit};
pub use relay::{Backlog, PgOutboxRelay, RelayBatch, RelayError};
pub use snapshot::PgSnapshotStore;
pub use transaction::{PgPooledConnection, PgTransaction};
pub use unit_of_work::PgUnitOfWork;

/// sqlx, re-exported so applications write their own queries against the same version.
pub use sqlx;

/// What the in-crate tests (those that need private access) share.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::{PgDatabase, PgOptions};
    use cqrs_core::{EventRecord, Metadata, RecordMetadata};
    use std::time::Duration;

    /// A database handle on a schema of the test's own, migrated; `None` (the test skips) when
    /// Postgres is unreachable and services are not required.
    pub(crate) async fn migrated_schema(name: &str) -> Option<PgDatabase> {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let id = cqrs_core::testing::test_id(name);
        let connect = PgOptions::new(url.clone())
            .schema(&id)
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect();
        let db = tokio::time::timeout(Duration::from_secs(10), connect).await;
        let reachable = matches!(db, Ok(Ok(_)));
        if !cqrs_core::testing::require_services("postgres", &url, reachable) {
            return None;
        }
        let Ok(Ok(db)) = db else { return None };
        db.migrate().await.expect("migrate the test schema");
        Some(db)
    }

    /// An event record with an empty payload.
    pub(crate) fn record() -> EventRecord {
        let metadata = Metadata::new();
        EventRecord::new(
            metadata.message_id,
            "Noted",
            1,
            serde_json::json!({}),
            RecordMetadata::from_metadata(&metadata),
        )
    }
}
