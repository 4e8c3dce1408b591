//! A snapshot saved when the aggregate's state had another shape or logic (another
//! `Aggregate::SNAPSHOT_VERSION`) is passed over, even when it still decodes: the stream is
//! replayed. Only decoding failures used to retire a snapshot, and most changes still decode (a
//! new field with a default), so loads decided on a state a replay would not give.

use crate::aggregates_decide_on_their_history::CounterEvent;
use crate::fixtures::*;
use cqrs_core::memory::{InMemoryEventStore, InMemorySnapshotStore};
use cqrs_core::ports::SnapshotStore;
use cqrs_core::{Aggregate, AggregateRepository, HandlerError, Metadata};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The first build's state: a total.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Tally {
    total: u64,
}

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Event = CounterEvent;
    type Command = u64;
    type Error = HandlerError;

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Added(added) = event;
        self.total += added.sum;
    }

    fn decide(&self, add: u64) -> Result<Vec<CounterEvent>, HandlerError> {
        Ok(vec![Added { sum: add }.into()])
    }
}

/// The next build's: it counts the additions too, a field older snapshots lack (they still
/// decode, with 0), so it says its snapshots are of version 2.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CountingTally {
    total: u64,
    #[serde(default)]
    additions: u64,
}

impl Aggregate for CountingTally {
    const TYPE: &'static str = "tally";
    const SNAPSHOT_VERSION: u32 = 2;
    type Event = CounterEvent;
    type Command = u64;
    type Error = HandlerError;

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Added(added) = event;
        self.total += added.sum;
        self.additions += 1;
    }

    fn decide(&self, add: u64) -> Result<Vec<CounterEvent>, HandlerError> {
        Ok(vec![Added { sum: add }.into()])
    }
}

#[test]
fn snapshots_of_another_state_version_are_passed_over() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let snapshots = Arc::new(InMemorySnapshotStore::new());
        let first =
            AggregateRepository::<Tally>::new(events.clone()).with_snapshots(snapshots.clone(), 1);
        for add in [1, 2, 3] {
            first
                .execute("t", None, add, &Metadata::new())
                .await
                .unwrap();
        }

        let next = AggregateRepository::<CountingTally>::new(events.clone())
            .with_snapshots(snapshots.clone(), 1);
        let loaded = next.load("t").await.unwrap();
        assert_eq!(
            (loaded.state.total, loaded.state.additions, loaded.version),
            (6, 3, 3),
            "the first build's snapshot is passed over: the whole stream is replayed"
        );

        // The next build's own snapshot replaces it and is used.
        next.execute("t", None, 4, &Metadata::new()).await.unwrap();
        let saved = snapshots
            .load("tally-t")
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(saved.version, 4);
        let loaded = next.load("t").await.unwrap();
        assert_eq!((loaded.state.total, loaded.state.additions), (10, 4));

        // A build of the first version (a rollback) passes over the newer snapshot too.
        let loaded = first.load("t").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (10, 4));
    });
}

/// A snapshot at version 0 (the repository never saves one; another writer might) includes no
/// event: its state is passed over, or the whole stream would be replayed on top of it.
#[test]
fn a_snapshot_at_version_zero_is_passed_over() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let snapshots = Arc::new(InMemorySnapshotStore::new());
        let repo =
            AggregateRepository::<Tally>::new(events.clone()).with_snapshots(snapshots.clone(), 1);
        repo.execute("t", None, 5, &Metadata::new()).await.unwrap();
        let mut saved = snapshots
            .load("tally-t")
            .await
            .unwrap()
            .expect("a snapshot");
        saved.version = 0;
        saved.last_event_id = None;
        // In a store of its own: a store keeps the newest snapshot of a stream.
        let zero = Arc::new(InMemorySnapshotStore::new());
        zero.save("tally-t", saved).await.unwrap();
        let repo = AggregateRepository::<Tally>::new(events.clone()).with_snapshots(zero, 1);
        let loaded = repo.load("t").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (5, 1));
    });
}
