//! The append functions read a stream's version after taking the append lock, which is right
//! only at READ COMMITTED: an append in a transaction at another level is refused, naming the
//! level, instead of failing as a conflict that is none. And an append that loses a race the
//! unique constraint catches reads the actual version without waiting for another holder's
//! pooled connection while it holds one (it opens one while the pool has room).

use crate::support::{options, pg_test, record};
use cqrs_core::ports::{EventStore, ExpectedVersion, StoreError};
use cqrs_postgres::PgDatabase;
use sqlx::AssertSqlSafe;
use std::time::Duration;

/// How many of this test's sessions wait on a lock another session holds.
async fn waiting(db: &PgDatabase) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE cardinality(pg_blocking_pids(pid)) > 0 AND application_name = $1",
    )
    .bind(format!("cqrs-test {}", db.schema()))
    .fetch_one(db.pool())
    .await
    .expect("count the waiting sessions")
}

pg_test! {
    /// Under REPEATABLE READ, an `Any` append after another writer's would miss it and hit the
    /// unique constraint: it is refused with what to change, and the transaction stays usable.
    async fn an_append_in_a_repeatable_read_transaction_is_refused_naming_the_level(db: PgDatabase) {
        let store = db.event_store();
        let mut tx = db
            .pool()
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap();
        // The first statement takes the transaction's snapshot.
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        store
            .append("s", ExpectedVersion::Any, vec![record(1)])
            .await
            .unwrap();

        let error = store
            .append_in(&mut tx, "s", ExpectedVersion::Any, vec![record(2)])
            .await
            .expect_err("refused");
        assert!(matches!(error, StoreError::Backend { .. }), "not a conflict: {error:?}");
        let message = error.to_string();
        assert!(message.contains("repeatable read"), "{message}");
        assert!(message.contains("read committed"), "{message}");
        sqlx::query("SELECT 1")
            .execute(&mut *tx)
            .await
            .expect("the transaction is not aborted");
        tx.rollback().await.unwrap();
        assert_eq!(store.load("s", 0).await.unwrap().len(), 1, "nothing appended");

        // The same append at READ COMMITTED goes through.
        let mut tx = db
            .pool()
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .unwrap();
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        let stored = store
            .append_in(&mut tx, "s", ExpectedVersion::Any, vec![record(3)])
            .await
            .unwrap();
        assert_eq!(stored[0].stream_version, Some(2));
        tx.commit().await.unwrap();
    }
}

pg_test! {
    /// On a pool of one connection, an append whose version an event inserted around the
    /// append functions took (the unique constraint catches it) reports the conflict with the
    /// actual version, read on its own connection, instead of waiting for a second one until
    /// `acquire_timeout` and failing as `Unavailable`.
    async fn an_append_that_loses_a_race_reads_the_version_on_its_own_connection(db: PgDatabase) {
        let small = options(db.schema())
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        // An event inserted without the append functions (so without the append lock), and
        // not committed yet.
        let mut foreign = db.pool().begin().await.unwrap();
        let insert = format!(
            "INSERT INTO \"{}\".events (stream_id, stream_version, event_id, event_type, \
             schema_version, payload, metadata) VALUES ('s', 1, $1, 'Noted', 1, '{{}}', '{{}}')",
            db.schema()
        );
        sqlx::query(AssertSqlSafe(insert))
            .bind(record(1).event_id)
            .execute(&mut *foreign)
            .await
            .unwrap();

        let store = small.event_store();
        let append = tokio::spawn(async move {
            store.append("s", ExpectedVersion::Any, vec![record(2)]).await
        });
        // The append drew version 1 and waits for the foreign row's fate.
        cqrs_core::testing::eventually(Duration::from_secs(10), "the append waits on the foreign insert", || async {
            (waiting(&db).await == 1).then_some(())
        })
        .await;
        foreign.commit().await.unwrap();

        let result = tokio::time::timeout(Duration::from_secs(20), append)
            .await
            .expect("the append answered")
            .unwrap();
        assert!(
            matches!(result, Err(StoreError::Conflict { actual: 1, .. })),
            "expected a conflict at version 1, got {result:?}"
        );
        small.pool().close().await;
    }
}

pg_test! {
    /// In a transaction on a pool that keeps no connection idle (`min_connections(0)`) but has
    /// room for another, an append whose version an event inserted around the append functions
    /// took opens a second connection to read the actual version: a conflict, not
    /// `Unavailable`.
    async fn an_append_in_a_transaction_that_loses_a_race_opens_a_connection_to_read_the_version(db: PgDatabase) {
        let small = options(db.schema())
            .min_connections(0)
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        let mut foreign = db.pool().begin().await.unwrap();
        let insert = format!(
            "INSERT INTO \"{}\".events (stream_id, stream_version, event_id, event_type, \
             schema_version, payload, metadata) VALUES ('s', 1, $1, 'Noted', 1, '{{}}', '{{}}')",
            db.schema()
        );
        sqlx::query(AssertSqlSafe(insert))
            .bind(record(1).event_id)
            .execute(&mut *foreign)
            .await
            .unwrap();

        let store = small.event_store();
        let pool = small.pool().clone();
        let append = tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            assert_eq!(pool.num_idle(), 0, "the pool keeps no connection idle");
            assert!(pool.size() < 2, "the pool has room for another");
            store.append_in(&mut tx, "s", ExpectedVersion::Any, vec![record(2)]).await
        });
        cqrs_core::testing::eventually(Duration::from_secs(10), "the append waits on the foreign insert", || async {
            (waiting(&db).await == 1).then_some(())
        })
        .await;
        foreign.commit().await.unwrap();

        let result = tokio::time::timeout(Duration::from_secs(20), append)
            .await
            .expect("the append answered")
            .unwrap();
        assert!(
            matches!(result, Err(StoreError::Conflict { actual: 1, .. })),
            "expected a conflict at version 1, got {result:?}"
        );
        small.pool().close().await;
    }
}
