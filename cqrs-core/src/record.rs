//! The serialized form of an event: what stores keep and transports carry.

use crate::{EventEnvelope, Headers, Metadata};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// A place in an event store's global order. Positions only grow: an event appended later in
/// the order has a greater position. Clients (of the realtime hub) see it as an opaque string,
/// one text per position (`"42"`, never `"042"` or `"+42"`); its order is the parsed value's,
/// not the text's (`"9"` comes before `"10"`): compare positions, not strings. Serialized
/// with serde (an [`EventRecord`]'s `position`), it is a JSON number.
///
/// ```
/// use cqrs_core::Position;
///
/// let p: Position = "42".parse().unwrap();
/// assert!(p > Position::START);
/// assert_eq!(p.to_string(), "42");
/// assert!("forty-two".parse::<Position>().is_err());
/// assert!("042".parse::<Position>().is_err() && "+42".parse::<Position>().is_err());
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Position(u64);

impl Position {
    /// Before the first event: reading after it reads everything.
    pub const START: Position = Position(0);

    /// A position from its number (adapters use this).
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The number behind the position.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A string that is not a [`Position`].
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a position: expected the decimal number of a position this server issued")]
pub struct InvalidPosition(String);

impl FromStr for Position {
    type Err = InvalidPosition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only the text `Display` writes: one string per position, as the docs promise.
        let canonical = s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
        s.parse::<u64>()
            .ok()
            .filter(|_| canonical)
            .map(Position)
            .ok_or_else(|| InvalidPosition(s.chars().take(64).collect()))
    }
}

/// The metadata that is stored and sent with an event. The in-process
/// [`principal`](Metadata::principal) is not part of it; [`actor`](Metadata::actor) is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecordMetadata {
    /// The id shared by every message of one original request.
    pub correlation_id: Uuid,
    /// The id of the message that caused this event.
    pub causation_id: Option<Uuid>,
    /// When the event happened.
    pub occurred_at: DateTime<Utc>,
    /// Who caused it, by stable id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Trace propagation fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trace_context: BTreeMap<String, String>,
    /// The application's own fields ([`Metadata::with_header`]). Absent from records written
    /// before they existed, and from those without any; a build that does not know them
    /// reads such records and passes them over.
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
}

/// One event in serialized form.
///
/// `stream_id`, `stream_version` and `position` are set once an event store has the event;
/// an event published without a store has none of them.
///
/// ```
/// # use cqrs_core::doc::TicketOpened;
/// use cqrs_core::{EventEnvelope, EventRecord, Metadata};
///
/// let envelope = EventEnvelope::new(TicketOpened { ticket_id: "t1".into() }, Metadata::new().with_actor("u1"))
///     .with_partition_key("t1");
/// let record = EventRecord::from_envelope(&envelope).unwrap();
/// assert_eq!(record.event_type, "TicketOpened");
/// assert_eq!(record.payload["ticket_id"], "t1");
/// assert_eq!(record.partition_key.as_deref(), Some("t1"));
/// assert_eq!(record.metadata.actor.as_deref(), Some("u1"));
/// assert_eq!(record.to_metadata().message_id, envelope.metadata.message_id);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventRecord {
    /// The event's id (its message id).
    pub event_id: Uuid,
    /// The event's wire name.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: u32,
    /// The payload.
    pub payload: serde_json::Value,
    /// Stored metadata.
    pub metadata: RecordMetadata,
    /// Events with one key keep their order in transports; normally the aggregate's stream id
    /// (an [`AggregateRepository`](crate::AggregateRepository)'s events have it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// The stream the event belongs to, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    /// The event's version within its stream (1 for the first), once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_version: Option<u64>,
    /// The event's place in the store's global order, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
}

impl EventRecord {
    /// Serializes an envelope's event and metadata. Fails as
    /// [`EventEnvelope::payload_json`] does (a NaN or an infinite float in the event).
    pub fn from_envelope(envelope: &EventEnvelope) -> Result<Self, serde_json::Error> {
        let m = &envelope.metadata;
        Ok(Self {
            event_id: m.message_id,
            event_type: envelope.name().to_owned(),
            schema_version: envelope.version(),
            payload: envelope.payload_json()?,
            metadata: RecordMetadata {
                correlation_id: m.correlation_id,
                causation_id: m.causation_id,
                occurred_at: m.timestamp,
                actor: m.actor.clone(),
                trace_context: m.trace_context.clone(),
                headers: m.headers.clone(),
            },
            partition_key: envelope.partition_key().map(str::to_owned),
            stream_id: envelope.stream_id().map(str::to_owned),
            stream_version: envelope.stream_version(),
            position: envelope.position(),
        })
    }

    /// A record built field by field (adapters reading rows use this).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        event_id: Uuid,
        event_type: impl Into<String>,
        schema_version: u32,
        payload: serde_json::Value,
        metadata: RecordMetadata,
    ) -> Self {
        Self {
            event_id,
            event_type: event_type.into(),
            schema_version,
            payload,
            metadata,
            partition_key: None,
            stream_id: None,
            stream_version: None,
            position: None,
        }
    }

    /// Sets the partition key.
    pub fn with_partition_key(mut self, key: Option<String>) -> Self {
        self.partition_key = key;
        self
    }

    /// Sets where the store keeps it.
    pub fn with_stream(mut self, stream_id: impl Into<String>, version: u64) -> Self {
        self.stream_id = Some(stream_id.into());
        self.stream_version = Some(version);
        self
    }

    /// Sets its global position.
    pub fn with_position(mut self, position: Position) -> Self {
        self.position = Some(position);
        self
    }

    /// The in-process metadata this record carries (no principal).
    pub fn to_metadata(&self) -> Metadata {
        // Built whole, not from `Metadata::new()`, whose fresh id and clock read (a process-wide
        // lock in `Uuid::now_v7`) would be thrown away for every decoded event.
        Metadata {
            message_id: self.event_id,
            correlation_id: self.metadata.correlation_id,
            causation_id: self.metadata.causation_id,
            timestamp: self.metadata.occurred_at,
            principal: None,
            actor: self.metadata.actor.clone(),
            trace_context: self.metadata.trace_context.clone(),
            headers: self.metadata.headers.clone(),
        }
    }
}

impl RecordMetadata {
    /// Metadata for a record, from the in-process metadata.
    pub fn from_metadata(metadata: &Metadata) -> Self {
        Self {
            correlation_id: metadata.correlation_id,
            causation_id: metadata.causation_id,
            occurred_at: metadata.timestamp,
            actor: metadata.actor.clone(),
            trace_context: metadata.trace_context.clone(),
            headers: metadata.headers.clone(),
        }
    }
}

/// Metric labels for event type names, which come from storage and may be anything: a name
/// becomes a label only if it looks like a wire name and is short (else `invalid`), and only
/// the first `CAP` distinct such names do; later ones share the label `other`. So neither a
/// bad record nor a producer writing ever new names (`E1`, `E2`, ...) makes unbounded metric
/// series. Names are never forgotten, so a name keeps its label; a name already kept is found
/// under the read lock, shared by every caller. The framework labels its own metrics so; use
/// one for yours (a transport decorator counting what it ships, say).
///
/// ```
/// use cqrs_core::EventTypeLabels;
///
/// static LABELS: EventTypeLabels<2> = EventTypeLabels::new();
/// assert_eq!(LABELS.label("tickets.opened"), "tickets.opened");
/// assert_eq!(LABELS.label("tickets.closed"), "tickets.closed");
/// assert_eq!(LABELS.label("tickets.assigned"), "other"); // past the cap of 2
/// assert_eq!(LABELS.label("tickets.opened"), "tickets.opened"); // kept
/// assert_eq!(LABELS.label("not a\nname"), "invalid");
/// ```
pub struct EventTypeLabels<const CAP: usize> {
    kept: std::sync::RwLock<std::collections::BTreeSet<Box<str>>>,
}

/// The longest wire name (the derives refuse longer ones when they compile).
pub(crate) const MAX_WIRE_NAME_LEN: usize = 64;

/// Whether `c` may be in a wire name: ASCII letters, digits, `.`, `_` and `-`, what needs no
/// quoting or escaping in a metrics label, a log field, a URL or a key of another tool.
pub(crate) fn is_wire_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The label of the event type names past an [`EventTypeLabels`]' cap.
pub(crate) const OTHER_TYPE_LABEL: &str = "other";

impl<const CAP: usize> std::fmt::Debug for EventTypeLabels<CAP> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventTypeLabels")
            .field("cap", &CAP)
            .finish_non_exhaustive()
    }
}

impl<const CAP: usize> Default for EventTypeLabels<CAP> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const CAP: usize> EventTypeLabels<CAP> {
    /// How many distinct names keep a label of their own (for the tests: the code uses
    /// `CAP` itself).
    #[cfg(test)]
    pub(crate) const CAP: usize = CAP;

    /// Labels keeping none yet (a `static` can hold one).
    pub const fn new() -> Self {
        Self {
            kept: std::sync::RwLock::new(std::collections::BTreeSet::new()),
        }
    }

    /// The label for `name`: itself, `invalid` (not a wire name: empty, longer than 64 bytes,
    /// or with a character other than ASCII letters, digits, `.`, `_` and `-`), or `other`
    /// (past the first `CAP` names).
    pub fn label(&self, name: &str) -> String {
        let wire_like = !name.is_empty()
            && name.len() <= MAX_WIRE_NAME_LEN
            && name.chars().all(is_wire_name_char);
        if !wire_like {
            return "invalid".to_owned();
        }
        if self
            .kept
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
        {
            return name.to_owned();
        }
        let mut kept = self.kept.write().unwrap_or_else(|p| p.into_inner());
        // Looked at again under the write lock: another caller may have kept it meanwhile.
        if kept.contains(name) || (kept.len() < CAP && kept.insert(name.into())) {
            name.to_owned()
        } else {
            OTHER_TYPE_LABEL.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{EventTypeLabels, OTHER_TYPE_LABEL};
    use std::collections::HashSet;

    #[test]
    fn the_first_distinct_names_keep_their_labels_and_the_rest_share_one() {
        let labels = EventTypeLabels::<128>::new();
        let seen: HashSet<String> = (0..10_000)
            .map(|n| labels.label(&format!("E{n}")))
            .collect();
        assert_eq!(seen.len(), EventTypeLabels::<128>::CAP + 1, "{seen:?}");
        assert!(seen.contains(OTHER_TYPE_LABEL));
        // The first names keep theirs, also when they come again; later ones stay `other`.
        for n in 0..EventTypeLabels::<128>::CAP {
            assert_eq!(labels.label(&format!("E{n}")), format!("E{n}"));
        }
        assert_eq!(labels.label("E9999"), OTHER_TYPE_LABEL);
        assert_eq!(labels.label("not a wire name"), "invalid");
        assert_eq!(labels.label(&"x".repeat(65)), "invalid");
        // An empty label reads as no label to Prometheus, merging series.
        assert_eq!(labels.label(""), "invalid");
    }

    /// A record goes to Postgres and Redis as text and comes back parsed: a float must come
    /// back bit for bit, or an aggregate replays another value than the one it decided on.
    /// serde_json's default parser rounds some (`float_roundtrip` makes it exact).
    #[test]
    fn a_record_read_back_from_its_text_decodes_to_the_same_floats() {
        #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
        struct Measured {
            value: f64,
        }
        impl crate::Message for Measured {
            const NAME: &'static str = "test.measured";
        }
        impl crate::Event for Measured {}

        let mut types = crate::EventTypes::new();
        types.register::<Measured>();
        // Among the values the default parser reads one unit in the last place off.
        for value in [51.248178375505404_f64, 0.1, 1e-300, 2.2250738585072014e-308] {
            let envelope = crate::EventEnvelope::new(Measured { value }, crate::Metadata::new());
            let record = super::EventRecord::from_envelope(&envelope).unwrap();
            let text = serde_json::to_string(&record).unwrap();
            let back: super::EventRecord = serde_json::from_str(&text).unwrap();
            let decoded = types.decode(&back).unwrap().unwrap();
            let read = decoded.downcast_ref::<Measured>().unwrap().value;
            assert_eq!(
                read.to_bits(),
                value.to_bits(),
                "{value:e} came back as {read:e}"
            );
        }
    }

    #[test]
    fn threads_racing_with_new_names_keep_at_most_the_cap() {
        let labels = EventTypeLabels::<16>::new();
        let seen: Vec<HashSet<String>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|t| {
                    let labels = &labels;
                    scope.spawn(move || {
                        // Every thread labels the same names, in a different order.
                        (0..1_000)
                            .map(|n| labels.label(&format!("E{}", (n * 7 + t * 131) % 1_000)))
                            .collect::<HashSet<_>>()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let all: HashSet<&String> = seen.iter().flatten().collect();
        assert!(all.len() <= EventTypeLabels::<16>::CAP + 1, "{all:?}");
        // Each kept name is kept once: labelled again, it keeps its label.
        let kept: Vec<&&String> = all
            .iter()
            .filter(|l| l.as_str() != OTHER_TYPE_LABEL)
            .collect();
        assert!(!kept.is_empty());
        for name in kept {
            assert_eq!(labels.label(name), **name);
        }
    }
}
