//! A relay whose checkpoint row is deleted while it runs (an operator starting it over) creates
//! the row again and ships from its start, instead of standing by for ever as if another relay
//! of its name held the row; and that check for a missing row does not wait on another
//! relay's uncommitted advance of it.

use crate::support::{pg_test, record};
use crate::transport::receive;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_postgres::{PgOutboxRelay, RelayBatch};
use sqlx::AssertSqlSafe;
use std::sync::Arc;

pg_test! {
    async fn a_relay_whose_checkpoint_row_was_deleted_ships_from_its_start_again(db: PgDatabase) {
        let store = db.event_store();
        store.append("s", ExpectedVersion::NO_STREAM, vec![record(1)]).await.unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        let relay = PgOutboxRelay::new(db.clone(), transport.clone());
        relay.ensure_checkpoint().await.unwrap();
        assert_eq!(relay.relay_once().await.unwrap(), RelayBatch::Shipped(1));

        let delete = format!("DELETE FROM \"{}\".relay_checkpoints", db.schema());
        sqlx::query(AssertSqlSafe(delete)).execute(db.pool()).await.unwrap();
        store.append("s", ExpectedVersion::Exactly(1), vec![record(2)]).await.unwrap();

        assert_eq!(
            relay.relay_once().await.unwrap(),
            RelayBatch::Shipped(2),
            "the row is created again and the relay ships from the start of the store"
        );
        assert_eq!(relay.backlog().await.unwrap().unpublished, 0);
        let shipped: Vec<u64> = receive(transport.as_ref(), "events", "readers", 3)
            .await
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(shipped, [1, 1, 2], "event 1 shipped again, as docs/postgres.md says");
    }
}

pg_test! {
    /// A transaction holding an uncommitted update of the checkpoint row (a batch whose
    /// `COMMIT` never arrived, its session idle until Postgres ends it) leaves another relay of
    /// the name standing by at once: its check for a missing row does not wait on that
    /// transaction (which it did, holding a pooled connection until the session ended).
    async fn a_relay_stands_by_at_once_behind_an_uncommitted_advance(db: PgDatabase) {
        let store = db.event_store();
        store.append("s", ExpectedVersion::NO_STREAM, vec![record(1)]).await.unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        let relay = PgOutboxRelay::new(db.clone(), transport.clone());
        relay.ensure_checkpoint().await.unwrap();

        let mut stuck = db.pool().begin().await.unwrap();
        let advance = format!(
            "UPDATE \"{}\".relay_checkpoints SET position = position",
            db.schema()
        );
        sqlx::query(AssertSqlSafe(advance)).execute(&mut *stuck).await.unwrap();
        let standby = tokio::time::timeout(std::time::Duration::from_secs(5), relay.relay_once())
            .await
            .expect("the relay waited on the uncommitted update")
            .unwrap();
        assert_eq!(standby, RelayBatch::Standby);

        stuck.rollback().await.unwrap();
        assert_eq!(relay.relay_once().await.unwrap(), RelayBatch::Shipped(1));
    }
}

pg_test! {
    /// `stored_checkpoint` tells a relay that never ran (no row) from one at the start, which
    /// `checkpoint` reads alike.
    async fn a_relay_that_never_ran_has_no_stored_checkpoint(db: PgDatabase) {
        let store = db.event_store();
        store.append("s", ExpectedVersion::NO_STREAM, vec![record(1)]).await.unwrap();
        let relay = PgOutboxRelay::new(db.clone(), Arc::new(InMemoryTransport::new()))
            .relay_name("new");
        assert_eq!(relay.stored_checkpoint().await.unwrap(), None);
        assert_eq!(relay.checkpoint().await.unwrap(), cqrs_core::Position::START);
        relay.ensure_checkpoint().await.unwrap();
        assert_eq!(relay.stored_checkpoint().await.unwrap(), Some(cqrs_core::Position::START));
        assert_eq!(relay.relay_once().await.unwrap(), RelayBatch::Shipped(1));
        let shipped = relay.stored_checkpoint().await.unwrap();
        assert!(shipped > Some(cqrs_core::Position::START), "{shipped:?}");

    }
}
