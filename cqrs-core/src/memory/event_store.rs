//! The in-memory event store and snapshot store.

use crate::ports::{EventStore, ExpectedVersion, Snapshot, SnapshotStore, StoreError};
use crate::{EventRecord, Position};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use uuid::Uuid;

/// A stream id Postgres could not take (U+0000 in it), refused by every call as the Postgres
/// stores refuse it.
fn refused_stream_id(stream_id: &str) -> Result<(), StoreError> {
    if stream_id.contains('\0') {
        return Err(StoreError::Rejected {
            backend: "memory",
            source: "the stream id holds U+0000, which Postgres cannot store".into(),
        });
    }
    Ok(())
}

/// Why an append cannot be stored (as Postgres could not hold it), if it cannot.
fn unstorable(events: &[EventRecord]) -> Option<String> {
    const NUL: char = '\0';
    events.iter().find_map(|event| {
        let id = event.event_id;
        if crate::ports::nests_deeper_than(&event.payload, crate::ports::MAX_PAYLOAD_DEPTH) {
            return Some(format!(
                "event {id}'s payload nests arrays and objects more than {} deep: it could be \
                 stored but never read back; flatten it or check the depth of client data",
                crate::ports::MAX_PAYLOAD_DEPTH
            ));
        }
        let m = &event.metadata;
        let text_with_nul = event.event_type.contains(NUL)
            || event
                .partition_key
                .as_deref()
                .is_some_and(|k| k.contains(NUL))
            || m.actor.as_deref().is_some_and(|a| a.contains(NUL))
            || m.trace_context
                .iter()
                .any(|(k, v)| k.contains(NUL) || v.contains(NUL))
            || m.headers
                .iter()
                .any(|(k, v)| k.contains(NUL) || v.contains(NUL))
            || crate::ports::holds_nul(&event.payload);
        text_with_nul.then(|| format!("event {id} holds U+0000, which Postgres cannot store"))
    })
}

#[derive(Default)]
struct State {
    /// Every event in global order; position = index + 1.
    all: Vec<EventRecord>,
    /// Per stream, the indexes into `all`.
    streams: HashMap<String, Vec<usize>>,
    /// Every stored event id: an id is stored once, as a unique constraint does in Postgres.
    ids: HashSet<Uuid>,
}

/// An event store in process memory: for tests, examples, and single-process servers that
/// need no durability. Appends are serialized by one lock, so positions follow commit order.
///
/// It refuses what the Postgres store refuses, so that tests meet the refusal before a server
/// does: a payload nested more than [`MAX_PAYLOAD_DEPTH`](crate::ports::MAX_PAYLOAD_DEPTH)
/// deep, and U+0000 in a stream id (in every call: `load` and `stream_version` too, and the
/// snapshot store's), an event type, a payload (its text or its keys), a
/// partition key, an actor, a trace context or a header, each as [`StoreError::Rejected`]; a schema
/// version past `i32::MAX` as [`StoreError::Codec`].
///
/// ```
/// use cqrs_core::{ExpectedVersion, Position, memory::InMemoryEventStore, ports::EventStore};
/// # use cqrs_core::{EventRecord, RecordMetadata, Metadata};
/// # fn record() -> EventRecord {
/// #     EventRecord::new(cqrs_core::reexports::uuid::Uuid::now_v7(), "Noted", 1, cqrs_core::reexports::serde_json::json!({}), RecordMetadata::from_metadata(&Metadata::new()))
/// # }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = InMemoryEventStore::new();
/// store.append("note-1", ExpectedVersion::NO_STREAM, vec![record(), record()]).await?;
/// assert_eq!(store.load("note-1", 0).await?.len(), 2);
/// assert_eq!(store.read_all(Position::START, 10).await?[1].position, Some(Position::new(2)));
/// # Ok::<_, cqrs_core::ports::StoreError>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Default)]
pub struct InMemoryEventStore {
    state: Arc<Mutex<State>>,
    appended: Arc<Notify>,
}

impl std::fmt::Debug for InMemoryEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.state.lock().map(|s| s.all.len()).unwrap_or(0);
        f.debug_struct("InMemoryEventStore")
            .field("events", &len)
            .finish()
    }
}

impl InMemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Completes once something is appended after this call: readers of the global order use
    /// it instead of polling. Take it *before* reading, so an append between the read and the
    /// wait is not missed:
    ///
    /// ```
    /// # use cqrs_core::memory::InMemoryEventStore;
    /// # use cqrs_core::ports::EventStore;
    /// # use cqrs_core::Position;
    /// # async fn follow(store: &InMemoryEventStore) -> Result<(), cqrs_core::ports::StoreError> {
    /// let mut after = Position::START;
    /// loop {
    ///     let appended = store.appended();
    ///     let records = store.read_all(after, 100).await?;
    ///     match records.last().and_then(|last| last.position) {
    ///         Some(last) => after = last,
    ///         None => appended.await,
    ///     }
    ///     # break;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        // A `Notified` sees every `notify_waiters` from its creation on, polled or not.
        self.appended.notified()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A std mutex: no operation awaits while holding it, and a panic cannot leave the
        // vectors half-written (pushes happen after every check), so poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl EventStore for InMemoryEventStore {
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        refused_stream_id(stream_id)?;
        if let Some(why) = unstorable(&events) {
            return Err(StoreError::Rejected {
                backend: "memory",
                source: why.into(),
            });
        }
        if let Some(event) = events
            .iter()
            .find(|e| i32::try_from(e.schema_version).is_err())
        {
            return Err(StoreError::Codec(
                format!(
                    "event {} has schema version {}, more than a Postgres integer holds",
                    event.event_id, event.schema_version
                )
                .into(),
            ));
        }
        let stored = {
            let mut state = self.lock();
            let current = state.streams.get(stream_id).map_or(0, Vec::len) as u64;
            // Ids first: a retry of an append that went through meets the version it moved
            // the stream to, and must hear "duplicate", never "conflict" (decide again).
            let mut batch = HashSet::with_capacity(events.len());
            if let Some(duplicate) = events
                .iter()
                .find(|e| state.ids.contains(&e.event_id) || !batch.insert(e.event_id))
            {
                return Err(StoreError::Backend {
                    backend: "memory",
                    source: format!(
                        "event {} of this batch for stream {stream_id} is already stored (or twice in the batch): an event id is stored once",
                        duplicate.event_id
                    )
                    .into(),
                });
            }
            if let ExpectedVersion::Exactly(v) = expected
                && v != current
            {
                return Err(StoreError::Conflict {
                    stream: stream_id.to_owned(),
                    expected,
                    actual: current,
                });
            }
            state.ids.extend(batch);
            let mut stored = Vec::with_capacity(events.len());
            for (i, event) in events.into_iter().enumerate() {
                let index = state.all.len();
                let record = event
                    .with_stream(stream_id, current + 1 + i as u64)
                    .with_position(Position::new(index as u64 + 1));
                state.all.push(record.clone());
                state
                    .streams
                    .entry(stream_id.to_owned())
                    .or_default()
                    .push(index);
                stored.push(record);
            }
            stored
        };
        self.appended.notify_waiters();
        Ok(stored)
    }

    async fn load(
        &self,
        stream_id: &str,
        after_version: u64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        refused_stream_id(stream_id)?;
        let state = self.lock();
        Ok(state
            .streams
            .get(stream_id)
            .map(|indexes| {
                indexes
                    .iter()
                    .skip(after_version as usize)
                    .map(|i| state.all[*i].clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let state = self.lock();
        Ok(state
            .all
            .iter()
            .skip(after.get() as usize)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
        refused_stream_id(stream_id)?;
        Ok(self.lock().streams.get(stream_id).map_or(0, Vec::len) as u64)
    }
}

/// A snapshot store in process memory.
#[derive(Clone, Debug, Default)]
pub struct InMemorySnapshotStore {
    snapshots: Arc<Mutex<HashMap<String, Snapshot>>>,
}

impl InMemorySnapshotStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl SnapshotStore for InMemorySnapshotStore {
    async fn load(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        refused_stream_id(stream_id)?;
        let snapshots = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        Ok(snapshots.get(stream_id).cloned())
    }

    async fn save(&self, stream_id: &str, snapshot: Snapshot) -> Result<(), StoreError> {
        refused_stream_id(stream_id)?;
        // What Postgres refuses, refused here too: a test on memory would snapshot what a
        // server on Postgres never can, and miss that its loads replay the whole stream.
        let what = format!("the snapshot of stream `{stream_id}`");
        let unholdable =
            crate::ports::unholdable(&snapshot.state, crate::ports::MAX_RESPONSE_DEPTH, &what);
        if let Some(why) = unholdable {
            return Err(StoreError::Rejected {
                backend: "memory",
                source: why.into(),
            });
        }
        let mut snapshots = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        match snapshots.get(stream_id) {
            Some(existing) if existing.version >= snapshot.version => {}
            _ => {
                snapshots.insert(stream_id.to_owned(), snapshot);
            }
        }
        Ok(())
    }
}
