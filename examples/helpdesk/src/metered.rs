//! Counting what the Postgres outbox relay ships, by event type.
//!
//! `PgOutboxRelay` counts the events it ships (`cqrs_outbox_published_total`, label `relay`)
//! but not their types, while the in-memory relay counts `cqrs_events_published_total` by `event_type`. The
//! relay's transport is wrapped so that both modes export the same series.

use cqrs_core::EventRecord;
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventTransport, TransportCapabilities, TransportError,
};
use std::sync::Arc;

/// A transport that counts each event it publishes successfully.
pub(crate) struct MeteredTransport {
    inner: Arc<dyn EventTransport>,
    relay: metrics::SharedString,
}

impl MeteredTransport {
    pub(crate) fn new(
        inner: Arc<dyn EventTransport>,
        relay: impl Into<metrics::SharedString>,
    ) -> Self {
        Self {
            inner,
            relay: relay.into(),
        }
    }
}

/// Event types come from storage: only short wire-like names become label values, and only the
/// first 256 of them (a writer of ever new names, `E1`, `E2`, ..., makes no more series).
static EVENT_TYPE_LABELS: cqrs_core::EventTypeLabels<256> = cqrs_core::EventTypeLabels::new();

fn bounded_label(name: &str) -> String {
    EVENT_TYPE_LABELS.label(name)
}

#[async_trait::async_trait]
impl EventTransport for MeteredTransport {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        self.inner.publish(topic, events).await?;
        for event in events {
            metrics::counter!(
                "cqrs_events_published_total",
                "relay" => self.relay.clone(),
                "event_type" => bounded_label(&event.event_type)
            )
            .increment(1);
        }
        Ok(())
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        self.inner.consumer(topic, group, options).await
    }
}
