//! A rebuild (`reset`) forgets a consumer's whole inbox, however large, in statements that
//! each delete a bounded batch, so each finishes inside a `statement_timeout`; it leaves other
//! consumers' entries alone, and all of it is one unit (a dropped unit forgets nothing).

use crate::support::pg_test;
use cqrs_core::ports::ProjectionStore;
use sqlx::AssertSqlSafe;

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
