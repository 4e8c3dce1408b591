use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryTransport};
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventStore, EventTransport, TransportCapabilities, TransportError,
};
use cqrs_core::relay::StoreRelay;
use cqrs_core::{EventEnvelope, EventRecord, ExpectedVersion, Metadata};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

fn record(sum: u64) -> EventRecord {
    EventRecord::from_envelope(&EventEnvelope::new(Added { sum }, Metadata::new())).unwrap()
}

/// A transport that can be switched off, and counts the publishes asked of it.
#[derive(Default)]
struct Switchable {
    inner: InMemoryTransport,
    down: AtomicBool,
    publishes: AtomicUsize,
}

#[async_trait]
impl EventTransport for Switchable {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        self.publishes.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(TransportError::Unavailable {
                backend: "test",
                source: "switched off".into(),
            });
        }
        self.inner.publish(topic, events).await
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

#[test]
fn events_are_shipped_in_order_once_and_a_failed_batch_loses_nothing() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let transport = Arc::new(Switchable::default());
        let checkpoints = Arc::new(InMemoryProjectionStore::new());
        let relay = StoreRelay::new(
            "relay",
            events.clone(),
            checkpoints.clone(),
            transport.clone(),
            "out",
        )
        .batch_size(2);
        events
            .append(
                "a",
                ExpectedVersion::NO_STREAM,
                vec![record(1), record(2), record(3)],
            )
            .await
            .unwrap();
        assert_eq!(relay.backlog().await.unwrap(), 3);
        assert_eq!(relay.relay_once().await.unwrap(), 2);
        transport.down.store(true, Ordering::SeqCst);
        events
            .append("b", ExpectedVersion::NO_STREAM, vec![record(4)])
            .await
            .unwrap();
        assert!(relay.relay_once().await.is_err(), "the transport is down");
        assert_eq!(
            relay.backlog().await.unwrap(),
            2,
            "the failed batch stays in the backlog"
        );
        transport.down.store(false, Ordering::SeqCst);
        assert_eq!(relay.relay_once().await.unwrap(), 2);
        assert_eq!(relay.relay_once().await.unwrap(), 0);

        let mut consumer = transport
            .consumer(
                "out",
                "check",
                ConsumerOptions::default().block(Duration::from_millis(10)),
            )
            .await
            .unwrap();
        let got = consumer.fetch(10).await.unwrap();
        let sums: Vec<u64> = got
            .iter()
            .map(|d| d.record.payload["sum"].as_u64().unwrap())
            .collect();
        assert_eq!(sums, [1, 2, 3, 4]);
        assert!(
            got.iter()
                .all(|d| d.record.position.is_some() && d.record.stream_id.is_some())
        );
    });
}

/// A relay whose transport is down retries once per millisecond at most, even with intervals
/// of zero (it retried in a tight loop: under a paused clock, time never moved).
#[test]
fn a_failing_relay_with_zero_intervals_pauses_between_retries() {
    run_paused(|| async {
        let events = Arc::new(InMemoryEventStore::new());
        events
            .append("a", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        let transport = Arc::new(Switchable::default());
        transport.down.store(true, Ordering::SeqCst);
        let relay = StoreRelay::new(
            "relay",
            events,
            Arc::new(InMemoryProjectionStore::new()),
            transport.clone(),
            "out",
        )
        .intervals(Duration::ZERO, Duration::ZERO);
        let runtime = cqrs_core::runtime::Runtime::builder().worker(relay).start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tries = transport.publishes.load(Ordering::SeqCst);
        assert!((100..=1001).contains(&tries), "{tries} tries in 1 s");
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}
