//! The store relay skips (and counts) an event the transport cannot encode, shipping the
//! others in order, retries (never skips) a refusal of everything, gives up on a publish that
//! never answers after its publish timeout, and keeps what a batch cut short passed.

use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::memory::{InMemoryEventStore, InMemoryProjectionStore, InMemoryTransport};
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventStore, EventTransport, TransportCapabilities, TransportError,
};
use cqrs_core::relay::StoreRelay;
use cqrs_core::testing::MetricCounts;
use cqrs_core::{EventEnvelope, EventRecord, ExpectedVersion, Metadata};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn record(sum: u64) -> EventRecord {
    EventRecord::from_envelope(&EventEnvelope::new(Added { sum }, Metadata::new())).unwrap()
}

/// A transport that cannot encode the event of sum `refuse` (so refuses every batch holding
/// it), fails retryably while `down`, refuses everything (a missing permission) while
/// `forbidden`, and never answers while `hang`; its first publish of one event sets
/// `ends_lease` (the relay's lease lost meanwhile).
#[derive(Default)]
struct Picky {
    inner: InMemoryTransport,
    refuse: Option<u64>,
    down: AtomicBool,
    forbidden: AtomicBool,
    hang: AtomicBool,
    ends_lease: Option<Arc<AtomicBool>>,
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
        let published = self.inner.publish(topic, events).await;
        if let (Some(lost), [_]) = (&self.ends_lease, events) {
            lost.store(true, Ordering::SeqCst);
        }
        published
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

/// One event the transport will never take does not stop the relay: the others of its batch
/// and every later batch are shipped, in order, and the refused one is counted and passed.
#[test]
fn an_event_the_transport_refuses_for_good_is_skipped_and_the_rest_shipped_in_order() {
    let counts = MetricCounts::default();
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
            assert_eq!(shipped_sums(&transport.inner).await, [1, 2, 4, 5]);

            // Later events are not held up either.
            events
                .append("b", ExpectedVersion::Exactly(1), vec![record(6)])
                .await
                .unwrap();
            assert_eq!(relay.relay_once().await.unwrap(), 1);
            assert_eq!(shipped_sums(&transport.inner).await, [6]);
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
        assert_eq!(shipped_sums(&transport.inner).await, [1, 2]);
    });
}

/// A retryable failure of the batch's publish fails the batch: nothing is passed, and the
/// retry finds the refused event.
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
        assert_eq!(shipped_sums(&transport.inner).await, [1, 3]);
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
        assert_eq!(shipped_sums(&transport.inner).await, [1]);
    });
}

/// A transport that cannot encode a batch of several events (too large for it), nor the event
/// of sum `refuse`, and takes `per_event` to publish one event. Records every publish it
/// took, duplicates included.
struct OneAtATime {
    inner: InMemoryTransport,
    refuse: u64,
    per_event: Duration,
    taken: Mutex<Vec<u64>>,
}

#[async_trait]
impl EventTransport for OneAtATime {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        if events.len() > 1 {
            return Err(TransportError::Codec("the batch is too large".into()));
        }
        tokio::time::sleep(self.per_event).await;
        let sum = events[0].payload["sum"].as_u64().unwrap();
        if sum == self.refuse {
            return Err(TransportError::Codec("this event cannot be encoded".into()));
        }
        self.inner.publish(topic, events).await?;
        self.taken.lock().unwrap().push(sum);
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

/// When publishing a refused batch one event at a time takes longer than the publish timeout,
/// the batch keeps what it published or skipped before running out: each retry goes on from
/// there, so the relay gets through every event, each published once, instead of
/// republishing the first ones for ever.
#[test]
fn a_batch_too_slow_to_publish_one_at_a_time_still_makes_progress() {
    run_paused(|| async {
        let counts = MetricCounts::default();
        let _recorder = metrics::set_default_local_recorder(&counts);
        let events = Arc::new(InMemoryEventStore::new());
        let transport = Arc::new(OneAtATime {
            inner: InMemoryTransport::new(),
            refuse: 3,
            per_event: Duration::from_millis(10),
            taken: Mutex::new(Vec::new()),
        });
        // Two events fit in the timeout, one at a time; the batch holds six.
        let relay = StoreRelay::new(
            "relay",
            events.clone(),
            Arc::new(InMemoryProjectionStore::new()),
            transport.clone(),
            "out",
        )
        .batch_size(10)
        .publish_timeout(Duration::from_millis(25));
        events
            .append(
                "a",
                ExpectedVersion::NO_STREAM,
                (1..=6).map(record).collect(),
            )
            .await
            .unwrap();

        let mut outcomes = Vec::new();
        while relay.backlog().await.unwrap() > 0 {
            assert!(outcomes.len() < 10, "no progress: {outcomes:?}");
            let outcome = relay.relay_once().await;
            outcomes.push(outcome.as_ref().map_err(|e| e.kind()).copied());
        }
        use cqrs_core::ErrorKind::Timeout;
        assert_eq!(
            outcomes,
            [Err(Timeout), Err(Timeout), Ok(2)],
            "each batch cut short reports its timeout after committing what it passed"
        );
        assert_eq!(
            *transport.taken.lock().unwrap(),
            [1, 2, 4, 5, 6],
            "each published once, in order"
        );
        assert_eq!(shipped_sums(&transport.inner).await, [1, 2, 4, 5, 6]);
        assert_eq!(
            counts
                .get("cqrs_events_skipped_total{relay=relay,event_type=test.added,reason=refused}"),
            1
        );
        assert_eq!(
            counts.get("cqrs_events_published_total{relay=relay,event_type=test.added}"),
            5
        );
    });
}

/// A transport that never answers a publish of more than `most` events (too slow for them),
/// or, with `own_timeout`, fails it at once as timed out (a transport with a command timeout
/// of its own, shorter than the relay's), and takes smaller ones at once. Records every event
/// it took, duplicates included.
struct SlowForMany {
    inner: InMemoryTransport,
    most: usize,
    own_timeout: bool,
    taken: Mutex<Vec<u64>>,
}

#[async_trait]
impl EventTransport for SlowForMany {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        if events.len() > self.most {
            if self.own_timeout {
                return Err(TransportError::Timeout { backend: "slow" });
            }
            std::future::pending::<()>().await;
        }
        self.inner.publish(topic, events).await?;
        let mut taken = self.taken.lock().unwrap();
        taken.extend(events.iter().map(|e| e.payload["sum"].as_u64().unwrap()));
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

/// A transport too slow for a whole batch within the publish timeout gets smaller batches:
/// after a batch that got nothing through, the relay reads and publishes at most half of it,
/// down to what the transport takes, so it gets through the backlog, each event once and in
/// order. (It sent the same whole batch again on every retry, and never got past it.) So does
/// one whose own timeout fails the batch first (it was retried whole for ever).
#[test]
fn a_transport_too_slow_for_a_whole_batch_gets_smaller_ones() {
    for own_timeout in [false, true] {
        a_transport_too_slow_for_a_whole_batch_gets_smaller_ones_with(own_timeout);
    }
}

fn a_transport_too_slow_for_a_whole_batch_gets_smaller_ones_with(own_timeout: bool) {
    run_paused(move || async move {
        let events = Arc::new(InMemoryEventStore::new());
        let transport = Arc::new(SlowForMany {
            inner: InMemoryTransport::new(),
            most: 3,
            own_timeout,
            taken: Mutex::new(Vec::new()),
        });
        let relay = StoreRelay::new(
            "relay",
            events.clone(),
            Arc::new(InMemoryProjectionStore::new()),
            transport.clone(),
            "out",
        )
        .batch_size(16)
        .publish_timeout(Duration::from_secs(1));
        events
            .append(
                "a",
                ExpectedVersion::NO_STREAM,
                (1..=20).map(record).collect(),
            )
            .await
            .unwrap();
        let mut outcomes = Vec::new();
        while relay.backlog().await.unwrap() > 0 {
            assert!(outcomes.len() < 30, "no progress: {outcomes:?}");
            let outcome = relay.relay_once().await;
            outcomes.push(outcome.as_ref().map_err(|e| e.kind()).copied());
        }
        use cqrs_core::ErrorKind::Timeout;
        // 16 and 8 time out; 4 times out too; then 2 at a time, trying 4 again after each
        // quick full batch of 2.
        assert_eq!(
            outcomes[..4],
            [Err(Timeout), Err(Timeout), Err(Timeout), Ok(2)]
        );
        assert_eq!(
            *transport.taken.lock().unwrap(),
            (1..=20).collect::<Vec<_>>(),
            "each published once, in order"
        );
        assert_eq!(
            shipped_sums(&transport.inner).await,
            (1..=20).collect::<Vec<_>>()
        );
    });
}

/// An event store whose reads never answer while `hang` is set.
#[derive(Default)]
struct Stalling {
    inner: InMemoryEventStore,
    hang: AtomicBool,
}

#[async_trait]
impl EventStore for Stalling {
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
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.read_all(after, limit).await
    }
    async fn stream_version(&self, stream_id: &str) -> Result<u64, cqrs_core::ports::StoreError> {
        self.inner.stream_version(stream_id).await
    }
}

/// A store call that never answers (a network path dropping packets, no statement timeout)
/// ends after the store timeout as a retryable failure, saying which call; the relay used
/// to wait on it for ever, its health still reading healthy.
#[test]
fn a_store_that_never_answers_times_out_after_the_store_timeout() {
    run_paused(|| async {
        let events = Arc::new(Stalling::default());
        let transport = Arc::new(InMemoryTransport::new());
        let relay = StoreRelay::new(
            "relay",
            events.clone(),
            Arc::new(InMemoryProjectionStore::new()),
            transport.clone(),
            "out",
        )
        .store_timeout(Duration::from_secs(3));
        events
            .append("a", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        events.hang.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let error = relay
            .relay_once()
            .await
            .expect_err("the store never answers");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(error.kind(), cqrs_core::ErrorKind::Timeout);
        assert!(
            error
                .to_string()
                .contains("reading the event store took longer than 3s"),
            "{error}"
        );

        events.hang.store(false, Ordering::SeqCst);
        assert_eq!(relay.relay_once().await.unwrap(), 1);
        assert_eq!(shipped_sums(&transport).await, [1]);
    });
}

/// A checkpoint store whose lease is lost (its session ended by the server) once `lost` is
/// set: reading the checkpoint in the lease's unit then fails.
struct LosesItsLease {
    inner: cqrs_core::memory::InMemoryProjectionStore,
    lost: Arc<AtomicBool>,
}

#[async_trait]
impl cqrs_core::ports::ProjectionStore for LosesItsLease {
    type Unit = cqrs_core::memory::InMemoryUnit;

    async fn begin(&self, consumer: &str) -> Result<Self::Unit, cqrs_core::ports::StoreError> {
        self.inner.begin(consumer).await
    }
    async fn mark_processed(
        &self,
        unit: &mut Self::Unit,
        consumer: &str,
        id: uuid::Uuid,
    ) -> Result<bool, cqrs_core::ports::StoreError> {
        self.inner.mark_processed(unit, consumer, id).await
    }
    async fn checkpoint(
        &self,
        unit: &mut Self::Unit,
        consumer: &str,
    ) -> Result<Option<cqrs_core::Position>, cqrs_core::ports::StoreError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(cqrs_core::ports::StoreError::Unavailable {
                backend: "test",
                source: "terminating connection due to administrator command".into(),
            });
        }
        self.inner.checkpoint(unit, consumer).await
    }
    async fn committed_checkpoint(
        &self,
        consumer: &str,
    ) -> Result<Option<cqrs_core::Position>, cqrs_core::ports::StoreError> {
        self.inner.committed_checkpoint(consumer).await
    }
    async fn save_checkpoint(
        &self,
        unit: &mut Self::Unit,
        consumer: &str,
        position: cqrs_core::Position,
    ) -> Result<(), cqrs_core::ports::StoreError> {
        self.inner.save_checkpoint(unit, consumer, position).await
    }
    async fn reset(
        &self,
        unit: &mut Self::Unit,
        consumer: &str,
    ) -> Result<(), cqrs_core::ports::StoreError> {
        self.inner.reset(unit, consumer).await
    }
    async fn commit(&self, unit: Self::Unit) -> Result<(), cqrs_core::ports::StoreError> {
        self.inner.commit(unit).await
    }
    async fn purge_inbox(
        &self,
        consumer: &str,
        older_than: Duration,
    ) -> Result<u64, cqrs_core::ports::StoreError> {
        self.inner.purge_inbox(consumer, older_than).await
    }
}

/// The one-at-a-time pass checks its lease before each publish: once the lease is lost (its
/// session ended; another instance's relay may be shipping the same events), it stops, instead
/// of publishing the rest of the batch behind that relay's copies, out of their order.
#[test]
fn a_one_at_a_time_pass_stops_when_its_lease_is_lost() {
    run(async {
        let events = Arc::new(InMemoryEventStore::new());
        let lost = Arc::new(AtomicBool::new(false));
        // Refuses the batch (it holds 3), so the relay publishes one at a time; its first
        // single publish ends the relay's lease.
        let transport = Arc::new(Picky {
            refuse: Some(3),
            ends_lease: Some(lost.clone()),
            ..Picky::default()
        });
        let store = Arc::new(LosesItsLease {
            inner: InMemoryProjectionStore::new(),
            lost: lost.clone(),
        });
        let relay = StoreRelay::new("relay", events.clone(), store, transport.clone(), "out")
            .batch_size(10);
        events
            .append(
                "a",
                ExpectedVersion::NO_STREAM,
                (1..=5).map(record).collect(),
            )
            .await
            .unwrap();

        let failed = relay.relay_once().await.expect_err("the lease was lost");
        assert!(
            failed.to_string().contains("administrator command"),
            "{failed}"
        );
        assert_eq!(
            shipped_sums(&transport.inner).await,
            [1],
            "nothing published after the lease was found lost"
        );
    });
}
