//! Every port this crate implements runs its conformance suite from `cqrs_core::testing`, each
//! scenario in a schema of its own (dropped after a pass). The scenario lists are the core's:
//! its macros expand to one test per scenario, and a harness of `None` (Postgres unreachable,
//! see `support::postgres_available`) skips the scenario, or fails it under
//! `CQRS_REQUIRE_SERVICES=1`.

use async_trait::async_trait;
use cqrs_core::EventRecord;
use cqrs_core::clock::ManualClock;
use cqrs_core::ports::{EventStore, ExpectedVersion, IdempotencyStore, StoreError};
use cqrs_core::testing::Harness;
use cqrs_core::testing::event_store::{EventStoreHarness, HeldAppend};
use cqrs_core::testing::idempotency::IdempotencyHarness;
use cqrs_core::testing::projection_store::ProjectionStoreHarness;
use cqrs_postgres::{PgDatabase, PgProjectionStore, PgUnitOfWork};
use std::sync::Arc;

pub(crate) struct PgHarness {
    id: String,
    db: PgDatabase,
    clock: ManualClock,
}

#[async_trait]
impl Harness for PgHarness {
    fn test_id(&self) -> &str {
        &self.id
    }

    async fn teardown(self) {
        self.db.drop_schema().await.expect("drop the test schema");
    }
}

/// A fresh, migrated schema named after the test id, on a manual clock; `None` when Postgres is
/// unreachable (the core's macros then skip the scenario).
async fn harness(id: String) -> Option<PgHarness> {
    let db = crate::support::schema(&id).await?;
    let clock = ManualClock::new();
    let db = db.with_clock(Arc::new(clock.clone()));
    Some(PgHarness { id, db, clock })
}

/// A command between its handler and its commit: its transaction is open (with a write of
/// its own) and its events are appended in it. Positions are drawn when the events reach the
/// table, under the append lock, in the statement just before `COMMIT`: this is the moment a
/// late committer can be in, and the reader must not move past it.
struct HeldUnit(PgUnitOfWork);

#[async_trait]
impl HeldAppend for HeldUnit {
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.0.commit().await
    }
}

#[async_trait]
impl EventStoreHarness for PgHarness {
    fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(self.db.event_store())
    }

    async fn begin_held_append(
        &self,
        stream_id: &str,
        events: Vec<EventRecord>,
    ) -> Option<Box<dyn HeldAppend>> {
        let mut uow = PgUnitOfWork::new(self.db.clone());
        let conn = uow.connection().await.expect("begin the held transaction");
        // A write, so the transaction has a transaction id like a real command's.
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(conn)
            .await
            .expect("take a transaction id");
        uow.append(stream_id, ExpectedVersion::NO_STREAM, events);
        Some(Box::new(HeldUnit(uow)))
    }
}

impl IdempotencyHarness for PgHarness {
    fn store(&self) -> Arc<dyn IdempotencyStore> {
        Arc::new(self.db.idempotency_store())
    }

    fn clock(&self) -> Option<ManualClock> {
        Some(self.clock.clone())
    }
}

impl ProjectionStoreHarness for PgHarness {
    type Store = PgProjectionStore;

    fn store(&self) -> Arc<PgProjectionStore> {
        Arc::new(self.db.projection_store())
    }
}

mod event_store {
    cqrs_core::event_store_conformance!(super::harness);
}

mod idempotency {
    cqrs_core::idempotency_conformance!(super::harness);
}

mod projection_store {
    cqrs_core::projection_store_conformance!(super::harness);
}
