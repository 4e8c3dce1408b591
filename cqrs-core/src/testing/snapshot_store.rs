//! The snapshot store conformance suite. See [`SnapshotStore`] for the contract.
//!
//! Run it with [`snapshot_store_conformance!`](crate::snapshot_store_conformance).

use super::Harness;
use crate::ports::{Snapshot, SnapshotStore, StoreError};
use serde_json::json;
use std::sync::Arc;

/// What a snapshot store adapter provides to its conformance suite.
pub trait SnapshotStoreHarness: Harness {
    /// The store under test.
    fn store(&self) -> Arc<dyn SnapshotStore>;
}

/// Expands to one `#[tokio::test]` per snapshot store scenario.
#[macro_export]
macro_rules! snapshot_store_conformance {
    ($make:path) => {
        $crate::__conformance!(
            $make,
            snapshot_store,
            [
                a_stream_without_a_snapshot_has_none,
                the_latest_snapshot_is_loaded_whole,
                an_older_or_equal_snapshot_is_ignored,
                streams_keep_their_own_snapshots,
                concurrent_saves_keep_the_newest,
                the_last_event_id_is_kept_with_the_snapshot,
                a_state_the_store_cannot_hold_is_refused,
            ]
        );
    };
}

fn stream(h: &impl Harness, name: &str) -> String {
    format!("{}-{name}", h.test_id())
}

/// Loading a stream that never had a snapshot is `None`, not an error.
pub async fn a_stream_without_a_snapshot_has_none<H: SnapshotStoreHarness>(h: &H) {
    let loaded = h.store().load(&stream(h, "none")).await.unwrap();
    assert_eq!(loaded, None);
}

/// A newer snapshot replaces the stored one, and the state comes back as it was saved
/// (nested values, text beyond ASCII, integers beyond 32 bits).
pub async fn the_latest_snapshot_is_loaded_whole<H: SnapshotStoreHarness>(h: &H) {
    let store = h.store();
    let id = stream(h, "latest");
    store
        .save(&id, Snapshot::new(5, json!({ "n": 5 })))
        .await
        .unwrap();
    let state = json!({
        "n": 10,
        "title": "Drucker brennt – ünïcødé ✓",
        "big": 9_007_199_254_740_993_u64,
        "nested": { "list": [1, "two", null, { "three": true }] },
    });
    store
        .save(&id, Snapshot::new(10, state.clone()))
        .await
        .unwrap();
    assert_eq!(
        store.load(&id).await.unwrap(),
        Some(Snapshot::new(10, state))
    );
}

/// A snapshot at an older version than the stored one, or at the same version, leaves the
/// stored one in place: a slow writer never takes a stream's snapshot back in time.
pub async fn an_older_or_equal_snapshot_is_ignored<H: SnapshotStoreHarness>(h: &H) {
    let store = h.store();
    let id = stream(h, "older");
    let kept = Snapshot::new(100, json!({ "at": 100 }));
    store.save(&id, kept.clone()).await.unwrap();
    store
        .save(&id, Snapshot::new(50, json!({ "at": 50 })))
        .await
        .unwrap();
    assert_eq!(store.load(&id).await.unwrap(), Some(kept.clone()));
    store
        .save(&id, Snapshot::new(100, json!({ "at": "100 again" })))
        .await
        .unwrap();
    assert_eq!(store.load(&id).await.unwrap(), Some(kept));
}

/// Each stream has its own snapshot.
pub async fn streams_keep_their_own_snapshots<H: SnapshotStoreHarness>(h: &H) {
    let store = h.store();
    let (a, b) = (stream(h, "a"), stream(h, "b"));
    store.save(&a, Snapshot::new(3, json!("a"))).await.unwrap();
    store.save(&b, Snapshot::new(1, json!("b"))).await.unwrap();
    assert_eq!(
        store.load(&a).await.unwrap(),
        Some(Snapshot::new(3, json!("a")))
    );
    assert_eq!(
        store.load(&b).await.unwrap(),
        Some(Snapshot::new(1, json!("b")))
    );
}

/// Many writers saving one stream at once, in no particular order, leave the newest version.
pub async fn concurrent_saves_keep_the_newest<H: SnapshotStoreHarness>(h: &H) {
    let store = h.store();
    let id = stream(h, "concurrent");
    let mut tasks = tokio::task::JoinSet::new();
    // Newest first, so a store that keeps the last write (not the newest) fails.
    for version in (1..=20_u64).rev() {
        let (store, id) = (Arc::clone(&store), id.clone());
        tasks.spawn(async move {
            store
                .save(&id, Snapshot::new(version, json!({ "v": version })))
                .await
        });
    }
    while let Some(saved) = tasks.join_next().await {
        saved.expect("a save task").expect("a save");
    }
    assert_eq!(
        store.load(&id).await.unwrap(),
        Some(Snapshot::new(20, json!({ "v": 20 })))
    );
}

/// The id of the stream's event at the snapshot's version comes back as saved, replaced with
/// the rest of the snapshot; a snapshot saved without one loads without one.
pub async fn the_last_event_id_is_kept_with_the_snapshot<H: SnapshotStoreHarness>(h: &H) {
    let store = h.store();
    let id = stream(h, "last-event");
    store
        .save(&id, Snapshot::new(3, json!({ "n": 3 })))
        .await
        .unwrap();
    let loaded = store.load(&id).await.unwrap().expect("a snapshot");
    assert_eq!(loaded.last_event_id, None);
    let event = uuid::Uuid::now_v7();
    store
        .save(
            &id,
            Snapshot::new(4, json!({ "n": 4 })).with_last_event(event),
        )
        .await
        .unwrap();
    let loaded = store.load(&id).await.unwrap().expect("a snapshot");
    assert_eq!((loaded.version, loaded.last_event_id), (4, Some(event)));
    let later = uuid::Uuid::now_v7();
    store
        .save(
            &id,
            Snapshot::new(6, json!({ "n": 6 })).with_last_event(later),
        )
        .await
        .unwrap();
    let loaded = store.load(&id).await.unwrap().expect("a snapshot");
    assert_eq!((loaded.version, loaded.last_event_id), (6, Some(later)));
    // A newer snapshot without an id does not keep the older one's: the id belongs to its
    // version only.
    store
        .save(&id, Snapshot::new(8, json!({ "n": 8 })))
        .await
        .unwrap();
    let loaded = store.load(&id).await.unwrap().expect("a snapshot");
    assert_eq!((loaded.version, loaded.last_event_id), (8, None));
}

/// A state nested more than [`MAX_RESPONSE_DEPTH`](crate::ports::MAX_RESPONSE_DEPTH) deep
/// (which could be stored but never read back) or holding U+0000 (which Postgres cannot
/// store) is refused as [`StoreError::Rejected`], and the snapshot before it stays; one at
/// the bound is kept and loads back whole.
pub async fn a_state_the_store_cannot_hold_is_refused<H: SnapshotStoreHarness>(h: &H) {
    let store = h.store();
    let id = stream(h, "unholdable");
    let nested = |levels: usize| {
        (0..levels).fold(json!(1), |inner, _| serde_json::Value::Array(vec![inner]))
    };
    let depth = crate::ports::MAX_RESPONSE_DEPTH;
    store
        .save(&id, Snapshot::new(1, nested(depth)))
        .await
        .expect("a state at the bound is kept");
    let loaded = store
        .load(&id)
        .await
        .unwrap()
        .expect("the snapshot at the bound");
    assert_eq!(loaded.state, nested(depth));
    for (what, state) in [
        ("too deep", nested(depth + 1)),
        ("holding U+0000", json!({ "title": "a\u{0}b" })),
    ] {
        match store.save(&id, Snapshot::new(2, state)).await {
            Err(StoreError::Rejected { .. }) => {}
            other => panic!("a state {what}: refused as `Rejected`, not: {other:?}"),
        }
        let kept = store.load(&id).await.unwrap().expect("the snapshot before");
        assert_eq!(
            kept.version, 1,
            "a state {what} replaced the snapshot before"
        );
    }
}
