//! An event sink that appends a command's recorded events to an event store.

use super::command::EventSink;
use crate::ports::{EventStore, ExpectedVersion};
use crate::{DispatchError, EventEnvelope, EventRecord, HandlerError};
use async_trait::async_trait;
use std::fmt;
use std::sync::Arc;

type StreamFor = dyn Fn(&EventRecord) -> String + Send + Sync;

/// An [`EventSink`] that appends the events a command recorded (`ctx.record`,
/// `ctx.record_keyed`) to an [`EventStore`]: the in-process counterpart of `cqrs-postgres`'s
/// command layer, for a server on in-memory backends whose relay ships from an
/// [`InMemoryEventStore`](crate::memory::InMemoryEventStore). With it, a handler's recorded
/// events reach the store, and from there the relay and its consumers, on either backend.
///
/// Each event goes to the stream [`stream_for`](Self::stream_for) names (by default its
/// partition key, else its event type, as `cqrs-postgres` does), at [`ExpectedVersion::Any`]:
/// one append per run of consecutive events of one stream, in the order they were recorded,
/// so the store's global order is the recording order. Unlike the Postgres layer, nothing is
/// atomic: the appends run after the handler succeeded, one after the other, so a store that
/// fails fails the dispatch with the store's error (its kind kept, `Unavailable` is
/// retryable) once the handler's own effects and the events before are in. A caller that
/// retries then runs the command again, and its events are recorded anew, with new ids
/// (consumers cannot tell them for duplicates): retry only commands that are safe to run
/// twice (an idempotency key, a check of the state they change), or use the Postgres layer,
/// whose events commit with the handler's writes or not at all. As for every sink, a caller
/// that drops the dispatch meanwhile does not cut the appends off: the bus runs the sink in a
/// task of its own ([`EventSink`](crate::EventSink)).
///
/// ```
/// use cqrs_core::memory::InMemoryEventStore;
/// use cqrs_core::ports::EventStore;
/// use cqrs_core::{CommandBus, EventStoreSink};
/// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler};
/// use std::sync::Arc;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = Arc::new(InMemoryEventStore::new());
/// let bus = CommandBus::builder()
///     .handler(OpenTicketHandler)
///     .event_sink(Arc::new(EventStoreSink::new(store.clone())))
///     .build()?;
/// bus.dispatch(OpenTicket { title: "Printer on fire".into() }).await?;
/// // The handler recorded `TicketOpened` keyed by the ticket's id: its stream.
/// assert_eq!(store.load("t1", 0).await?.len(), 1);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct EventStoreSink {
    store: Arc<dyn EventStore>,
    stream_for: Option<Arc<StreamFor>>,
}

impl fmt::Debug for EventStoreSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStoreSink")
            .field("stream_for", &self.stream_for.as_ref().map(|_| "custom"))
            .finish_non_exhaustive()
    }
}

impl EventStoreSink {
    /// A sink appending to `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            stream_for: None,
        }
    }

    /// Names the stream each event is appended to. Default: its partition key, else its event
    /// type.
    pub fn stream_for(
        mut self,
        f: impl Fn(&EventRecord) -> String + Send + Sync + 'static,
    ) -> Self {
        self.stream_for = Some(Arc::new(f));
        self
    }

    fn stream_of(&self, record: &EventRecord) -> String {
        match &self.stream_for {
            Some(f) => f(record),
            None => record
                .partition_key
                .clone()
                .unwrap_or_else(|| record.event_type.clone()),
        }
    }
}

#[async_trait]
impl EventSink for EventStoreSink {
    async fn accept(&self, events: Vec<EventEnvelope>) -> Result<(), DispatchError> {
        // One append per run of events of one stream, in recording order, so the store's
        // global order is the order they were recorded in (as the Postgres layer keeps it).
        let mut streams: Vec<(String, Vec<EventRecord>)> = Vec::new();
        for envelope in &events {
            let record = EventRecord::from_envelope(envelope)
                .map_err(|e| DispatchError::Handler(HandlerError::internal(e)))?;
            // A `stream_for` that panics fails this dispatch, not its caller's task.
            let stream =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stream_of(&record)))
                    .map_err(|panic| {
                        DispatchError::Handler(HandlerError::internal(format!(
                            "the sink's `stream_for` panicked: {}",
                            crate::panic::into_message(panic)
                        )))
                    })?;
            match streams.last_mut() {
                Some((last, records)) if *last == stream => records.push(record),
                _ => streams.push((stream, vec![record])),
            }
        }
        for (stream, records) in streams {
            self.store
                .append(&stream, ExpectedVersion::Any, records)
                .await
                .map_err(|e| DispatchError::Handler(HandlerError::from(e)))?;
        }
        Ok(())
    }
}
