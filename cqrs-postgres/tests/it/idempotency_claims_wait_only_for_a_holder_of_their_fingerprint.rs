//! While a claim holds an idempotency key, only claims with its fingerprint wait for it (on the
//! server, seen by `pg_blocking_pids`); any number of concurrent claims with another fingerprint
//! fail at once, before the holder ends, and when the holder is dropped exactly one waiting
//! duplicate takes the key while the others go on waiting for that one. A duplicate waits at
//! most its claim wait, so one given up by its caller frees its connection soon.

use crate::support::pg_test;
use cqrs_core::ports::{
    Claim, EventStore, IdempotencyGuard, IdempotencyStore, StoreError, StoredResponse,
};
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
        // Waiting as long as the test needs, on a slow machine too.
        let db = db.with_claim_wait(Duration::from_secs(60));
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

pg_test! {
    async fn a_duplicate_given_up_while_it_waits_frees_its_connection_within_the_claim_wait(
        db: PgDatabase
    ) {
        // Two connections: the holder's, and the one the duplicate waits on.
        let small = crate::support::options(db.schema())
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect")
            .with_claim_wait(Duration::from_secs(2));
        let store = small.idempotency_store();
        let guard = new(store.claim("s", "k", "fp-1", DAY).await.unwrap());

        // A duplicate waits its whole claim wait, then says why it gives up.
        let busy = match store.claim("s", "k", "fp-1", DAY).await {
            Err(error) => error,
            Ok(claim) => panic!("a duplicate answered while the key was held: {claim:?}"),
        };
        assert_eq!(busy.kind(), cqrs_core::ErrorKind::Unavailable, "{busy}");
        assert!(busy.to_string().contains("still running"), "{busy}");

        // A duplicate whose caller gives up while it waits: its statement goes on waiting on
        // the server, holding the second connection, but only for the claim wait, and then
        // gives the connection back. Unbounded, it would hold it until the holder ends, and
        // the read below would find no connection.
        let store = Arc::new(store);
        let duplicate = tokio::spawn({
            let store = store.clone();
            async move { store.claim("s", "k", "fp-1", DAY).await.map(|_| ()) }
        });
        until_waiting(&db, 1, "the duplicate waits for the holder").await;
        duplicate.abort();
        assert!(duplicate.await.unwrap_err().is_cancelled());
        let read = small.event_store().read_all(cqrs_core::Position::START, 10).await;
        assert!(read.is_ok(), "the connection came back while the key was held: {read:?}");

        let response = StoredResponse::new(201, serde_json::json!({"made": "once"}));
        guard.complete(response.clone()).await.unwrap();
        match store.claim("s", "k", "fp-1", DAY).await.unwrap() {
            Claim::Replay(r) => assert_eq!(r, response),
            Claim::New(_) => panic!("a completed key was taken again"),
        }
        small.pool().close().await;
    }
}

pg_test! {
    async fn a_completion_whose_caller_gives_up_mid_way_still_commits(db: PgDatabase) {
        // The duplicate below waits for the completion as long as the test needs.
        let db = db.with_claim_wait(Duration::from_secs(60));
        let store = db.idempotency_store();
        let guard = new(store.claim("s", "k", "fp-1", DAY).await.unwrap());
        let response = StoredResponse::new(201, serde_json::json!({"made": "once"}));

        // The caller polls its completion once (the statement goes out) and gives up, as one
        // whose time budget ran out in the middle of it. The work the key guards has run, so
        // the key must end completed: rolled back, a retry would run the work again.
        let mut completing = Box::pin(guard.complete(response.clone()));
        assert!(
            futures_util::FutureExt::now_or_never(completing.as_mut()).is_none(),
            "a completion needs a round trip to the server"
        );
        drop(completing);
        // Once the completion's session is done (committed, or rolled back as it was before
        // the fix), a claim tells which: asked at once, it could share the completion's
        // connection, handed back to the pool mid-transaction, and see its uncommitted write.
        cqrs_core::testing::eventually(DEADLINE, "the completion's session ends", || async {
            let busy: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND state <> 'idle' AND pid <> pg_backend_pid()",
            )
            .bind(format!("cqrs-test {}", db.schema()))
            .fetch_one(db.pool())
            .await
            .expect("read the sessions");
            (busy == 0).then_some(())
        })
        .await;

        match store.claim("s", "k", "fp-1", DAY).await.unwrap() {
            Claim::Replay(r) => assert_eq!(r, response),
            Claim::New(_) => panic!("the key was rolled back: a retry would run the work again"),
        }
    }
}

pg_test! {
    /// A `statement_timeout` shorter than the claim wait ends the duplicate's wait at it, and
    /// the duplicate says the key is busy, as at the end of the claim wait: a retry replays
    /// the holder's response. (It was a plain timeout, which servers answer as such, not as a
    /// key still in use.)
    async fn a_statement_timeout_ending_a_claims_wait_says_the_key_is_busy(db: PgDatabase) {
        // Long enough for the holder's own claim on a loaded machine.
        let timed = crate::support::options(db.schema())
            .statement_timeout(Some(Duration::from_secs(3)))
            .connect()
            .await
            .expect("connect")
            .with_claim_wait(Duration::from_secs(60));
        let store = timed.idempotency_store();
        let _guard = new(store.claim("s", "k", "fp-1", DAY).await.unwrap());
        let busy = match store.claim("s", "k", "fp-1", DAY).await {
            Err(error) => error,
            Ok(claim) => panic!("a duplicate answered while the key was held: {claim:?}"),
        };
        assert_eq!(busy.kind(), cqrs_core::ErrorKind::Unavailable, "{busy}");
        let elapsed = std::iter::successors(
            Some(&busy as &(dyn std::error::Error + 'static)),
            |e| e.source(),
        )
        .find_map(|e| e.downcast_ref::<cqrs_postgres::ClaimWaitElapsed>());
        assert!(elapsed.is_some(), "no ClaimWaitElapsed among the sources of {busy}");
    }
}
