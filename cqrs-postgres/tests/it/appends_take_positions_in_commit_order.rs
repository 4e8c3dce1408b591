//! The global-order mechanism itself: a writer that has drawn its positions and stays open
//! holds the append lock, so a later writer waits for its commit instead of committing a
//! higher position first, and a reader that continues from its checkpoint sees both.
//! (The core's late-commit scenario holds the same kind of open `append_in` and checks the
//! reader; this checks the waiting itself.)

use crate::support::{pg_test, record};
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::{EventRecord, Position};
use std::time::Duration;

async fn read_from(store: &dyn EventStore, mut after: Position) -> Vec<EventRecord> {
    let mut out = Vec::new();
    loop {
        let page = store.read_all(after, 100).await.unwrap();
        let Some(last) = page.last().and_then(|r| r.position) else {
            return out;
        };
        after = last;
        out.extend(page);
    }
}

pg_test! {
    async fn a_writer_holding_its_positions_open_makes_later_writers_wait(db: PgDatabase) {
        let store = db.event_store();
        let mut held = db.pool().begin().await.unwrap();
        let held_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *held)
            .await
            .unwrap();
        let a = store
            .append_in(&mut held, "a", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        let a_position = a[0].position.unwrap();

        let later = {
            let store = db.event_store();
            tokio::spawn(async move {
                store.append("b", ExpectedVersion::NO_STREAM, vec![record(2)]).await
            })
        };
        // The later writer is seen waiting on the open one's lock (not merely not done yet).
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the later append blocked by the open transaction",
            || async {
                let blocked: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                )
                .bind(held_pid)
                .fetch_one(db.pool())
                .await
                .unwrap();
                (blocked > 0).then_some(())
            },
        )
        .await;
        assert!(!later.is_finished(), "the later append waits for the open one");
        let first_read = read_from(&store, Position::START).await;
        assert!(first_read.is_empty(), "nothing is readable yet: {first_read:?}");

        held.commit().await.unwrap();
        let b = later.await.unwrap().unwrap();
        assert!(b[0].position.unwrap() > a_position, "positions follow commit order");
        let all = read_from(&store, Position::START).await;
        assert_eq!(
            all.iter().map(|r| r.stream_id.as_deref().unwrap()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }
}

pg_test! {
    async fn a_conflict_inside_a_transaction_leaves_it_usable(db: PgDatabase) {
        let store = db.event_store();
        store.append("s", ExpectedVersion::NO_STREAM, vec![record(1)]).await.unwrap();
        let mut tx = db.pool().begin().await.unwrap();
        let conflict = store
            .append_in(&mut tx, "s", ExpectedVersion::NO_STREAM, vec![record(2)])
            .await
            .unwrap_err();
        assert!(
            matches!(conflict, cqrs_core::ports::StoreError::Conflict { actual: 1, .. }),
            "{conflict}"
        );
        store
            .append_in(&mut tx, "s", ExpectedVersion::Exactly(1), vec![record(2)])
            .await
            .expect("the transaction is not aborted");
        tx.commit().await.unwrap();
        assert_eq!(store.stream_version("s").await.unwrap(), 2);
    }
}
