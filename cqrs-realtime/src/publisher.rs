//! The publishing side: events in, channel messages out.

use crate::options::DEFAULT_CHANNEL_PREFIX;
use crate::{EventRouting, PushedEvent, Topic};
use async_trait::async_trait;
use cqrs_core::ports::{PubSub, TransportError};
use cqrs_core::throttled::{A_MINUTE, Throttled};
use cqrs_core::{DispatchError, EventEnvelope, EventRecord, EventSink};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Publishes events to the hubs of every instance, through the pub/sub port.
///
/// Each event is routed ([`EventRouting::route`]) and published once per channel its topics
/// live on (usually one), as one message carrying its topics, position, routing fields and
/// `event` object. Every hub subscribed to that channel, in this process or another, pushes
/// it to its matching subscriptions.
///
/// Publishing is at-most-once, like the pub/sub: a hub that is not subscribed misses the
/// event, and a client closes the gap by resuming from the durable log. Hubs push events in
/// the order they were published, so publish them in position order when clients resume
/// with `since`: a client resuming from the last position it saw never gets an earlier one
/// that arrived after it. A relay over [`into_transport`](Self::into_transport) does (one
/// active relay reads the store in position order); several tasks publishing at once (a
/// [`PublishWorker`](crate::PublishWorker) with concurrency, this publisher as the
/// [`EventSink`] of concurrent commands) keep only each aggregate's order, if that.
///
/// A `Publisher` is also an [`EventSink`]: give it to a command bus and the events of every
/// successful command are pushed (failures are logged, never fail the command).
///
/// ```
/// # use cqrs_realtime::doc::{TicketRouting, ticket_record};
/// use cqrs_core::memory::InMemoryPubSub;
/// use cqrs_realtime::Publisher;
/// use std::sync::Arc;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let publisher = Publisher::new(Arc::new(InMemoryPubSub::new()), Arc::new(TicketRouting));
/// let sent = publisher.publish(&ticket_record("t1", "u1")).await?;
/// assert_eq!(sent, 1); // one message, on channel `realtime:tickets`
/// # Ok::<_, cqrs_realtime::PublishError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Publisher {
    pubsub: Arc<dyn PubSub>,
    routing: Arc<dyn EventRouting>,
    prefix: Arc<str>,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn encode_error(record: &EventRecord, source: serde_json::Error) -> PublishError {
    PublishError::Encode {
        event_id: record.event_id,
        event_type: record.event_type.clone(),
        source,
    }
}

/// Why an event was not published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The event's `event` object could not be serialized (a bug in the routing).
    #[error(
        "could not encode event {event_id} (`{event_type}`) for the realtime channel: {source}; check what the routing puts in the pushed event"
    )]
    Encode {
        /// The event's id.
        event_id: uuid::Uuid,
        /// The event's wire name.
        event_type: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The pub/sub failed. Live clients miss the event; resuming clients will get it from the
    /// store.
    #[error("could not publish to realtime channel {channel}: {source}")]
    PubSub {
        /// The full channel name.
        channel: String,
        /// The pub/sub's error.
        #[source]
        source: TransportError,
    },
}

impl PublishError {
    /// The class of this error: the pub/sub's own (an unavailable broker is worth a retry),
    /// `Internal` for an event the routing cannot encode (a bug: no retry mends it).
    ///
    /// ```
    /// use cqrs_core::ErrorKind;
    /// use cqrs_core::ports::TransportError;
    /// use cqrs_realtime::PublishError;
    ///
    /// let error = PublishError::PubSub {
    ///     channel: "realtime:tickets".into(),
    ///     source: TransportError::Timeout { backend: "redis" },
    /// };
    /// assert!(error.kind().is_retryable());
    /// ```
    pub fn kind(&self) -> cqrs_core::ErrorKind {
        match self {
            PublishError::Encode { .. } => cqrs_core::ErrorKind::Internal,
            PublishError::PubSub { source, .. } => source.kind(),
        }
    }
}

impl Publisher {
    /// A publisher on `pubsub`, routing with `routing`, on channels prefixed with
    /// [`DEFAULT_CHANNEL_PREFIX`].
    pub fn new(pubsub: Arc<dyn PubSub>, routing: Arc<dyn EventRouting>) -> Self {
        // Exported at 0 from the start, so that an alert on its increase sees the first one.
        metrics::counter!(crate::metrics::names::PUSH_FAILURES).increment(0);
        Self {
            pubsub,
            routing,
            prefix: Arc::from(DEFAULT_CHANNEL_PREFIX),
        }
    }

    /// Sets the channel prefix; it must match the hubs' (see
    /// [`HubOptions::channel_prefix`](crate::HubOptions::channel_prefix)).
    pub fn channel_prefix(mut self, prefix: &str) -> Self {
        self.prefix = Arc::from(prefix);
        self
    }

    /// Publishes one event. Returns how many channel messages were sent: 0 when the routing
    /// does not push the event.
    ///
    /// An event on several channels is offered to each of them even when one fails; the first
    /// failure is returned (and the others logged).
    pub async fn publish(&self, record: &EventRecord) -> Result<usize, PublishError> {
        self.publish_skipping(record, &mut Vec::new()).await
    }

    /// [`publish`](Self::publish), except to the channels in `published`; adds each channel it
    /// publishes to. A retry of a partly failed publish passes the channels the first try
    /// reached, so their subscribers do not get the event twice.
    pub(crate) async fn publish_skipping(
        &self,
        record: &EventRecord,
        published: &mut Vec<String>,
    ) -> Result<usize, PublishError> {
        let Some(routed) = self.routing.route(record) else {
            return Ok(0);
        };
        let event = PushedEvent::new(routed, record.position)
            .map_err(|source| encode_error(record, source))?;
        // Group the event's topics by channel: one message per channel, naming only the topics
        // that channel carries.
        let mut channels: BTreeMap<String, Vec<&Topic>> = BTreeMap::new();
        for topic in event.topics() {
            match self.routing.channel(topic) {
                Some(channel) => channels
                    .entry(format!("{}{channel}", self.prefix))
                    .or_default()
                    .push(topic),
                None => tracing::debug!(%topic, "routed topic has no channel; not published"),
            }
        }
        channels.retain(|channel, _| !published.contains(channel));
        // Everything is encoded before anything is sent: an encoding bug fails the event as a
        // whole, never after some channels already have it.
        let mut messages = Vec::with_capacity(channels.len());
        for (channel, topics) in channels {
            let payload = event
                .encode(&topics)
                .map_err(|source| encode_error(record, source))?;
            messages.push((channel, Arc::<str>::from(payload)));
        }
        let mut sent = 0;
        let mut failure = None;
        for (channel, payload) in messages {
            match self.pubsub.publish(&channel, payload).await {
                Ok(()) => {
                    sent += 1;
                    published.push(channel);
                }
                Err(source) if failure.is_none() => {
                    let away = source.kind().is_retryable();
                    failure = Some(PublishError::PubSub { channel, source });
                    // Away, or not answering: each other channel would wait out the same
                    // timeout. A retry publishes them (it passes over those published).
                    if away {
                        break;
                    }
                }
                Err(source) => {
                    static SAID: Throttled = Throttled::every(A_MINUTE);
                    if let Some(unsaid) = SAID.may_say() {
                        tracing::warn!(%channel, error = %source, unsaid, "realtime publish failed (`unsaid`: as many since the last such line)");
                    }
                }
            }
        }
        failure.map_or(Ok(sent), Err)
    }

    /// Publishes events in order, stopping at the first failure.
    pub async fn publish_all(&self, records: &[EventRecord]) -> Result<usize, PublishError> {
        let mut sent = 0;
        for record in records {
            sent += self.publish(record).await?;
        }
        Ok(sent)
    }
}

/// Publishes a command's recorded events as they are handed over. They have no position yet
/// (the store gives one when it appends), so their pushes carry none: clients cannot resume
/// from them, and a resume racing one may push it twice. For hubs with an event store, publish
/// the stored records instead (`docs/realtime.md`, "Publishing").
#[async_trait]
impl EventSink for Publisher {
    async fn accept(&self, events: Vec<EventEnvelope>) -> Result<(), DispatchError> {
        let count = events.len();
        for (done, envelope) in events.into_iter().enumerate() {
            let record = match EventRecord::from_envelope(&envelope) {
                Ok(record) => record,
                Err(error) => {
                    // A bug in the event's `Serialize`, the same for every such event: said
                    // once a minute, counted each time.
                    static SAID: Throttled = Throttled::every(A_MINUTE);
                    metrics::counter!(crate::metrics::names::PUSH_FAILURES).increment(1);
                    if let Some(unsaid) = SAID.may_say() {
                        tracing::error!(event = envelope.name(), %error, unsaid, "could not serialize an event for realtime push (`unsaid`: as many since the last such line)");
                    }
                    continue;
                }
            };
            // Live push is at-most-once: a failure must not fail a command that succeeded.
            match self.publish(&record).await {
                Ok(_) => {}
                // The pub/sub is away, or does not answer within its command timeout: the
                // command waits for this sink, so the rest are dropped rather than each
                // waiting out the same timeout (20 events behind a hung Redis held a command
                // for 40 s). These pushes carry no position: clients that need every event
                // reload it (or take pushes from stored records, which they resume from).
                // Warned once a minute at most: every command fails so while the pub/sub is
                // away (`realtime_push_failures_total` counts each).
                Err(error) if matches!(&error, PublishError::PubSub { source, .. } if source.kind().is_retryable()) =>
                {
                    static SAID: Throttled = Throttled::every(A_MINUTE);
                    let dropped = count - done - 1;
                    metrics::counter!(crate::metrics::names::PUSH_FAILURES)
                        .increment(1 + dropped as u64);
                    if let Some(unsaid) = SAID.may_say() {
                        tracing::warn!(event_id = %record.event_id, %error, dropped, unsaid, "realtime push failed; the command's other events are not pushed (`unsaid`: as many such failures since the last such line)");
                    }
                    break;
                }
                Err(error) => {
                    static SAID: Throttled = Throttled::every(A_MINUTE);
                    metrics::counter!(crate::metrics::names::PUSH_FAILURES).increment(1);
                    if let Some(unsaid) = SAID.may_say() {
                        tracing::warn!(event_id = %record.event_id, %error, unsaid, "realtime push failed (`unsaid`: as many since the last such line)");
                    }
                }
            }
        }
        Ok(())
    }
}
