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
use cqrs_core::{EventRecord, Position};
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
    let options = &hub.options;
    let mut sender = ReplaySender::new(conn);
    let mut cursor = since;
    let mut read = 0usize;
    let mut sent = 0u64;
    let failure = loop {
        let batch = match timeout(
            options.operation_timeout,
            store.read_all(cursor, options.replay_batch),
        )
        .await
        {
            Ok(Ok(batch)) => batch,
            Ok(Err(error)) => {
                tracing::warn!(%topic, %error, "replay read failed");
                break Some("the event log is unavailable".to_owned());
            }
            Err(_) => break Some("the event log did not answer in time".to_owned()),
        };
        let caught_up = batch.len() < options.replay_batch;
        for record in &batch {
            read += 1;
            if let Some(position) = record.position {
                cursor = cursor.max(position);
            }
            if let Some(frame) = replay_frame(hub, conn, topic, record) {
                if !sender.send(frame).await {
                    return;
                }
                sent += 1;
            }
        }
        if caught_up {
            // Live events dropped from a full buffer are in the store: read on for them.
            let overflowed = {
                let mut buffer = slot.lock();
                buffer.frames.retain(|(p, _)| p.is_none_or(|p| p > cursor));
                std::mem::take(&mut buffer.overflowed)
            };
            // An empty read after an overflow means every dropped event was at or below
            // the cursor (covered) or had no position (not in the log: nothing to recover).
            if !overflowed || batch.is_empty() {
                break None;
            }
        }
        if read >= options.replay_limit {
            break Some(format!(
                "more than {} events to replay: reload the state and subscribe without `since`",
                options.replay_limit
            ));
        }
    };
    hub.metrics.replayed(sent);
    if let Some(message) = failure {
        let frame = ServerFrame::error(ErrorCode::ResumeFailed, message, Some(topic.as_str()));
        if !sender.send(Utf8Bytes::from(frame.to_json())).await {
            return;
        }
    }
    // The seam. Held events are sent in batches without the lock (sending may wait for the
    // writer); the subscription goes live under the lock once the buffer is empty, so a live
    // event is either held and flushed here, or queued after everything flushed.
    loop {
        let held = {
            let mut buffer = slot.lock();
            if buffer.frames.is_empty() {
                slot.go_live(&mut buffer, cursor);
                break;
            }
            std::mem::take(&mut buffer.frames)
        };
        for (position, frame) in held {
            if position.is_some_and(|p| p <= cursor) {
                continue;
            }
            if !sender.send(frame).await {
                return;
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
