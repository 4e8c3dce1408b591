//! A rebuild (`reset`) forgets a consumer's whole inbox, however large, in statements that
//! each delete a bounded batch, so each finishes inside a `statement_timeout`; it leaves other
//! consumers' entries alone, and all of it is one unit (a dropped unit forgets nothing). A
//! purge deleting some of the same entries meanwhile neither ends it early nor waits for it.

use crate::support::{pg_test, someone_waits};
use cqrs_core::ports::ProjectionStore;
use sqlx::AssertSqlSafe;
use std::time::Duration;

/// The batch the crate deletes per statement (`PURGE_BATCH`).
const BATCH: i64 = 5_000;
/// Enough entries for three batches.
const ENTRIES: i64 = 2 * BATCH + 1;

async fn count(db: &cqrs_postgres::PgDatabase, sql: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql.replace("{s}", db.schema())))
        .fetch_one(db.pool())
        .await
        .expect("count rows")
}

pg_test! {
    async fn a_rebuild_resets_a_large_inbox_in_bounded_statements(db: PgDatabase) {
        let s = db.schema().to_owned();
        // Every statement that deletes inbox entries logs how many it deleted.
        for statement in [
            format!(r#"CREATE TABLE "{s}".inbox_deletes (deleted bigint NOT NULL)"#),
            format!(
                r#"CREATE FUNCTION "{s}".log_inbox_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN
                       INSERT INTO "{s}".inbox_deletes SELECT count(*) FROM old_rows;
                       RETURN NULL;
                   END $$"#
            ),
            format!(
                r#"CREATE TRIGGER log_inbox_deletes AFTER DELETE ON "{s}".inbox
                   REFERENCING OLD TABLE AS old_rows
                   FOR EACH STATEMENT EXECUTE FUNCTION "{s}".log_inbox_deletes()"#
            ),
            format!(
                r#"INSERT INTO "{s}".inbox (consumer, message_id)
                   SELECT 'big', gen_random_uuid() FROM generate_series(1, {ENTRIES})"#
            ),
            format!(r#"INSERT INTO "{s}".inbox (consumer, message_id) VALUES ('other', gen_random_uuid())"#),
            format!(r#"INSERT INTO "{s}".checkpoints (consumer, position) VALUES ('big', 42), ('other', 7)"#),
        ] {
            sqlx::query(AssertSqlSafe(statement))
                .execute(db.pool())
                .await
                .expect("set up the inbox");
        }

        let store = db.projection_store();
        // A dropped unit forgets nothing.
        let mut unit = store.begin("big").await.unwrap();
        store.reset(&mut unit, "big").await.unwrap();
        drop(unit);
        let big = r#"SELECT count(*) FROM "{s}".inbox WHERE consumer = 'big'"#;
        assert_eq!(count(&db, big).await, ENTRIES, "a dropped reset deleted entries");

        let mut unit = store.begin("big").await.unwrap();
        store.reset(&mut unit, "big").await.unwrap();
        assert_eq!(store.checkpoint(&mut unit, "big").await.unwrap(), None);
        store.commit(unit).await.unwrap();

        assert_eq!(count(&db, big).await, 0, "the reset left inbox entries");
        let other = r#"SELECT count(*) FROM "{s}".inbox WHERE consumer = 'other'"#;
        assert_eq!(count(&db, other).await, 1, "the reset deleted another consumer's entry");
        let mut unit = store.begin("other").await.unwrap();
        assert_eq!(
            store.checkpoint(&mut unit, "other").await.unwrap(),
            Some(cqrs_core::Position::new(7))
        );
        drop(unit);

        let largest = r#"SELECT coalesce(max(deleted), 0) FROM "{s}".inbox_deletes"#;
        assert!(
            count(&db, largest).await <= BATCH,
            "one statement deleted {} entries, more than a batch of {BATCH}",
            count(&db, largest).await
        );
        let logged = r#"SELECT coalesce(sum(deleted), 0)::bigint FROM "{s}".inbox_deletes"#;
        // The dropped unit's statements rolled back with their log rows.
        assert_eq!(count(&db, logged).await, ENTRIES);
    }
}

/// Fills consumer `big`'s inbox with `ENTRIES` entries.
async fn fill(db: &cqrs_postgres::PgDatabase) {
    let s = db.schema();
    sqlx::query(AssertSqlSafe(format!(
        r#"INSERT INTO "{s}".inbox (consumer, message_id)
           SELECT 'big', gen_random_uuid() FROM generate_series(1, {ENTRIES})"#
    )))
    .execute(db.pool())
    .await
    .expect("fill the inbox");
}

pg_test! {
    async fn a_purge_deleting_the_same_entries_does_not_end_a_reset_early(db: PgDatabase) {
        fill(&db).await;
        // A purge in flight: it holds the ten smallest ids, the start of the reset's first
        // batch, deleted but not committed.
        let s = db.schema().to_owned();
        let mut purge = db.pool().begin().await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            r#"DELETE FROM "{s}".inbox WHERE consumer = 'big' AND message_id IN
               (SELECT message_id FROM "{s}".inbox WHERE consumer = 'big'
                ORDER BY message_id LIMIT 10)"#
        )))
        .execute(&mut *purge)
        .await
        .unwrap();

        let store = db.projection_store();
        let resetting = tokio::spawn({
            let store = store.clone();
            async move {
                let mut unit = store.begin("big").await?;
                store.reset(&mut unit, "big").await?;
                store.commit(unit).await
            }
        });
        cqrs_core::testing::eventually(Duration::from_secs(10), "the reset waits for the purge", || {
            let db = db.clone();
            async move { someone_waits(&db).await.then_some(()) }
        })
        .await;
        // The purge commits: the reset's first batch deletes ten entries fewer than it read.
        purge.commit().await.unwrap();
        resetting.await.unwrap().unwrap();

        let big = r#"SELECT count(*) FROM "{s}".inbox WHERE consumer = 'big'"#;
        assert_eq!(count(&db, big).await, 0, "the reset stopped after its first batch");
    }
}

pg_test! {
    async fn a_purge_passes_over_the_entries_a_reset_holds(db: PgDatabase) {
        fill(&db).await;
        let store = db.projection_store();
        let mut unit = store.begin("big").await.unwrap();
        store.reset(&mut unit, "big").await.unwrap();
        // Every entry is deleted in the open unit: a purge of them all neither waits for it
        // nor deletes anything.
        let purged = tokio::time::timeout(
            Duration::from_secs(10),
            store.purge_inbox("big", Duration::ZERO),
        )
        .await
        .expect("the purge waited for the reset's unit")
        .unwrap();
        assert_eq!(purged, 0);
        store.commit(unit).await.unwrap();
        let big = r#"SELECT count(*) FROM "{s}".inbox WHERE consumer = 'big'"#;
        assert_eq!(count(&db, big).await, 0);
    }
}

pg_test! {
    /// A purge of more old entries than one statement deletes goes on batch after batch
    /// until every old one is gone (not only the first batch), and keeps the young ones.
    async fn a_purge_of_a_large_inbox_deletes_every_old_entry(db: PgDatabase) {
        fill(&db).await;
        let s = db.schema().to_owned();
        sqlx::query(AssertSqlSafe(format!(
            r#"UPDATE "{s}".inbox SET processed_at = now() - interval '2 hours'"#
        )))
        .execute(db.pool())
        .await
        .expect("age the entries");
        sqlx::query(AssertSqlSafe(format!(
            r#"INSERT INTO "{s}".inbox (consumer, message_id) VALUES ('big', gen_random_uuid())"#
        )))
        .execute(db.pool())
        .await
        .expect("add a young entry");
        let purged = db
            .projection_store()
            .purge_inbox("big", Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(purged, ENTRIES as u64, "every old entry, over three batches");
        let big = r#"SELECT count(*) FROM "{s}".inbox WHERE consumer = 'big'"#;
        assert_eq!(count(&db, big).await, 1, "the young entry stays");
    }
}
