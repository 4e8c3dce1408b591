//! Migrating is one call, safe to repeat and to run from several instances at once, and two
//! schemas are two independent stores.

use crate::support::{options, postgres_available, record};
use cqrs_core::Position;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once_and_schemas_do_not_mix() {
    if !postgres_available().await {
        return;
    }
    cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
        let a = cqrs_core::testing::test_id("migrate_a");
        let b = cqrs_core::testing::test_id("migrate_b");
        let first = options(&a).connect().await.unwrap();
        let second = options(&a).connect().await.unwrap();
        let (x, y) = tokio::join!(first.migrate(), second.migrate());
        x.unwrap();
        y.unwrap();
        first.migrate().await.expect("a second run applies nothing");
        let applied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{a}\"._sqlx_migrations"
        )))
        .fetch_one(first.pool())
        .await
        .unwrap();
        assert_eq!(applied, 5);

        let other = options(&b).connect().await.unwrap();
        other.migrate().await.unwrap();
        first
            .event_store()
            .append("s", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        assert!(
            other
                .event_store()
                .read_all(Position::START, 10)
                .await
                .unwrap()
                .is_empty()
        );
        other
            .event_store()
            .append("s", ExpectedVersion::NO_STREAM, vec![record(2)])
            .await
            .expect("the same stream in another schema is another stream");

        first.drop_schema().await.unwrap();
        other.drop_schema().await.unwrap();
    })
    .await;
}
