//! An event with its metadata, type-erased so one bus and one transport carry every event type.

use crate::{Event, Metadata};
use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;

/// An event value of some [`Event`] type, behind a trait object.
///
/// Implemented for every `E: Event`; you never implement it yourself.
pub trait AnyEvent: Any + Send + Sync {
    /// The event's wire name.
    fn name(&self) -> &'static str;
    /// The event's schema version.
    fn version(&self) -> u32;
    /// The payload as JSON, for storage and transport.
    fn to_json(&self) -> Result<serde_json::Value, serde_json::Error>;
    /// The value as `Any`, to downcast.
    fn as_any(&self) -> &dyn Any;
}

impl<E: Event> AnyEvent for E {
    fn name(&self) -> &'static str {
        E::NAME
    }
    fn version(&self) -> u32 {
        E::VERSION
    }
    fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(self)
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
    event: Arc<dyn AnyEvent>,
}

impl EventEnvelope {
    /// Wraps an event.
    pub fn new<E: Event>(event: E, metadata: Metadata) -> Self {
        Self {
            metadata,
            partition_key: None,
            event: Arc::new(event),
        }
    }

    /// Wraps an already type-erased event (decoders use this).
    pub fn from_arc(event: Arc<dyn AnyEvent>, metadata: Metadata) -> Self {
        Self {
            metadata,
            partition_key: None,
            event,
        }
    }

    /// Sets the partition key: events with one key keep their order in transports. Normally the
    /// aggregate id.
    pub fn with_partition_key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.partition_key = Some(key.into());
        self
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

    /// The payload as JSON.
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
            .field("metadata", &self.metadata)
            .finish()
    }
}
