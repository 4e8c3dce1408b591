//! A command whose `COMMIT` reached the server but whose answer never came back (the
//! connection cut then) may have committed: it fails as `Timeout` ("may or may not have taken
//! effect"), not as `Unavailable`, which told callers to retry and so ran it twice. Retried
//! with its idempotency key, it replays. An outbox relay's batch and a projection's unit of
//! work say the same.

use crate::proxy::Proxy;
use crate::support::tickets::{self, Note, NoteHandler, OpenTicket, OpenTicketHandler, Then};
use crate::support::{pg_test, record};
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{EventStore, ExpectedVersion, ProjectionStore, StoredResponse};
use cqrs_core::{CommandBus, ErrorKind, Metadata, Position};
use cqrs_postgres::{IdempotencyKey, Idempotent, PgCommandExecutor, PgDatabase, PgOutboxRelay};
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use std::time::Duration;

pg_test! {
    async fn a_commit_whose_answer_is_lost_is_an_unknown_outcome(db: PgDatabase) {
        tickets::create_table(&db).await;
        let (proxy, pool) =
            Proxy::in_front_of_the_database(PgPoolOptions::new().max_connections(2)).await;
        let cut = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let bus = CommandBus::builder()
            .layer(cut.command_layer())
            .handler(OpenTicketHandler::default())
            .build()
            .unwrap();

        proxy.cut_after_next_commit();
        let lost = bus.dispatch(OpenTicket::new("t1", Then::Succeed)).await.unwrap_err();
        assert_eq!(lost.kind(), ErrorKind::Timeout, "{lost}");
        assert!(lost.to_string().contains("unknown"), "{lost}");
        assert_eq!(tickets::count(&db).await, 1, "it did commit");

        let executor = PgCommandExecutor::new(bus, cut.clone());
        let key = IdempotencyKey::new("POST /tickets", "k1", "fp", Duration::from_secs(60));
        let respond = |id: &String| StoredResponse::new(201, serde_json::json!({ "id": id }));
        let run = || executor.execute_idempotent(
            &key,
            OpenTicket::new("t2", Then::Succeed),
            Metadata::new(),
            respond,
        );
        proxy.cut_after_next_commit();
        let lost = run().await.unwrap_err();
        assert_eq!(lost.kind(), ErrorKind::Timeout, "{lost}");
        let retried = run().await.unwrap();
        assert!(matches!(retried, Idempotent::Replayed(_)), "{retried:?}");
        assert_eq!(tickets::count(&db).await, 2, "the retry ran nothing");
        cut.pool().close().await;
    }
}

pg_test! {
    /// The same for a command whose only write is its events' append: that statement is its
    /// own commit, and its lost answer was `Unavailable` too.
    async fn an_append_that_was_its_own_commit_and_lost_its_answer_is_an_unknown_outcome(db: PgDatabase) {
        // One connection, no ping before a checkout: the statement is prepared on the
        // connection the cut one runs on, and nothing else is sent between.
        let (proxy, pool) = Proxy::in_front_of_the_database(
            PgPoolOptions::new().max_connections(1).test_before_acquire(false),
        )
        .await;
        let cut = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let bus = CommandBus::builder()
            .layer(cut.command_layer())
            .handler(NoteHandler)
            .build()
            .unwrap();
        bus.dispatch(Note("warm")).await.expect("prepares the append");
        // The warm-up connection's release ping is a `Sync` too: it must not be the one cut.
        proxy.settle_with(cut.pool(), 0).await;

        proxy.cut_after_next_statement();
        let lost = bus.dispatch(Note("n1")).await.unwrap_err();
        assert_eq!(lost.kind(), ErrorKind::Timeout, "{lost}");
        assert!(lost.to_string().contains("unknown"), "{lost}");
        assert_eq!(crate::support::event_count(&db).await, 2, "it did commit");
        cut.pool().close().await;
    }
}

pg_test! {
    /// A plain `EventStore::append`, outside any transaction, is its own commit too: its lost
    /// answer is an unknown outcome (it was `Unavailable`, "retry"), and the retry of the same
    /// records, which meets the version the first try moved the stream to, is refused as a
    /// duplicate, never as a conflict (which would have the caller decide again).
    async fn a_plain_append_that_lost_its_answer_is_an_unknown_outcome(db: PgDatabase) {
        use cqrs_core::ExpectedVersion;
        use cqrs_core::ports::{EventStore, StoreError};
        let (proxy, pool) = Proxy::in_front_of_the_database(
            PgPoolOptions::new().max_connections(1).test_before_acquire(false),
        )
        .await;
        let cut = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let store = cut.event_store();
        store
            .append("warm", ExpectedVersion::NO_STREAM, vec![crate::support::record(0)])
            .await
            .expect("prepares the append");
        // The warm-up connection's release ping is a `Sync` too: it must not be the one cut.
        proxy.settle_with(cut.pool(), 0).await;

        let first = crate::support::record(1);
        proxy.cut_after_next_statement();
        let lost = store
            .append("s-1", ExpectedVersion::NO_STREAM, vec![first.clone()])
            .await
            .unwrap_err();
        assert_eq!(lost.kind(), ErrorKind::Timeout, "{lost}");
        assert!(lost.to_string().contains("unknown"), "{lost}");
        assert_eq!(crate::support::event_count(&db).await, 2, "it did commit");
        let retried = store
            .append("s-1", ExpectedVersion::NO_STREAM, vec![first])
            .await
            .unwrap_err();
        assert!(
            !matches!(retried, StoreError::Conflict { .. })
                && retried.to_string().contains("already stored")
                && retried.to_string().contains("its first attempt was stored: it took effect"),
            "a retry of a stored event is a duplicate, no conflict: {retried}"
        );
        assert_eq!(crate::support::event_count(&db).await, 2);
        cut.pool().close().await;
    }
}

pg_test! {
    /// The same for an outbox relay's batch: its `COMMIT` went through (the checkpoint moved),
    /// so the batch's error is `Timeout`, not `Unavailable` ("nothing happened, retry").
    async fn a_relay_batch_whose_commit_answer_is_lost_is_an_unknown_outcome(db: PgDatabase) {
        db.event_store()
            .append("s", ExpectedVersion::NO_STREAM, vec![record(1), record(2)])
            .await
            .unwrap();
        let (proxy, pool) =
            Proxy::in_front_of_the_database(PgPoolOptions::new().max_connections(2)).await;
        let cut = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let relay = PgOutboxRelay::new(cut.clone(), Arc::new(InMemoryTransport::new()));
        relay.ensure_checkpoint().await.unwrap();

        proxy.cut_after_next_commit();
        let lost = relay.relay_once().await.unwrap_err();
        assert_eq!(lost.kind(), ErrorKind::Timeout, "{lost}");
        assert!(lost.to_string().contains("unknown"), "{lost}");
        let behind = PgOutboxRelay::new(db.clone(), Arc::new(InMemoryTransport::new()));
        assert_eq!(behind.backlog().await.unwrap().unpublished, 0, "it did commit");
        cut.pool().close().await;
    }
}

pg_test! {
    /// And for a projection's unit of work.
    async fn a_projection_unit_whose_commit_answer_is_lost_is_an_unknown_outcome(db: PgDatabase) {
        let (proxy, pool) =
            Proxy::in_front_of_the_database(PgPoolOptions::new().max_connections(2)).await;
        let cut = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let store = cut.projection_store();
        let mut unit = store.begin("p").await.unwrap();
        store
            .save_checkpoint(&mut unit, "p", Position::new(7))
            .await
            .unwrap();

        proxy.cut_after_next_commit();
        let lost = store.commit(unit).await.unwrap_err();
        assert_eq!(lost.kind(), ErrorKind::Timeout, "{lost}");
        assert!(lost.to_string().contains("unknown"), "{lost}");
        let check = db.projection_store();
        let mut unit = check.begin("p").await.unwrap();
        assert_eq!(
            check.checkpoint(&mut unit, "p").await.unwrap(),
            Some(Position::new(7)),
            "it did commit"
        );
        cut.pool().close().await;
    }
}

pg_test! {
    /// The same for an application's own transaction (`PgDatabase::begin`): a `COMMIT` whose
    /// answer was lost maps, through either `store_error`, to `Timeout`. It was an I/O error
    /// like any other, which both made `Unavailable`, so a caller that mapped it as the docs
    /// show told its client to retry what had committed.
    async fn an_applications_own_commit_that_lost_its_answer_maps_to_an_unknown_outcome(db: PgDatabase) {
        tickets::create_table(&db).await;
        let (proxy, pool) =
            Proxy::in_front_of_the_database(PgPoolOptions::new().max_connections(2)).await;
        let cut = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let by_database = |e| cut.store_error(e);
        let mappers: [(&str, &dyn Fn(sqlx::Error) -> cqrs_core::ports::StoreError); 2] =
            [("PgDatabase::store_error", &by_database), ("store_error", &cqrs_postgres::store_error)];
        for (n, (mapper, map)) in (1..).zip(mappers) {
            let insert = format!(
                "INSERT INTO \"{}\".tickets (id, title) VALUES ('t{n}', 'mine')",
                db.schema()
            );
            let mut tx = cut.begin().await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(insert))
                .execute(&mut *tx)
                .await
                .unwrap();
            proxy.cut_after_next_commit();
            let lost = tx.commit().await.unwrap_err();
            assert!(lost.to_string().contains("unknown"), "{lost}");
            assert_eq!(tickets::count(&db).await, n, "it did commit");
            let mapped = map(lost);
            assert_eq!(mapped.kind(), ErrorKind::Timeout, "{mapper}: {mapped}");
        }
        cut.pool().close().await;
    }
}
