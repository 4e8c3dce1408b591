//! A relay or publisher that ships a batch again (after a crash or a failed publish) does not
//! make clients see its events twice; and a relay over the publisher transport pushes in the
//! store's order.

use crate::support::{TEST_LIMIT, TestHub};
use async_trait::async_trait;
use cqrs_core::EventRecord;
use cqrs_core::memory::{InMemoryProjectionStore, InMemoryPubSub};
use cqrs_core::ports::{ConsumerOptions, EventTransport, PubSub, Subscription, TransportError};
use cqrs_core::relay::StoreRelay;
use cqrs_core::runtime::Runtime;
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, PublisherTransport};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Positions 1..3 published, then 2..3 again (a batch shipped again): each is pushed once, on
/// every topic; the next event comes right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_published_again_is_pushed_once() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let mut all = t.connect("agent-a1").await;
        all.subscribe("tickets").await;
        let mut one = t.connect("agent-a2").await;
        one.subscribe("ticket:t1").await;
        let mut stored = Vec::new();
        for seq in 1..=3 {
            stored.push(t.store("t1", "u1", seq).await);
        }
        let publisher = t.hub.publisher();
        publisher.publish_all(&stored).await.unwrap();
        publisher.publish_all(&stored[1..]).await.unwrap();
        t.publish("t1", "u1", 4).await;
        for client in [&mut all, &mut one] {
            for seq in 1..=4 {
                let event = client.event().await;
                assert_eq!(event.seq, seq, "each once, in order: {event:?}");
                assert_eq!(event.position.as_deref(), Some(seq.to_string().as_str()));
            }
            client.ping_pong().await;
        }
    })
    .await;
}

/// Only copies are dropped: an event that arrives after a higher position (a publisher that
/// does not publish in position order) is still pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_event_is_still_pushed() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        let first = t.store("t1", "u1", 1).await;
        let second = t.store("t2", "u1", 2).await;
        let publisher = t.hub.publisher();
        publisher.publish(&second).await.unwrap();
        publisher.publish(&first).await.unwrap();
        assert_eq!(client.event().await.seq, 2);
        assert_eq!(client.event().await.seq, 1);
        client.ping_pong().await;
    })
    .await;
}

/// An in-memory pub/sub whose `fail_at`-th publish (counting from 1) fails.
struct FailsOnce {
    inner: InMemoryPubSub,
    publishes: AtomicUsize,
    fail_at: usize,
}

#[async_trait]
impl PubSub for FailsOnce {
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
        if self.publishes.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Err(TransportError::Timeout { backend: "test" });
        }
        self.inner.publish(channel, payload).await
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
        self.inner.subscribe(channel).await
    }
}

/// A relay over the publisher transport pushes the store's events in position order, across
/// tickets; when a publish fails mid-batch, the relay ships the whole batch again, and the
/// clients still get each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_over_the_publisher_pushes_in_store_order_once_each() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(FailsOnce {
            inner: InMemoryPubSub::new(),
            publishes: AtomicUsize::new(0),
            fail_at: 4,
        });
        let t = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| b).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        // Stored before the relay starts, so its first batch holds all six.
        for seq in 1..=6 {
            t.store(&format!("t{}", seq % 3), "u1", seq).await;
        }
        let relay = StoreRelay::new(
            "realtime",
            t.store.clone(),
            Arc::new(InMemoryProjectionStore::new()),
            Arc::new(t.hub.publisher().into_transport()),
            "realtime",
        )
        .intervals(Duration::from_millis(5), Duration::from_millis(50));
        let runtime = Runtime::builder().worker(relay).start();
        for seq in 1..=6 {
            let event = client.event().await;
            assert_eq!(event.seq, seq, "in store order, each once: {event:?}");
        }
        assert!(
            pubsub.publishes.load(Ordering::SeqCst) > 6,
            "the batch was published again after the failure"
        );
        t.store("t1", "u1", 7).await;
        assert_eq!(client.event().await.seq, 7, "no copy came before it");
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

/// The adapter publishes only; a pub/sub failure is retryable.
#[tokio::test]
async fn the_publisher_transport_only_publishes_and_its_failures_are_retryable() {
    let pubsub = Arc::new(FailsOnce {
        inner: InMemoryPubSub::new(),
        publishes: AtomicUsize::new(0),
        fail_at: 1,
    });
    let transport = PublisherTransport::new(cqrs_realtime::Publisher::new(
        pubsub,
        Arc::new(crate::support::TicketRouting),
    ));
    assert!(!transport.capabilities().persistent);
    let refused = transport
        .consumer("realtime", "g", ConsumerOptions::default())
        .await
        .err()
        .expect("no consumer");
    assert!(
        matches!(&refused, TransportError::Invalid(m) if m.contains("only publishes")),
        "{refused}"
    );
    let record: EventRecord = crate::support::record("t1", "u1", 1);
    let failed = transport
        .publish("realtime", std::slice::from_ref(&record))
        .await
        .expect_err("the pub/sub failed");
    assert!(
        matches!(failed, TransportError::Unavailable { .. }),
        "{failed}"
    );
    assert!(failed.kind().is_retryable(), "{failed}");
    transport
        .publish("realtime", std::slice::from_ref(&record))
        .await
        .expect("published on the retry");
    assert!(matches!(
        transport.publish("", &[]).await,
        Err(TransportError::Invalid(_))
    ));
}

/// The hub's publisher as a transport only publishes: a consumer is refused, and a topic
/// against the port's rules is refused for that, as every transport refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_transport_refuses_consumers_and_bad_topics() {
    use cqrs_core::ports::validate_topic;
    let t = TestHub::start(cqrs_realtime::HubOptions::new()).await;
    let transport = t.hub.publisher().into_transport();
    let refused = transport
        .consumer("events", "g", ConsumerOptions::default())
        .await
        .err()
        .expect("no consumer");
    assert!(refused.to_string().contains("only publishes"), "{refused}");
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
