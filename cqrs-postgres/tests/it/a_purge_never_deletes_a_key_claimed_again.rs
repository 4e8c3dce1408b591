//! A purge of expired idempotency keys that races a new claim of an expired key never deletes
//! the key's new, completed record: a retry with that key replays instead of running the work
//! again.

use crate::support::{pg_test, someone_waits};
use cqrs_core::clock::ManualClock;
use cqrs_core::ports::{Claim, IdempotencyGuard, IdempotencyStore, StoredResponse};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

fn new(claim: Claim) -> Box<dyn IdempotencyGuard> {
    match claim {
        Claim::New(guard) => guard,
        Claim::Replay(r) => panic!("expected a new claim, got a replay of {r:?}"),
    }
}

pg_test! {
    async fn a_purge_racing_a_new_claim_keeps_the_new_record(db: PgDatabase) {
        let clock = ManualClock::new();
        let db = db.with_clock(Arc::new(clock.clone()));
        let store = Arc::new(db.idempotency_store());
        let first = new(store.claim("s", "k", "fp", HOUR).await.unwrap());
        first
            .complete(StoredResponse::new(201, json!({ "run": 1 })))
            .await
            .unwrap();
        clock.advance(2 * HOUR);

        // The key has expired: a retry claims it again, and its transaction holds the row.
        let second = new(store.claim("s", "k", "fp", HOUR).await.unwrap());
        let purging = tokio::spawn({
            let store = store.clone();
            async move { store.purge_expired().await }
        });
        // The purge either passes the held row by or waits for it; give it the chance to
        // read the expired version before the claim completes.
        cqrs_core::testing::eventually(Duration::from_secs(10), "the purge waits or ends", || {
            let (db, done) = (db.clone(), purging.is_finished());
            async move { (done || someone_waits(&db).await).then_some(()) }
        })
        .await;
        second
            .complete(StoredResponse::new(201, json!({ "run": 2 })))
            .await
            .unwrap();
        let purged = purging.await.unwrap().unwrap();
        assert_eq!(purged, 0, "the purge deleted the key completed again");
        match store.claim("s", "k", "fp", HOUR).await.unwrap() {
            Claim::Replay(stored) => assert_eq!(stored.body, json!({ "run": 2 })),
            Claim::New(_) => panic!("the record was purged: the work would run a third time"),
        }
    }
}
