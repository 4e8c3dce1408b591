use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryTransport};
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventStore, EventTransport, TransportCapabilities, TransportError,
};
use cqrs_core::relay::StoreRelay;
use cqrs_core::runtime::Health;
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

/// A relay named `relay` with one event to ship, and its transport, switched off.
async fn a_relay_behind_a_transport_that_is_down()
-> (Arc<Switchable>, StoreRelay<InMemoryProjectionStore>) {
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
    );
    (transport, relay)
}

/// A relay whose transport is down retries once per millisecond at most, even with intervals
/// of zero (it retried in a tight loop: under a paused clock, time never moved).
#[test]
fn a_failing_relay_with_zero_intervals_pauses_between_retries() {
    run_paused(|| async {
        let (transport, relay) = a_relay_behind_a_transport_that_is_down().await;
        let relay = relay.intervals(Duration::ZERO, Duration::ZERO);
        let runtime = cqrs_core::runtime::Runtime::builder().worker(relay).start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tries = transport.publishes.load(Ordering::SeqCst);
        assert!((100..=1001).contains(&tries), "{tries} tries in 1 s");
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A relay whose batches keep failing with nothing shipped is degraded, then unhealthy after
/// `unhealthy_after` failures in a row (it looked merely degraded for ever), for the same
/// reason however many more fail, and healthy again once a batch goes through.
#[test]
fn a_relay_failing_batch_after_batch_turns_unhealthy_and_recovers() {
    run_paused(|| async {
        let (transport, relay) = a_relay_behind_a_transport_that_is_down().await;
        let relay = relay
            .intervals(Duration::from_millis(10), Duration::from_millis(10))
            .unhealthy_after(3);
        let runtime = cqrs_core::runtime::Runtime::builder().worker(relay).start();
        let health = || async { runtime.health().await.components["relay"].0.clone() };
        while transport.publishes.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            matches!(health().await, Health::Degraded(_)),
            "{:?}",
            health().await
        );
        while transport.publishes.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        let reason = match health().await {
            Health::Unhealthy(reason) => {
                assert!(reason.contains("3 or more batches in a row"), "{reason}");
                assert!(reason.contains("switched off"), "{reason}");
                reason
            }
            other => panic!("unhealthy after 3 failures, got {other:?}"),
        };
        // The same reason after another failure: a server logs each new reason it reads, at
        // every readiness check, and a count in it made every check a new one.
        while transport.publishes.load(Ordering::SeqCst) < 5 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(health().await, Health::Unhealthy(reason));
        transport.down.store(false, Ordering::SeqCst);
        while health().await != Health::Healthy {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// An event store that counts the reads made while the relay's lease (its unit in
/// `checkpoints`) is held.
struct LeaseWatcher {
    inner: InMemoryEventStore,
    checkpoints: Arc<InMemoryProjectionStore>,
    reads_under_lease: AtomicUsize,
}

#[async_trait]
impl EventStore for LeaseWatcher {
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, cqrs_core::ports::StoreError> {
        self.inner.append(stream_id, expected, events).await
    }
    async fn load(
        &self,
        stream_id: &str,
        after_version: u64,
    ) -> Result<Vec<EventRecord>, cqrs_core::ports::StoreError> {
        self.inner.load(stream_id, after_version).await
    }
    async fn read_all(
        &self,
        after: cqrs_core::Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, cqrs_core::ports::StoreError> {
        // Units of one name never overlap: a `begin` that cannot go ahead at once means the
        // relay holds its lease.
        let begin = cqrs_core::ports::ProjectionStore::begin(&*self.checkpoints, "relay");
        if tokio::time::timeout(Duration::from_millis(1), begin)
            .await
            .is_err()
        {
            self.reads_under_lease.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.read_all(after, limit).await
    }
    async fn stream_version(&self, stream_id: &str) -> Result<u64, cqrs_core::ports::StoreError> {
        self.inner.stream_version(stream_id).await
    }
}

/// The relay reads a batch before it takes its lease (from the checkpoint it last saw), so
/// the lease does not sit idle while the read waits, nor hold a second connection of a pool;
/// only its first batch, with no checkpoint seen yet, is read under the lease.
#[test]
fn the_relay_reads_its_batch_before_it_takes_its_lease() {
    run(async {
        let checkpoints = Arc::new(InMemoryProjectionStore::new());
        let events = Arc::new(LeaseWatcher {
            inner: InMemoryEventStore::new(),
            checkpoints: checkpoints.clone(),
            reads_under_lease: AtomicUsize::new(0),
        });
        let transport = Arc::new(Switchable::default());
        let relay = StoreRelay::new(
            "relay",
            events.clone(),
            checkpoints,
            transport.clone(),
            "out",
        );
        for (stream, sum) in [("a", 1), ("b", 2), ("c", 3)] {
            events
                .append(stream, ExpectedVersion::NO_STREAM, vec![record(sum)])
                .await
                .unwrap();
            assert_eq!(relay.relay_once().await.unwrap(), 1);
        }
        assert_eq!(relay.relay_once().await.unwrap(), 0);
        assert_eq!(
            events.reads_under_lease.load(Ordering::SeqCst),
            1,
            "the first only"
        );
        assert_eq!(shipped_sums(&transport.inner).await, [1, 2, 3]);
    });
}

/// A relay whose checkpoint another instance moved since it last looked reads again under
/// its lease, from the new checkpoint: nothing is shipped twice.
#[test]
fn a_relay_behind_another_instance_reads_again_from_its_checkpoint() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let checkpoints = Arc::new(InMemoryProjectionStore::new());
        let transport = Arc::new(Switchable::default());
        let relay = |_| {
            StoreRelay::new(
                "relay",
                events.clone(),
                checkpoints.clone(),
                transport.clone(),
                "out",
            )
        };
        let (first, second) = (relay(1), relay(2));
        let append = |stream: &'static str, sums: Vec<u64>| {
            let events = events.clone();
            async move {
                events
                    .append(
                        stream,
                        ExpectedVersion::NO_STREAM,
                        sums.into_iter().map(record).collect(),
                    )
                    .await
                    .unwrap();
            }
        };
        append("a", vec![1, 2, 3]).await;
        assert_eq!(first.relay_once().await.unwrap(), 3);
        append("b", vec![4, 5]).await;
        assert_eq!(second.relay_once().await.unwrap(), 2);
        append("c", vec![6]).await;
        // `first` last saw the checkpoint after 3, and reads 4, 5, 6 ahead of its lease.
        assert_eq!(first.relay_once().await.unwrap(), 1, "only 6 is new");
        assert_eq!(shipped_sums(&transport.inner).await, [1, 2, 3, 4, 5, 6]);
    });
}

#[test]
fn the_backlog_is_counted_to_the_end_it_finds_while_events_keep_arriving() {
    run(async {
        let inner = Arc::new(InMemoryEventStore::new());
        inner
            .append(
                "a",
                ExpectedVersion::NO_STREAM,
                vec![record(1), record(2), record(3)],
            )
            .await
            .unwrap();
        // Stands for events that never stop: counting until an empty page would count them all.
        let events = Arc::new(ArrivesWhileRead {
            inner,
            arrivals: AtomicUsize::new(5_000),
            failing: Default::default(),
        });
        let relay = StoreRelay::new(
            "relay",
            events,
            Arc::new(InMemoryProjectionStore::new()),
            Arc::new(InMemoryTransport::new()),
            "out",
        );
        let backlog = relay.backlog().await.unwrap();
        assert_eq!(
            backlog, 3,
            "counted to the end of its first read, not {backlog}"
        );
    });
}

/// An event store whose reads, once armed, wait for the test to let them go.
struct HeldReads {
    inner: InMemoryEventStore,
    armed: AtomicBool,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait]
impl EventStore for HeldReads {
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, cqrs_core::ports::StoreError> {
        self.inner.append(stream_id, expected, events).await
    }
    async fn load(
        &self,
        stream_id: &str,
        after_version: u64,
    ) -> Result<Vec<EventRecord>, cqrs_core::ports::StoreError> {
        self.inner.load(stream_id, after_version).await
    }
    async fn read_all(
        &self,
        after: cqrs_core::Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, cqrs_core::ports::StoreError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let released = self.release.notified();
            self.entered.notify_one();
            released.await;
        }
        self.inner.read_all(after, limit).await
    }
    async fn stream_version(&self, stream_id: &str) -> Result<u64, cqrs_core::ports::StoreError> {
        self.inner.stream_version(stream_id).await
    }
}

/// Shutdown asked for while the relay reads its batch: the relay publishes nothing and
/// returns (a publish, with its timeout, could outlast the runtime's grace and be aborted
/// part-way), and the next relay ships the batch.
#[test]
fn a_relay_asked_to_stop_during_its_read_publishes_nothing() {
    run(async {
        let events = Arc::new(HeldReads {
            inner: InMemoryEventStore::new(),
            armed: AtomicBool::new(true),
            entered: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        });
        let checkpoints = Arc::new(InMemoryProjectionStore::new());
        let transport = Arc::new(Switchable::default());
        let relay = || {
            StoreRelay::new(
                "relay",
                events.clone(),
                checkpoints.clone(),
                transport.clone(),
                "out",
            )
        };
        events
            .append("a", ExpectedVersion::NO_STREAM, vec![record(1), record(2)])
            .await
            .unwrap();
        let (trigger, shutdown) = cqrs_core::runtime::Shutdown::new();
        let ctx = cqrs_core::runtime::WorkerContext::new(
            shutdown,
            cqrs_core::runtime::HealthReporter::detached("relay"),
        );
        let mut worker = relay();
        let entered = events.entered.notified();
        let running =
            tokio::spawn(async move { cqrs_core::runtime::Worker::run(&mut worker, ctx).await });
        entered.await;
        trigger.trigger();
        events.release.notify_one();
        running.await.unwrap().unwrap();
        assert_eq!(transport.publishes.load(Ordering::SeqCst), 0);
        assert_eq!(relay().relay_once().await.unwrap(), 2, "nothing moved");
        assert_eq!(shipped_sums(&transport.inner).await, [1, 2]);
    });
}
