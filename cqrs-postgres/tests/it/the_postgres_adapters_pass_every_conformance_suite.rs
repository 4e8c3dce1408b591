//! Every port this crate implements runs its conformance suite from `cqrs_core::testing`, each
//! scenario in a schema of its own (dropped after a pass). The scenario lists are the core's:
//! its macros expand to one test per scenario, and a harness of `None` (Postgres unreachable,
//! see `support::postgres_available`) skips the scenario, or fails it under
//! `CQRS_REQUIRE_SERVICES=1`.

use async_trait::async_trait;
use cqrs_core::EventRecord;
use cqrs_core::clock::ManualClock;
use cqrs_core::ports::{EventStore, ExpectedVersion, IdempotencyStore, SnapshotStore, StoreError};
use cqrs_core::testing::Harness;
use cqrs_core::testing::event_store::{EventStoreHarness, HeldAppend};
use cqrs_core::testing::idempotency::IdempotencyHarness;
use cqrs_core::testing::projection_store::ProjectionStoreHarness;
use cqrs_core::testing::snapshot_store::SnapshotStoreHarness;
use cqrs_postgres::{PgDatabase, PgProjectionStore};
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
    // The scenarios hold a key for as long as they need: no claim gives up waiting on a slow
    // machine (the bound is tested on its own).
    let db = db
        .with_clock(Arc::new(clock.clone()))
        .with_claim_wait(std::time::Duration::from_secs(60));
    Some(PgHarness { id, db, clock })
}

/// A writer between its append and its commit: its transaction is open and its events are
/// in the table, their positions drawn under the append lock, which it holds until it commits.
/// This is the moment a late committer can be in, and the reader must not move past it.
struct HeldTx {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// The backend serving `tx`, to see who waits for it.
    pid: i32,
    /// Another connection, to ask `pg_blocking_pids` while `tx` is held.
    pool: sqlx::PgPool,
}

#[async_trait]
impl HeldAppend for HeldTx {
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(|e| StoreError::Backend {
            backend: "postgres",
            source: e.into(),
        })
    }

    async fn blocks_another_writer(&mut self) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid)))",
        )
        .bind(self.pid)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::Backend {
            backend: "postgres",
            source: e.into(),
        })
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
        let mut tx = self
            .db
            .pool()
            .begin()
            .await
            .expect("begin the held transaction");
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .expect("the held backend's pid");
        let appended = self
            .db
            .event_store()
            .append_in(&mut tx, stream_id, ExpectedVersion::NO_STREAM, events)
            .await
            .expect("the held append");
        assert!(
            appended.iter().all(|r| r.position.is_some()),
            "the held events are in the table, with positions: {appended:?}"
        );
        Some(Box::new(HeldTx {
            tx,
            pid,
            pool: self.db.pool().clone(),
        }))
    }
}

impl SnapshotStoreHarness for PgHarness {
    fn store(&self) -> Arc<dyn SnapshotStore> {
        Arc::new(self.db.snapshot_store())
    }
}

#[async_trait]
impl IdempotencyHarness for PgHarness {
    fn store(&self) -> Arc<dyn IdempotencyStore> {
        Arc::new(self.db.idempotency_store())
    }

    fn store_with_claim_wait(&self, wait: std::time::Duration) -> Arc<dyn IdempotencyStore> {
        Arc::new(self.db.clone().with_claim_wait(wait).idempotency_store())
    }

    fn clock(&self) -> Option<ManualClock> {
        Some(self.clock.clone())
    }

    /// How many of this test's sessions (they carry its id as their application name) wait on
    /// a lock another session holds: a duplicate claim waits for the key's lock, and the
    /// scenarios that ask hold one key at a time.
    async fn waiting_claims(&self, _scope: &str, _key: &str) -> Option<usize> {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE cardinality(pg_blocking_pids(pid)) > 0 AND application_name = $1",
        )
        .bind(format!("cqrs-test {}", self.id))
        .fetch_one(self.db.pool())
        .await
        .expect("count the waiting sessions");
        Some(waiting as usize)
    }
}

#[async_trait]
impl ProjectionStoreHarness for PgHarness {
    type Store = PgProjectionStore;

    fn store(&self) -> Arc<PgProjectionStore> {
        Arc::new(self.db.projection_store())
    }

    /// Whether one of this test's sessions (they carry its id as their application name, and
    /// only the scenario's units take locks) waits on a lock another session holds: a unit
    /// waiting in `begin` for the consumer's advisory lock.
    async fn a_unit_waits(&self, _consumer: &str) -> Option<bool> {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
             WHERE cardinality(pg_blocking_pids(pid)) > 0 AND application_name = $1)",
        )
        .bind(format!("cqrs-test {}", self.id))
        .fetch_one(self.db.pool())
        .await
        .expect("ask whether a unit waits");
        Some(waiting)
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

mod snapshot_store {
    cqrs_core::snapshot_store_conformance!(super::harness);
}
