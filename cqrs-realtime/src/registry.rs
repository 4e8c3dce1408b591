//! Who is subscribed to what, and the fan-out of one event to every matching subscription.

use crate::metrics::Metrics;
use crate::queue::{Outgoing, SendQueue};
use crate::signal::{CloseSignal, Ending};
use crate::{Authorizer, ErrorCode, PushedEvent, ServerFrame, Topic};
use axum::extract::ws::Utf8Bytes;
use cqrs_core::Position;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// What the dispatcher and a connection's reader share about one connection.
pub(crate) struct Conn<P> {
    pub(crate) id: u64,
    pub(crate) principal: P,
    /// The bounded send queue; the connection's writer drains it.
    pub(crate) queue: Arc<SendQueue>,
    pub(crate) close: Arc<CloseSignal>,
    pub(crate) metrics: Arc<Metrics>,
}

impl<P> Conn<P> {
    /// Queues a frame without waiting; whether it was queued. A full queue means the client
    /// does not keep up: the connection is closed with 1008 rather than slowing the hub or
    /// growing memory.
    ///
    /// A connection that is closing takes nothing more, though its writer may have made room
    /// meanwhile: an event queued after one was dropped could reach the client before the
    /// close, and a client resuming from the last event it got would never get the dropped one.
    /// (An event of another channel may still slip in between a failed push and its close:
    /// harmless, as a topic's events all come through its one channel, in order.)
    pub(crate) fn push(&self, frame: Utf8Bytes) -> bool {
        if self.close.get().is_some() {
            return false;
        }
        if self.queue.try_push(Outgoing::Frame(frame)).is_err() {
            self.close_slow();
            return false;
        }
        true
    }

    pub(crate) fn close_slow(&self) {
        if self.close.close(Ending::SLOW) {
            // Reached from the fan-out (a full queue): a recorder that panics must not stop
            // the dispatch to the other subscriptions.
            let _ = catch_unwind(AssertUnwindSafe(|| self.metrics.slow_close()));
            tracing::debug!(connection = self.id, "closing a slow client");
        }
    }
}

/// One subscription of one connection.
pub(crate) struct Slot<P> {
    pub(crate) conn: Arc<Conn<P>>,
    /// While a replay runs, live events are held in `buffer` instead of queued.
    replaying: AtomicBool,
    buffer: Mutex<ReplayBuffer>,
    /// Live events at or below this position were covered by the replay: dropped.
    replayed_up_to: AtomicU64,
    capacity: usize,
    /// Told that events may have been missed (`events_missed`): not told again until the
    /// client subscribes again (a new slot), which is how it closes the gap.
    told_missed: AtomicBool,
}

#[derive(Default)]
pub(crate) struct ReplayBuffer {
    /// The held live events, in arrival order; a `None` frame marks where a live event without
    /// a position was dropped (see `lost`): the flush queues `events_missed` there.
    pub(crate) frames: Vec<(Option<Position>, Option<Utf8Bytes>)>,
    /// The highest position of a live event dropped because the buffer was full: the replay
    /// reads on until its cursor passes it. (A dropped event without a position is not in
    /// the log and cannot be read back: see `lost`.)
    pub(crate) dropped: Option<Position>,
    /// A live event without a position was dropped because the buffer was full: it cannot be
    /// read back, so a marker was put in `frames` after the events held before it, and the
    /// subscription is told `events_missed` at that point of its stream, before any event
    /// that came after the loss. One marker at most: a subscription is told once.
    pub(crate) lost: bool,
}

impl<P> Slot<P> {
    pub(crate) fn new(conn: Arc<Conn<P>>, replaying: bool, capacity: usize) -> Self {
        Self {
            conn,
            replaying: AtomicBool::new(replaying),
            buffer: Mutex::new(ReplayBuffer::default()),
            replayed_up_to: AtomicU64::new(0),
            capacity,
            told_missed: AtomicBool::new(false),
        }
    }

    /// A live event for this subscription.
    fn deliver(&self, position: Option<Position>, frame: &Utf8Bytes) {
        if self.replaying.load(Ordering::Acquire) {
            let mut buffer = self.lock();
            // Checked again under the lock: the replay ends by clearing the flag under it.
            if self.replaying.load(Ordering::Acquire) {
                if buffer.frames.len() < self.capacity {
                    buffer.frames.push((position, Some(frame.clone())));
                } else if position.is_none() {
                    // The marker may take the buffer one past its capacity, once.
                    if !std::mem::replace(&mut buffer.lost, true) {
                        buffer.frames.push((None, None));
                    }
                } else if position > buffer.dropped {
                    buffer.dropped = position;
                }
                return;
            }
        }
        // Read only once the replay is seen to be over: `go_live` stores the bound before it
        // clears the flag. Read before the flag, a stale 0 let an event the replay had sent
        // through a second time.
        if let Some(p) = position
            && p.get() <= self.replayed_up_to.load(Ordering::Acquire)
        {
            return;
        }
        self.conn.push(frame.clone());
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, ReplayBuffer> {
        // A std mutex: nothing awaits while it is held.
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the replay: from now on live events are queued directly, except those at or
    /// below `up_to`. Call with the buffer lock held and the buffer empty.
    pub(crate) fn go_live(&self, up_to: Position) {
        self.replayed_up_to.store(up_to.get(), Ordering::Release);
        self.replaying.store(false, Ordering::Release);
    }

    /// Whether this subscription is to be told `events_missed` now (it was not told yet);
    /// from now on it is not told again.
    pub(crate) fn claim_missed(&self) -> bool {
        !self.told_missed.swap(true, Ordering::Relaxed)
    }

    /// Queues `frame` (an `events_missed`) unless this subscription was told already; whether
    /// it was queued (a full queue closes the connection instead).
    fn tell_missed(&self, frame: &Utf8Bytes) -> bool {
        if !self.claim_missed() {
            return false;
        }
        self.conn.push(frame.clone())
    }
}

/// The subscriptions to one topic, by connection id, and the channel that carries the topic.
struct Slots<P> {
    /// The routing's channel for the topic (without the hub's prefix): a channel that missed
    /// messages finds the topics to warn with it.
    channel: Box<str>,
    slots: HashMap<u64, Arc<Slot<P>>>,
}

/// The subscriptions by topic, and the topics by channel.
struct Subscriptions<P> {
    topics: HashMap<Topic, Slots<P>>,
    /// The topics each channel carries (those with a subscription): a channel that missed
    /// messages warns its own topics without walking every topic of the hub, which with a
    /// channel per topic made a reconnect cost channels × topics under the lock.
    by_channel: HashMap<Box<str>, HashSet<Topic>>,
}

/// Every subscription of a hub, by topic.
pub(crate) struct Registry<P> {
    topics: RwLock<Subscriptions<P>>,
    pub(crate) authorizer: Arc<dyn Authorizer<P>>,
    /// The largest event frame a connection's write buffer takes (see [`event_frame`]).
    pub(crate) max_event_frame: usize,
}

impl<P: Send + Sync + 'static> Registry<P> {
    pub(crate) fn new(authorizer: Arc<dyn Authorizer<P>>, max_event_frame: usize) -> Self {
        Self {
            topics: RwLock::new(Subscriptions {
                topics: HashMap::new(),
                by_channel: HashMap::new(),
            }),
            authorizer,
            max_event_frame,
        }
    }

    /// Adds a subscription to `topic`, which `channel` carries, and runs `then` before any
    /// event can reach it: the `subscribed` frame queued there comes before the
    /// subscription's first event.
    pub(crate) fn insert(
        &self,
        topic: &Topic,
        channel: &str,
        slot: Arc<Slot<P>>,
        then: impl FnOnce(),
    ) {
        let mut guard = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let Subscriptions { topics, by_channel } = &mut *guard;
        topics
            .entry(topic.clone())
            .or_insert_with(|| {
                by_channel
                    .entry(channel.into())
                    .or_default()
                    .insert(topic.clone());
                Slots {
                    channel: channel.into(),
                    slots: HashMap::new(),
                }
            })
            .slots
            .insert(slot.conn.id, slot);
        then();
    }

    /// Removes a subscription, and runs `then` before any later event is dispatched.
    pub(crate) fn remove(&self, topic: &Topic, connection: u64, then: impl FnOnce()) {
        let mut guard = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let Subscriptions { topics, by_channel } = &mut *guard;
        if let Some(slots) = topics.get_mut(topic) {
            slots.slots.remove(&connection);
            if slots.slots.is_empty()
                && let Some(slots) = topics.remove(topic)
                && let Some(carried) = by_channel.get_mut(&slots.channel)
            {
                carried.remove(topic);
                if carried.is_empty() {
                    by_channel.remove(&slots.channel);
                }
            }
        }
        then();
    }

    /// Pushes a live event that `channel`'s task received to every subscription of its topics
    /// whose principal may see it. The frame is encoded once per topic and shared by every
    /// connection.
    ///
    /// A topic that `channel` does not carry is not pushed: a message naming it comes from a
    /// publisher that maps topics to channels otherwise (during a rolling deploy), outside the
    /// order and the copy check of the topic's own channel, which may never carry the event.
    /// Those of its subscriptions whose principal may see the event are told `events_missed`
    /// instead (once each), to resume from the log (the others learn nothing of it);
    /// returns how many `events_missed` frames were queued (a full queue closes the
    /// connection instead). Nothing is pushed once `released` is set. It is read under the lock a subscribe takes
    /// to register: a subscription made after its channel was released is served by the
    /// channel's next task, and must not get an older message the released task still holds
    /// (after events the next task already pushed).
    pub(crate) fn dispatch(
        &self,
        channel: &str,
        released: &AtomicBool,
        event: &PushedEvent,
    ) -> u64 {
        let guard = self.topics.read().unwrap_or_else(|p| p.into_inner());
        let topics = &guard.topics;
        if released.load(Ordering::SeqCst) {
            return 0;
        }
        let mut told = 0;
        for topic in event.topics() {
            let Some(slots) = topics.get(topic) else {
                continue;
            };
            if &*slots.channel != channel {
                // Only to those that may see it: to others, the notice would tell that an
                // event they may not see happened.
                let frame = missed_frame(topic);
                let mut panicked = Panics::default();
                for slot in slots.slots.values() {
                    if !self.may_see_counting(&slot.conn.principal, topic, event, &mut panicked) {
                        continue;
                    }
                    if slot.tell_missed(&frame) {
                        told += 1;
                    }
                }
                log_panicked(topic, event, &panicked);
                continue;
            }
            let mut frame: Option<Utf8Bytes> = None;
            let mut panicked = Panics::default();
            for slot in slots.slots.values() {
                if !self.may_see_counting(&slot.conn.principal, topic, event, &mut panicked) {
                    continue;
                }
                let frame =
                    frame.get_or_insert_with(|| event_frame(topic, event, self.max_event_frame));
                slot.deliver(event.position(), frame);
            }
            log_panicked(topic, event, &panicked);
        }
        told
    }

    /// Tells every subscription of a topic that `channel` carries that the hub may have
    /// missed live events on it: an `error` frame `events_missed` naming the topic, queued
    /// like an event (before the events that come after the gap). The subscriptions stay.
    /// Returns how many frames were queued. Runs only when a loss was seen: one frame is
    /// encoded per topic of the channel, none on the path of a normal event. Nothing is told
    /// once `released` is set (see [`dispatch`](Self::dispatch)): the subscriptions made since
    /// belong to the channel's next task, which missed nothing.
    pub(crate) fn missed(&self, channel: &str, released: &AtomicBool) -> u64 {
        let guard = self.topics.read().unwrap_or_else(|p| p.into_inner());
        if released.load(Ordering::SeqCst) {
            return 0;
        }
        let Some(carried) = guard.by_channel.get(channel) else {
            return 0;
        };
        let mut told = 0;
        for topic in carried {
            let Some(slots) = guard.topics.get(topic) else {
                continue;
            };
            let frame = missed_frame(topic);
            for slot in slots.slots.values() {
                if slot.tell_missed(&frame) {
                    told += 1;
                }
            }
        }
        told
    }

    /// The authorizer's answer; a panicking authorizer hides the event instead of taking the
    /// channel's dispatcher down.
    pub(crate) fn may_see(&self, principal: &P, topic: &Topic, event: &PushedEvent) -> bool {
        let mut panicked = Panics::default();
        let may = self.may_see_counting(principal, topic, event, &mut panicked);
        log_panicked(topic, event, &panicked);
        may
    }

    /// [`may_see`](Self::may_see), counting a panic in `panicked` instead of logging it: an
    /// event its authorizer panics on, fanned out to thousands of subscribers, is logged once
    /// (by [`log_panicked`]), not once per subscriber under the registry's lock. A panic hides
    /// the event from its subscription alone, so a principal the authorizer fails on (one
    /// user's odd data, on however many connections) costs the others nothing. Each panic
    /// also runs the process's panic hook (a log line, a backtrace), so the event is hidden
    /// from the topic's remaining subscriptions without asking once
    /// [`Panics::gave_up`] says so.
    fn may_see_counting(
        &self,
        principal: &P,
        topic: &Topic,
        event: &PushedEvent,
        panicked: &mut Panics,
    ) -> bool {
        if panicked.gave_up() {
            panicked.unasked += 1;
            return false;
        }
        catch_unwind(AssertUnwindSafe(|| {
            self.authorizer.may_see(principal, topic, event)
        }))
        .unwrap_or_else(|_| {
            panicked.count += 1;
            false
        })
    }
}

/// Panics on one event's fan-out to a topic after which its remaining subscriptions are
/// hidden from without asking: the panic hook's cost under the registry's lock stays bounded
/// when a bug the event reaches fails for every principal. Twice the connections a principal
/// holds by default ([`HubOptions::max_connections_per_principal`]), so one principal the
/// authorizer fails on never reaches it alone. (Stopping after the first few panics with no
/// answer between could not tell that principal's connections, met first, from such a bug.)
///
/// [`HubOptions::max_connections_per_principal`]: crate::HubOptions::max_connections_per_principal
const MOST_PANICS: u64 = 32;

/// The authorizer's panics on one event for the subscriptions of one topic.
#[derive(Default)]
struct Panics {
    /// Subscriptions for which `may_see` panicked.
    count: u64,
    /// Subscriptions the event was hidden from without asking (see [`gave_up`](Self::gave_up)).
    unasked: u64,
}

impl Panics {
    /// Whether to stop asking: [`MOST_PANICS`] calls panicked.
    fn gave_up(&self) -> bool {
        self.count >= MOST_PANICS
    }
}

/// Logs that the authorizer panicked on `event` for subscribers of `topic`, once, when it did.
fn log_panicked(topic: &Topic, event: &PushedEvent, panicked: &Panics) {
    if panicked.count > 0 {
        tracing::error!(
            %topic,
            position = ?event.position(),
            subscribers = panicked.count + panicked.unasked,
            panicked = panicked.count,
            "the realtime authorizer panicked in may_see; the event was hidden from those \
             subscribers (after {MOST_PANICS} panics on one event, from the topic's remaining \
             subscribers without asking)"
        );
    }
}

/// The `error` frame `events_missed` for `topic`.
pub(crate) fn missed_frame(topic: &Topic) -> Utf8Bytes {
    Utf8Bytes::from(
        ServerFrame::error(
            ErrorCode::EventsMissed,
            "the server may have missed live events on this topic; the subscription stays \
             open, but to close the gap unsubscribe and subscribe again with `since` set to \
             the last position you received before this frame",
            Some(topic.as_str()),
        )
        .to_json(),
    )
}

/// The `event` frame of `event` on `topic`; or, when it is longer than `max` bytes, an
/// `error` frame `event_too_large` in its place. A frame the write buffer cannot take fails
/// the write and drops the connection, and a client resuming from before the event would get
/// it again, and be dropped again, for ever.
pub(crate) fn event_frame(topic: &Topic, event: &PushedEvent, max: usize) -> Utf8Bytes {
    #[derive(Serialize)]
    struct EventFrame<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        topic: &'a str,
        event: &'a RawValue,
        #[serde(skip_serializing_if = "Option::is_none")]
        position: Option<String>,
    }
    let frame = EventFrame {
        kind: "event",
        topic: topic.as_str(),
        event: event.event_raw(),
        position: event.position().map(|p| p.to_string()),
    };
    // A struct of strings and already-valid JSON: serializing cannot fail.
    let json = serde_json::to_string(&frame).unwrap_or_default();
    if json.len() <= max {
        return Utf8Bytes::from(json);
    }
    // Met again by every client resuming from before it: said once a minute.
    static SAID: cqrs_core::throttled::Throttled =
        cqrs_core::throttled::Throttled::every(cqrs_core::throttled::A_MINUTE);
    if let Some(unsaid) = SAID.may_say() {
        tracing::warn!(%topic, bytes = json.len(), max, unsaid, "an event is too large to push; sent event_too_large instead (`unsaid`: as many since the last such line)");
    }
    let position = frame.position.as_deref().unwrap_or("none");
    Utf8Bytes::from(
        ServerFrame::error(
            ErrorCode::EventTooLarge,
            format!(
                "the event at position {position} is {} bytes, more than the {max} this server \
                 sends; it was not delivered",
                json.len()
            ),
            Some(topic.as_str()),
        )
        .to_json(),
    )
}

#[cfg(test)]
mod tests {
    use super::Conn;
    use crate::metrics::Metrics;
    use crate::queue::{Outgoing, SendQueue};
    use crate::signal::Ending;
    use std::sync::Arc;

    fn conn(capacity: usize) -> Conn<()> {
        Conn {
            id: 1,
            principal: (),
            queue: Arc::new(SendQueue::new(capacity)),
            close: Default::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Once an event found the queue full, no later one is queued, even after the writer took
    /// a frame: the client must not get an event past the one it missed.
    #[test]
    fn nothing_is_queued_after_a_frame_was_dropped() {
        let conn = conn(1);
        assert!(conn.push("1".into()));
        assert!(!conn.push("2".into()), "the queue is full");
        assert_eq!(conn.close.get(), Some(Ending::SLOW));
        assert!(matches!(conn.queue.try_pop(), Some(Outgoing::Frame(f)) if f.as_str() == "1"));
        assert!(!conn.push("3".into()), "closed as slow");
        assert!(conn.queue.try_pop().is_none());
    }

    /// A channel that missed messages warns the topics it carries and no other, and the
    /// index of topics by channel keeps no topic once its last subscription is gone.
    #[test]
    fn a_channel_warns_only_its_own_topics_and_the_index_keeps_no_left_topic() {
        use super::{Registry, Slot};
        use crate::{AllowAll, Topic};
        use std::sync::atomic::AtomicBool;

        let registry = Registry::<()>::new(Arc::new(AllowAll), 1 << 16);
        let conn = Arc::new(conn(64));
        let topic = |name: &str| Topic::parse(name).unwrap();
        let carried = [("t.a1", "a"), ("t.a2", "a"), ("t.b1", "b")];
        for (name, channel) in carried {
            let slot = Arc::new(Slot::new(conn.clone(), false, 8));
            registry.insert(&topic(name), channel, slot, || {});
        }
        let live = AtomicBool::new(false);
        assert_eq!(registry.missed("a", &live), 2, "t.a1 and t.a2");
        assert_eq!(registry.missed("c", &live), 0, "a channel nothing is on");
        let mut told = Vec::new();
        while let Some(Outgoing::Frame(frame)) = conn.queue.try_pop() {
            told.push(frame.as_str().to_owned());
        }
        assert_eq!(told.len(), 2);
        assert!(
            told.iter()
                .all(|f| f.contains("events_missed") && !f.contains("t.b1")),
            "{told:?}"
        );

        for (name, _) in carried {
            registry.remove(&topic(name), conn.id, || {});
        }
        let guard = registry.topics.read().unwrap();
        assert!(guard.topics.is_empty());
        assert!(
            guard.by_channel.is_empty(),
            "{:?}",
            guard.by_channel.keys().collect::<Vec<_>>()
        );
    }

    /// A connection closing for any other reason takes nothing more either.
    #[test]
    fn a_closing_connection_takes_no_frame() {
        let conn = conn(4);
        assert!(conn.close.close(Ending::SHUTDOWN));
        assert!(!conn.push("1".into()));
        assert!(conn.queue.try_pop().is_none());
        assert_eq!(
            conn.close.get(),
            Some(Ending::SHUTDOWN),
            "still the first ending"
        );
    }
}
