//! The store relay skips (and counts) an event the transport cannot encode, shipping the
//! others in order, retries (never skips) a refusal of everything, and gives up on a publish that never answers after its publish timeout.

use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryTransport};
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventStore, EventTransport, TransportCapabilities, TransportError,
};
use cqrs_core::relay::StoreRelay;
use cqrs_core::{EventEnvelope, EventRecord, ExpectedVersion, Metadata};
use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Recorder, SharedString, Unit};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn record(sum: u64) -> EventRecord {
    EventRecord::from_envelope(&EventEnvelope::new(Added { sum }, Metadata::new())).unwrap()
}

/// A transport that cannot encode the event of sum `refuse` (so refuses every batch holding
/// it), fails retryably while `down`, refuses everything (a missing permission) while
/// `forbidden`, and never answers while `hang`.
#[derive(Default)]
struct Picky {
    inner: InMemoryTransport,
    refuse: Option<u64>,
    down: AtomicBool,
    forbidden: AtomicBool,
    hang: AtomicBool,
}

#[async_trait]
impl EventTransport for Picky {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(TransportError::Unavailable {
                backend: "test",
                source: "switched off".into(),
            });
        }
        if self.forbidden.load(Ordering::SeqCst) {
            return Err(TransportError::Backend {
                backend: "test",
                source: "NOPERM this user has no permissions to run the 'xadd' command".into(),
            });
        }
        if events
            .iter()
            .any(|e| e.payload["sum"].as_u64() == self.refuse)
        {
            return Err(TransportError::Codec("this event cannot be encoded".into()));
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

/// Counters by name and labels (`name{k=v,...}`).
#[derive(Default)]
struct Counts(Mutex<BTreeMap<String, Arc<Count>>>);

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl Counts {
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

impl Recorder for Counts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &metrics::Metadata<'_>) -> Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Counter::from_arc(self.0.lock().unwrap().entry(name).or_default().clone())
    }
    fn register_gauge(&self, _: &Key, _: &metrics::Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &metrics::Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

async fn shipped_sums(transport: &Picky) -> Vec<u64> {
    let mut consumer = transport
        .consumer(
            "out",
            "check",
            ConsumerOptions::default().block(Duration::from_millis(10)),
        )
        .await
        .unwrap();
    let got = consumer.fetch(100).await.unwrap();
    got.iter()
        .map(|d| d.record.payload["sum"].as_u64().unwrap())
        .collect()
}

/// One event the transport will never take does not stop the relay: the others of its batch
/// and every later batch are shipped, in order, and the refused one is counted and passed.
#[test]
fn an_event_the_transport_refuses_for_good_is_skipped_and_the_rest_shipped_in_order() {
    let counts = Counts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let events = Arc::new(InMemoryEventStore::new());
            let transport = Arc::new(Picky {
                refuse: Some(3),
                ..Picky::default()
            });
            let relay = StoreRelay::new(
                "relay",
                events.clone(),
                Arc::new(InMemoryProjectionStore::new()),
                transport.clone(),
                "out",
            )
            .batch_size(10);
            events
                .append("a", ExpectedVersion::NO_STREAM, vec![record(1), record(2)])
                .await
                .unwrap();
            events
                .append("b", ExpectedVersion::NO_STREAM, vec![record(3)])
                .await
                .unwrap();
            events
                .append("a", ExpectedVersion::Exactly(2), vec![record(4), record(5)])
                .await
                .unwrap();

            let passed = relay
                .relay_once()
                .await
                .expect("the refusal does not fail the batch");
            assert_eq!(
                passed, 5,
                "the checkpoint passes all five, the refused one too"
            );
            assert_eq!(relay.backlog().await.unwrap(), 0);
            assert_eq!(shipped_sums(&transport).await, [1, 2, 4, 5]);

            // Later events are not held up either.
            events
                .append("b", ExpectedVersion::Exactly(1), vec![record(6)])
                .await
                .unwrap();
            assert_eq!(relay.relay_once().await.unwrap(), 1);
            assert_eq!(shipped_sums(&transport).await, [6]);
        });
    });
    assert_eq!(
        counts.get("cqrs_events_skipped_total{relay=relay,event_type=test.added,reason=refused}"),
        1
    );
    assert_eq!(
        counts.get("cqrs_events_published_total{relay=relay,event_type=test.added}"),
        5
    );
}

/// A refusal that is not about one event (a permission the broker denies) would refuse every
/// event alike: the relay retries instead of skipping them all.
#[test]
fn a_refusal_of_everything_is_retried_not_skipped() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let transport = Arc::new(Picky::default());
        transport.forbidden.store(true, Ordering::SeqCst);
        let relay = StoreRelay::new(
            "relay",
            events.clone(),
            Arc::new(InMemoryProjectionStore::new()),
            transport.clone(),
            "out",
        );
        events
            .append("a", ExpectedVersion::NO_STREAM, vec![record(1), record(2)])
            .await
            .unwrap();
        let error = relay
            .relay_once()
            .await
            .expect_err("nothing may be skipped");
        assert!(error.to_string().contains("NOPERM"), "{error}");
        assert_eq!(relay.backlog().await.unwrap(), 2);
        transport.forbidden.store(false, Ordering::SeqCst);
        assert_eq!(relay.relay_once().await.unwrap(), 2);
        assert_eq!(shipped_sums(&transport).await, [1, 2]);
    });
}

/// A retryable failure while looking for the refused event fails the batch as before: nothing
/// is passed, and the retry finds it.
#[test]
fn a_retryable_failure_still_fails_the_batch_and_skips_nothing() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let transport = Arc::new(Picky {
            refuse: Some(2),
            ..Picky::default()
        });
        transport.down.store(true, Ordering::SeqCst);
        let relay = StoreRelay::new(
            "relay",
            events.clone(),
            Arc::new(InMemoryProjectionStore::new()),
            transport.clone(),
            "out",
        );
        events
            .append(
                "a",
                ExpectedVersion::NO_STREAM,
                vec![record(1), record(2), record(3)],
            )
            .await
            .unwrap();
        let error = relay.relay_once().await.expect_err("the transport is down");
        assert!(error.kind().is_retryable(), "{error}");
        assert_eq!(
            error.to_string(),
            "store relay `relay` could not publish to `out`: test is unavailable: switched off"
        );
        assert_eq!(relay.backlog().await.unwrap(), 3, "nothing passed");
        transport.down.store(false, Ordering::SeqCst);
        assert_eq!(relay.relay_once().await.unwrap(), 3);
        assert_eq!(shipped_sums(&transport).await, [1, 3]);
    });
}

/// A publish that never answers ends after the publish timeout as a retryable failure (the
/// relay's lease must not sit idle past the lease store's idle-in-transaction timeout), and
/// the lease is free again for the retry.
#[test]
fn a_publish_that_never_answers_times_out_after_the_publish_timeout() {
    run_paused(|| async {
        let events = Arc::new(InMemoryEventStore::new());
        let transport = Arc::new(Picky::default());
        transport.hang.store(true, Ordering::SeqCst);
        let relay = StoreRelay::new(
            "relay",
            events.clone(),
            Arc::new(InMemoryProjectionStore::new()),
            transport.clone(),
            "out",
        )
        .publish_timeout(Duration::from_secs(5));
        events
            .append("a", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let error = relay
            .relay_once()
            .await
            .expect_err("the publish never answers");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(error.kind(), cqrs_core::ErrorKind::Timeout);
        assert_eq!(
            error.to_string(),
            "store relay `relay`: publishing to `out` took longer than 5s"
        );
        assert_eq!(relay.backlog().await.unwrap(), 1, "nothing passed");

        transport.hang.store(false, Ordering::SeqCst);
        assert_eq!(relay.relay_once().await.unwrap(), 1);
        assert_eq!(shipped_sums(&transport).await, [1]);
    });
}
