//! A projection unit whose lock wait fails (a statement timeout) or is given up (the caller
//! drops it) leaves no aborted or open transaction on the pooled connection: the next user of
//! that connection works normally; one given up while the holder still works gives its
//! connection back (at the end of its wait's slice, a second) before the holder is done.

use crate::support::{database_url, pg_test};
use cqrs_core::ports::ProjectionStore;
use cqrs_postgres::{PgOptions, PgProjectionStore};
use sqlx::AssertSqlSafe;
use std::time::Duration;

pg_test! {
    async fn a_projection_unit_that_cannot_get_its_lock_leaves_the_pool_clean(db: PgDatabase) {
        let holder_store = PgProjectionStore::new(db.clone());
        // One connection, so whatever the failed unit left on it, the next user gets.
        let timed_db = PgOptions::new(database_url())
            .schema(db.schema())
            .max_connections(1)
            // Below the lock wait's slice (1 s), so that it ends the wait; well above the
            // give-up's 100 ms below, so that a test thread descheduled for a while still
            // sees its own give-up, not the timeout's error.
            .statement_timeout(Some(Duration::from_millis(800)))
            .connect()
            .await
            .expect("connect");
        let timed = PgProjectionStore::new(timed_db.clone());
        let select_one = || async {
            sqlx::query_scalar::<_, i32>(AssertSqlSafe("SELECT 1".to_owned()))
                .fetch_one(timed_db.pool())
                .await
        };

        // A statement timeout while waiting for the lock.
        let holder = holder_store.begin("c").await.expect("begin");
        assert!(timed.begin("c").await.is_err(), "the lock wait times out");
        assert_eq!(select_one().await.expect("the connection is clean after a timeout"), 1);

        // A caller that gives up while waiting.
        let gave_up = tokio::time::timeout(Duration::from_millis(100), timed.begin("c")).await;
        assert!(gave_up.is_err(), "still waiting for the lock");
        holder_store.commit(holder).await.expect("commit the holder");
        assert_eq!(select_one().await.expect("the connection is clean after a cancel"), 1);
        // And the lock is free: nothing left holds it.
        let unit = tokio::time::timeout(Duration::from_secs(5), holder_store.begin("c"))
            .await
            .expect("the lock is free")
            .expect("begin");
        holder_store.commit(unit).await.expect("commit");
        timed_db.pool().close().await;
    }
}

pg_test! {
    /// A caller that gives up waiting for the consumer's lock (a relay's store timeout, a
    /// readiness probe's own deadline) gives its pooled connection back while the lock's
    /// holder still works: given-up waits must not use up the pool.
    async fn a_lock_wait_given_up_frees_its_connection_while_the_holder_works(db: PgDatabase) {
        let holder_store = PgProjectionStore::new(db.clone());
        let small = PgOptions::new(database_url())
            .schema(db.schema())
            .max_connections(2)
            // Roomy: waits given up that kept their connections would hold them until the
            // holder commits, after the query below, so that query would still time out.
            .acquire_timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect");
        let waiting = PgProjectionStore::new(small.clone());
        let holder = holder_store.begin("c").await.expect("begin");
        for _ in 0..3 {
            let gave_up =
                tokio::time::timeout(Duration::from_millis(100), waiting.begin("c")).await;
            assert!(gave_up.is_err(), "still waiting for the lock");
        }
        let one = sqlx::query_scalar::<_, i32>(AssertSqlSafe("SELECT 1".to_owned()))
            .fetch_one(small.pool())
            .await
            .expect("a connection of the pool, while the holder still holds the lock");
        assert_eq!(one, 1);
        holder_store.commit(holder).await.expect("commit the holder");
        small.pool().close().await;
    }
}

pg_test! {
    /// A wait longer than one slice still ends with the lock, once the holder commits; the
    /// unit then holds it, its own statements have the session's `lock_timeout` back, and no
    /// savepoint of the wait is left open.
    async fn a_long_lock_wait_gets_the_lock_once_the_holder_commits(db: PgDatabase) {
        let store = PgProjectionStore::new(db.clone());
        let holder = store.begin("c").await.expect("begin");
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.begin("c").await }
        });
        // Waiting for the lock, then past the first slice (a second); then the holder lets go.
        cqrs_core::testing::eventually(Duration::from_secs(10), "the waiter waits", || async {
            crate::support::someone_waits(&db).await.then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(!waiter.is_finished(), "the waiter waits while the lock is held");
        store.commit(holder).await.expect("commit the holder");
        let mut unit = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter gets the lock")
            .unwrap()
            .expect("begin");
        let lock_timeout: String = sqlx::query_scalar("SHOW lock_timeout")
            .fetch_one(unit.connection())
            .await
            .unwrap();
        assert_eq!(lock_timeout, "0");
        let third = tokio::time::timeout(Duration::from_millis(200), store.begin("c")).await;
        assert!(third.is_err(), "the waiter holds the lock now");
        // The slices left no savepoint open: each one nested inside the last would cost the
        // unit's first write a transaction id per slice.
        let error = sqlx::query("ROLLBACK TO SAVEPOINT cqrs_consumer_lock")
            .execute(unit.connection())
            .await
            .expect_err("a savepoint of the lock wait is still open");
        let code = error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("3B001"), "no such savepoint: {error}");
    }
}
