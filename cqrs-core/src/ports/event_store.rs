//! The event store port.

use super::StoreError;
use crate::{EventRecord, Position};
use async_trait::async_trait;
use std::fmt;

/// What a writer expects a stream's version to be before its append.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// Append whatever the version is.
    Any,
    /// The stream must be at exactly this version; `Exactly(0)` means it must not exist yet.
    Exactly(u64),
}

impl ExpectedVersion {
    /// The stream must not exist yet.
    pub const NO_STREAM: ExpectedVersion = ExpectedVersion::Exactly(0);
}

/// The deepest nesting of arrays and objects an event's payload may have: every event store
/// refuses a deeper one as [`StoreError::Rejected`]. Stores, transports and the realtime hub
/// decode JSON with `serde_json`, which reads at most 128 levels, and wrap a few levels of
/// their own around a payload: a deeper one could be stored but never read back, and its
/// stream would fail every load.
pub const MAX_PAYLOAD_DEPTH: usize = 100;

/// Whether `value` nests arrays and objects more than `max_depth` deep (a scalar is 0 deep,
/// `[]` and `{}` are 1). It walks with a stack of its own, so a value of any depth is safe to
/// check.
///
/// ```
/// use cqrs_core::ports::{MAX_PAYLOAD_DEPTH, nests_deeper_than};
/// use cqrs_core::reexports::serde_json::json;
///
/// assert!(!nests_deeper_than(&json!({ "a": [1, 2] }), 2));
/// assert!(nests_deeper_than(&json!({ "a": [[1]] }), 2));
/// assert!(!nests_deeper_than(&json!("text"), 0));
/// # let _ = MAX_PAYLOAD_DEPTH;
/// ```
pub fn nests_deeper_than(value: &serde_json::Value, max_depth: usize) -> bool {
    use serde_json::Value;
    let container = |value: &&Value| value.is_array() || value.is_object();
    // Only containers go on the stack, with their depth.
    let mut pending: Vec<(&Value, usize)> = Vec::new();
    if container(&value) {
        pending.push((value, 1));
    }
    while let Some((value, depth)) = pending.pop() {
        if depth > max_depth {
            return true;
        }
        let depth = depth + 1;
        match value {
            Value::Array(items) => {
                pending.extend(items.iter().filter(container).map(|child| (child, depth)));
            }
            Value::Object(fields) => {
                pending.extend(
                    fields
                        .values()
                        .filter(container)
                        .map(|child| (child, depth)),
                );
            }
            _ => {}
        }
    }
    false
}

/// Whether any text of `value`, or any key, holds U+0000, which Postgres stores in neither
/// `text` nor `jsonb`: its stores refuse such a value as [`StoreError::Rejected`], and the
/// in-memory store does the same, so that tests meet the refusal.
///
/// ```
/// use cqrs_core::ports::holds_nul;
/// use cqrs_core::reexports::serde_json::json;
///
/// assert!(holds_nul(&json!({ "a": ["x\u{0}y"] })));
/// assert!(holds_nul(&json!({ "a\u{0}": 1 })));
/// assert!(!holds_nul(&json!({ "a": "\u{1}" })));
/// ```
pub fn holds_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    const NUL: char = '\0';
    // Containers only go on the stack: a scalar is answered without one.
    let mut pending: Vec<&Value> = Vec::new();
    let mut next = Some(value);
    while let Some(value) = next.take().or_else(|| pending.pop()) {
        match value {
            Value::String(text) if text.contains(NUL) => return true,
            Value::Array(items) => pending.extend(items),
            Value::Object(fields) => {
                if fields.keys().any(|k| k.contains(NUL)) {
                    return true;
                }
                pending.extend(fields.values());
            }
            _ => {}
        }
    }
    false
}

/// Why `value`, which `what` names ("the response"), cannot be held alike by every store: it
/// nests more than `max_depth` arrays and objects deep (it could be stored but never read
/// back), or holds U+0000 (which Postgres cannot store). `None` when it can.
pub(crate) fn unholdable(
    value: &serde_json::Value,
    max_depth: usize,
    what: &str,
) -> Option<String> {
    if nests_deeper_than(value, max_depth) {
        Some(format!(
            "{what} nests arrays and objects more than {max_depth} deep: it could be stored but \
             never read back"
        ))
    } else if holds_nul(value) {
        Some(format!("{what} holds U+0000, which Postgres cannot store"))
    } else {
        None
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::Exactly(v) => write!(f, "version {v}"),
        }
    }
}

/// An append-only store of event streams with one global order.
///
/// The contract (checked by [`testing::event_store`](crate::testing::event_store)):
///
/// * **Atomic appends.** `append` writes all of its events or none. The events get versions
///   `current + 1 ..= current + n` in the given order.
/// * **Optimistic concurrency.** With `ExpectedVersion::Exactly(v)`, the append fails with
///   [`StoreError::Conflict`] unless the stream is at `v`; of many concurrent appends at one
///   version exactly one wins. This is enforced by the store (a unique constraint, a lock),
///   never by reading first and writing after. An empty append at `Exactly(v)` is a guard:
///   a conflict unless the stream is at `v`, and nothing stored either way (at `Any` it
///   checks nothing).
/// * **Load.** `load(stream, after)` returns the stream's events with a version greater than
///   `after`, in version order.
/// * **Global order.** `read_all(after, limit)` returns events with a position greater than
///   `after`, in position order, at most `limit`, and fewer only when it reached the end of
///   what it may show now (readers take a short page as caught up: a store that pages by
///   size must fill the page, or its readers stop early). A reader never skips an event that commits
///   late: once `read_all` has returned position `p`, no event with a position at or below `p`
///   can appear later.
/// * **One copy per event id.** An append holding an event id already stored (in any stream)
///   or twice in its batch fails whole, and never as [`StoreError::Conflict`]: a conflict
///   says "load and decide again", and a retry of an append whose outcome was unclear must not
///   be decided again with fresh ids (it would take effect twice).
/// * **Readable payloads.** An append holding a payload nested more than
///   [`MAX_PAYLOAD_DEPTH`] deep fails whole with [`StoreError::Rejected`], before anything is
///   stored. A store may refuse other values it cannot hold the same way (Postgres: text
///   holding U+0000; the in-memory store refuses those too, so that tests meet the refusal).
/// * Returned records carry `stream_id`, `stream_version` and `position`.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream_id` if the stream is at `expected`. Returns the stored
    /// records (with versions and positions).
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// The events of `stream_id` with a version greater than `after_version`, in order.
    async fn load(
        &self,
        stream_id: &str,
        after_version: u64,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// Events of every stream with a position greater than `after`, in global order, at most
    /// `limit` of them; fewer only at the end of what it may show now: no more were committed
    /// at the time of the read, or those committed wait behind an earlier position whose append
    /// is still open (see "Global order" above). Readers take a page shorter than `limit` for
    /// the end of the store, and stop there.
    async fn read_all(&self, after: Position, limit: usize)
    -> Result<Vec<EventRecord>, StoreError>;

    /// The stream's current version (0 when it does not exist).
    async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError>;
}

/// A page of the global order, as [`read_up_to_undecodable`] reads it.
pub(crate) struct Page {
    pub(crate) records: Vec<EventRecord>,
    /// The page ends before an event the store cannot decode, not at the end of the store:
    /// short, it still does not mean caught up.
    pub(crate) cut: bool,
}

/// [`EventStore::read_all`]; or, when the page fails on an event the store cannot decode
/// ([`StoreError::Codec`]: a row written around its append), the events before that one,
/// found with pages half as long each time one fails (a few reads, not one per event), the
/// next read failing on the event itself. For readers that go event by event (a store-fed
/// projection runner, the `StoreRelay`): they take and move past the events before it, and
/// stop at it, where a failed page held back the whole page. Not for a reader that needs a
/// whole range (a rebuild, a resume), which fails as before.
pub(crate) async fn read_up_to_undecodable(
    store: &dyn EventStore,
    after: Position,
    limit: usize,
) -> Result<Page, StoreError> {
    let error = match store.read_all(after, limit).await {
        Err(error @ StoreError::Codec(_)) if limit > 1 => error,
        page => {
            return page.map(|records| Page {
                records,
                cut: false,
            });
        }
    };
    tracing::warn!(
        %error,
        after = after.get(),
        "a page of the event store cannot be read whole; reading the events before the one at fault in smaller pages"
    );
    let mut records: Vec<EventRecord> = Vec::new();
    let mut from = after;
    let mut ask = limit / 2;
    while ask > 0 && records.len() < limit {
        match store.read_all(from, ask).await {
            Ok(page) => {
                let short = page.len() < ask;
                if let Some(last) = page.last().and_then(|r| r.position) {
                    from = last;
                }
                records.extend(page);
                if short {
                    break;
                }
                // Saturating: a store may return more than it was asked for.
                ask = ask.min(limit.saturating_sub(records.len()));
            }
            Err(StoreError::Codec(_)) => ask /= 2,
            // The store failing meanwhile: the next read tells.
            Err(_) if !records.is_empty() => break,
            Err(error) => return Err(error),
        }
    }
    if records.is_empty() {
        return Err(error);
    }
    Ok(Page { records, cut: true })
}

/// A snapshot of an aggregate's state at a stream version.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The stream version the state includes.
    pub version: u64,
    /// The serialized state.
    pub state: serde_json::Value,
    /// The id of the stream's event at `version`, when known: a load checks that the stream
    /// still has that event there, so a snapshot of another history (events restored from a
    /// backup older than the snapshots) is passed over instead of trusted.
    pub last_event_id: Option<uuid::Uuid>,
}

impl Snapshot {
    /// A snapshot of `state` at `version`.
    pub fn new(version: u64, state: serde_json::Value) -> Self {
        Self {
            version,
            state,
            last_event_id: None,
        }
    }

    /// The same, naming the stream's event at its version (see
    /// [`last_event_id`](Self::last_event_id)).
    pub fn with_last_event(mut self, event_id: uuid::Uuid) -> Self {
        self.last_event_id = Some(event_id);
        self
    }
}

/// Optional storage of aggregate snapshots, so loading a long stream reads only its tail.
///
/// The contract (checked by [`testing::snapshot_store`](crate::testing::snapshot_store)): a
/// stream without a snapshot loads `None`; the state loads as it was saved; a save replaces
/// the stored snapshot only with a newer version (one at the same or an older version is
/// ignored, also when writers race), so a stream's snapshot never goes back in time. An adapter
/// that sees the stream's events may also replace a snapshot the stream no longer has events
/// for (one ahead of a stream restored from an older backup) with one it has: see
/// `cqrs_postgres::PgSnapshotStore`. Such an adapter can, in a race with the append that backs
/// a newer snapshot, take that snapshot for unbacked and store an older one: loads stay
/// correct (they replay a longer tail) until the next save.
///
/// A state nested more than [`MAX_RESPONSE_DEPTH`](crate::ports::MAX_RESPONSE_DEPTH) (127)
/// arrays and objects deep, or holding U+0000, is refused as [`StoreError::Rejected`] and the
/// stored snapshot stays, whatever the store could hold: Postgres cannot keep either, so a
/// test on another store would snapshot what a server on Postgres never can. (The repository
/// then loads by replaying, with a warning.) A state at the bound is kept and loads back
/// whole.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// The latest snapshot of a stream.
    async fn load(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError>;
    /// Stores a snapshot, replacing an older one. A snapshot at the same or an older version
    /// than the stored one is ignored.
    async fn save(&self, stream_id: &str, snapshot: Snapshot) -> Result<(), StoreError>;
}
