use crate::fixtures::*;
use cqrs_core::memory::{InMemoryEventStore, InMemorySnapshotStore};
use cqrs_core::ports::{EventStore, ExpectedVersion, Snapshot, SnapshotStore, StoreError};
use cqrs_core::{
    Aggregate, AggregateError, AggregateRepository, ErrorKind, EventEnvelope, EventRecord,
    EventTypes, HandlerError, Metadata, UnknownEventPolicy, async_trait, event_set,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

event_set! {
    pub enum CounterEvent {
        Added(Added),
    }
}

/// A running total that refuses to go past 100.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Total {
    total: u64,
    applied: u64,
}

impl Aggregate for Total {
    const TYPE: &'static str = "total";
    type Event = CounterEvent;
    type Command = u64;
    type Error = HandlerError;

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Added(added) = event;
        self.total += added.sum;
        self.applied += 1;
    }

    fn decide(&self, add: u64) -> Result<Vec<CounterEvent>, HandlerError> {
        if self.total + add > 100 {
            return Err(HandlerError::conflict(
                "too_much",
                "the total would pass 100",
            ));
        }
        Ok(vec![Added { sum: add }.into()])
    }
}

#[test]
fn the_repository_loads_decides_and_appends_at_the_loaded_version() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let repo = AggregateRepository::<Total>::new(store.clone());
        let metadata = Metadata::new().with_actor("u1");
        let mut positions = Vec::new();
        for add in [10, 20, 30] {
            let committed = repo.execute("a", None, add, &metadata).await.unwrap();
            positions.push(committed.position().expect("an event was stored").get());
        }
        // Another stream's event in between: positions are the store's global order.
        repo.execute("b", None, 1, &metadata).await.unwrap();
        let committed = repo.execute("a", None, 0, &metadata).await.unwrap();
        positions.push(committed.position().unwrap().get());
        assert_eq!(positions, [1, 2, 3, 5], "each write's last position");
        let loaded = repo.load("a").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (60, 4));
        let refused = repo.execute("a", None, 50, &metadata).await.unwrap_err();
        let AggregateError::Rejected(e) = refused else {
            panic!("expected a refusal")
        };
        assert_eq!(e.code(), "too_much");

        let stale = repo.execute("a", Some(2), 1, &metadata).await.unwrap_err();
        assert!(matches!(
            stale,
            AggregateError::Store(StoreError::Conflict { actual: 4, .. })
        ));
        let as_handler_error: HandlerError = stale.into();
        assert_eq!(as_handler_error.code(), "version_conflict");

        let stored = store.load("total-a", 0).await.unwrap();
        assert_eq!(stored.len(), 4);
        assert_eq!(stored[0].metadata.actor.as_deref(), Some("u1"));
        assert_eq!(stored[0].metadata.causation_id, Some(metadata.message_id));
        // The stream, not the bare id: another aggregate type's `a` is another chain.
        assert_eq!(stored[0].partition_key.as_deref(), Some("total-a"));
    });
}

/// A stream holding events under a type's old wire name loads through a rename in the
/// repository's types, and the next write carries the new name.
#[test]
fn a_stream_with_events_under_an_old_type_name_loads_through_a_rename() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let m = Metadata::new();
        let old = EventRecord::new(
            m.message_id,
            "test.summed",
            1,
            serde_json::json!({"sum": 7}),
            cqrs_core::RecordMetadata::from_metadata(&m),
        );
        store
            .append("total-a", ExpectedVersion::NO_STREAM, vec![old])
            .await
            .unwrap();
        let plain = AggregateRepository::<Total>::new(store.clone());
        assert!(
            matches!(
                plain.load("a").await,
                Err(AggregateError::UnknownEvent { .. })
            ),
            "without the rename the old name is unknown"
        );
        let mut types = EventTypes::of::<CounterEvent>();
        types.rename("test.summed", "test.added");
        let repo = AggregateRepository::<Total>::with_types(store.clone(), Arc::new(types));
        assert_eq!(repo.load("a").await.unwrap().state.total, 7);
        repo.execute("a", None, 1, &m).await.unwrap();
        let stored = store.load("total-a", 1).await.unwrap();
        assert_eq!(stored[0].event_type, "test.added");
    });
}

/// An empty aggregate id is refused, on every way in, before anything is read or stored: it
/// would name one stream (`total-`) shared by every command that came without an id.
#[test]
fn an_empty_aggregate_id_is_refused_before_anything_is_stored() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let repo = AggregateRepository::<Total>::new(store.clone());
        let metadata = Metadata::new();
        let empty = |error: AggregateError<HandlerError>| {
            assert!(
                matches!(error, AggregateError::EmptyId { aggregate: "total" }),
                "{error:?}"
            );
            let as_handler_error: HandlerError = error.into();
            assert_eq!(as_handler_error.code(), "empty_aggregate_id");
            assert_eq!(as_handler_error.kind(), ErrorKind::Invalid);
            assert!(
                as_handler_error
                    .to_string()
                    .contains("`total` aggregate is empty")
            );
        };
        empty(repo.execute("", None, 1, &metadata).await.unwrap_err());
        empty(repo.decide("", None, 1, &metadata).await.unwrap_err());
        empty(repo.load("").await.map(|_| ()).unwrap_err());
        empty(repo.rebuild("", Vec::new()).map(|_| ()).unwrap_err());
        let by_hand = cqrs_core::Loaded {
            id: String::new(),
            state: Total::default(),
            version: 0,
        };
        empty(
            repo.decide_on(by_hand, None, 1, &metadata)
                .map(|_| ())
                .unwrap_err(),
        );
        assert!(store.load("total-", 0).await.unwrap().is_empty());
        assert!(
            store
                .read_all(Default::default(), 10)
                .await
                .unwrap()
                .is_empty(),
            "nothing stored"
        );
    });
}

/// An event store where another writer appends `Added { sum }` to the stream just before each
/// of the first `races` appends of this one.
struct Racing {
    inner: InMemoryEventStore,
    races: std::sync::atomic::AtomicU32,
    sum: u64,
    /// The event ids of every append of this writer's, in order.
    attempts: std::sync::Mutex<Vec<Vec<uuid::Uuid>>>,
}

#[async_trait]
impl EventStore for Racing {
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        use std::sync::atomic::Ordering;
        self.attempts
            .lock()
            .unwrap()
            .push(events.iter().map(|e| e.event_id).collect());
        let raced = self
            .races
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if raced.is_ok() {
            self.inner
                .append(stream_id, ExpectedVersion::Any, vec![added(self.sum)])
                .await?;
        }
        self.inner.append(stream_id, expected, events).await
    }

    async fn load(&self, stream_id: &str, after: u64) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.load(stream_id, after).await
    }

    async fn read_all(
        &self,
        after: cqrs_core::Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.read_all(after, limit).await
    }

    async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(stream_id).await
    }
}

fn racing(races: u32, sum: u64) -> Arc<Racing> {
    Arc::new(Racing {
        inner: InMemoryEventStore::new(),
        races: races.into(),
        sum,
        attempts: Default::default(),
    })
}

/// A writer that lost a race decides again on what the winner did: it gets the aggregate's
/// own refusal on the new state, or succeeds on it; it gets the conflict only when every
/// attempt lost.
#[test]
fn execute_retrying_decides_again_on_what_the_winner_did() {
    run(async {
        let metadata = Metadata::new()
            .with_actor("user-1")
            .with_trace_field(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .with_header("tenant", "acme");
        // Lost once, then added on top of the winner's 10.
        let store = racing(1, 10);
        let repo = AggregateRepository::<Total>::new(store.clone());
        let committed = repo
            .execute_retrying("a", || 30, &metadata, 3)
            .await
            .unwrap();
        assert_eq!((committed.state.total, committed.version), (40, 2));
        // The attempt that went through carries the command's ids, actor and trace context
        // (metadata made once outside the loop would still pass; one dropped on a retry would
        // not), under event ids of its own: its events were decided again, on another state.
        let stored = store.load("total-a", 1).await.unwrap();
        let ours = &stored[0].metadata;
        assert_eq!(ours.correlation_id, metadata.correlation_id);
        assert_eq!(ours.causation_id, Some(metadata.message_id));
        assert_eq!(ours.actor.as_deref(), Some("user-1"));
        assert_eq!(
            ours.trace_context.get("traceparent").map(String::as_str),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(
            ours.headers.get("tenant"),
            Some("acme"),
            "the command's headers pass on to its events"
        );
        let attempts = store.attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), 2, "{attempts:?}");
        assert_eq!(attempts[1], vec![stored[0].event_id]);
        assert_ne!(attempts[0], attempts[1], "the retry drew fresh event ids");

        // The winner took 95 of the 100: deciding again, the loser is refused as the aggregate
        // refuses, not with a version conflict.
        let repo = AggregateRepository::<Total>::new(racing(1, 95));
        let refused = repo
            .execute_retrying("a", || 30, &metadata, 3)
            .await
            .unwrap_err();
        let AggregateError::Rejected(e) = refused else {
            panic!("the aggregate's refusal, not {refused:?}")
        };
        assert_eq!(e.code(), "too_much");

        // Every attempt lost: the last conflict.
        let repo = AggregateRepository::<Total>::new(racing(3, 1));
        let lost = repo
            .execute_retrying("a", || 30, &metadata, 3)
            .await
            .unwrap_err();
        assert!(
            matches!(
                lost,
                AggregateError::Store(StoreError::Conflict { actual: 3, .. })
            ),
            "{lost:?}"
        );
        // Once, with one attempt, as `execute` does.
        let repo = AggregateRepository::<Total>::new(racing(1, 1));
        let once = repo
            .execute_retrying("a", || 30, &metadata, 1)
            .await
            .unwrap_err();
        assert!(
            matches!(once, AggregateError::Store(StoreError::Conflict { .. })),
            "{once:?}"
        );
    });
}

/// A command prepared by I/O (a service asked) is prepared again on each attempt, on the state
/// the winner of a race left, and the events carry the command's metadata; a preparation that
/// fails ends the call with the aggregate's refusal, nothing appended and nothing retried.
#[test]
fn execute_retrying_prepared_prepares_again_on_what_the_winner_did() {
    run(async {
        let metadata = Metadata::new().with_actor("user-1");
        // Lost once: the winner added 10 before the second attempt loaded.
        let store = racing(1, 10);
        let repo = AggregateRepository::<Total>::new(store.clone());
        let seen = std::sync::Mutex::new(Vec::new());
        let committed = repo
            .execute_retrying_prepared(
                "a",
                |loaded| {
                    seen.lock()
                        .unwrap()
                        .push((loaded.version, loaded.state.total));
                    // The service's answer depends on what it was shown: add what is left
                    // to 50.
                    let add = 50 - loaded.state.total;
                    async move {
                        tokio::task::yield_now().await;
                        Ok::<_, HandlerError>(add)
                    }
                },
                &metadata,
                3,
            )
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![(0, 0), (1, 10)]);
        assert_eq!((committed.state.total, committed.version), (50, 2));
        let stored = store.load("total-a", 1).await.unwrap();
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(stored[0].metadata.causation_id, Some(metadata.message_id));
        assert_eq!(stored[0].metadata.actor.as_deref(), Some("user-1"));

        // The service refuses: the refusal, nothing appended, asked once.
        let store = racing(0, 0);
        let repo = AggregateRepository::<Total>::new(store.clone());
        let asked = std::sync::atomic::AtomicU32::new(0);
        let refused = repo
            .execute_retrying_prepared(
                "b",
                |_| {
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async { Err(HandlerError::forbidden("the service said no")) }
                },
                &metadata,
                3,
            )
            .await
            .unwrap_err();
        let AggregateError::Rejected(e) = refused else {
            panic!("the service's refusal, not {refused:?}")
        };
        assert_eq!(e.kind(), ErrorKind::Forbidden);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(store.stream_version("total-b").await.unwrap(), 0);

        // Every attempt lost: the last conflict, the service asked on each.
        let store = racing(3, 1);
        let repo = AggregateRepository::<Total>::new(store.clone());
        let asked = std::sync::atomic::AtomicU32::new(0);
        let lost = repo
            .execute_retrying_prepared(
                "c",
                |_| {
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async { Ok(1) }
                },
                &metadata,
                3,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                lost,
                AggregateError::Store(StoreError::Conflict { actual: 3, .. })
            ),
            "{lost:?}"
        );
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 3);
    });
}

/// Events restored from a backup older than the snapshots: each snapshot names the stream's
/// event at its version, and a load that does not find that event there passes the snapshot
/// over, both while the stream is behind it and once new events have taken the stream past its
/// version (the stale snapshot would then decide on a history the stream no longer has).
#[test]
fn a_snapshot_of_another_history_is_passed_over() {
    run(async {
        let snapshots = Arc::new(InMemorySnapshotStore::new());
        let before = Arc::new(InMemoryEventStore::new());
        let repo =
            AggregateRepository::<Total>::new(before.clone()).with_snapshots(snapshots.clone(), 1);
        for _ in 0..5 {
            repo.execute("r", None, 1, &Metadata::new()).await.unwrap();
        }
        let restored = Arc::new(InMemoryEventStore::new());
        let three = before.load("total-r", 0).await.unwrap()[..3].to_vec();
        restored
            .append("total-r", ExpectedVersion::NO_STREAM, three)
            .await
            .unwrap();
        let repo = AggregateRepository::<Total>::new(restored).with_snapshots(snapshots, 1);
        let loaded = repo.load("r").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (3, 3));
        // Versions 4 and 5 again, with other events than the stale snapshot's.
        for _ in 0..2 {
            repo.execute("r", None, 10, &Metadata::new()).await.unwrap();
        }
        let loaded = repo.load("r").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (23, 5));
        // Version 6 replaces the stale snapshot, which is used from then on.
        repo.execute("r", None, 1, &Metadata::new()).await.unwrap();
        let loaded = repo.load("r").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (24, 6));
        assert_eq!(loaded.state.applied, 6, "from the snapshot at 6, no tail");
    });
}

/// A snapshot that names no last event (saved by an older build, or by a store that keeps
/// none) ahead of its stream is passed over: trusted, it gave the aggregate a version the
/// stream lacks, so every append conflicted and no newer snapshot ever replaced it. One at a
/// version the stream has is used.
#[test]
fn a_snapshot_that_names_no_event_ahead_of_its_stream_is_passed_over() {
    run(async {
        let snapshots = Arc::new(InMemorySnapshotStore::new());
        let store = Arc::new(InMemoryEventStore::new());
        let repo =
            AggregateRepository::<Total>::new(store.clone()).with_snapshots(snapshots.clone(), 100);
        for _ in 0..3 {
            repo.execute("s", None, 1, &Metadata::new()).await.unwrap();
        }
        let state =
            |total: u64, applied: u64| serde_json::to_value(Total { total, applied }).unwrap();
        snapshots
            .save("total-s", Snapshot::new(5, state(50, 5)))
            .await
            .unwrap();
        let loaded = repo.load("s").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (3, 3), "replayed");
        repo.execute("s", None, 1, &Metadata::new())
            .await
            .expect("appends at the stream's own version");

        // At a version the stream has, it stands for the events up to there.
        let at_four = Arc::new(InMemorySnapshotStore::new());
        at_four
            .save("total-s", Snapshot::new(4, state(40, 4)))
            .await
            .unwrap();
        let repo = AggregateRepository::<Total>::new(store).with_snapshots(at_four, 100);
        let loaded = repo.load("s").await.unwrap();
        assert_eq!(
            (loaded.state.total, loaded.version),
            (40, 4),
            "from the snapshot"
        );
    });
}

#[test]
fn snapshots_are_saved_every_n_versions_and_loading_reads_only_the_tail() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let snapshots = Arc::new(InMemorySnapshotStore::new());
        let repo =
            AggregateRepository::<Total>::new(store.clone()).with_snapshots(snapshots.clone(), 2);
        for _ in 0..5 {
            repo.execute("b", None, 1, &Metadata::new()).await.unwrap();
        }
        let snapshot = snapshots
            .load("total-b")
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(snapshot.version, 4);
        let loaded = repo.load("b").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (5, 5));
        assert_eq!(
            loaded.state.applied, 5,
            "4 from the snapshot, 1 from the tail"
        );

        // A snapshot that no longer decodes is ignored: the stream is replayed.
        snapshots
            .save(
                "total-b",
                cqrs_core::ports::Snapshot::new(5, serde_json::json!("garbage")),
            )
            .await
            .unwrap();
        let loaded = repo.load("b").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (5, 5));
    });
}

#[test]
fn concurrent_executions_at_one_version_leave_one_winner() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let repo = Arc::new(AggregateRepository::<Total>::new(store.clone()));
        repo.execute("c", None, 1, &Metadata::new()).await.unwrap();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let repo = repo.clone();
                tokio::spawn(async move { repo.execute("c", Some(1), 1, &Metadata::new()).await })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => wins += 1,
                Err(AggregateError::Store(StoreError::Conflict { .. })) => {}
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(wins, 1);
        assert_eq!(store.stream_version("total-c").await.unwrap(), 2);
    });
}

/// Keeps who added last, which only the envelope tells (`apply_with`), and lets only them add
/// again.
#[derive(Debug, Default)]
pub struct LastAdder {
    last: Option<String>,
}

impl Aggregate for LastAdder {
    const TYPE: &'static str = "last_adder";
    type Event = CounterEvent;
    type Command = &'static str;
    type Error = HandlerError;

    fn apply(&mut self, _event: &CounterEvent) {}

    fn apply_with(&mut self, _event: &CounterEvent, envelope: &cqrs_core::EventEnvelope) {
        self.last = envelope.metadata.actor.clone();
    }

    fn decide(&self, who: &'static str) -> Result<Vec<CounterEvent>, HandlerError> {
        match &self.last {
            Some(last) if last != who => Err(HandlerError::forbidden("not the last adder")),
            _ => Ok(vec![Added { sum: 1 }.into()]),
        }
    }
}

/// The test kit replays given events as the repository does, through `apply_with`, with the
/// metadata they were given.
#[test]
fn the_test_kit_replays_events_with_their_metadata() {
    use cqrs_core::testing::AggregateTest;
    let by_ada = || (Added { sum: 1 }, Metadata::new().with_actor("ada"));
    AggregateTest::<LastAdder>::given_with([by_ada()])
        .when("ada")
        .then_expect_events([Added { sum: 1 }]);
    let err = AggregateTest::<LastAdder>::given_with([by_ada()])
        .when("bob")
        .then_expect_error();
    assert_eq!(err.code(), "forbidden");
}

/// Counts the events it was handed with a principal, which is never stored.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PrincipalSeen {
    seen: u64,
}

impl Aggregate for PrincipalSeen {
    const TYPE: &'static str = "principal_seen";
    type Event = CounterEvent;
    type Command = ();
    type Error = HandlerError;

    fn apply(&mut self, _event: &CounterEvent) {}

    fn apply_with(&mut self, _event: &CounterEvent, envelope: &cqrs_core::EventEnvelope) {
        self.seen += u64::from(envelope.metadata.principal.is_some());
    }

    fn decide(&self, (): ()) -> Result<Vec<CounterEvent>, HandlerError> {
        Ok(vec![Added { sum: 1 }.into()])
    }
}

/// The state a command returns, and the snapshot saved from it, equal the state a replay
/// builds: the events just decided are applied without the command's principal, as a load
/// finds them.
#[test]
fn a_decided_state_and_its_snapshot_match_a_replay_without_the_principal() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let snapshots = Arc::new(InMemorySnapshotStore::new());
        let repo = AggregateRepository::<PrincipalSeen>::new(store.clone())
            .with_snapshots(snapshots.clone(), 1);
        let acting = Metadata::new().with_principal(cqrs_core::Principal::new("ada"));
        let committed = repo.execute("p", None, (), &acting).await.unwrap();
        assert_eq!(committed.state.seen, 0, "decided");
        let from_snapshot = repo.load("p").await.unwrap();
        assert_eq!(from_snapshot.state.seen, 0, "loaded from the snapshot");
        let replayed = AggregateRepository::<PrincipalSeen>::new(store)
            .load("p")
            .await
            .unwrap();
        assert_eq!(replayed.state.seen, 0, "replayed");
    });
}

/// Subtracts; an event type of the same domain that `Total` does not take.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subtracted {
    pub sum: u64,
}

impl cqrs_core::Message for Subtracted {
    const NAME: &'static str = "test.subtracted";
}

impl cqrs_core::Event for Subtracted {}

fn record_of<E: cqrs_core::Event>(event: E) -> EventRecord {
    EventRecord::from_envelope(&EventEnvelope::new(event, Metadata::new())).unwrap()
}

/// An event of the stream that this build cannot apply (a newer build wrote it during a
/// rolling deploy) fails the load, naming it: skipped, the aggregate would decide on
/// incomplete state and its append at the stream's version would succeed.
#[test]
fn loading_fails_on_an_event_of_a_type_this_build_does_not_know() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let mut unknown = record_of(Added { sum: 1 });
        unknown.event_type = "test.multiplied".into();
        store
            .append(
                "total-x",
                ExpectedVersion::NO_STREAM,
                vec![record_of(Added { sum: 1 }), unknown],
            )
            .await
            .unwrap();
        let repo = AggregateRepository::<Total>::new(store.clone());
        let err = repo.load("x").await.unwrap_err();
        assert!(
            matches!(
                &err,
                AggregateError::UnknownEvent { stream, version: 2, event_type }
                    if stream == "total-x" && event_type == "test.multiplied"
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("deploy the build that wrote it"),
            "{err}"
        );
        // The other way such an event gets there, which no deploy mends.
        assert!(
            err.to_string()
                .contains("a handler recorded it keyed with this stream's id by mistake"),
            "{err}"
        );
        let refused = repo
            .execute("x", None, 1, &Metadata::new())
            .await
            .unwrap_err();
        assert!(matches!(refused, AggregateError::UnknownEvent { .. }));
        assert_eq!(
            store.stream_version("total-x").await.unwrap(),
            2,
            "nothing appended"
        );
        let as_handler_error: HandlerError = refused.into();
        assert_eq!(
            as_handler_error.kind(),
            ErrorKind::Unavailable,
            "retry later"
        );
    });
}

/// Types shared with other consumers (`with_types`) may know a type that is not among the
/// aggregate's events: an event of it in the stream fails the load too, whatever the policy.
/// No build of the aggregate will ever load it (the type was removed from the set, or the event
/// appended under the stream by mistake), so as a handler error it is `internal`, not a retry.
#[test]
fn loading_fails_on_an_event_the_aggregate_does_not_take() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        store
            .append(
                "total-y",
                ExpectedVersion::NO_STREAM,
                vec![
                    record_of(Added { sum: 1 }),
                    record_of(Subtracted { sum: 1 }),
                ],
            )
            .await
            .unwrap();
        for policy in [UnknownEventPolicy::Skip, UnknownEventPolicy::Fail] {
            let mut shared = EventTypes::new();
            shared
                .register::<Added>()
                .register::<Subtracted>()
                .unknown_events(policy);
            let repo = AggregateRepository::<Total>::with_types(store.clone(), Arc::new(shared));
            let err = repo.load("y").await.unwrap_err();
            assert!(
                matches!(
                    &err,
                    AggregateError::ForeignEvent { stream, version: 2, event_type }
                        if stream == "total-y" && event_type == "test.subtracted"
                ),
                "{policy:?}: {err:?}"
            );
            assert!(
                err.to_string()
                    .contains("is not among the aggregate's events"),
                "{err}"
            );
            let refused = repo
                .execute("y", None, 1, &Metadata::new())
                .await
                .unwrap_err();
            let as_handler_error: HandlerError = refused.into();
            assert_eq!(
                as_handler_error.kind(),
                ErrorKind::Internal,
                "no build will load it: {as_handler_error:?}"
            );
        }
    });
}

/// Records that skip a version (a tail passed to `rebuild`, which takes the whole stream, or
/// a stream that lost an event) are refused, naming the gap, not applied as if whole: the
/// decision would rest on incomplete state, and its append at the last version would succeed.
#[test]
fn records_that_skip_a_version_are_refused() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        store
            .append(
                "total-g",
                ExpectedVersion::NO_STREAM,
                vec![
                    record_of(Added { sum: 1 }),
                    record_of(Added { sum: 2 }),
                    record_of(Added { sum: 3 }),
                ],
            )
            .await
            .unwrap();
        let repo = AggregateRepository::<Total>::new(store.clone());
        let whole = store.load("total-g", 0).await.unwrap();
        assert_eq!(repo.rebuild("g", whole.clone()).unwrap().version, 3);
        let tail = store.load("total-g", 1).await.unwrap();
        let mut holed = whole.clone();
        holed.remove(1);
        for (what, records, after, found) in [("a tail", tail, 0, 2), ("a hole", holed, 1, 3)] {
            let err = repo.rebuild("g", records).unwrap_err();
            assert!(
                matches!(
                    &err,
                    AggregateError::VersionGap { stream, after: a, found: f }
                        if stream == "total-g" && *a == after && *f == found
                ),
                "{what}: {err:?}"
            );
            let as_handler_error: HandlerError = err.into();
            assert_eq!(as_handler_error.kind(), ErrorKind::Internal, "{what}");
        }
    });
}

/// Shared types that leave out one of the aggregate's own events (registered type by type,
/// for the upcasters) still load its streams: the repository adds the aggregate's events. Left
/// out, every load failed as `UnknownEvent`, telling the caller to deploy a build it runs.
#[test]
fn shared_types_that_leave_out_an_aggregate_event_still_load_it() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        store
            .append(
                "total-y",
                ExpectedVersion::NO_STREAM,
                vec![record_of(Added { sum: 4 })],
            )
            .await
            .unwrap();
        let mut shared = EventTypes::new();
        shared.register::<Subtracted>();
        let shared = Arc::new(shared);
        let repo = AggregateRepository::<Total>::with_types(store.clone(), shared.clone());
        let loaded = repo.load("y").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (4, 1));
        repo.execute("y", None, 2, &Metadata::new()).await.unwrap();
        assert_eq!(repo.load("y").await.unwrap().state.total, 6);
        assert!(
            !shared.knows("test.added"),
            "the caller's types are not changed"
        );
    });
}

/// Another struct under the wire name of one of the aggregate's events: records of one would
/// decode as the other, so the repository refuses it where it is made, naming both.
#[test]
fn shared_types_with_another_struct_under_an_aggregate_event_name_are_refused() {
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct ReadSideAdded {
        sum: u64,
    }
    impl cqrs_core::Message for ReadSideAdded {
        const NAME: &'static str = "test.added";
    }
    impl cqrs_core::Event for ReadSideAdded {}

    let mut shared = EventTypes::new();
    shared.register::<ReadSideAdded>();
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        AggregateRepository::<Total>::with_types(store, Arc::new(shared))
    }))
    .map(|_| ())
    .unwrap_err();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("`test.added`"), "{message}");
    assert!(message.contains("ReadSideAdded"), "{message}");
    assert!(message.contains("fixtures::Added"), "{message}");
}

/// A stored event this build cannot decode fails the load. One of a newer schema version waits
/// for the newer build (`unavailable`: retry); one of an old version no upcaster takes further
/// waits for no build (`internal`).
#[test]
fn an_event_of_another_schema_version_fails_the_load_as_its_cause_says() {
    run(async {
        for (schema_version, kind) in [(2, ErrorKind::Unavailable), (0, ErrorKind::Internal)] {
            let store = Arc::new(InMemoryEventStore::new());
            let mut event = record_of(Added { sum: 1 });
            event.schema_version = schema_version;
            store
                .append("total-v", ExpectedVersion::NO_STREAM, vec![event])
                .await
                .unwrap();
            let repo = AggregateRepository::<Total>::new(store.clone());
            let refused = repo
                .execute("v", None, 1, &Metadata::new())
                .await
                .unwrap_err();
            assert!(
                matches!(refused, AggregateError::Decode(_)),
                "{schema_version}: {refused:?}"
            );
            let as_handler_error: HandlerError = refused.into();
            assert_eq!(as_handler_error.kind(), kind, "{schema_version}");
        }
    });
}

/// Fails every load; saves nothing.
struct Down;

#[async_trait]
impl SnapshotStore for Down {
    async fn load(&self, _stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        Err(StoreError::Unavailable {
            backend: "snapshots",
            source: "the snapshot store is down".into(),
        })
    }

    async fn save(&self, _stream_id: &str, _snapshot: Snapshot) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A snapshot is a shortcut: a snapshot store that cannot load costs a full replay, not the
/// command.
#[test]
fn a_snapshot_store_that_fails_to_load_costs_only_a_replay() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let repo = AggregateRepository::<Total>::new(store).with_snapshots(Arc::new(Down), 1);
        for add in [1, 2, 3] {
            repo.execute("z", None, add, &Metadata::new())
                .await
                .unwrap();
        }
        let loaded = repo.load("z").await.unwrap();
        assert_eq!((loaded.state.total, loaded.version), (6, 3));
        assert_eq!(loaded.state.applied, 3, "replayed from the start");
    });
}

/// A reading whose mean may be NaN (no samples): JSON cannot hold it.
#[derive(Clone, Debug, Serialize, Deserialize, cqrs_core::Event)]
#[cqrs(name = "test.measured")]
pub struct Measured {
    pub mean: f64,
}

event_set! {
    pub enum MeterEvent {
        Measured(Measured),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Meter {
    readings: u64,
    /// One over the readings before the last: infinite after the first.
    share: f64,
}

impl Aggregate for Meter {
    const TYPE: &'static str = "meter";
    type Event = MeterEvent;
    /// The samples to average.
    type Command = Vec<f64>;
    type Error = HandlerError;

    fn apply(&mut self, _: &MeterEvent) {
        self.share = 1.0 / self.readings as f64;
        self.readings += 1;
    }

    fn decide(&self, samples: Vec<f64>) -> Result<Vec<MeterEvent>, HandlerError> {
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        Ok(vec![Measured { mean }.into()])
    }
}

/// An event holding a NaN is refused before it is stored: serde_json alone writes it as
/// `null`, which no later load could decode, and the stream could not be loaded again.
#[test]
fn an_event_json_cannot_hold_is_refused_and_the_stream_stays_loadable() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let repo = AggregateRepository::<Meter>::new(store.clone());
        let metadata = Metadata::new();
        repo.execute("m", None, vec![1.0, 2.0], &metadata)
            .await
            .unwrap();
        let refused = repo
            .execute("m", None, Vec::new(), &metadata)
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, AggregateError::Encode { event_type, stream, .. } if *event_type == "test.measured" && stream == "meter-m"),
            "{refused:?}"
        );
        assert!(
            refused.to_string().contains("field `mean` is NaN"),
            "{refused}"
        );
        assert_eq!(store.stream_version("meter-m").await.unwrap(), 1);
        let loaded = repo.load("m").await.unwrap();
        assert_eq!((loaded.state.readings, loaded.version), (1, 1));
        repo.execute("m", None, vec![4.0], &metadata).await.unwrap();
        assert_eq!(repo.load("m").await.unwrap().version, 2);
    });
}

/// A state holding an infinite float gets no snapshot: `serde_json` stored it as `null`, which
/// never decoded, so every load replayed the stream and saved the broken snapshot again.
#[test]
fn a_state_json_cannot_hold_gets_no_snapshot() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let snapshots = Arc::new(InMemorySnapshotStore::new());
        let repo =
            AggregateRepository::<Meter>::new(store.clone()).with_snapshots(snapshots.clone(), 1);
        let metadata = Metadata::new();
        let first = repo.execute("s", None, vec![1.0], &metadata).await.unwrap();
        assert!(first.state.share.is_infinite());
        assert!(
            snapshots.load("meter-s").await.unwrap().is_none(),
            "not saved"
        );
        assert_eq!(repo.load("s").await.unwrap().version, 1);
        repo.execute("s", None, vec![2.0], &metadata).await.unwrap();
        let saved = snapshots
            .load("meter-s")
            .await
            .unwrap()
            .expect("a finite state's");
        assert_eq!(saved.version, 2);
        assert_eq!(saved.state["share"], serde_json::json!(1.0));
    });
}

/// Counts its events; its state's `Serialize` panics at 7 and its `Deserialize` at 13 (a
/// `serialize_with` / `deserialize_with` that unwraps).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Fragile {
    #[serde(serialize_with = "not_seven", deserialize_with = "not_thirteen")]
    count: u64,
}

fn not_seven<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    assert!(*n != 7, "seven does not serialize");
    s.serialize_u64(*n)
}

fn not_thirteen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = u64::deserialize(d)?;
    assert!(n != 13, "thirteen does not deserialize");
    Ok(n)
}

impl Aggregate for Fragile {
    const TYPE: &'static str = "fragile";
    type Event = MeterEvent;
    type Command = ();
    type Error = HandlerError;

    fn apply(&mut self, _: &MeterEvent) {
        self.count += 1;
    }

    fn decide(&self, (): ()) -> Result<Vec<MeterEvent>, HandlerError> {
        Ok(vec![Measured { mean: 0.0 }.into()])
    }
}

/// A state whose `Serialize` panics gets no snapshot and the command that stored its events
/// succeeds; a stored snapshot whose `Deserialize` panics is passed over and the stream
/// replayed. Both unwound: the first out of a command that had taken effect, the second out of
/// every load, for good.
#[test]
fn a_snapshot_whose_serde_panics_is_passed_over() {
    run(async {
        let store = Arc::new(InMemoryEventStore::new());
        let snapshots = Arc::new(InMemorySnapshotStore::new());
        let repo =
            AggregateRepository::<Fragile>::new(store.clone()).with_snapshots(snapshots.clone(), 1);
        let metadata = Metadata::new();
        for _ in 0..7 {
            repo.execute("f", None, (), &metadata).await.unwrap();
        }
        let saved = snapshots.load("fragile-f").await.unwrap().unwrap();
        assert_eq!(saved.version, 6, "none saved at 7");
        assert_eq!(store.stream_version("fragile-f").await.unwrap(), 7);

        // Another build's snapshot at 7, which this one's `Deserialize` panics on.
        let seventh = store.load("fragile-f", 6).await.unwrap()[0].event_id;
        snapshots
            .save(
                "fragile-f",
                Snapshot::new(7, serde_json::json!({ "count": 13 })).with_last_event(seventh),
            )
            .await
            .unwrap();
        let loaded = repo.load("f").await.unwrap();
        assert_eq!((loaded.state.count, loaded.version), (7, 7), "replayed");
        repo.execute("f", None, (), &metadata).await.unwrap();
        assert_eq!(
            snapshots.load("fragile-f").await.unwrap().unwrap().version,
            8
        );
    });
}
