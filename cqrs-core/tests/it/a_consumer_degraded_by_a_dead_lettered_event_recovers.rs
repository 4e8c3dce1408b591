//! An event-bus consumer whose handler fails an event is degraded while the event may come
//! back. Once it was dead-lettered (tried `max_deliveries` times) and nothing else comes, it
//! is healthy again: the loop was left degraded for good, as no batch came to clear it.

use crate::events_from_a_transport_reach_the_event_bus::consume_adds_with;
use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{ConsumerOptions, EventTransport};
use cqrs_core::runtime::Health;
use cqrs_core::testing::eventually;
use cqrs_core::{
    EventBus, EventContext, EventEnvelope, EventHandler, EventRecord, HandlerError, Metadata,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Fails every time.
#[derive(Clone, Default)]
struct Fails {
    tries: Arc<AtomicUsize>,
}

#[async_trait]
impl EventHandler<Added> for Fails {
    async fn handle(&self, _: &Added, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.tries.fetch_add(1, Ordering::SeqCst);
        Err(HandlerError::internal("the handler fails"))
    }

    fn name(&self) -> &str {
        "fails"
    }
}

#[test]
fn a_consumer_degraded_by_a_dead_lettered_event_recovers() {
    run_paused(|| async {
        let transport = Arc::new(InMemoryTransport::new());
        let envelope = EventEnvelope::new(Added { sum: 1 }, Metadata::new());
        let record = EventRecord::from_envelope(&envelope).unwrap();
        transport.publish("adds", &[record]).await.unwrap();
        let fails = Fails::default();
        let bus = EventBus::builder().handler(fails.clone()).build().unwrap();
        let options = ConsumerOptions::default()
            .block(Duration::from_millis(50))
            .redelivery_delay(Duration::from_millis(300))
            .max_deliveries(2);
        let runtime = consume_adds_with(bus, &transport, options);
        let worker = "event-bus:adds:bus";
        let health = || async { runtime.health().await.components[worker].0.clone() };
        eventually(
            Duration::from_secs(10),
            "a failed try to degrade it",
            || async { matches!(health().await, Health::Degraded(_)).then_some(()) },
        )
        .await;
        eventually(
            Duration::from_secs(10),
            "the event dead-lettered",
            || async { (transport.dead_letters("adds", "bus").len() == 1).then_some(()) },
        )
        .await;
        assert_eq!(fails.tries.load(Ordering::SeqCst), 2);
        eventually(Duration::from_secs(10), "healthy again", || async {
            (health().await == Health::Healthy).then_some(())
        })
        .await;
        let _ = runtime.shutdown(Duration::from_secs(1)).await;
    });
}
