//! The event transport of Postgres without Redis: it takes every event and keeps none.

use cqrs_core::EventRecord;
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventTransport, TransportCapabilities, TransportError,
    validate_topic,
};

/// What the outbox relay ships to on Postgres without Redis. Nothing reads a transport there
/// (the stats read the event store, the WebSocket hubs get the realtime relay's pushes), but
/// the relay still runs, so that its checkpoint follows the store: when Redis is added later
/// (to run more instances) the relay goes on from there, and the stream gets only the events
/// committed from then on, not the whole history again (which the stats, deduping through an
/// inbox that keeps a week, would count again).
///
/// `publish` accepts (any valid topic and payload) and drops; `consumer` refuses; not persistent, so the
/// stats read the event store.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DiscardTransport;

#[async_trait::async_trait]
impl EventTransport for DiscardTransport {
    fn capabilities(&self) -> TransportCapabilities {
        TransportCapabilities::NONE
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        validate_topic(topic)?;
        // As every transport: what another would refuse fails here too.
        cqrs_core::ports::validate_payloads(events)
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        _options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        // A topic that breaks the port's rules is refused for that, as by every transport.
        validate_topic(topic)?;
        Err(TransportError::Invalid(format!(
            "cannot consume topic `{topic}` as group `{group}`: on Postgres without Redis events \
             go to no transport (the relay discards them); consumers must read the event store"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_takes_every_event_keeps_none_and_refuses_consumers() {
        let transport = DiscardTransport;
        assert!(!transport.capabilities().persistent);
        let metadata = cqrs_core::Metadata::new();
        let event = EventRecord::new(
            metadata.message_id,
            "TicketOpened",
            1,
            serde_json::json!({}),
            cqrs_core::RecordMetadata::from_metadata(&metadata),
        );
        assert!(transport.publish("helpdesk.events", &[event]).await.is_ok());
        assert!(matches!(
            transport.publish("a{b", &[]).await,
            Err(TransportError::Invalid(_))
        ));
        let refused = transport
            .consumer(
                "helpdesk.events",
                "tickets.stats",
                ConsumerOptions::default(),
            )
            .await
            .err()
            .expect("no consumer");
        assert!(matches!(refused, TransportError::Invalid(_)), "{refused}");
        assert!(
            refused
                .to_string()
                .contains("consumers must read the event store"),
            "{refused}"
        );
        // A topic against the port's rules is refused for that, as every transport does.
        let broken = transport
            .consumer("a{b", "g", ConsumerOptions::default())
            .await
            .err()
            .expect("no consumer");
        assert_eq!(
            broken.to_string(),
            validate_topic("a{b").unwrap_err().to_string()
        );
    }
}
