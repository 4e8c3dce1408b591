//! The in-memory event store refuses U+0000 wherever the Postgres store cannot hold it, so a
//! test on memory meets the refusal a server on Postgres would answer with.

use crate::fixtures::run;
use cqrs_core::memory::InMemoryEventStore;
use cqrs_core::ports::{EventStore, ExpectedVersion, StoreError};
use cqrs_core::testing::event_store::record;
use cqrs_core::{EventRecord, Position};
use serde_json::json;

#[test]
fn text_holding_nul_is_rejected_wherever_it_is() {
    run(async {
        let store = InMemoryEventStore::new();
        let with = |change: fn(&mut EventRecord)| {
            let mut r = record(1);
            change(&mut r);
            r
        };
        let cases = [
            ("stream id", "s\0", record(1)),
            ("event type", "s", with(|r| r.event_type = "No\0ted".into())),
            (
                "payload text",
                "s",
                with(|r| r.payload = json!({ "t": ["a\0b"] })),
            ),
            (
                "payload key",
                "s",
                with(|r| r.payload = json!({ "a\0": 1 })),
            ),
            (
                "partition key",
                "s",
                with(|r| r.partition_key = Some("k\0".into())),
            ),
            (
                "actor",
                "s",
                with(|r| r.metadata.actor = Some("u\0".into())),
            ),
            (
                "trace context",
                "s",
                with(|r| {
                    r.metadata
                        .trace_context
                        .insert("traceparent".into(), "0\0".into());
                }),
            ),
        ];
        for (what, stream, event) in cases {
            let refused = store
                .append(stream, ExpectedVersion::Any, vec![record(2), event])
                .await
                .expect_err(what);
            assert!(
                matches!(refused, StoreError::Rejected { .. }),
                "{what}: {refused:?}"
            );
        }
        assert!(
            store
                .read_all(Position::START, 10)
                .await
                .unwrap()
                .is_empty(),
            "nothing of any batch was stored"
        );
        // A schema version past a Postgres integer cannot be stored either: a codec error.
        let refused = store
            .append(
                "s",
                ExpectedVersion::Any,
                vec![with(|r| r.schema_version = u32::MAX)],
            )
            .await
            .unwrap_err();
        assert!(matches!(refused, StoreError::Codec(_)), "{refused:?}");
        // Other control characters are text like any other.
        store
            .append(
                "s",
                ExpectedVersion::Any,
                vec![with(|r| r.payload = json!("a\u{1}b"))],
            )
            .await
            .unwrap();
    });
}

/// The snapshot store refuses such a stream id as well, on load and on save, as Postgres does,
/// instead of reading it as a stream with no snapshot.
#[test]
fn the_snapshot_store_refuses_a_stream_id_holding_nul() {
    use cqrs_core::memory::InMemorySnapshotStore;
    use cqrs_core::ports::{Snapshot, SnapshotStore};
    run(async {
        let snapshots = InMemorySnapshotStore::new();
        let loaded = snapshots.load("s\0").await;
        assert!(
            matches!(loaded, Err(StoreError::Rejected { .. })),
            "{loaded:?}"
        );
        let saved = snapshots.save("s\0", Snapshot::new(1, json!({}))).await;
        assert!(
            matches!(saved, Err(StoreError::Rejected { .. })),
            "{saved:?}"
        );
        snapshots
            .save("s", Snapshot::new(1, json!({})))
            .await
            .expect("another stream id is fine");
    });
}
