//! During a rolling upgrade a build from before migration 7 updates a stream's snapshot row
//! without knowing `last_event_id`: the row then keeps the id of an older version. It must
//! load as a snapshot without an id (trusted, as before), not as one of another history that
//! every load would replay the whole stream around.

use crate::support::schema;
use cqrs_core::ports::{Snapshot, SnapshotStore};
use cqrs_postgres::sqlx::{self, AssertSqlSafe};
use serde_json::json;

#[tokio::test]
async fn a_snapshot_updated_by_a_previous_build_carries_no_event_id() {
    let Some(db) = schema(&cqrs_core::testing::test_id("snapshot_previous_build")).await else {
        return;
    };
    let store = db.snapshot_store();
    let event = uuid::Uuid::now_v7();
    store
        .save(
            "s",
            Snapshot::new(10, json!({ "n": 10 })).with_last_event(event),
        )
        .await
        .unwrap();
    // The previous build's save, as it was before migration 7.
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{}\".snapshots AS t (stream_id, version, state) VALUES ($1, $2, $3) \
         ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, \
         state = EXCLUDED.state, updated_at = now() WHERE t.version < EXCLUDED.version",
        db.schema()
    )))
    .bind("s")
    .bind(20_i64)
    .bind(json!({ "n": 20 }))
    .execute(db.pool())
    .await
    .unwrap();
    let loaded = store.load("s").await.unwrap().expect("a snapshot");
    assert_eq!(loaded.version, 20);
    assert_eq!(
        loaded.last_event_id, None,
        "the id of version 10 is not version 20's"
    );
    db.drop_schema().await.unwrap();
}
