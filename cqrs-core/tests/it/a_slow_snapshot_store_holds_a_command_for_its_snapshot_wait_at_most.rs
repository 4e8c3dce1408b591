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

/// Opens ticket `id` through `repo`.
async fn open(
    repo: &AggregateRepository<Ticket>,
    id: &str,
) -> Result<cqrs_core::Committed<Ticket>, cqrs_core::AggregateError<cqrs_core::HandlerError>> {
    repo.execute(id, None, TicketCommand::Open, &Metadata::new())
        .await
}

/// Saves into `inner` once `gate` lets it through; panics instead with `panics`. Counts the
/// saves begun.
struct Gated {
    gate: Arc<Semaphore>,
    inner: InMemorySnapshotStore,
    panics: bool,
    begun: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl SnapshotStore for Gated {
    async fn load(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load(stream_id).await
    }

    async fn save(&self, stream_id: &str, snapshot: Snapshot) -> Result<(), StoreError> {
        self.begun.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
    begun: Arc<std::sync::atomic::AtomicUsize>,
}

/// A repository snapshotting every version into a store whose saves wait for the gate.
fn setup(wait: Duration, panics: bool) -> Setup {
    setup_in_order(wait, panics, false)
}

/// As [`setup`], the wait set before the snapshots with `wait_first`.
fn setup_in_order(wait: Duration, panics: bool, wait_first: bool) -> Setup {
    let gate = Arc::new(Semaphore::new(0));
    let saved = InMemorySnapshotStore::new();
    let events = Arc::new(InMemoryEventStore::new());
    let begun = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = Gated {
        gate: gate.clone(),
        inner: saved.clone(),
        panics,
        begun: begun.clone(),
    };
    let repo = AggregateRepository::<Ticket>::new(events.clone());
    let repo = if wait_first {
        repo.with_snapshot_wait(wait)
            .with_snapshots(Arc::new(store), 1)
    } else {
        repo.with_snapshots(Arc::new(store), 1)
            .with_snapshot_wait(wait)
    };
    Setup {
        repo,
        events,
        saved,
        gate,
        begun,
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

/// The wait set before the snapshots holds (it was dropped, and the command waited the
/// default), and a clone of the repository keeps it.
#[tokio::test(start_paused = true)]
async fn the_wait_holds_set_before_the_snapshots_and_in_a_clone() {
    let t = setup_in_order(Duration::from_millis(200), false, true);
    let repo = t.repo.clone();
    let started = tokio::time::Instant::now();
    open(&repo, "t-1").await.expect("the command succeeds");
    assert_eq!(started.elapsed(), Duration::from_millis(200));
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

/// A stuck store does not pile up a task per due snapshot: past 16 saves under way, a due
/// snapshot is skipped; once they finish, snapshots are saved again.
#[tokio::test(start_paused = true)]
async fn a_stuck_store_holds_at_most_sixteen_saves_under_way() {
    use std::sync::atomic::Ordering;
    let t = setup(Duration::ZERO, false);
    for n in 0..24 {
        open(&t.repo, &format!("t-{n}"))
            .await
            .expect("the command succeeds");
    }
    eventually(
        Duration::from_secs(10),
        "the saves under way begin",
        || async { (t.begun.load(Ordering::SeqCst) == 16).then_some(()) },
    )
    .await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        t.begun.load(Ordering::SeqCst),
        16,
        "the others were skipped"
    );

    t.gate.add_permits(1_000);
    eventually(
        Duration::from_secs(10),
        "the saves under way finish",
        || async {
            let saved = t.saved.load("ticket-t-15").await.unwrap();
            saved.map(|_| ())
        },
    )
    .await;
    // Room again: a later one is saved (each try a new ticket, so a snapshot is due).
    let tries = std::sync::atomic::AtomicUsize::new(100);
    eventually(
        Duration::from_secs(10),
        "a snapshot saved again",
        || async {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            open(&t.repo, &format!("t-{n}"))
                .await
                .expect("the command succeeds");
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            t.saved
                .load(&format!("ticket-t-{n}"))
                .await
                .unwrap()
                .map(|_| ())
        },
    )
    .await;
}

/// On a runtime without tokio's time driver (no `enable_time`), the wait cannot be timed: the
/// command returns without waiting, and the save goes on by itself. The timer, made as the
/// wait began, panicked after the events were stored, failing a command that took effect.
#[test]
fn without_a_time_driver_the_command_succeeds_and_the_save_goes_on() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime without timers");
    runtime.block_on(async {
        let events = Arc::new(InMemoryEventStore::new());
        let saved = InMemorySnapshotStore::new();
        let repo = AggregateRepository::<Ticket>::new(events.clone())
            .with_snapshots(Arc::new(saved.clone()), 1);
        let committed = repo
            .execute("t-1", None, TicketCommand::Open, &Metadata::new())
            .await
            .expect("the command succeeds");
        assert_eq!(committed.version, 1);
        assert_eq!(events.stream_version(STREAM).await.unwrap(), 1);
        // No timer here: the save's task runs as this one yields.
        for _ in 0..1_000 {
            if saved.load(STREAM).await.unwrap().is_some() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the snapshot was never saved");
    });
}

/// A save whose task a runtime dropped before it ever ran (a runtime made for one call, shut
/// down as the call returned) is no longer under way: sixteen such used to leave the count of
/// saves up for good, and every later snapshot of the repository was skipped.
#[test]
fn saves_dropped_with_their_runtime_are_not_left_under_way() {
    let events = Arc::new(InMemoryEventStore::new());
    let saved = InMemorySnapshotStore::new();
    let repo = AggregateRepository::<Ticket>::new(events)
        .with_snapshots(Arc::new(saved.clone()), 1)
        .with_snapshot_wait(Duration::ZERO);
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    };
    for n in 0..20 {
        // Not waited for: the call returns before the save's task is first polled, and the
        // runtime, dropped, drops the task.
        runtime()
            .block_on(repo.execute(
                &format!("t-{n}"),
                None,
                TicketCommand::Open,
                &Metadata::new(),
            ))
            .expect("the command succeeds");
    }
    runtime().block_on(async {
        repo.execute("t-last", None, TicketCommand::Open, &Metadata::new())
            .await
            .expect("the command succeeds");
        eventually(
            Duration::from_secs(10),
            "the last snapshot is saved",
            || async { saved.load("ticket-t-last").await.unwrap().map(|_| ()) },
        )
        .await;
    });
}
