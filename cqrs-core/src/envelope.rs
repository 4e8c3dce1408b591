//! An event with its metadata, type-erased so one bus and one transport carry every event type.

use crate::{Event, Metadata, Position};
use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;

/// An event value of some [`Event`] type, behind a trait object.
///
/// Implemented for every `E: Event`, and sealed: a hand-written implementation could report a
/// name its value's type does not have, which decoding and routing go by.
pub trait AnyEvent: Any + Send + Sync + sealed::Sealed {
    /// The event's wire name.
    fn name(&self) -> &'static str;
    /// The event's schema version.
    fn version(&self) -> u32;
    /// The payload as JSON, for storage and transport. Fails for a NaN or an infinite float,
    /// which JSON cannot carry (`serde_json` alone would write `null`, which would not decode).
    fn to_json(&self) -> Result<serde_json::Value, serde_json::Error>;
    /// The value as `Any`, to downcast.
    fn as_any(&self) -> &dyn Any;
}

mod sealed {
    /// Only the blanket implementation of [`AnyEvent`](super::AnyEvent), for every event.
    pub trait Sealed {}

    impl<E: crate::Event> Sealed for E {}
}

impl<E: Event> AnyEvent for E {
    fn name(&self) -> &'static str {
        E::NAME
    }
    fn version(&self) -> u32 {
        E::VERSION
    }
    fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        // Not `serde_json::to_value`, which writes a NaN as `null`: such an event would be
        // stored and then fail to decode on every read of its stream. A `Serialize` that
        // panics (a `serialize_with` that unwraps) is an error like one that fails, for every
        // writer (a bus's sink, an outbox, a relay), not an unwind into its caller.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| crate::json::to_value(self)))
            .unwrap_or_else(|panic| {
                Err(<serde_json::Error as serde::ser::Error>::custom(
                    format_args!(
                        "its Serialize panicked: {}",
                        crate::panic::into_message(panic)
                    ),
                ))
            })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// An event and its metadata, as handlers, stores and transports see it.
///
/// Cloning is cheap: the payload is shared.
///
/// ```
/// # use cqrs_core::doc::TicketOpened;
/// use cqrs_core::{EventEnvelope, Metadata};
///
/// let envelope = EventEnvelope::new(TicketOpened { ticket_id: "t1".into() }, Metadata::new())
///     .with_partition_key("t1");
/// assert_eq!(envelope.name(), "TicketOpened");
/// assert_eq!(envelope.downcast_ref::<TicketOpened>().unwrap().ticket_id, "t1");
/// ```
#[derive(Clone)]
pub struct EventEnvelope {
    /// The event's metadata.
    pub metadata: Metadata,
    partition_key: Option<Arc<str>>,
    stored: Option<Stored>,
    event: Arc<dyn AnyEvent>,
}

/// Where a store keeps an event.
#[derive(Clone, Debug)]
struct Stored {
    stream_id: Arc<str>,
    stream_version: u64,
    position: Option<Position>,
}

impl EventEnvelope {
    /// Wraps an event.
    pub fn new<E: Event>(event: E, metadata: Metadata) -> Self {
        Self {
            metadata,
            partition_key: None,
            stored: None,
            event: Arc::new(event),
        }
    }

    /// Wraps an already type-erased event (decoders use this).
    pub fn from_arc(event: Arc<dyn AnyEvent>, metadata: Metadata) -> Self {
        Self {
            metadata,
            partition_key: None,
            stored: None,
            event,
        }
    }

    /// Sets the partition key: events with one key keep their order in transports. Normally the
    /// aggregate id.
    pub fn with_partition_key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Notes where a store keeps this event: its stream, its version in the stream, and its
    /// global position when the store has one.
    pub fn with_stored(
        mut self,
        stream_id: impl Into<Arc<str>>,
        stream_version: u64,
        position: Option<Position>,
    ) -> Self {
        self.stored = Some(Stored {
            stream_id: stream_id.into(),
            stream_version,
            position,
        });
        self
    }

    /// The stream that stores this event, if it came from a store.
    pub fn stream_id(&self) -> Option<&str> {
        self.stored.as_ref().map(|s| &*s.stream_id)
    }

    /// The event's version within its stream, if it came from a store.
    pub fn stream_version(&self) -> Option<u64> {
        self.stored.as_ref().map(|s| s.stream_version)
    }

    /// The event's global position, if it came from a store that has one.
    pub fn position(&self) -> Option<Position> {
        self.stored.as_ref().and_then(|s| s.position)
    }

    /// The partition key, if any.
    pub fn partition_key(&self) -> Option<&str> {
        self.partition_key.as_deref()
    }

    /// The event's wire name.
    pub fn name(&self) -> &'static str {
        self.event.name()
    }

    /// The event's schema version.
    pub fn version(&self) -> u32 {
        self.event.version()
    }

    /// The Rust type id of the payload.
    pub fn payload_type_id(&self) -> TypeId {
        self.event.as_any().type_id()
    }

    /// The payload, if it is an `E`.
    pub fn downcast_ref<E: Event>(&self) -> Option<&E> {
        self.event.as_any().downcast_ref::<E>()
    }

    /// The type-erased payload.
    pub fn event(&self) -> &Arc<dyn AnyEvent> {
        &self.event
    }

    /// The payload as JSON. Fails when the event's `Serialize` does or panics, or when it holds
    /// a NaN or an infinite float, which JSON cannot carry.
    pub fn payload_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        self.event.to_json()
    }
}

impl fmt::Debug for EventEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventEnvelope")
            .field("name", &self.name())
            .field("version", &self.version())
            .field("partition_key", &self.partition_key)
            .field("stored", &self.stored)
            .field("metadata", &self.metadata)
            .finish()
    }
}
