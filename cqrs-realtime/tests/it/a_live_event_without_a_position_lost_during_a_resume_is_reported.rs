use crate::support::{TEST_LIMIT, TestHub, record};
use async_trait::async_trait;
use cqrs_core::memory::{InMemoryEventStore, InMemoryPubSub};
use cqrs_core::ports::{EventStore, StoreError};
use cqrs_core::testing::with_timeout;
use cqrs_core::{EventRecord, ExpectedVersion, Position};
use cqrs_realtime::{HubOptions, ServerFrame};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// The in-memory store, whose reads wait until the test lets them through.
struct HeldStore {
    inner: Arc<InMemoryEventStore>,
    entered: Arc<Notify>,
    release: Arc<Semaphore>,
}

#[async_trait]
impl EventStore for HeldStore {
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.append(stream_id, expected, events).await
    }

    async fn load(&self, stream_id: &str, after: u64) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.load(stream_id, after).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.entered.notify_one();
        // Released for good: every read after the first goes straight through.
        drop(self.release.acquire().await.unwrap());
        self.inner.read_all(after, limit).await
    }

    async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(stream_id).await
    }
}

/// Live events without a position (published without a store) overflow a resuming
/// subscription's hold buffer: they are not in the log and cannot be read back, so the client
/// is told with `events_missed` at the point of the loss (after the event held before it),
/// not left with a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn position_less_events_dropped_from_the_hold_buffer_get_events_missed() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let store = Arc::new(InMemoryEventStore::new());
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Semaphore::new(0));
        let held = Arc::new(HeldStore {
            inner: store.clone(),
            entered: entered.clone(),
            release: release.clone(),
        });
        let t = TestHub::start_full(
            pubsub,
            HubOptions::new().replay_buffer(1),
            store,
            Some(held),
            |b| b,
        )
        .await;
        // A live subscriber of `ticket:t1`: each event is dispatched to the subscriptions of
        // `tickets` (the resuming one) before those of `ticket:t1` (its routing lists the
        // topics in that order, and one task dispatches the channel, event after event), so
        // once the watcher has event 3, the dispatch that held or dropped 1-3 for the resuming
        // subscription is done.
        let mut watcher = t.connect("agent-a1").await;
        watcher.subscribe("ticket:t1").await;
        let mut client = t.connect("agent-a2").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        client.expect_subscribed("tickets").await;
        tokio::time::timeout(Duration::from_secs(10), entered.notified())
            .await
            .expect("the replay reads the store");

        let publisher = t.hub.publisher();
        for seq in 1..=3 {
            let live = record("t1", "u1", seq);
            assert_eq!(live.position, None);
            publisher.publish(&live).await.unwrap();
        }
        for seq in 1..=3 {
            assert_eq!(watcher.event().await.seq, seq);
        }
        release.add_permits(Semaphore::MAX_PERMITS);

        let held = client.event().await;
        assert_eq!((held.seq, held.position), (1, None), "the one event held");
        client.send(json!({"type": "ping"})).await;
        match client.frame().await {
            ServerFrame::Error { code, topic, .. } => {
                assert_eq!(code, "events_missed");
                assert_eq!(topic.as_deref(), Some("tickets"));
            }
            other => panic!("expected events_missed for the dropped events, got {other:?}"),
        }
        match client.frame().await {
            ServerFrame::Pong => {}
            other => panic!("expected pong, got {other:?}"),
        }
        assert_eq!(t.hub.stats().missed_notices, 1);
        // Live from here on.
        publisher.publish(&record("t1", "u1", 4)).await.unwrap();
        assert_eq!(client.event().await.seq, 4);
    })
    .await;
}
