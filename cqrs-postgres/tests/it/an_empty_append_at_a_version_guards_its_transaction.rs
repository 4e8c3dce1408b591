//! An empty append at `Exactly(v)` inside a transaction is a guard: "commit my writes only if
//! the stream is still at v". It takes the append lock like any append, so an append to the
//! stream from elsewhere waits for the guard's transaction to end instead of committing
//! between the check and the guard's `COMMIT`. An empty append at `Any` checks nothing and
//! takes no lock.

use crate::support::{pg_test, record};
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_postgres::PgDatabase;
use std::time::Duration;

async fn pid(tx: &mut sqlx::PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(tx)
        .await
        .unwrap()
}

/// Whether a session waits on a lock `holder` holds.
async fn blocked_by(db: &PgDatabase, holder: i32) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))",
    )
    .bind(holder)
    .fetch_one(db.pool())
    .await
    .unwrap()
}

pg_test! {
    async fn an_append_waits_for_an_open_empty_append_at_a_version(db: PgDatabase) {
        let store = db.event_store();
        let mut guard = db.begin().await.unwrap();
        let guard_pid = pid(&mut guard).await;
        let appended = store
            .append_in(&mut guard, "s", ExpectedVersion::Exactly(0), vec![])
            .await
            .unwrap();
        assert!(appended.is_empty());

        let other = {
            let store = db.event_store();
            tokio::spawn(async move {
                store.append("s", ExpectedVersion::Exactly(0), vec![record(1)]).await
            })
        };
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the other append blocked by the guard's transaction, or done",
            || {
                let (db, done) = (db.clone(), other.is_finished());
                async move { (done || blocked_by(&db, guard_pid).await).then_some(()) }
            },
        )
        .await;
        assert!(
            !other.is_finished(),
            "an append committed while a transaction that checked the stream at version 0 was \
             still open: {:?}",
            other.await
        );
        // The guard's writes commit with the stream still at version 0.
        assert_eq!(store.stream_version("s").await.unwrap(), 0);
        guard.commit().await.unwrap();

        let stored = other.await.unwrap().expect("the other append runs after the guard");
        assert_eq!(stored[0].stream_version, Some(1));
    }
}

pg_test! {
    async fn an_empty_append_at_any_version_takes_no_lock(db: PgDatabase) {
        let store = db.event_store();
        let mut open = db.begin().await.unwrap();
        store
            .append_in(&mut open, "s", ExpectedVersion::Any, vec![])
            .await
            .unwrap();
        // Would wait for `open` (and the test time out) if the empty append held the lock.
        store
            .append("s", ExpectedVersion::Exactly(0), vec![record(1)])
            .await
            .unwrap();
        open.commit().await.unwrap();
        assert_eq!(store.stream_version("s").await.unwrap(), 1);
    }
}

pg_test! {
    async fn an_empty_append_at_a_stale_version_is_a_conflict(db: PgDatabase) {
        let store = db.event_store();
        store
            .append("s", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        let error = store
            .append_in(&mut tx, "s", ExpectedVersion::Exactly(0), vec![])
            .await
            .expect_err("the stream is at version 1");
        assert!(
            matches!(
                error,
                cqrs_core::ports::StoreError::Conflict { actual: 1, .. }
            ),
            "{error:?}"
        );
        // The transaction stays usable.
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
    }
}
