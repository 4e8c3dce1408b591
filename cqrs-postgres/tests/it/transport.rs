//! An in-memory transport that fails, or takes a batch and never answers, on request; a relay
//! running on one as a worker; and a reader of everything published to a topic.

use async_trait::async_trait;
use cqrs_core::EventRecord;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventTransport, TransportCapabilities, TransportError,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
pub(crate) struct ControlledTransport {
    pub(crate) inner: InMemoryTransport,
    /// Publishes that fail before any succeeds.
    pub(crate) fail_first: AtomicUsize,
    /// The publish call (1-based) that stores its batch and then never returns; 0 for none.
    pub(crate) hang_on_call: AtomicUsize,
    pub(crate) calls: AtomicUsize,
    pub(crate) failures: AtomicUsize,
    /// Every event the broker took, in publish order.
    pub(crate) published: Mutex<Vec<EventRecord>>,
    /// How long each publish takes (a slow broker).
    pub(crate) delay: Mutex<Duration>,
    /// How long each publish takes per event it carries, on top of `delay`.
    pub(crate) delay_per_event: Mutex<Duration>,
    /// How many events each publish that went through carried, in order.
    pub(crate) runs: Mutex<Vec<usize>>,
    /// A publish of more events than this fails at once as timed out (a broker whose client
    /// has a command timeout of its own); 0 for none.
    pub(crate) times_out_above: AtomicUsize,
}

impl ControlledTransport {
    pub(crate) fn failing_first(n: usize) -> Arc<Self> {
        let t = Self::default();
        t.fail_first.store(n, Ordering::SeqCst);
        Arc::new(t)
    }

    /// Every event the broker took, in publish order.
    pub(crate) fn published(&self) -> Vec<EventRecord> {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn slow(delay: Duration) -> Arc<Self> {
        let t = Self::default();
        *t.delay.lock().unwrap() = delay;
        Arc::new(t)
    }

    /// A broker that takes `delay` for each event of a publish, and none of them when the
    /// publish is given up before that.
    pub(crate) fn slow_per_event(delay: Duration) -> Arc<Self> {
        let t = Self::default();
        *t.delay_per_event.lock().unwrap() = delay;
        Arc::new(t)
    }

    /// A broker whose client times out (at once, here) a publish of more than `most` events.
    pub(crate) fn timing_out_above(most: usize) -> Arc<Self> {
        let t = Self::default();
        t.times_out_above.store(most, Ordering::SeqCst);
        Arc::new(t)
    }

    pub(crate) fn hanging_on_call(n: usize) -> Arc<Self> {
        let t = Self::default();
        t.hang_on_call.store(n, Ordering::SeqCst);
        Arc::new(t)
    }
}

#[async_trait]
impl EventTransport for ControlledTransport {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let per_event = *self
            .delay_per_event
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let delay = *self.delay.lock().unwrap_or_else(|p| p.into_inner())
            + per_event * u32::try_from(events.len()).unwrap_or(u32::MAX);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let most = self.times_out_above.load(Ordering::SeqCst);
        if most > 0 && events.len() > most {
            return Err(TransportError::Timeout { backend: "test" });
        }
        if self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(TransportError::Unavailable {
                backend: "test",
                source: "the broker is down".into(),
            });
        }
        self.inner.publish(topic, events).await?;
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(events);
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(events.len());
        if self.hang_on_call.load(Ordering::SeqCst) == call {
            // The broker has the batch; the relay never hears back.
            std::future::pending::<()>().await;
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

/// Reads (and acknowledges) messages of `topic` as group `group` until `count` arrived, in
/// delivery order; fails after 20 s naming how many came.
pub(crate) async fn receive(
    transport: &dyn EventTransport,
    topic: &str,
    group: &str,
    count: usize,
) -> Vec<EventRecord> {
    let mut consumer = transport
        .consumer(
            topic,
            group,
            ConsumerOptions::default().block(Duration::from_millis(50)),
        )
        .await
        .expect("join the group");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut received = Vec::new();
    while received.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} messages arrived",
            received.len()
        );
        let batch = consumer.fetch(100).await.expect("fetch");
        let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
        consumer.ack(&ids).await.expect("ack");
        received.extend(batch.into_iter().map(|d| d.record));
    }
    received
}

/// A broker whose first publish waits until the test lets it through; the others go at once.
pub(crate) struct GatedTransport {
    inner: InMemoryTransport,
    /// Let the first publish through with `gate.add_permits(1)`.
    pub(crate) gate: tokio::sync::Semaphore,
    pub(crate) calls: AtomicUsize,
    published: Mutex<Vec<EventRecord>>,
}

impl GatedTransport {
    pub(crate) fn new() -> Self {
        Self {
            inner: InMemoryTransport::new(),
            gate: tokio::sync::Semaphore::new(0),
            calls: AtomicUsize::new(0),
            published: Mutex::new(Vec::new()),
        }
    }

    /// Every event the broker took, in publish order.
    pub(crate) fn published(&self) -> Vec<EventRecord> {
        self.published.lock().unwrap().clone()
    }
}

#[async_trait]
impl EventTransport for GatedTransport {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            self.gate
                .acquire()
                .await
                .expect("the gate stays open")
                .forget();
        }
        self.inner.publish(topic, events).await?;
        self.published.lock().unwrap().extend_from_slice(events);
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

/// A relay publishing to a [`ControlledTransport`] of its own, run as a worker.
pub(crate) struct RunningRelay {
    pub(crate) transport: Arc<ControlledTransport>,
    pub(crate) health: cqrs_core::runtime::HealthReporter,
    trigger: cqrs_core::runtime::ShutdownTrigger,
    worker: tokio::task::JoinHandle<Result<(), cqrs_core::BoxError>>,
}

impl RunningRelay {
    /// Runs the relay `relay` makes on a new transport.
    pub(crate) fn start(
        relay: impl FnOnce(Arc<ControlledTransport>) -> cqrs_postgres::PgOutboxRelay,
    ) -> Self {
        use cqrs_core::runtime::{HealthReporter, Shutdown, Worker, WorkerContext};
        let transport = Arc::new(ControlledTransport::default());
        let mut relay = relay(transport.clone());
        let (trigger, shutdown) = Shutdown::new();
        let health = HealthReporter::detached("relay");
        let ctx = WorkerContext::new(shutdown, health.clone());
        let worker = tokio::spawn(async move { relay.run(ctx).await });
        Self {
            transport,
            health,
            trigger,
            worker,
        }
    }

    /// The `n` of every event shipped, in order.
    pub(crate) fn shipped(&self) -> Vec<u64> {
        self.transport
            .published()
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect()
    }

    /// What the relay's `run` returned, once it returns by itself.
    pub(crate) async fn finished(self) -> Result<(), cqrs_core::BoxError> {
        self.worker.await.unwrap()
    }

    /// Stops it, cleanly.
    pub(crate) async fn stop(self) {
        self.trigger.trigger();
        self.worker.await.unwrap().unwrap();
    }
}
