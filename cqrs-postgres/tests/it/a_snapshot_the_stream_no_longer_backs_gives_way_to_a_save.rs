//! After events were restored from a backup older than the snapshots, a stream's stored
//! snapshot can be ahead of the stream, or of another history at its version. A save of a
//! snapshot the stream does back replaces it, so loads stop replaying the whole stream; a
//! stale save never takes a snapshot the stream backs back in time.

use crate::support::{pg_test, record};
use cqrs_core::EventRecord;
use cqrs_core::ports::{EventStore, ExpectedVersion, Snapshot, SnapshotStore};
use serde_json::json;

async fn stream_of(db: &cqrs_postgres::PgDatabase, events: u64) -> Vec<EventRecord> {
    db.event_store()
        .append(
            "s",
            ExpectedVersion::NO_STREAM,
            (1..=events).map(record).collect(),
        )
        .await
        .unwrap()
}

fn at(events: &[EventRecord], version: u64) -> Snapshot {
    Snapshot::new(version, json!({ "at": version }))
        .with_last_event(events[version as usize - 1].event_id)
}

async fn loaded_version(db: &cqrs_postgres::PgDatabase) -> Option<u64> {
    db.snapshot_store()
        .load("s")
        .await
        .unwrap()
        .map(|s| s.version)
}

pg_test! {
    async fn a_snapshot_ahead_of_its_stream_gives_way_to_a_save(db: PgDatabase) {
        let events = stream_of(&db, 60).await;
        let snapshots = db.snapshot_store();
        // Saved before the stream was restored to 60 events.
        snapshots
            .save("s", Snapshot::new(100, json!({ "at": 100 })).with_last_event(uuid::Uuid::now_v7()))
            .await
            .unwrap();
        snapshots.save("s", at(&events, 60)).await.unwrap();
        assert_eq!(
            loaded_version(&db).await,
            Some(60),
            "a snapshot past the stream's end kept the stream's own snapshot out"
        );
        // A stale save does not take it back in time.
        snapshots.save("s", at(&events, 50)).await.unwrap();
        assert_eq!(loaded_version(&db).await, Some(60));
        // A newer version replaces it as ever (the store refuses no save).
        snapshots
            .save("s", Snapshot::new(100, json!({ "at": 100 })))
            .await
            .unwrap();
        assert_eq!(loaded_version(&db).await, Some(100), "a newer version still wins");
    }
}

pg_test! {
    async fn a_snapshot_of_another_history_gives_way_to_a_save(db: PgDatabase) {
        let events = stream_of(&db, 80).await;
        let snapshots = db.snapshot_store();
        // At a version the stream has, but naming an event it does not have there.
        snapshots
            .save("s", Snapshot::new(70, json!({ "at": "elsewhere" })).with_last_event(uuid::Uuid::now_v7()))
            .await
            .unwrap();
        snapshots.save("s", at(&events, 65)).await.unwrap();
        assert_eq!(loaded_version(&db).await, Some(65));
        snapshots.save("s", at(&events, 64)).await.unwrap();
        assert_eq!(loaded_version(&db).await, Some(65), "a stale save went back in time");
    }
}

pg_test! {
    async fn a_snapshot_without_events_is_replaced_only_by_a_newer_one(db: PgDatabase) {
        // A snapshot store used without this schema's events: there is no stream to compare
        // with, and an older save is ignored as before.
        let snapshots = db.snapshot_store();
        snapshots.save("s", Snapshot::new(100, json!({}))).await.unwrap();
        snapshots.save("s", Snapshot::new(50, json!({}))).await.unwrap();
        assert_eq!(loaded_version(&db).await, Some(100));
    }
}
