//! Every port this crate implements runs its conformance suite from `cqrs_core::testing`, each
//! scenario in a schema of its own (dropped after a pass).
//!
//! The scenario lists repeat those of the core's `*_conformance!` macros, because those macros
//! cannot skip a scenario when Postgres is unreachable; keep them in step with the core.

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

async fn harness(id: String) -> Option<PgHarness> {
    let db = crate::support::schema(&id).await?;
    let clock = ManualClock::new();
    let db = db.with_clock(Arc::new(clock.clone()));
    Some(PgHarness { id, db, clock })
}

/// One `#[tokio::test]` per scenario, as the core's macros expand, plus a skip when Postgres is
/// unreachable.
macro_rules! conformance {
    ($port:ident, [$($scenario:ident),+ $(,)?]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let Some(harness) = super::harness(cqrs_core::testing::test_id(stringify!($scenario))).await else {
                    return;
                };
                cqrs_core::testing::with_timeout(
                    std::time::Duration::from_secs(60),
                    cqrs_core::testing::$port::$scenario(&harness),
                )
                .await;
                Harness::teardown(harness).await;
            }
        )+
    };
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
    use super::*;

    conformance!(
        event_store,
        [
            append_then_load_returns_events_in_order_with_versions,
            a_stale_expected_version_is_a_conflict,
            a_conflicting_batch_writes_nothing,
            concurrent_appends_at_one_version_exactly_one_wins,
            expected_any_appends_at_whatever_version,
            load_after_a_version_returns_the_tail,
            read_all_returns_every_stream_in_one_global_order,
            records_keep_their_payload_and_metadata,
            a_reader_never_skips_an_event_that_commits_late,
        ]
    );
}

mod idempotency {
    use super::*;

    conformance!(
        idempotency,
        [
            a_completed_key_replays_its_response,
            a_key_reused_with_another_request_is_rejected,
            concurrent_claims_of_one_key_run_the_work_once,
            a_dropped_claim_releases_the_key,
            scopes_are_independent,
            keys_expire_after_their_ttl,
        ]
    );
}

mod projection_store {
    use super::*;

    conformance!(
        projection_store,
        [
            a_message_is_processed_once_per_consumer,
            an_uncommitted_unit_leaves_no_trace,
            a_checkpoint_reads_back_what_was_committed,
            units_of_one_consumer_never_overlap,
            a_reset_forgets_the_inbox_and_the_checkpoint,
        ]
    );
}
