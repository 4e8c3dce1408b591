//! The publisher as an event transport, for a relay to feed in the event store's order.

use crate::{PublishError, Publisher};
use async_trait::async_trait;
use cqrs_core::EventRecord;
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventTransport, TransportCapabilities, TransportError,
    validate_topic,
};
use std::fmt;

/// An [`EventTransport`] that publishes each record, in order, through a [`Publisher`]: give
/// it to a relay (`cqrs_core::relay::StoreRelay`, `cqrs_postgres::PgOutboxRelay`) and the
/// relay's events reach the hubs in the event store's global order.
///
/// This is how to publish a topic that spans many aggregates (a `tickets` feed) when clients
/// resume with `since`: a relay of one name is active on one instance at a time and reads the
/// store in position order, so every hub receives the events in position order, and a client
/// that resumes from the last position it saw misses nothing. (A
/// [`PublishWorker`](crate::PublishWorker) with concurrency above 1, or on several instances,
/// publishes out of position order.) Give this relay a name of its own: it keeps its own
/// checkpoint.
///
/// * `publish(topic, records)` publishes the records one after the other, each awaited; the
///   topic is only checked ([`validate_topic`]), the routing chooses the channels. A batch
///   holding a payload nested too deep is refused whole, as by every transport
///   ([`validate_payloads`](cqrs_core::ports::validate_payloads)).
/// * A pub/sub failure fails the batch with a retryable [`TransportError::Unavailable`]: the
///   relay publishes it again, and the hubs drop the events they already pushed (see
///   [`Hub`](crate::Hub): a position a channel delivered recently is not pushed twice).
/// * An event the routing cannot encode is logged at error level and skipped, as the
///   `PublishWorker` does: retrying cannot help it.
/// * It only publishes: [`consumer`](EventTransport::consumer) fails with
///   [`TransportError::Invalid`]. Its capabilities say so: not persistent (live push is
///   at-most-once; the event store is the durable log), no consumer groups.
///
/// ```
/// # use cqrs_realtime::doc::TicketRouting;
/// use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryPubSub};
/// use cqrs_core::relay::StoreRelay;
/// use cqrs_core::runtime::Runtime;
/// use cqrs_realtime::Publisher;
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let publisher = Publisher::new(Arc::new(InMemoryPubSub::new()), Arc::new(TicketRouting));
/// let relay = StoreRelay::new(
///     "realtime",
///     Arc::new(InMemoryEventStore::new()),
///     Arc::new(InMemoryProjectionStore::new()),
///     Arc::new(publisher.into_transport()),
///     "realtime",
/// )
/// .intervals(Duration::from_millis(20), Duration::from_secs(5));
/// let runtime = Runtime::builder().worker(relay).start();
/// runtime.shutdown(Duration::from_secs(5)).await.unwrap();
/// # });
/// ```
#[derive(Clone)]
pub struct PublisherTransport {
    publisher: Publisher,
}

impl fmt::Debug for PublisherTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublisherTransport")
            .field("publisher", &self.publisher)
            .finish()
    }
}

impl PublisherTransport {
    /// A transport publishing through `publisher`.
    pub fn new(publisher: Publisher) -> Self {
        Self { publisher }
    }
}

impl Publisher {
    /// This publisher as an [`EventTransport`] for a relay: see [`PublisherTransport`].
    pub fn into_transport(self) -> PublisherTransport {
        PublisherTransport::new(self)
    }
}

#[async_trait]
impl EventTransport for PublisherTransport {
    /// Not persistent, no consumer groups; a channel delivers in publish order.
    fn capabilities(&self) -> TransportCapabilities {
        TransportCapabilities::NONE.ordered_per_key(true)
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        validate_topic(topic)?;
        cqrs_core::ports::validate_payloads(events)?;
        for record in events {
            match self.publisher.publish(record).await {
                Ok(_) => {}
                Err(error @ PublishError::Encode { .. }) => {
                    // Retrying cannot help an event the routing cannot encode.
                    tracing::error!(
                        %error,
                        position = ?record.position.map(|p| p.get()),
                        "event cannot be pushed; skipped"
                    );
                }
                Err(error) => {
                    return Err(TransportError::Unavailable {
                        backend: "realtime pub/sub",
                        source: Box::new(error),
                    });
                }
            }
        }
        Ok(())
    }

    async fn consumer(
        &self,
        topic: &str,
        _group: &str,
        _options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        // A topic that breaks the port's rules is refused for that, as by every transport.
        validate_topic(topic)?;
        Err(TransportError::Invalid(format!(
            "cannot consume `{topic}`: the realtime publisher transport only publishes (to the \
             hubs' pub/sub channels); consume the event store or a durable transport instead"
        )))
    }
}
