//! The event store conformance suite. See [`EventStore`] for the contract.
//!
//! Run it with [`event_store_conformance!`](crate::event_store_conformance).

use super::Harness;
use crate::ports::{EventStore, ExpectedVersion, StoreError};
use crate::{EventRecord, Metadata, Position, RecordMetadata};
use async_trait::async_trait;
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;

/// An append whose transaction stays open until [`commit`](HeldAppend::commit).
#[async_trait]
pub trait HeldAppend: Send {
    /// Commits the held append.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;

    /// Whether another writer is waiting for this append's transaction to end. A store that
    /// serializes appends must answer it: the late-commit scenario waits until the later
    /// writer has either committed or is waiting here, and fails after a deadline otherwise.
    /// Default: `false` (a store whose writers never wait for each other).
    async fn blocks_another_writer(&mut self) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// What an event store adapter provides to its conformance suite.
#[async_trait]
pub trait EventStoreHarness: Harness {
    /// The store under test, empty of this test's streams.
    fn store(&self) -> Arc<dyn EventStore>;

    /// Starts appending `events` to `stream_id` (expecting no stream) as a writer whose
    /// transaction begins now and stays open until the returned handle commits it, so it
    /// commits after a writer that began later. (A store that draws positions at append time
    /// lets the late writer commit first; a store that serializes appends makes it wait, or
    /// draws positions at commit: either way the reader must not skip the held writer's
    /// events.) `None` when the adapter
    /// has no transactions: its suite must then be run with
    /// `event_store_conformance!(harness, without_held_appends)`, which leaves out the two
    /// scenarios that hold an append open (the late-commit one and
    /// `an_append_at_the_version_of_one_in_flight_conflicts`); both fail on `None`, so they
    /// never pass without testing.
    async fn begin_held_append(
        &self,
        stream_id: &str,
        events: Vec<EventRecord>,
    ) -> Option<Box<dyn HeldAppend>> {
        let _ = (stream_id, events);
        None
    }
}

/// Expands to one `#[tokio::test]` per event store scenario, each with a fresh harness from
/// `$make(test_id).await`.
///
/// `event_store_conformance!(harness, without_held_appends)` is for an adapter that cannot
/// hold an append open (no transactions: see [`EventStoreHarness::begin_held_append`]): it
/// leaves out [`a_reader_never_skips_an_event_that_commits_late`] and
/// [`an_append_at_the_version_of_one_in_flight_conflicts`], so the test list shows they are
/// not run, rather than tests that pass without testing.
#[macro_export]
macro_rules! event_store_conformance {
    ($make:path) => {
        $crate::event_store_conformance!($make, without_held_appends);
        $crate::__conformance!(
            $make,
            event_store,
            [
                a_reader_never_skips_an_event_that_commits_late,
                an_append_at_the_version_of_one_in_flight_conflicts,
            ]
        );
    };
    ($make:path, without_held_appends) => {
        $crate::__conformance!(
            $make,
            event_store,
            [
                append_then_load_returns_events_in_order_with_versions,
                a_stale_expected_version_is_a_conflict,
                an_empty_append_checks_the_version_and_stores_nothing,
                a_conflicting_batch_writes_nothing,
                an_event_id_is_stored_once,
                concurrent_appends_at_one_version_exactly_one_wins,
                expected_any_appends_at_whatever_version,
                concurrent_any_appends_never_conflict_and_get_contiguous_versions,
                load_after_a_version_returns_the_tail,
                read_all_returns_every_stream_in_one_global_order,
                records_keep_their_payload_and_metadata,
                a_payload_too_deep_to_read_back_is_refused,
                a_stream_id_holding_nul_is_refused_by_every_call,
                text_a_store_cannot_hold_is_refused_whole_or_kept,
            ]
        );
    };
}

/// A record of type `Noted` with `{"n": n}`.
pub fn record(n: u64) -> EventRecord {
    let metadata = Metadata::new();
    EventRecord::new(
        metadata.message_id,
        "Noted",
        1,
        json!({ "n": n }),
        RecordMetadata::from_metadata(&metadata),
    )
}

/// A record of type `Detailed` (schema version 3) with partition key `key-1`, an actor, a
/// trace context, and a payload of what JSON stores can get wrong: escapes, unicode, numbers
/// past doubles, exact fractions, empty containers.
pub fn detailed_record() -> EventRecord {
    let metadata = Metadata::new()
        .caused()
        .with_actor("user-7")
        .with_trace_field("traceparent", "00-abc-def-01")
        .with_header("tenant", "acme")
        .with_header("client-ip", "203.0.113.7 ü 🎫");
    EventRecord::new(
        metadata.message_id,
        "Detailed",
        3,
        json!({
            "text": "ünïcødé \"quoted\" <b> 🎫 日本語 \\ line\nbreak\ttab \u{1} \u{FFFF}",
            "list": [1, 2, "three", true, null],
            "nested": {"a": null, "b": {"c": [[]]}},
            "empty_object": {},
            "empty_array": [],
            "empty_text": "",
            "largest": u64::MAX,
            "smallest": i64::MIN,
            // Above 2^53: a store keeping numbers as doubles changes it.
            "above_doubles": 9_007_199_254_740_993_u64,
            "fraction": 0.1,
            // Both read back one unit in the last place off by a parser that rounds twice
            // (serde_json without `float_roundtrip`).
            "exact_fraction": 51.248178375505404_f64,
            "tiny": 2.2250738585072014e-308_f64,
            "negative": -1.5,
            "ünïcødé key": 1,
        }),
        RecordMetadata::from_metadata(&metadata),
    )
    .with_partition_key(Some("key-1".into()))
}

fn numbers(records: &[EventRecord]) -> Vec<u64> {
    records
        .iter()
        .map(|r| {
            r.payload["n"].as_u64().unwrap_or_else(|| {
                panic!(
                    "a payload came back as {}: its `n`, stored as an unsigned integer, is one no \
                     longer",
                    r.payload
                )
            })
        })
        .collect()
}

/// Waits (10 s at most) for `read_all(after, limit)` to return a full page, `available` events
/// being stored after `after`; fails naming the sizes it got, and a store that caps its pages.
async fn full_page(store: &dyn EventStore, after: Position, limit: usize, available: usize) {
    let mut sizes = std::collections::BTreeSet::new();
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let page = store.read_all(after, limit).await.unwrap();
        check_page(after, &page);
        if page.len() == limit {
            return;
        }
        sizes.insert(page.len());
        assert!(
            tokio::time::Instant::now() < until,
            "a read of {limit} with {available} events after it returns {limit}, not \
             {sizes:?}: a store must not cap a page below the limit asked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Checks a page `read_all(after, ..)` returned: every position above `after` and growing. A
/// store that returned `after` itself would have a paging reader read the same page for ever.
#[track_caller]
fn check_page(after: Position, page: &[EventRecord]) {
    let positions: Vec<Option<Position>> = page.iter().map(|r| r.position).collect();
    assert!(
        positions.iter().all(|p| p.is_some_and(|p| p > after)),
        "read_all({after:?}, ..) returned positions {positions:?}: each must be above `after`"
    );
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "read_all({after:?}, ..) returned positions {positions:?}: they must grow"
    );
}

/// Appended events load back in order with versions 1..=n, stream ids and positions.
pub async fn append_then_load_returns_events_in_order_with_versions<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-a", h.test_id());
    let batch = vec![record(1), record(2)];
    let ids: Vec<_> = batch.iter().map(|r| r.event_id).collect();
    let mut stored = store
        .append(&stream, ExpectedVersion::NO_STREAM, batch)
        .await
        .expect("first append");
    stored.extend(
        store
            .append(&stream, ExpectedVersion::Exactly(2), vec![record(3)])
            .await
            .expect("second append at version 2"),
    );
    // What `append` returns is what was stored: the events in order, each with its stream,
    // version and position.
    assert_eq!(
        stored
            .iter()
            .map(|r| r.event_id)
            .take(2)
            .collect::<Vec<_>>(),
        ids,
        "append returns the appended events, in order"
    );
    assert_eq!(numbers(&stored), [1, 2, 3]);
    assert_eq!(
        stored.iter().map(|r| r.stream_version).collect::<Vec<_>>(),
        [Some(1), Some(2), Some(3)]
    );
    assert!(
        stored
            .iter()
            .all(|r| r.stream_id.as_deref() == Some(stream.as_str())),
        "append returns records with their stream id"
    );
    let returned: Vec<Position> = stored
        .iter()
        .map(|r| {
            r.position
                .expect("append returns records with their position")
        })
        .collect();
    assert!(
        returned.windows(2).all(|w| w[0] < w[1]),
        "returned positions grow: {returned:?}"
    );
    let loaded = store.load(&stream, 0).await.expect("load");
    assert_eq!(numbers(&loaded), [1, 2, 3]);
    assert_eq!(
        loaded.iter().map(|r| r.stream_version).collect::<Vec<_>>(),
        [Some(1), Some(2), Some(3)]
    );
    assert!(
        loaded
            .iter()
            .all(|r| r.stream_id.as_deref() == Some(stream.as_str()))
    );
    let positions: Vec<Position> = loaded
        .iter()
        .map(|r| r.position.expect("a position"))
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions grow: {positions:?}"
    );
    assert_eq!(
        positions, returned,
        "load reads back the positions append returned"
    );
    assert_eq!(store.stream_version(&stream).await.unwrap(), 3);
    assert_eq!(
        store
            .stream_version(&format!("{stream}-missing"))
            .await
            .unwrap(),
        0
    );
    assert!(
        store
            .load(&format!("{stream}-missing"), 0)
            .await
            .unwrap()
            .is_empty()
    );
}

/// An append at a version the stream is not at fails with a typed conflict naming both.
pub async fn a_stale_expected_version_is_a_conflict<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-b", h.test_id());
    store
        .append(&stream, ExpectedVersion::NO_STREAM, vec![record(1)])
        .await
        .unwrap();
    for expected in [
        ExpectedVersion::NO_STREAM,
        ExpectedVersion::Exactly(2),
        ExpectedVersion::Exactly(7),
    ] {
        match store.append(&stream, expected, vec![record(9)]).await {
            Err(StoreError::Conflict {
                stream: s,
                expected: e,
                actual,
            }) => {
                assert_eq!((s.as_str(), e, actual), (stream.as_str(), expected, 1));
            }
            other => panic!("expected a conflict at {expected}, got {other:?}"),
        }
    }
    let missing = format!("{stream}-missing");
    let result = store
        .append(&missing, ExpectedVersion::Exactly(1), vec![record(1)])
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict { actual: 0, .. })),
        "an append expecting version 1 of a missing stream is a conflict at 0, not: {result:?}"
    );
    assert_eq!(numbers(&store.load(&stream, 0).await.unwrap()), [1]);
}

/// An empty append at a version is a guard: a conflict unless the stream is at that version,
/// and nothing stored either way; at `Any` it checks nothing. (A unit of work appends an
/// empty batch to commit its writes only if a stream did not move.)
pub async fn an_empty_append_checks_the_version_and_stores_nothing<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-g", h.test_id());
    let missing = format!("{stream}-missing");
    let guard = |stream: String, expected| {
        let store = store.clone();
        async move { store.append(&stream, expected, Vec::new()).await }
    };
    let stored = guard(missing.clone(), ExpectedVersion::NO_STREAM).await;
    assert!(
        matches!(&stored, Ok(records) if records.is_empty()),
        "an empty append expecting no stream, on none: {stored:?}"
    );
    store
        .append(&stream, ExpectedVersion::NO_STREAM, vec![record(1)])
        .await
        .unwrap();
    for expected in [ExpectedVersion::NO_STREAM, ExpectedVersion::Exactly(2)] {
        match guard(stream.clone(), expected).await {
            Err(StoreError::Conflict {
                expected: e,
                actual,
                ..
            }) => assert_eq!((e, actual), (expected, 1)),
            other => panic!("an empty append at {expected} on a stream at 1: {other:?}"),
        }
    }
    for expected in [ExpectedVersion::Exactly(1), ExpectedVersion::Any] {
        let stored = guard(stream.clone(), expected).await;
        assert!(
            matches!(&stored, Ok(records) if records.is_empty()),
            "an empty append at {expected} on a stream at 1: {stored:?}"
        );
    }
    assert_eq!(numbers(&store.load(&stream, 0).await.unwrap()), [1]);
    assert_eq!(store.stream_version(&stream).await.unwrap(), 1);
    assert_eq!(store.stream_version(&missing).await.unwrap(), 0);
}

/// A batch rejected for its version leaves no trace: not one of its events is stored.
pub async fn a_conflicting_batch_writes_nothing<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-c", h.test_id());
    store
        .append(&stream, ExpectedVersion::NO_STREAM, vec![record(1)])
        .await
        .unwrap();
    // A conflict, not any error: a caller reloads and decides again only on a conflict.
    match store
        .append(
            &stream,
            ExpectedVersion::NO_STREAM,
            vec![record(2), record(3), record(4)],
        )
        .await
    {
        Err(StoreError::Conflict { actual: 1, .. }) => {}
        other => panic!("a stale batch is a conflict at version 1, got {other:?}"),
    }
    assert_eq!(numbers(&store.load(&stream, 0).await.unwrap()), [1]);
    assert_eq!(store.stream_version(&stream).await.unwrap(), 1);
}

/// An event id is stored once: appending a record again (a retry after an unclear failure,
/// the same record to a second stream) fails and stores nothing, and so does a batch holding
/// one id twice. Consumers dedupe by event id, so a second copy would never take effect.
pub async fn an_event_id_is_stored_once<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let (first, second) = (format!("{}-a", h.test_id()), format!("{}-b", h.test_id()));
    let again = record(1);
    let again_first = again.clone();
    store
        .append(&first, ExpectedVersion::NO_STREAM, vec![again.clone()])
        .await
        .unwrap();
    // Never a conflict, which would send the caller to decide again with fresh ids; nor
    // retryable (`Unavailable`, `Timeout`), which would have it send the duplicate for ever.
    let refused = |error: StoreError, case: &str| {
        assert!(
            !matches!(error, StoreError::Conflict { .. }),
            "{case}: a duplicate event id is no version conflict: {error}"
        );
        assert!(
            !error.kind().is_retryable(),
            "{case}: a duplicate event id is refused for good, not as retryable: {error}"
        );
    };
    let error = store
        .append(&first, ExpectedVersion::Any, vec![record(2), again.clone()])
        .await
        .expect_err(
            "accepted an event id already stored, in the same stream; the records it returned",
        );
    refused(error, "the same stream");
    assert_eq!(
        numbers(&store.load(&first, 0).await.unwrap()),
        [1],
        "the refused batch stored none of its events"
    );
    let error = store
        .append(&second, ExpectedVersion::NO_STREAM, vec![again])
        .await
        .expect_err(
            "accepted an event id already stored, in another stream; the records it returned",
        );
    refused(error, "another stream");
    let twice = record(3);
    let error = store
        .append(
            &second,
            ExpectedVersion::Any,
            vec![twice.clone(), twice.clone()],
        )
        .await
        .expect_err("accepted one id twice in a batch; the records it returned");
    refused(error, "twice in a batch");
    assert_eq!(
        numbers(&store.load(&second, 0).await.unwrap()),
        [] as [u64; 0],
        "the refused batches stored none of their events"
    );
    // A retry of an append that went through (its answer lost): the stream has moved past
    // the expected version since, and still it is a duplicate, not a conflict.
    let error = store
        .append(
            &first,
            ExpectedVersion::NO_STREAM,
            vec![again_first.clone()],
        )
        .await
        .expect_err(
            "accepted a retry of one event at the version before it; the records it returned",
        );
    refused(error, "a retry of one event");
    let (third, pair) = (format!("{}-c", h.test_id()), vec![record(4), record(5)]);
    store
        .append(&third, ExpectedVersion::NO_STREAM, pair.clone())
        .await
        .unwrap();
    let error = store
        .append(&third, ExpectedVersion::NO_STREAM, pair)
        .await
        .expect_err(
            "accepted a retry of a batch at the version before it; the records it returned",
        );
    refused(error, "a retry of a batch");
    let error = store
        .append(
            &third,
            ExpectedVersion::NO_STREAM,
            vec![twice.clone(), twice],
        )
        .await
        .expect_err("accepted one id twice in a batch at a stale version; the records it returned");
    refused(error, "twice in a batch at a stale version");
    assert_eq!(store.stream_version(&third).await.unwrap(), 2);
    assert_eq!(numbers(&store.load(&first, 0).await.unwrap()), [1]);
    assert_eq!(store.stream_version(&second).await.unwrap(), 0);
}

/// 50 tasks append at one expected version: exactly one wins, the rest get conflicts.
pub async fn concurrent_appends_at_one_version_exactly_one_wins<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-d", h.test_id());
    store
        .append(&stream, ExpectedVersion::NO_STREAM, vec![record(0)])
        .await
        .unwrap();
    let tasks: Vec<_> = (1..=50)
        .map(|n| {
            let store = store.clone();
            let stream = stream.clone();
            tokio::spawn(async move {
                store
                    .append(
                        &stream,
                        ExpectedVersion::Exactly(1),
                        vec![record(n), record(n + 100)],
                    )
                    .await
            })
        })
        .collect();
    let (mut won, mut conflicts) = (Vec::new(), 0);
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.expect("the task ran") {
            Ok(_) => won.push(i as u64 + 1),
            Err(StoreError::Conflict { .. }) => conflicts += 1,
            Err(other) => panic!("task {} failed with {other}", i + 1),
        }
    }
    assert_eq!(won.len(), 1, "exactly one append wins; winners: {won:?}");
    assert_eq!(conflicts, 49);
    assert_eq!(
        numbers(&store.load(&stream, 0).await.unwrap()),
        [0, won[0], won[0] + 100]
    );
}

/// `ExpectedVersion::Any` appends whatever the version.
pub async fn expected_any_appends_at_whatever_version<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-e", h.test_id());
    store
        .append(&stream, ExpectedVersion::Any, vec![record(1)])
        .await
        .unwrap();
    let stored = store
        .append(&stream, ExpectedVersion::Any, vec![record(2)])
        .await
        .unwrap();
    assert_eq!(stored[0].stream_version, Some(2));
}

/// Concurrent `ExpectedVersion::Any` appends to one stream never conflict: every one
/// succeeds, each batch gets contiguous versions in its order (no other append's event between
/// them), and the stream ends at versions `1..=n` without a gap or a repeat, in position order.
pub async fn concurrent_any_appends_never_conflict_and_get_contiguous_versions<
    H: EventStoreHarness,
>(
    h: &H,
) {
    let store = h.store();
    let stream = format!("{}-any", h.test_id());
    let (writers, batch) = (20u64, 3u64);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (store, stream) = (store.clone(), stream.clone());
            tokio::spawn(async move {
                let events = (0..batch).map(|i| record(w * 100 + i)).collect();
                store.append(&stream, ExpectedVersion::Any, events).await
            })
        })
        .collect();
    for (w, task) in tasks.into_iter().enumerate() {
        let stored = match task.await.expect("the task ran") {
            Ok(stored) => stored,
            Err(e) => panic!("writer {w}: an `Any` append failed: {e}"),
        };
        let versions: Vec<u64> = stored
            .iter()
            .map(|r| r.stream_version.expect("a version"))
            .collect();
        assert!(
            versions.windows(2).all(|v| v[1] == v[0] + 1),
            "writer {w}: its batch got contiguous versions, got {versions:?}"
        );
        let w = w as u64;
        assert_eq!(
            numbers(&stored),
            [w * 100, w * 100 + 1, w * 100 + 2],
            "in its order"
        );
    }
    let loaded = store.load(&stream, 0).await.unwrap();
    let total = writers * batch;
    assert_eq!(
        loaded
            .iter()
            .map(|r| r.stream_version.unwrap_or(0))
            .collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "versions 1..={total}, no gap, no repeat"
    );
    let positions: Vec<Position> = loaded.iter().filter_map(|r| r.position).collect();
    assert!(
        positions.len() == loaded.len() && positions.windows(2).all(|p| p[0] < p[1]),
        "positions grow with versions: {positions:?}"
    );
    // Each batch loads back in one piece.
    for chunk in loaded.chunks(batch as usize) {
        let n = numbers(chunk);
        assert!(
            n.iter().all(|x| x / 100 == n[0] / 100),
            "a batch interleaved with another: {n:?}"
        );
    }
    assert_eq!(store.stream_version(&stream).await.unwrap(), total);
}

/// `load(stream, v)` returns only versions after `v`.
pub async fn load_after_a_version_returns_the_tail<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-f", h.test_id());
    store
        .append(
            &stream,
            ExpectedVersion::NO_STREAM,
            (1..=5).map(record).collect(),
        )
        .await
        .unwrap();
    assert_eq!(numbers(&store.load(&stream, 3).await.unwrap()), [4, 5]);
    assert!(store.load(&stream, 5).await.unwrap().is_empty());
}

/// Read-all from a position returns later events of every stream in position order, within
/// the limit and filling it while there are events to fill it, and paging through it visits
/// each event once.
pub async fn read_all_returns_every_stream_in_one_global_order<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let (a, b) = (format!("{}-g1", h.test_id()), format!("{}-g2", h.test_id()));
    // Other tests share the store: start from the current end.
    let start = last_position(store.as_ref()).await;
    store
        .append(&a, ExpectedVersion::NO_STREAM, vec![record(1)])
        .await
        .unwrap();
    store
        .append(&b, ExpectedVersion::NO_STREAM, vec![record(2), record(3)])
        .await
        .unwrap();
    store
        .append(&a, ExpectedVersion::Exactly(1), vec![record(4)])
        .await
        .unwrap();

    // A page is full while there are events to fill it: readers take a short one as the end.
    // (Short while committed events wait behind an append still open, which on a store other
    // scenarios share may happen: so the read is tried again, for a while.)
    for limit in [1, 2, 3, 4] {
        full_page(store.as_ref(), start, limit, 4).await;
    }
    // And one far wider than these: a store that caps its pages (at 50, say) fails here.
    let wide = format!("{}-g3", h.test_id());
    store
        .append(
            &wide,
            ExpectedVersion::NO_STREAM,
            (5..=124).map(record).collect(),
        )
        .await
        .unwrap();
    full_page(store.as_ref(), start, 120, 124).await;
    let mut seen = Vec::new();
    let mut after = start;
    loop {
        let page = store.read_all(after, 2).await.unwrap();
        assert!(page.len() <= 2, "the limit holds");
        check_page(after, &page);
        let Some(last) = page.last() else { break };
        after = last.position.expect("a position");
        seen.extend(page);
    }
    let ours: Vec<&EventRecord> = seen
        .iter()
        .filter(|r| r.stream_id.as_deref().is_some_and(|s| s == a || s == b))
        .collect();
    assert_eq!(
        ours.iter()
            .map(|r| r.payload["n"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let positions: Vec<Position> = seen.iter().map(|r| r.position.unwrap()).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: {positions:?}"
    );
    let ids: HashSet<_> = seen.iter().map(|r| r.event_id).collect();
    assert_eq!(ids.len(), seen.len(), "no event twice");
}

/// The payload, event type, schema version, partition key and metadata round-trip, read
/// through `load` and `read_all` alike.
pub async fn records_keep_their_payload_and_metadata<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-h", h.test_id());
    // Other tests share the store: `read_all` from the current end.
    let start = last_position(store.as_ref()).await;
    let original = detailed_record();
    store
        .append(&stream, ExpectedVersion::NO_STREAM, vec![original.clone()])
        .await
        .unwrap();
    let loaded = store.load(&stream, 0).await.unwrap().remove(0);
    // Projections and relays read through `read_all`, which an adapter may decode apart.
    let (mut read, _) = read_ours(store.as_ref(), start, &[stream.as_str()]).await;
    assert_eq!(read.len(), 1, "read_all returns the one record of {stream}");
    let read = read.remove(0);
    for (how, got) in [("load", &loaded), ("read_all", &read)] {
        assert_eq!(got.event_id, original.event_id, "{how}: event id");
        assert_eq!(
            got.stream_id.as_deref(),
            Some(stream.as_str()),
            "{how}: stream id"
        );
        assert_eq!(got.stream_version, Some(1), "{how}: stream version");
        assert!(got.position.is_some(), "{how}: position");
        assert_eq!(got.event_type, "Detailed", "{how}: event type");
        assert_eq!(got.schema_version, 3, "{how}: schema version");
        assert_eq!(got.payload, original.payload, "{how}: payload");
        assert_eq!(
            got.partition_key.as_deref(),
            Some("key-1"),
            "{how}: partition key"
        );
        assert_eq!(
            got.metadata.correlation_id, original.metadata.correlation_id,
            "{how}: correlation id"
        );
        assert_eq!(
            got.metadata.causation_id, original.metadata.causation_id,
            "{how}: causation id"
        );
        assert_eq!(
            got.metadata.actor.as_deref(),
            Some("user-7"),
            "{how}: actor"
        );
        assert_eq!(
            got.metadata.trace_context, original.metadata.trace_context,
            "{how}: trace context"
        );
        assert_eq!(
            got.metadata.headers, original.metadata.headers,
            "{how}: headers"
        );
        let drift = (got.metadata.occurred_at - original.metadata.occurred_at).num_microseconds();
        assert!(
            drift.is_some_and(|d| d.abs() < 1_000),
            "{how}: timestamp kept to the millisecond: stored {}, read back {}",
            original.metadata.occurred_at,
            got.metadata.occurred_at
        );
    }
}

/// `n` arrays, one inside the other.
fn nested(n: usize) -> serde_json::Value {
    (0..n).fold(json!(1), |inner, _| json!([inner]))
}

/// `n` levels, objects and arrays in turn, the outermost an object.
fn nested_mixed(n: usize) -> serde_json::Value {
    (0..n).fold(json!(1), |inner, level| {
        if (n - level) % 2 == 1 {
            json!({ "a": inner })
        } else {
            json!([inner])
        }
    })
}

/// A payload nested more than [`MAX_PAYLOAD_DEPTH`](crate::ports::MAX_PAYLOAD_DEPTH) deep is
/// refused as [`StoreError::Rejected`] (alone and in a batch, which stores nothing); one at the
/// bound is stored and loads back.
pub async fn a_payload_too_deep_to_read_back_is_refused<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-deep", h.test_id());
    let depth = crate::ports::MAX_PAYLOAD_DEPTH;
    let mut deep = record(1);
    deep.payload = nested(depth + 1);
    // Objects count as arrays do.
    let mut deep_objects = record(4);
    deep_objects.payload = nested_mixed(depth + 1);
    for batch in [
        vec![deep.clone()],
        vec![record(2), deep],
        vec![deep_objects],
    ] {
        let refused = store
            .append(&stream, ExpectedVersion::Any, batch)
            .await
            .expect_err("a payload too deep to read back is refused");
        assert!(
            matches!(refused, StoreError::Rejected { .. }),
            "refused as `Rejected` (a client's data at fault), not: {refused:?}"
        );
    }
    assert!(
        store.load(&stream, 0).await.unwrap().is_empty(),
        "nothing of either batch was stored"
    );
    let mut deepest = record(3);
    deepest.payload = nested(depth);
    store
        .append(&stream, ExpectedVersion::Any, vec![deepest])
        .await
        .expect("a payload at the bound is stored");
    let mut deepest_objects = record(5);
    deepest_objects.payload = nested_mixed(depth);
    store
        .append(&stream, ExpectedVersion::Any, vec![deepest_objects])
        .await
        .expect("a payload of objects and arrays at the bound is stored");
    let loaded = store.load(&stream, 0).await.unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded[0].payload, nested(depth), "and loads back whole");
    assert_eq!(loaded[1].payload, nested_mixed(depth));
}

/// A stream id holding U+0000 (which Postgres cannot hold in text) is refused as
/// [`StoreError::Rejected`] (a client's data at fault: a path parameter, say) by `append`,
/// `load` and `stream_version` alike, not read as a stream with no events.
pub async fn a_stream_id_holding_nul_is_refused_by_every_call<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-nul\0", h.test_id());
    let rejected = |what: &str, result: Result<(), StoreError>| match result {
        Err(StoreError::Rejected { .. }) => {}
        other => panic!("{what}: refused as `Rejected`, not: {other:?}"),
    };
    let appended = store
        .append(&stream, ExpectedVersion::Any, vec![record(1)])
        .await;
    rejected("append", appended.map(drop));
    rejected("load", store.load(&stream, 0).await.map(drop));
    rejected(
        "stream_version",
        store.stream_version(&stream).await.map(drop),
    );
}

/// U+0000 in any text of an event (its type, partition key, actor, trace context, headers, a
/// payload string or key): a store that cannot hold it (Postgres) refuses the whole batch as
/// [`StoreError::Rejected`] (the caller's fault, not an outage or a bug) and stores nothing of
/// it; one that can keeps it as it was. Either way nothing of the batch is half stored.
pub async fn text_a_store_cannot_hold_is_refused_whole_or_kept<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let with = |metadata: Metadata| {
        let mut r = record(2);
        r.metadata = RecordMetadata::from_metadata(&metadata);
        r
    };
    let mut cases: Vec<(&str, EventRecord)> = vec![
        ("event type", {
            let mut r = record(2);
            r.event_type = "No\0ted".to_owned();
            r
        }),
        (
            "partition key",
            record(2).with_partition_key(Some("key\0".into())),
        ),
        ("actor", with(Metadata::new().with_actor("user\0"))),
        (
            "trace context key",
            with(Metadata::new().with_trace_field("trace\0", "v")),
        ),
        (
            "trace context value",
            with(Metadata::new().with_trace_field("traceparent", "00\0")),
        ),
        (
            "header key",
            with(Metadata::new().with_header("ten\0ant", "v")),
        ),
        (
            "header value",
            with(Metadata::new().with_header("tenant", "ac\0me")),
        ),
    ];
    for (what, payload) in [
        ("payload string", json!({ "n": 2, "text": "a\0b" })),
        ("payload key", json!({ "n": 2, "ke\0y": 1 })),
    ] {
        let mut r = record(2);
        r.payload = payload;
        cases.push((what, r));
    }
    for (i, (what, bad)) in cases.into_iter().enumerate() {
        let stream = format!("{}-text-{i}", h.test_id());
        let good = record(1);
        match store
            .append(&stream, ExpectedVersion::NO_STREAM, vec![good, bad.clone()])
            .await
        {
            Err(StoreError::Rejected { .. }) => {
                let version = store.stream_version(&stream).await.unwrap();
                assert_eq!(version, 0, "{what}: a refused batch stored nothing");
            }
            Ok(stored) => {
                assert_eq!(stored.len(), 2, "{what}: the whole batch stored");
                let loaded = store.load(&stream, 1).await.unwrap().remove(0);
                assert_eq!(loaded.event_type, bad.event_type, "{what}: kept as it was");
                assert_eq!(loaded.partition_key, bad.partition_key, "{what}: kept");
                assert_eq!(loaded.payload, bad.payload, "{what}: kept as it was");
                assert_eq!(loaded.metadata.actor, bad.metadata.actor, "{what}: kept");
                assert_eq!(
                    loaded.metadata.trace_context, bad.metadata.trace_context,
                    "{what}: kept as it was"
                );
                assert_eq!(
                    loaded.metadata.headers, bad.metadata.headers,
                    "{what}: kept as it was"
                );
            }
            Err(other) => panic!(
                "{what} holding U+0000: refused as `Rejected` (the caller's to fix) or kept, \
                 not: {other:?}"
            ),
        }
    }
}

/// The late-commit trap, made deterministic: writer A begins and stays open, B appends after
/// it; a reader never sees A before A commits, and a reader that continues from its checkpoint
/// after A commits sees both exactly once. Fails when the harness cannot hold an append open
/// (run the suite `without_held_appends` for such an adapter).
pub async fn a_reader_never_skips_an_event_that_commits_late<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let (a, b) = (
        format!("{}-late-a", h.test_id()),
        format!("{}-late-b", h.test_id()),
    );
    let start = last_position(store.as_ref()).await;
    let Some(mut held) = h.begin_held_append(&a, vec![record(1)]).await else {
        panic!(
            "the harness cannot hold an append open (`begin_held_append` gave `None`), so this \
             scenario tests nothing: run the suite with \
             `event_store_conformance!(harness, without_held_appends)`, which leaves it out"
        );
    };
    // B may have to wait for A (a store that serializes appends): append it in the background,
    // and wait until it has either committed ahead of A or is waiting for A.
    let b_append = append_beside(held.as_mut(), &store, &b, record(2)).await;
    // A is still open: the reader must not see it, and may hold B back until A commits.
    let (first_read, checkpoint) = read_ours(store.as_ref(), start, &[&a, &b]).await;
    assert!(
        first_read
            .iter()
            .all(|r| r.stream_id.as_deref() != Some(a.as_str())),
        "an uncommitted event was read"
    );
    held.commit().await.expect("commit the held append");
    b_append.await.expect("B's task ran").expect("B's append");
    let (second_read, _) = read_ours(store.as_ref(), checkpoint, &[&a, &b]).await;
    let mut all: Vec<&str> = first_read
        .iter()
        .chain(second_read.iter())
        .filter_map(|r| r.stream_id.as_deref())
        .collect();
    all.sort();
    assert_eq!(
        all,
        [a.as_str(), b.as_str()],
        "a reader that continued from its checkpoint {checkpoint} saw both events exactly once \
         (first read: {:?}, second read: {:?})",
        numbers(&first_read),
        numbers(&second_read)
    );
}

/// Appends `event` to `stream` (expecting no stream) in the background, and waits until it
/// has either finished or is waiting for `held`.
async fn append_beside(
    held: &mut dyn HeldAppend,
    store: &Arc<dyn EventStore>,
    stream: &str,
    event: EventRecord,
) -> tokio::task::JoinHandle<Result<Vec<EventRecord>, StoreError>> {
    let append = {
        let (store, stream) = (store.clone(), stream.to_owned());
        tokio::spawn(async move {
            store
                .append(&stream, ExpectedVersion::NO_STREAM, vec![event])
                .await
        })
    };
    // Wide: the append may first open a connection of its own, on a loaded machine.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !append.is_finished()
        && !held
            .blocks_another_writer()
            .await
            .expect("ask whether the append waits for the held one")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "within 30 s, an append neither finished nor waited for the held append"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    append
}

/// The version check is the store's, at the append, not a read before it: with an append to a
/// new stream in flight (uncommitted), a second append expecting no stream either waits for it
/// and then conflicts, or conflicts at once; it never also goes through. (Fifty racing appends
/// catch a check made by reading first only when they happen to collide.)
pub async fn an_append_at_the_version_of_one_in_flight_conflicts<H: EventStoreHarness>(h: &H) {
    let store = h.store();
    let stream = format!("{}-in-flight", h.test_id());
    let Some(mut held) = h.begin_held_append(&stream, vec![record(1)]).await else {
        panic!(
            "the harness cannot hold an append open (`begin_held_append` gave `None`): run the \
             suite with `event_store_conformance!(harness, without_held_appends)`"
        );
    };
    let second = append_beside(held.as_mut(), &store, &stream, record(2)).await;
    held.commit().await.expect("commit the held append");
    match second.await.expect("the second append's task ran") {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("the second append expecting no stream must conflict, got {other:?}"),
    }
    assert_eq!(numbers(&store.load(&stream, 0).await.unwrap()), [1]);
}

/// The records of `streams` after `after`, and the last position read (of any stream): the
/// checkpoint a real reader keeps, whatever other writers of a shared store appended.
async fn read_ours(
    store: &dyn EventStore,
    after: Position,
    streams: &[&str],
) -> (Vec<EventRecord>, Position) {
    let mut out = Vec::new();
    let mut after = after;
    loop {
        let page = store.read_all(after, 100).await.unwrap();
        check_page(after, &page);
        let Some(last) = page.last() else { break };
        after = last.position.unwrap();
        out.extend(
            page.into_iter()
                .filter(|r| r.stream_id.as_deref().is_some_and(|s| streams.contains(&s))),
        );
    }
    (out, after)
}

async fn last_position(store: &dyn EventStore) -> Position {
    let mut after = Position::START;
    loop {
        let page = store.read_all(after, 1000).await.unwrap();
        check_page(after, &page);
        match page.last() {
            Some(last) => after = last.position.unwrap(),
            None => return after,
        }
    }
}
