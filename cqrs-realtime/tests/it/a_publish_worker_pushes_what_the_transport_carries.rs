use crate::support::{TEST_LIMIT, TestHub, TicketRouting, record};
use async_trait::async_trait;
use cqrs_core::EventRecord;
use cqrs_core::memory::{InMemoryPubSub, InMemoryTransport};
use cqrs_core::ports::{ConsumerOptions, EventTransport, PubSub, Subscription, TransportError};
use cqrs_core::runtime::Runtime;
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{EventRouting, HubOptions, PublishWorker, Routed, Topic};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Events put on the durable transport reach subscribed clients through the worker, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_on_the_transport_reach_subscribers() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let transport = Arc::new(InMemoryTransport::new());
        let runtime = publish_worker(&t, &transport, Duration::from_secs(30));
        let mut client = t.connect("agent-a1").await;
        client.subscribe("ticket:t1").await;
        let records: Vec<_> = (1..=5).map(|seq| record("t1", "u1", seq)).collect();
        transport.publish("events", &records).await.unwrap();
        for seq in 1..=5 {
            assert_eq!(client.event().await.seq, seq);
        }
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// The ticket routing with `ticket:<id>` on a channel of its own, so an event goes out on two
/// channels.
struct TwoChannels;

impl EventRouting for TwoChannels {
    fn channel(&self, topic: &Topic) -> Option<String> {
        match topic.family() {
            "ticket" => Some("one-ticket".into()),
            _ => TicketRouting.channel(topic),
        }
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
        TicketRouting.route(record)
    }
}

/// An in-memory pub/sub whose first publish to `fail_on` fails, keeping the channels it was
/// asked to publish to, in order.
struct FailsOnce {
    inner: InMemoryPubSub,
    fail_on: &'static str,
    failed: AtomicBool,
    asked: std::sync::Mutex<Vec<String>>,
}

impl FailsOnce {
    fn on(channel: &'static str) -> Self {
        Self {
            inner: InMemoryPubSub::new(),
            fail_on: channel,
            failed: AtomicBool::new(false),
            asked: Default::default(),
        }
    }
}

#[async_trait]
impl PubSub for FailsOnce {
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
        self.asked.lock().unwrap().push(channel.to_owned());
        if channel == self.fail_on && !self.failed.swap(true, Ordering::SeqCst) {
            return Err(TransportError::Timeout { backend: "test" });
        }
        self.inner.publish(channel, payload).await
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
        self.inner.subscribe(channel).await
    }
}

/// A publish that reaches one of an event's two channels and fails on the other is retried on
/// the failed one only: the client on the first channel gets the event once, the client on
/// the second gets it after the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_failed_publish_is_retried_only_where_it_failed() {
    with_timeout(TEST_LIMIT, async {
        // Channels go out in name order: `realtime:one-ticket` first, then the failing one.
        let pubsub = Arc::new(FailsOnce::on("realtime:tickets"));
        let t = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| {
            b.routing(TwoChannels)
        })
        .await;
        let transport = Arc::new(InMemoryTransport::new());
        let runtime = publish_worker(&t, &transport, Duration::from_millis(10));
        let mut on_ticket = t.connect("agent-a1").await;
        on_ticket.subscribe("ticket:t1").await;
        let mut on_all = t.connect("agent-a2").await;
        on_all.subscribe("tickets").await;

        // One key, so the worker publishes 2 only once 1 is done, retry included.
        let records: Vec<_> = (1..=2)
            .map(|seq| {
                let mut record = record("t1", "u1", seq);
                record.partition_key = Some("t1".into());
                record
            })
            .collect();
        transport.publish("events", &records).await.unwrap();
        assert_eq!(on_all.event().await.seq, 1, "delivered after the retry");
        assert_eq!(on_all.event().await.seq, 2);
        assert!(pubsub.failed.load(Ordering::SeqCst), "the failure happened");
        // Exactly once each on the channel that did not fail (it carries them in order, so a
        // second copy of 1 would come before 2).
        assert_eq!(on_ticket.event().await.seq, 1);
        assert_eq!(on_ticket.event().await.seq, 2);
        on_ticket.ping_pong().await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// A publish whose first channel times out (the pub/sub away, or not answering) tries no
/// other: each would wait out the same timeout. The retry publishes them all, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_times_out_tries_no_other_channel() {
    with_timeout(TEST_LIMIT, async {
        // Channels go out in name order: the failing `realtime:one-ticket` first.
        let pubsub = Arc::new(FailsOnce::on("realtime:one-ticket"));
        let t = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| {
            b.routing(TwoChannels)
        })
        .await;
        let transport = Arc::new(InMemoryTransport::new());
        let runtime = publish_worker(&t, &transport, Duration::from_millis(10));
        let mut on_all = t.connect("agent-a2").await;
        on_all.subscribe("tickets").await;
        transport
            .publish("events", &[record("t1", "u1", 1)])
            .await
            .unwrap();
        assert_eq!(on_all.event().await.seq, 1, "delivered after the retry");
        assert_eq!(
            *pubsub.asked.lock().unwrap(),
            [
                "realtime:one-ticket",
                "realtime:one-ticket",
                "realtime:tickets"
            ],
            "nothing more after the time-out; the retry publishes both"
        );
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// A runtime with a `PublishWorker` from topic `events` of `transport` to the hub of `t`.
fn publish_worker(
    t: &TestHub,
    transport: &Arc<InMemoryTransport>,
    redelivery: Duration,
) -> Runtime {
    Runtime::builder()
        .worker(PublishWorker::new(
            t.hub.publisher(),
            transport.clone(),
            "events",
            "realtime",
            ConsumerOptions::default()
                .block(Duration::from_millis(50))
                .redelivery_delay(redelivery),
        ))
        .start()
}

/// A pub/sub that fails every publish, counting them: as timed out, or with `refusing`, as
/// refused for good (a channel an ACL forbids, say).
#[derive(Default)]
struct Away {
    publishes: std::sync::atomic::AtomicUsize,
    refusing: bool,
}

#[async_trait]
impl PubSub for Away {
    async fn publish(&self, _channel: &str, _payload: Arc<str>) -> Result<(), TransportError> {
        self.publishes.fetch_add(1, Ordering::SeqCst);
        if self.refusing {
            return Err(TransportError::Backend {
                backend: "test",
                source: "NOPERM this channel".into(),
            });
        }
        Err(TransportError::Timeout { backend: "test" })
    }

    async fn subscribe(&self, _channel: &str) -> Result<Subscription, TransportError> {
        Err(TransportError::Timeout { backend: "test" })
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct TicketChanged {
    ticket_id: String,
    reporter_id: String,
    seq: u64,
}

impl cqrs_core::Message for TicketChanged {
    const NAME: &'static str = "TicketChanged";
}

impl cqrs_core::Event for TicketChanged {}

/// A `Publisher` as a command's event sink gives up the command's other pushes after the
/// pub/sub failed one as away or timed out: the command waits for the sink, and each push
/// waited out the same command timeout (20 events behind a hung Redis held a command for
/// 40 s). A refusal of one channel stops nothing. The command succeeds either way: live push
/// is at-most-once.
#[tokio::test]
async fn a_publisher_sink_gives_up_a_commands_pushes_once_the_pubsub_fails() {
    for (refusing, tried) in [(false, 1), (true, 10)] {
        publish_ten_through_the_sink(refusing, tried).await;
    }
}

async fn publish_ten_through_the_sink(refusing: bool, tried: usize) {
    use cqrs_core::{EventEnvelope, EventSink, Metadata};
    let away = Arc::new(Away {
        refusing,
        ..Away::default()
    });
    let publisher = cqrs_realtime::Publisher::new(away.clone(), Arc::new(TicketRouting));
    let events = (1..=10)
        .map(|seq| {
            let changed = TicketChanged {
                ticket_id: "t1".into(),
                reporter_id: "u1".into(),
                seq,
            };
            EventEnvelope::new(changed, Metadata::new())
        })
        .collect();
    let counts = cqrs_core::testing::MetricCounts::default();
    counts
        .scope(publisher.accept(events))
        .await
        .expect("the command succeeds");
    assert_eq!(
        away.publishes.load(Ordering::SeqCst),
        tried,
        "refusing: {refusing}"
    );
    // Warned once a minute at most, but every event not pushed is counted: the one that
    // failed and the nine given up, or the ten refused.
    assert_eq!(
        counts.get("realtime_push_failures_total"),
        10,
        "refusing: {refusing}"
    );
}

/// A transport over `inner` whose consumers' first fetch fails (Redis away for a moment),
/// counting the consumers it makes.
struct FirstFetchFails {
    inner: Arc<InMemoryTransport>,
    made: std::sync::atomic::AtomicUsize,
    failed: Arc<AtomicBool>,
}

struct FailingOnce {
    inner: Box<dyn cqrs_core::ports::Consumer>,
    failed: Arc<AtomicBool>,
}

#[async_trait]
impl EventTransport for FirstFetchFails {
    fn capabilities(&self) -> cqrs_core::ports::TransportCapabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        self.inner.publish(topic, events).await
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Result<Box<dyn cqrs_core::ports::Consumer>, TransportError> {
        self.made.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FailingOnce {
            inner: self.inner.consumer(topic, group, options).await?,
            failed: self.failed.clone(),
        }))
    }
}

#[async_trait]
impl cqrs_core::ports::Consumer for FailingOnce {
    async fn fetch(
        &mut self,
        max: usize,
    ) -> Result<Vec<cqrs_core::ports::Delivery>, TransportError> {
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Err(TransportError::Unavailable {
                backend: "test",
                source: "the first fetch fails".into(),
            });
        }
        self.inner.fetch(max).await
    }

    async fn ack(&mut self, ids: &[cqrs_core::ports::DeliveryId]) -> Result<(), TransportError> {
        self.inner.ack(ids).await
    }

    async fn nack(&mut self, id: &cqrs_core::ports::DeliveryId) -> Result<(), TransportError> {
        self.inner.nack(id).await
    }

    async fn nack_with_reason(
        &mut self,
        id: &cqrs_core::ports::DeliveryId,
        reason: &str,
    ) -> Result<(), TransportError> {
        self.inner.nack_with_reason(id, reason).await
    }

    async fn keep_alive(
        &mut self,
        ids: &[cqrs_core::ports::DeliveryId],
    ) -> Result<(), TransportError> {
        self.inner.keep_alive(ids).await
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        self.inner.keep_alive_interval()
    }

    fn redelivery_delay(&self) -> Option<Duration> {
        self.inner.redelivery_delay()
    }

    async fn close(&mut self) -> Result<(), TransportError> {
        self.inner.close().await
    }
}

/// A run ended by a failed fetch is restarted with the consumer it had (what that consumer
/// could not release is taken over, not reclaimed later with a delivery counted that nothing
/// published), and the events go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publish_worker_keeps_its_consumer() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let transport = Arc::new(FirstFetchFails {
            inner: Arc::new(InMemoryTransport::new()),
            made: Default::default(),
            failed: Arc::default(),
        });
        let runtime = Runtime::builder()
            .worker(PublishWorker::new(
                t.hub.publisher(),
                transport.clone(),
                "events",
                "realtime",
                ConsumerOptions::default().block(Duration::from_millis(50)),
            ))
            .start();
        let mut client = t.connect("agent-a1").await;
        client.subscribe("ticket:t1").await;
        transport
            .publish("events", &[record("t1", "u1", 1)])
            .await
            .unwrap();
        assert_eq!(client.event().await.seq, 1);
        assert!(transport.failed.load(Ordering::SeqCst), "a fetch failed");
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(transport.made.load(Ordering::SeqCst), 1, "one consumer");
    })
    .await;
}
