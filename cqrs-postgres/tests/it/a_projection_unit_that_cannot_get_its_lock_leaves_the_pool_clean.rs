//! A projection unit whose lock wait fails (a statement timeout) or is given up (the caller
//! drops it) leaves no aborted or open transaction on the pooled connection: the next user of
//! that connection works normally.

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
            .statement_timeout(Some(Duration::from_millis(300)))
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
