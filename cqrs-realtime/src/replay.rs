//! Resume: replay a subscription's events from the durable log, then hand over to live events
//! with no gap and no duplicate.
//!
//! The subscription is registered (and its upstream live) before the first read, in
//! replaying mode: live events are held in its buffer. Every event published before that
//! moment was stored before it, so the reads see it; every event published after it is in
//! the buffer. At the seam the buffer is flushed, minus what the reads already covered
//! (positions at or below the last one read), and the subscription goes live.

use crate::hub::HubInner;
use crate::queue::Outgoing;
use crate::registry::{Conn, Slot, event_frame};
use crate::{ErrorCode, PushedEvent, ServerFrame, Topic};
use axum::extract::ws::Utf8Bytes;
use cqrs_core::ports::EventStore;
use cqrs_core::{EventRecord, Position};
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::time::timeout;

pub(crate) async fn replay<P: Send + Sync + 'static>(
    hub: &HubInner<P>,
    conn: &Arc<Conn<P>>,
    slot: &Slot<P>,
    topic: &Topic,
    since: Position,
) {
    let Some(store) = hub.store.as_ref() else {
        return;
    };
    let mut replay = Replay {
        hub,
        store: store.as_ref(),
        conn,
        slot,
        topic,
        sender: ReplaySender::new(conn),
        cursor: since,
        read: 0,
        sent: 0,
        flushed: BTreeSet::new(),
    };
    let failure = loop {
        match replay.read_up().await {
            Ok(()) => {}
            Err(End::Closed) => return,
            Err(End::Failed(message)) => break Some(message),
        }
        match replay.flush(true).await {
            Flush::Live => break None,
            Flush::Closed => return,
            // Live events were dropped while held ones were flushed: read them back.
            Flush::ReadBack => {}
        }
    };
    hub.metrics.replayed(replay.sent);
    if let Some(message) = failure {
        let frame = ServerFrame::error(ErrorCode::ResumeFailed, message, Some(topic.as_str()));
        if replay.sender.send(Utf8Bytes::from(frame.to_json())).await {
            replay.flush(false).await;
        }
    }
}

/// Why a replay stopped reading.
enum End {
    /// The connection is closing.
    Closed,
    /// The log failed or the replay ran past its limit; the client is told why.
    Failed(String),
}

/// How a flush of the hold buffer ended.
enum Flush {
    /// The subscription is live.
    Live,
    /// The connection is closing.
    Closed,
    /// Live events were dropped from a full buffer: they are in the store, read on.
    ReadBack,
}

struct Replay<'a, P> {
    hub: &'a HubInner<P>,
    store: &'a dyn EventStore,
    conn: &'a Conn<P>,
    slot: &'a Slot<P>,
    topic: &'a Topic,
    sender: ReplaySender<'a, P>,
    /// The highest position read from the store.
    cursor: Position,
    read: usize,
    sent: u64,
    /// Positions above the cursor already sent from the hold buffer: a later read skips them.
    flushed: BTreeSet<Position>,
}

impl<P: Send + Sync + 'static> Replay<'_, P> {
    /// Reads and sends the subscription's stored events after the cursor until a read
    /// catches up with the log.
    async fn read_up(&mut self) -> Result<(), End> {
        let options = &self.hub.options;
        loop {
            let batch = match timeout(
                options.operation_timeout,
                self.store.read_all(self.cursor, options.replay_batch),
            )
            .await
            {
                Ok(Ok(batch)) => batch,
                Ok(Err(error)) => {
                    tracing::warn!(topic = %self.topic, %error, "replay read failed");
                    return Err(End::Failed("the event log is unavailable".to_owned()));
                }
                Err(_) => {
                    return Err(End::Failed(
                        "the event log did not answer in time".to_owned(),
                    ));
                }
            };
            let caught_up = batch.len() < options.replay_batch;
            for record in &batch {
                self.read += 1;
                if let Some(position) = record.position {
                    self.cursor = self.cursor.max(position);
                    if self.flushed.remove(&position) {
                        continue;
                    }
                }
                if let Some(frame) = replay_frame(self.hub, self.conn, self.topic, record) {
                    if !self.sender.send(frame).await {
                        return Err(End::Closed);
                    }
                    self.sent += 1;
                }
            }
            if caught_up {
                // Live events dropped from a full buffer are in the store: read on for them.
                let overflowed = {
                    let mut buffer = self.slot.lock();
                    let cursor = self.cursor;
                    buffer.frames.retain(|(p, _)| p.is_none_or(|p| p > cursor));
                    std::mem::take(&mut buffer.overflowed)
                };
                // An empty read after an overflow means every dropped event was at or below
                // the cursor (covered) or had no position (not in the log: nothing to recover).
                if !overflowed || batch.is_empty() {
                    return Ok(());
                }
            }
            if self.read >= options.replay_limit {
                return Err(End::Failed(format!(
                    "more than {} events to replay: reload the state and subscribe without `since`",
                    options.replay_limit
                )));
            }
        }
    }

    /// The seam. Held events are sent in batches without the lock (sending may wait for the
    /// writer); the subscription goes live under the lock once the buffer is empty, so a live
    /// event is either held and flushed here, or queued after everything flushed.
    ///
    /// Live events keep arriving while a batch is sent; when the buffer fills up meanwhile,
    /// the ones it drops came after every event flushed so far (the buffer stayed full from
    /// the first drop until it was taken), so the next batch is flushed and then, with
    /// `read_back`, the store is read again for the dropped ones.
    async fn flush(&mut self, read_back: bool) -> Flush {
        loop {
            let (held, overflowed) = {
                let mut buffer = self.slot.lock();
                let overflowed = read_back && std::mem::take(&mut buffer.overflowed);
                if buffer.frames.is_empty() && !overflowed {
                    self.slot.go_live(&mut buffer, self.cursor);
                    return Flush::Live;
                }
                (std::mem::take(&mut buffer.frames), overflowed)
            };
            for (position, frame) in held {
                if position.is_some_and(|p| p <= self.cursor) {
                    continue;
                }
                if !self.sender.send(frame).await {
                    return Flush::Closed;
                }
                if let Some(position) = position {
                    self.flushed.insert(position);
                }
            }
            if overflowed {
                return Flush::ReadBack;
            }
        }
    }
}

/// The frame of a stored event for this subscription, if it is on the topic and the
/// principal may see it.
fn replay_frame<P: Send + Sync + 'static>(
    hub: &HubInner<P>,
    conn: &Conn<P>,
    topic: &Topic,
    record: &EventRecord,
) -> Option<Utf8Bytes> {
    let routed = hub.routing.route(record)?;
    if !routed.topics().contains(topic) {
        return None;
    }
    let event = match PushedEvent::new(routed, record.position) {
        Ok(event) => event,
        Err(error) => {
            tracing::warn!(event_id = %record.event_id, %error, "stored event cannot be pushed");
            return None;
        }
    };
    hub.registry
        .may_see(&conn.principal, topic, &event)
        .then(|| event_frame(topic, &event))
}

/// Sends replayed frames with backpressure, taking at most a quarter of the send queue at a
/// time and only when half of it is free: live events on the connection's other
/// subscriptions keep room, so a long replay does not get the client closed as slow.
struct ReplaySender<'a, P> {
    conn: &'a Conn<P>,
    /// Frames this replay may still queue before waiting for room again.
    budget: usize,
}

impl<'a, P> ReplaySender<'a, P> {
    fn new(conn: &'a Conn<P>) -> Self {
        Self { conn, budget: 0 }
    }

    /// Queues a frame; `false` when the connection is closing.
    async fn send(&mut self, frame: Utf8Bytes) -> bool {
        let queue = &self.conn.queue;
        let mut item = Outgoing::Frame(frame);
        loop {
            if self.budget > 0 {
                match queue.try_push(item) {
                    Ok(()) => {
                        self.budget -= 1;
                        return true;
                    }
                    // Live traffic took the room: wait for it again.
                    Err(back) => {
                        item = back;
                        self.budget = 0;
                    }
                }
            }
            tokio::select! {
                biased;
                _ = self.conn.close.reader_closed() => return false,
                _ = queue.room_for((queue.capacity() / 2).max(1)) => {}
            }
            self.budget = (queue.capacity() / 4).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::SendQueue;
    use crate::{AllowAll, AuthenticateFn, EventRouting, Hub, HubOptions, Routed, Unauthenticated};
    use cqrs_core::memory::{InMemoryEventStore, InMemoryPubSub};
    use cqrs_core::ports::{ExpectedVersion, StoreError};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use tokio::time::Instant;

    /// Every event on topic `t`.
    struct OneTopic;

    impl EventRouting for OneTopic {
        fn channel(&self, _: &Topic) -> Option<String> {
            Some("t".to_owned())
        }

        fn route(&self, record: &EventRecord) -> Option<Routed> {
            Some(Routed::new(record.payload.clone()).topic(Topic::parse("t").ok()?))
        }
    }

    /// The in-memory store, showing reads only the events up to `visible`: what a read
    /// returned before later events were stored.
    struct Visible {
        inner: InMemoryEventStore,
        visible: AtomicU64,
    }

    #[async_trait::async_trait]
    impl EventStore for Visible {
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
            let visible = self.visible.load(Ordering::SeqCst);
            let mut batch = self.inner.read_all(after, limit).await?;
            batch.retain(|r| r.position.is_some_and(|p| p.get() <= visible));
            Ok(batch)
        }

        async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
            self.inner.stream_version(stream_id).await
        }
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::task::yield_now().await;
        }
    }

    /// Live events overflow the hold buffer while the held ones are being flushed at the
    /// seam (the replay waits there for room in the send queue): the dropped ones are read
    /// back from the store, and every event arrives once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overflow_during_the_seam_is_read_back() {
        let store = Arc::new(Visible {
            inner: InMemoryEventStore::new(),
            visible: AtomicU64::new(3),
        });
        let hub = Hub::builder(AuthenticateFn::new(|_: String| async {
            Err::<(), _>(Unauthenticated::new("not used"))
        }))
        .authorizer(AllowAll)
        .routing(OneTopic)
        .pubsub(Arc::new(InMemoryPubSub::new()))
        .event_store(store.clone())
        .options(HubOptions::new().replay_buffer(2).replay_batch(100))
        .build()
        .unwrap();
        let inner = hub.inner.clone();
        let topic = Topic::parse("t").unwrap();
        let conn = Arc::new(Conn {
            id: 1,
            principal: (),
            // Four frames: the replay waits for two free slots once it has used its share.
            queue: Arc::new(SendQueue::new(4)),
            close: Default::default(),
            metrics: inner.metrics.clone(),
        });
        let slot = Arc::new(Slot::new(conn.clone(), true, 2));
        inner.registry.insert(&topic, slot.clone(), || {});
        let store_event = |n: u64| {
            let store = store.clone();
            async move {
                let record = cqrs_core::testing::event_store::record(n);
                let stored = store
                    .append(&format!("s-{n}"), ExpectedVersion::Any, vec![record])
                    .await
                    .unwrap();
                stored.into_iter().next().unwrap()
            }
        };
        let publish = |record: &EventRecord| {
            let routed = OneTopic.route(record).unwrap();
            inner
                .registry
                .dispatch(&PushedEvent::new(routed, record.position).unwrap());
        };

        // 1-3 are read; 4 and 5 are stored after the read and published: held.
        let mut stored = Vec::new();
        for n in 1..=5 {
            stored.push(store_event(n).await);
        }
        publish(&stored[3]);
        publish(&stored[4]);
        let replay = tokio::spawn({
            let (inner, conn, slot, topic) =
                (inner.clone(), conn.clone(), slot.clone(), topic.clone());
            async move { replay(&inner, &conn, &slot, &topic, Position::new(0)).await }
        });
        // The seam took 4 and 5 and waits for room: 1-3 fill the queue, nothing drains it.
        until("the seam to take the held events", || {
            slot.lock().frames.is_empty()
        })
        .await;
        // 6-8 arrive meanwhile: the buffer takes two and drops 8.
        store.visible.store(u64::MAX, Ordering::SeqCst);
        for n in 6..=8 {
            stored.push(store_event(n).await);
        }
        for record in &stored[5..] {
            publish(record);
        }
        assert!(slot.lock().overflowed);

        let mut got = Vec::new();
        let mut replay = std::pin::pin!(replay);
        loop {
            tokio::select! {
                item = conn.queue.pop() => got.push(item),
                done = &mut replay => {
                    done.unwrap();
                    break;
                }
            }
        }
        while let Some(item) = conn.queue.try_pop() {
            got.push(item);
        }
        let seen: Vec<u64> = got
            .into_iter()
            .map(|item| match item {
                Outgoing::Frame(frame) => {
                    let frame: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
                    frame["event"]["n"].as_u64().unwrap()
                }
                Outgoing::Ping => panic!("a ping"),
            })
            .collect();
        assert_eq!(seen, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Live from here on: a later event is queued directly, once.
        let ninth = store_event(9).await;
        publish(&ninth);
        assert!(matches!(conn.queue.try_pop(), Some(Outgoing::Frame(_))));
        assert!(conn.queue.try_pop().is_none());
    }
}
