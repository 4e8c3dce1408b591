//! While a claim holds an idempotency key, only claims with its fingerprint wait for it (on the
//! server, seen by `pg_blocking_pids`); any number of concurrent claims with another fingerprint
//! fail at once, before the holder ends, and when the holder is dropped exactly one waiting
//! duplicate takes the key while the others go on waiting for that one.

use crate::support::pg_test;
use cqrs_core::ports::{Claim, IdempotencyGuard, IdempotencyStore, StoreError, StoredResponse};
use cqrs_postgres::{PgDatabase, PgIdempotencyStore};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const DAY: Duration = Duration::from_secs(24 * 3600);
const DEADLINE: Duration = Duration::from_secs(10);

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

async fn until_waiting(db: &PgDatabase, n: i64, what: &str) {
    cqrs_core::testing::eventually(DEADLINE, what, || async {
        (waiting(db).await == n).then_some(())
    })
    .await;
}

/// Eight concurrent claims of `k` with `fp-2`: each fails with a mismatch within the deadline.
async fn eight_mismatches(store: &Arc<PgIdempotencyStore>) {
    let claims: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim("s", "k", "fp-2", DAY).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for claim in claims {
        let answer = tokio::time::timeout_at(deadline, claim)
            .await
            .expect("a claim with another fingerprint did not answer while the key was held")
            .unwrap();
        assert!(
            matches!(answer, Err(StoreError::FingerprintMismatch { .. })),
            "expected a mismatch, got {answer:?}"
        );
    }
}

fn new(claim: Claim) -> Box<dyn IdempotencyGuard> {
    match claim {
        Claim::New(guard) => guard,
        Claim::Replay(r) => panic!("expected a new claim, got a replay of {r:?}"),
    }
}

pg_test! {
    async fn claims_wait_only_for_a_holder_of_their_fingerprint(db: PgDatabase) {
        let store = Arc::new(db.idempotency_store());
        let guard = new(store.claim("s", "k", "fp-1", DAY).await.unwrap());
        assert_eq!(waiting(&db).await, 0);

        let (answers, mut answered) = mpsc::unbounded_channel();
        for _ in 0..3 {
            let (store, answers) = (store.clone(), answers.clone());
            tokio::spawn(async move {
                let _ = answers.send(store.claim("s", "k", "fp-1", DAY).await);
            });
        }
        until_waiting(&db, 3, "three duplicates wait for the holder").await;

        eight_mismatches(&store).await;
        assert!(answered.try_recv().is_err(), "a duplicate answered while the key was held");
        assert_eq!(waiting(&db).await, 3, "the duplicates still wait");

        // The holder rolls back: one duplicate takes the key, the other two wait for it.
        drop(guard);
        let taken = tokio::time::timeout(DEADLINE, answered.recv())
            .await
            .expect("a duplicate answered once the holder was dropped")
            .unwrap();
        let guard = new(taken.unwrap());
        until_waiting(&db, 2, "two duplicates wait for the new holder").await;
        eight_mismatches(&store).await;
        assert!(answered.try_recv().is_err(), "a duplicate answered while the key was held");

        let response = StoredResponse::new(201, serde_json::json!({"made": "once"}));
        guard.complete(response.clone()).await.unwrap();
        for _ in 0..2 {
            let answer = tokio::time::timeout(DEADLINE, answered.recv())
                .await
                .expect("a duplicate answered once the key completed")
                .unwrap();
            match answer.unwrap() {
                Claim::Replay(r) => assert_eq!(r, response),
                Claim::New(_) => panic!("a second duplicate took a completed key"),
            }
        }
        assert_eq!(waiting(&db).await, 0);
    }
}
