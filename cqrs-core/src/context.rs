//! What a handler receives beside its message.

use crate::clock::Clock;
use crate::{Event, EventEnvelope, Extensions, Metadata};
use std::fmt;
use std::sync::Arc;

/// The context of one command: its metadata, the events the handler records, and extensions
/// that middleware put there (a database transaction, for instance).
pub struct CommandContext {
    metadata: Metadata,
    events: Vec<EventEnvelope>,
    extensions: Extensions,
    /// What stamps recorded events; `None`: the system clock.
    pub(crate) clock: Option<Arc<dyn Clock>>,
}

impl fmt::Debug for CommandContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandContext")
            .field("metadata", &self.metadata)
            .field("events", &self.events)
            .field("extensions", &self.extensions)
            .field(
                "clock",
                &self.clock.as_ref().map_or("system", |_| "injected"),
            )
            .finish()
    }
}

impl CommandContext {
    /// A context for a command with this metadata.
    pub fn new(metadata: Metadata) -> Self {
        Self::with_extensions(metadata, Extensions::new())
    }

    /// A context with extensions already set (used by middleware).
    pub fn with_extensions(metadata: Metadata, extensions: Extensions) -> Self {
        Self {
            metadata,
            events: Vec::new(),
            extensions,
            clock: None,
        }
    }

    /// Stamps the events recorded from now on with `clock`'s time instead of the system
    /// clock's: what a bus given a clock ([`CommandBusBuilder::clock`]) does, for a test whose
    /// handler is called directly.
    ///
    /// [`CommandBusBuilder::clock`]: crate::CommandBusBuilder::clock
    ///
    /// ```
    /// # use cqrs_core::doc::TicketOpened;
    /// use cqrs_core::reexports::chrono::{TimeZone, Utc};
    /// use cqrs_core::clock::ManualClock;
    /// use cqrs_core::{CommandContext, Metadata};
    /// use std::sync::Arc;
    ///
    /// let at = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    /// let mut ctx = CommandContext::new(Metadata::new()).with_clock(Arc::new(ManualClock::at(at)));
    /// ctx.record(TicketOpened { ticket_id: "t1".into() });
    /// assert_eq!(ctx.recorded()[0].metadata.timestamp, at);
    /// ```
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The command's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Now, by the context's clock ([`with_clock`](Self::with_clock); the bus's, or the
    /// system clock): for a handler's own time-dependent decisions (a due date), so a test
    /// that gives the bus a clock controls them too.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        match &self.clock {
            Some(clock) => clock.now(),
            None => chrono::Utc::now(),
        }
    }

    /// Metadata for an event this command causes, stamped by the context's clock.
    fn caused(&self) -> Metadata {
        match &self.clock {
            Some(clock) => self.metadata.caused_at(clock.now()),
            // One read of the system clock, for the id and the timestamp.
            None => self.metadata.caused(),
        }
    }

    /// Records an event caused by this command. It inherits the command's correlation id and
    /// principal and takes the command's id as causation id; its timestamp is now, by the
    /// context's clock ([`with_clock`](Self::with_clock); the system clock unless the bus was
    /// given one). Recorded events are handed on only if the handler succeeds.
    ///
    /// ```
    /// # use cqrs_core::doc::TicketOpened;
    /// use cqrs_core::{CommandContext, Metadata};
    ///
    /// let command = Metadata::new();
    /// let mut ctx = CommandContext::new(command.clone());
    /// ctx.record(TicketOpened { ticket_id: "t1".into() });
    /// let recorded = &ctx.recorded()[0];
    /// assert_eq!(recorded.metadata.correlation_id, command.correlation_id);
    /// assert_eq!(recorded.metadata.causation_id, Some(command.message_id));
    /// ```
    pub fn record<E: Event>(&mut self, event: E) -> &EventEnvelope {
        let envelope = EventEnvelope::new(event, self.caused());
        self.push(envelope)
    }

    /// Records an event with a partition key (normally the id of what it is about: its
    /// aggregate's, its stream's).
    ///
    /// The key orders the event among those of its key on a transport, and names the stream it
    /// is stored in by default (`cqrs-postgres`'s command layer, [`EventStoreSink`](crate::EventStoreSink)).
    /// So key with an id of your own, not with another aggregate's stream id: an event of a
    /// type that aggregate does not know, in its stream, stops it from loading.
    pub fn record_keyed<E: Event>(&mut self, key: impl Into<Arc<str>>, event: E) -> &EventEnvelope {
        let envelope = EventEnvelope::new(event, self.caused()).with_partition_key(key);
        self.push(envelope)
    }

    fn push(&mut self, envelope: EventEnvelope) -> &EventEnvelope {
        self.events.push(envelope);
        self.events.last().expect("just pushed")
    }

    /// The events recorded so far.
    pub fn recorded(&self) -> &[EventEnvelope] {
        &self.events
    }

    /// Takes the recorded events out.
    pub fn take_recorded(&mut self) -> Vec<EventEnvelope> {
        std::mem::take(&mut self.events)
    }

    /// Values middleware put here.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// Values middleware put here, mutably (a handler borrows a transaction this way).
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    pub(crate) fn into_parts(self) -> (Vec<EventEnvelope>, Extensions) {
        (self.events, self.extensions)
    }
}

/// The context of one query.
#[derive(Debug)]
pub struct QueryContext {
    metadata: Metadata,
    extensions: Extensions,
}

impl QueryContext {
    /// A context for a query with this metadata.
    pub fn new(metadata: Metadata) -> Self {
        Self::with_extensions(metadata, Extensions::new())
    }

    /// A context with extensions already set.
    pub fn with_extensions(metadata: Metadata, extensions: Extensions) -> Self {
        Self {
            metadata,
            extensions,
        }
    }

    /// The query's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Values middleware put here.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    pub(crate) fn into_extensions(self) -> Extensions {
        self.extensions
    }
}

/// The context of one event delivery to one handler. Cheap to copy.
#[derive(Clone, Copy, Debug)]
pub struct EventContext<'a> {
    envelope: &'a EventEnvelope,
}

impl<'a> EventContext<'a> {
    /// The context of delivering this envelope.
    pub fn new(envelope: &'a EventEnvelope) -> Self {
        Self { envelope }
    }

    /// The event's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.envelope.metadata
    }

    /// The whole envelope (partition key, name, version).
    pub fn envelope(&self) -> &EventEnvelope {
        self.envelope
    }

    /// Metadata for a message this event causes (a command an event handler sends), stamped by
    /// the system clock: with an injected one, `ctx.metadata().caused_at(clock.now())`.
    pub fn caused(&self) -> Metadata {
        self.envelope.metadata.caused()
    }
}
