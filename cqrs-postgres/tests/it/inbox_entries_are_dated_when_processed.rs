//! An inbox entry is dated when the event is processed, not when its unit began: a unit that
//! waited (for its consumer's lock, or on a slow event) before it marked an event does not
//! make the entry look older than it is, so `purge_inbox` keeps it for the whole retention.

use crate::support::pg_test;
use cqrs_core::ports::ProjectionStore;
use sqlx::AssertSqlSafe;
use std::time::Duration;

pg_test! {
    async fn inbox_entries_are_dated_when_processed(db: PgDatabase) {
        let store = db.projection_store();
        let id = uuid::Uuid::now_v7();
        let mut unit = store.begin("c").await.unwrap();
        // The unit waits before it processes the event; the wait is the condition under test,
        // not a guess at one.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert!(store.mark_processed(&mut unit, "c", id).await.unwrap());
        store.commit(unit).await.unwrap();
        // The date itself, on the server's clock, rather than a purge with a short retention
        // run right after: a loaded machine can stall longer than that retention in between.
        let processed_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(AssertSqlSafe(
            format!(
                r#"SELECT processed_at FROM "{}".inbox WHERE consumer = 'c' AND message_id = $1"#,
                db.schema()
            ),
        ))
        .bind(id)
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert!(
            processed_at >= before,
            "dated {processed_at}, before it was processed (after {before}): when its unit began"
        );
        // Purges measure the age from that date: kept within the retention, purged past it.
        assert_eq!(
            store.purge_inbox("c", Duration::from_secs(3600)).await.unwrap(),
            0,
            "an entry processed just now was purged"
        );
        let mut unit = store.begin("c").await.unwrap();
        assert!(
            !store.mark_processed(&mut unit, "c", id).await.unwrap(),
            "the entry is kept: the event is still a duplicate"
        );
        store.commit(unit).await.unwrap();
        assert_eq!(store.purge_inbox("c", Duration::ZERO).await.unwrap(), 1);
    }
}
