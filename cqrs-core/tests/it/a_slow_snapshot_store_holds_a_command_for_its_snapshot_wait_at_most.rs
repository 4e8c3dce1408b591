//! A command whose events made a snapshot due has taken effect once they are stored. Its
//! snapshot's save, which used to run inside the command to the end, now runs in a task of
//! its own: a stuck store holds the command for the repository's snapshot wait at most (not
//! until a time-out layer reports the command failed, so that its client retries it), a command
//! given up during the save does not cut the save off, and a store that panics fails nothing.

use async_trait::async_trait;
use cqrs_core::doc::{Ticket, TicketCommand};
use cqrs_core::memory::{InMemoryEventStore, InMemorySnapshotStore};
use cqrs_core::ports::{EventStore, Snapshot, SnapshotStore, StoreError};
use cqrs_core::testing::eventually;
use cqrs_core::{AggregateRepository, Metadata};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

const STREAM: &str = "ticket-t-1";

/// Saves into `inner` once `gate` lets it through; panics instead with `panics`.
struct Gated {
    gate: Arc<Semaphore>,
    inner: InMemorySnapshotStore,
    panics: bool,
}

#[async_trait]
impl SnapshotStore for Gated {
    async fn load(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load(stream_id).await
    }

    async fn save(&self, stream_id: &str, snapshot: Snapshot) -> Result<(), StoreError> {
        if self.panics {
            panic!("a bug in the snapshot store");
        }
        let _permit = self.gate.acquire().await.expect("the gate is never closed");
        self.inner.save(stream_id, snapshot).await
    }
}

struct Setup {
    repo: AggregateRepository<Ticket>,
    events: Arc<InMemoryEventStore>,
    saved: InMemorySnapshotStore,
    gate: Arc<Semaphore>,
}

/// A repository snapshotting every version into a store whose saves wait for the gate.
fn setup(wait: Duration, panics: bool) -> Setup {
    let gate = Arc::new(Semaphore::new(0));
    let saved = InMemorySnapshotStore::new();
    let events = Arc::new(InMemoryEventStore::new());
    let store = Gated {
        gate: gate.clone(),
        inner: saved.clone(),
        panics,
    };
    let repo = AggregateRepository::<Ticket>::new(events.clone())
        .with_snapshots(Arc::new(store), 1)
        .with_snapshot_wait(wait);
    Setup {
        repo,
        events,
        saved,
        gate,
    }
}

async fn snapshot_lands(saved: &InMemorySnapshotStore) {
    let version = eventually(Duration::from_secs(30), "the snapshot is saved", || async {
        saved.load(STREAM).await.unwrap().map(|s| s.version)
    })
    .await;
    assert_eq!(version, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stuck_save_holds_its_command_for_the_wait_and_lands_after_it() {
    let t = setup(Duration::from_millis(200), false);
    let started = tokio::time::Instant::now();
    let committed = tokio::time::timeout(
        Duration::from_secs(60),
        t.repo
            .execute("t-1", None, TicketCommand::Open, &Metadata::new()),
    )
    .await
    .expect("the command returns although its snapshot's save is stuck")
    .expect("the command succeeds");
    assert_eq!(committed.version, 1);
    // The clock is paused, so this is the wait exactly: the command waited for the save first.
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    assert_eq!(t.events.stream_version(STREAM).await.unwrap(), 1);
    assert!(t.saved.load(STREAM).await.unwrap().is_none());

    t.gate.add_permits(1);
    snapshot_lands(&t.saved).await;
}

#[tokio::test(start_paused = true)]
async fn a_command_given_up_during_its_save_does_not_cut_the_save_off() {
    let t = setup(Duration::from_secs(5), false);
    // A time-out layer (or a client gone) gives the command up while its snapshot is saved.
    let given_up = tokio::time::timeout(
        Duration::from_millis(50),
        t.repo
            .execute("t-1", None, TicketCommand::Open, &Metadata::new()),
    )
    .await;
    assert!(
        given_up.is_err(),
        "the command was given up during the save"
    );
    assert_eq!(t.events.stream_version(STREAM).await.unwrap(), 1);

    t.gate.add_permits(1);
    snapshot_lands(&t.saved).await;
}

#[tokio::test(start_paused = true)]
async fn a_store_that_panics_saving_fails_nothing() {
    let t = setup(Duration::from_secs(5), true);
    let committed = t
        .repo
        .execute("t-1", None, TicketCommand::Open, &Metadata::new())
        .await
        .expect("a snapshot store's panic does not fail a command that took effect");
    assert_eq!(committed.version, 1);
    assert!(t.saved.load(STREAM).await.unwrap().is_none());
    // The next command loads the stream without a snapshot, as before.
    let again = t
        .repo
        .execute("t-1", None, TicketCommand::Open, &Metadata::new())
        .await;
    assert!(
        again.is_err(),
        "the reloaded ticket is open, so opening it again is refused"
    );
}
