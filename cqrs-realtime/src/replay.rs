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
use crate::registry::{Conn, ReplayBuffer, Slot, event_frame, missed_frame};
use crate::{ErrorCode, PushedEvent, ServerFrame, Topic};
use axum::extract::ws::Utf8Bytes;
use cqrs_core::ports::EventStore;
use cqrs_core::throttled::{A_MINUTE, Throttled};
use cqrs_core::{EventRecord, Position};
use futures_util::FutureExt;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;

/// `permit` is one of the hub's `max_concurrent_replays`, taken before the subscription was
/// registered. The replay holds one only while it reads the store: it lets it go while it
/// waits for room in the send queue, so a client that reads slowly does not keep other
/// resumes waiting, and takes one again before its next read.
pub(crate) async fn replay<P: Send + Sync + 'static>(
    hub: &HubInner<P>,
    conn: &Arc<Conn<P>>,
    slot: &Slot<P>,
    topic: &Topic,
    since: Position,
    permit: Option<OwnedSemaphorePermit>,
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
        sender: ReplaySender::new(conn, hub.options.idle_timeout, permit),
        cursor: since,
        read: 0,
        flushed: BTreeSet::new(),
        since_in_log: since == Position::START,
        read_back_to: None,
    };
    let failure = loop {
        match replay.read_up().await {
            Ok(()) => {}
            Err(End::Closed) => return,
            Err(End::Failed(message)) => {
                // Failed before any read showed `since` is in the log: it may be past the end
                // (a reset log), and going live from it would drop every live event up to it
                // without a word. Live from the start instead: at worst a held event the
                // client had comes again, after it was told the resume failed.
                if !replay.since_in_log {
                    replay.cursor = Position::START;
                }
                break Some(message);
            }
        }
        match replay.flush(true).await {
            Flush::Live => break None,
            Flush::Closed => return,
            // Live events were dropped while held ones were flushed: read them back.
            Flush::ReadBack => {}
        }
    };
    if let Some(message) = failure {
        let frame = ServerFrame::error(ErrorCode::ResumeFailed, message, Some(topic.as_str()));
        if !replay.sender.send(Utf8Bytes::from(frame.to_json())).await {
            return;
        }
        // Live events dropped from the full buffer that the failed read did not get back are
        // lost, and what the buffer holds now may have come after them: told at once, so the
        // client's `since` (its last event before the notice) is below every lost one. The
        // held events that follow come again in the resume the notice asks for.
        if replay.read_back_to.is_some_and(|p| p > replay.cursor) && slot.claim_missed() {
            if !replay.sender.send(missed_frame(topic)).await {
                return;
            }
            hub.metrics.missed_notices(1);
        }
        replay.flush(false).await;
    }
}

/// Batches a flush sends before it queues what it holds without waiting for room (see
/// [`Replay::flush`]).
const MAX_FLUSH_ROUNDS: usize = 64;

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
    /// Positions above the cursor already sent from the hold buffer: a later read skips them.
    flushed: BTreeSet<Position>,
    /// A read showed that `since` is in the log (an event follows it, or is at it).
    since_in_log: bool,
    /// The highest position of a live event dropped from the full buffer that a read is to
    /// get back from the store.
    read_back_to: Option<Position>,
}

impl<P: Send + Sync + 'static> Replay<'_, P> {
    /// Reads and sends the subscription's stored events after the cursor until a read
    /// catches up with the log.
    async fn read_up(&mut self) -> Result<(), End> {
        let options = &self.hub.options;
        loop {
            // Reads that match nothing on this topic send nothing, so the sender would not
            // notice the client has gone.
            if self.conn.close.get().is_some() {
                return Err(End::Closed);
            }
            // Never more than one past the limit: exactly `replay_limit` events to replay is
            // within it, and only an event after them shows there are too many.
            let want = options
                .replay_batch
                .min(options.replay_limit.saturating_add(1) - self.read);
            self.sender.look_again();
            // Dropped before this read began: stored before they were published, so this
            // read finds them, unless the log does not hold them.
            let dropped_before = self.read_back_to;
            let batch = self.read(self.cursor, want).await?;
            if batch.is_empty() && self.read == 0 && self.cursor > Position::START {
                self.check_within_log().await?;
            }
            self.since_in_log = true;
            // A page shorter than asked is the end of the log (the port's promise: waiting
            // for an empty one would never end on a busy log, whose every read returns
            // what was appended during the last).
            let caught_up = batch.len() < want;
            // The frame of the event whose wait for room ended this batch early.
            let mut waiting = None;
            for record in &batch {
                self.read += 1;
                if self.read > options.replay_limit {
                    return Err(too_many(options.replay_limit));
                }
                if let Some(position) = record.position {
                    self.cursor = self.cursor.max(position);
                    if self.flushed.remove(&position) {
                        continue;
                    }
                }
                if let Some(frame) = replay_frame(self.hub, self.conn, self.topic, record) {
                    let item = Outgoing::Frame(frame);
                    // The client may make the replay wait for room for as long as it likes,
                    // with the permit let go. One that frees room within a probe (slower than
                    // the log, not stalled) keeps the batch: reading it again would cost a
                    // read per wait. One that takes longer waits without it (each such replay
                    // held one, and `max_concurrent_replays` bounded the reads, not what they
                    // kept): its frame waits, the rest is read again after it (the cursor is
                    // at it).
                    let queued = if record.position.is_some() {
                        match self.sender.send_within_a_probe(item).await {
                            Ok(queued) => queued,
                            Err(item) => {
                                waiting = Some(item);
                                break;
                            }
                        }
                    } else {
                        self.sender.send_item(item).await
                    };
                    if !queued {
                        return Err(End::Closed);
                    }
                    // Counted as it is queued: a replay cut short (the connection closed
                    // from outside, which drops it at its next wait) counts what it sent.
                    self.hub.metrics.replayed(1);
                }
            }
            if let Some(item) = waiting {
                drop(batch);
                if !self.sender.send_item(item).await {
                    return Err(End::Closed);
                }
                self.hub.metrics.replayed(1);
                continue;
            }
            if caught_up {
                // Live events dropped from a full buffer were stored before they were
                // published: read on until the cursor passes the last of them. Each further
                // read returns at least that one, so this ends (or hits the limit).
                // Live events dropped from the full buffer that the log, read to its end,
                // did not give back (a live position this log does not hold): lost. Failed,
                // so the client is told so (`resume_failed`, then `events_missed` where they
                // were), rather than going live over a gap; and at once, not after the drops
                // stop: while live events keep overflowing the buffer, each read would find
                // a new one to read back, and the replay would read the log without end.
                if dropped_before.is_some_and(|p| p > self.cursor) {
                    return Err(not_read_back());
                }
                let behind = {
                    let slot = self.slot;
                    let mut buffer = slot.lock();
                    let cursor = self.cursor;
                    buffer.frames.retain(|(p, _)| p.is_none_or(|p| p > cursor));
                    self.dropped_above_cursor(&mut buffer)
                };
                if !behind {
                    if self.read_back_to.is_some_and(|p| p > self.cursor) {
                        return Err(not_read_back());
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Nothing follows `since` in the log: fine if `since` is its last event, but a position
    /// past its end (an in-memory log that restarted, a position from another deployment)
    /// would hold back every live event until the log reached it. Such a position is refused:
    /// the subscription goes live from the log's end, and the client is told to reload.
    async fn check_within_log(&mut self) -> Result<(), End> {
        let since = self.cursor;
        // The event at `since` (or one after it, just appended) is there, or not.
        if !self
            .read(Position::new(since.get() - 1), 1)
            .await?
            .is_empty()
        {
            return Ok(());
        }
        self.cursor = Position::START;
        Err(End::Failed(format!(
            "position {since} is past the end of the event log (it was reset, or the position \
             is from another server): reload the state over HTTP; live events follow"
        )))
    }

    /// One read of the log, within the operation timeout; a failure ends the replay.
    async fn read(&mut self, after: Position, limit: usize) -> Result<Vec<EventRecord>, End> {
        if self.sender.permit.is_none() {
            self.sender.permit = self.hub.replay_permit().await;
            if self.sender.permit.is_none() {
                return Err(End::Failed(
                    "too many resumes are replaying on this server to read the event log in \
                     time: reload the state over HTTP; live events follow"
                        .to_owned(),
                ));
            }
        }
        match timeout(
            self.hub.options.operation_timeout,
            self.store.read_all(after, limit),
        )
        .await
        {
            Ok(Ok(batch)) => Ok(batch),
            Ok(Err(error)) => {
                // Every resuming client meets an outage of the store: said once a minute.
                static SAID: Throttled = Throttled::every(A_MINUTE);
                if let Some(unsaid) = SAID.may_say() {
                    tracing::warn!(topic = %self.topic, %error, unsaid, "replay read failed (`unsaid`: as many since the last such line)");
                }
                Err(End::Failed(
                    "the event log is unavailable: reload the state over HTTP; live events follow"
                        .to_owned(),
                ))
            }
            Err(_) => Err(End::Failed(
                "the event log did not answer in time: reload the state over HTTP; live events \
                 follow"
                    .to_owned(),
            )),
        }
    }

    /// Whether live events above the cursor were dropped from the full buffer since the
    /// last look (then the store must be read again); resets the mark, remembering it until a
    /// read passes it.
    fn dropped_above_cursor(&mut self, buffer: &mut ReplayBuffer) -> bool {
        match buffer.dropped.take() {
            Some(dropped) if dropped > self.cursor => {
                self.read_back_to = self.read_back_to.max(Some(dropped));
                true
            }
            _ => false,
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
    ///
    /// Without `read_back` (after `resume_failed`) events dropped meanwhile are not read
    /// again: the subscription is told `events_missed` after the events held before them.
    ///
    /// Live events that keep arriving as fast as the client takes them would keep the buffer
    /// from ever being empty here: after `MAX_FLUSH_ROUNDS` batches, what is held goes to the
    /// send queue at once, without waiting for room, and the subscription goes live; a queue
    /// too full for it closes the client as slow, as a live push would.
    async fn flush(&mut self, read_back: bool) -> Flush {
        for round in 1.. {
            let (held, overflowed, lost) = {
                let slot = self.slot;
                let mut buffer = slot.lock();
                let overflowed = read_back && self.dropped_above_cursor(&mut buffer);
                let lost = !read_back && self.dropped_above_cursor(&mut buffer);
                if buffer.frames.is_empty() && !overflowed && !lost {
                    self.slot.go_live(self.cursor);
                    return Flush::Live;
                }
                let held = std::mem::take(&mut buffer.frames);
                if round > MAX_FLUSH_ROUNDS && !overflowed {
                    // Under the lock, so no live event passes these.
                    for (frame, notice) in self.frames_of(held, lost) {
                        // Counted only when queued (not when a full queue closed the client).
                        if self.conn.push(frame) && notice {
                            self.hub.metrics.missed_notices(1);
                        }
                    }
                    self.slot.go_live(self.cursor);
                    return Flush::Live;
                }
                (held, overflowed, lost)
            };
            for (frame, notice) in self.frames_of(held, lost) {
                if !self.sender.send(frame).await {
                    return Flush::Closed;
                }
                if notice {
                    self.hub.metrics.missed_notices(1);
                }
            }
            if overflowed {
                return Flush::ReadBack;
            }
        }
        unreachable!("`1..` does not end")
    }

    /// The frames to send for `held` (then, when `lost`, an `events_missed`), each with
    /// whether it is that notice: events at or below the cursor are skipped (read from the
    /// store already), the others are recorded as flushed, and a marker of a dropped event
    /// without a position becomes `events_missed` (once per subscription).
    fn frames_of(
        &mut self,
        held: Vec<(Option<Position>, Option<Utf8Bytes>)>,
        lost: bool,
    ) -> Vec<(Utf8Bytes, bool)> {
        let mut frames = Vec::with_capacity(held.len() + usize::from(lost));
        let markers = held.into_iter().chain(lost.then_some((None, None)));
        for (position, frame) in markers {
            if position.is_some_and(|p| p <= self.cursor) {
                continue;
            }
            match frame {
                Some(frame) => frames.push((frame, false)),
                // A live event dropped here: told at this point.
                None if self.slot.claim_missed() => frames.push((missed_frame(self.topic), true)),
                None => continue,
            }
            if let Some(position) = position {
                self.flushed.insert(position);
            }
        }
        frames
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
    let mut routed = hub.routing.route(record)?;
    if !routed.topics().contains(topic) {
        return None;
    }
    // As the publisher sends it on the subscription's channel: with the topics of that channel
    // only, so the authorizer decides on the event it sees live.
    let channel = hub.routing.channel(topic);
    routed.retain_topics(|t| hub.routing.channel(t) == channel);
    let event = match PushedEvent::new(routed, record.position) {
        Ok(event) => event,
        Err(error) => {
            // Met again by every client resuming from before it: said once a minute.
            static SAID: Throttled = Throttled::every(A_MINUTE);
            if let Some(unsaid) = SAID.may_say() {
                tracing::warn!(event_id = %record.event_id, %error, unsaid, "stored event cannot be pushed (`unsaid`: as many since the last such line)");
            }
            return None;
        }
    };
    hub.registry
        .may_see(&conn.principal, topic, &event)
        .then(|| event_frame(topic, &event, hub.registry.max_event_frame))
}

/// How long a replay may wait for room in all, in idle timeouts (see [`ReplaySender`]).
const REPLAY_WAIT_IN_IDLE_TIMEOUTS: u32 = 8;

/// Sends replayed frames with backpressure, taking at most a quarter of the send queue at a
/// time and only when half of it is free: live events on the connection's other
/// subscriptions keep room, so a long replay does not get the client closed as slow.
///
/// A client that takes nothing for `stall_limit` (the idle timeout) while the replay waits
/// is closed as slow: the replay runs in the connection's reader task, so the idle timeout
/// that guards reads does not run meanwhile, and without this a client that stopped reading
/// would hold its connection until shutdown. A client that takes frames all along, while live
/// events on its other subscriptions keep half the queue from ever being free, is not: the
/// replay then waits for two free slots and takes one, leaving the last to live traffic.
///
/// A replay that has waited for room [`REPLAY_WAIT_IN_IDLE_TIMEOUTS`] idle timeouts in all
/// (ten minutes by default) closes its connection as slow too: a client that takes frames now
/// and then, never idle for long, paced it for hours, and held the frames queued for it (built
/// for it alone, unlike live ones, which are shared) all that time. Only the waits count:
/// reading the store and waiting for a replay permit do not.
struct ReplaySender<'a, P> {
    conn: &'a Conn<P>,
    /// Frames this replay may still queue before waiting for room again.
    budget: usize,
    stall_limit: Duration,
    /// How long this replay waited for room, in all, and how long it may: past that the
    /// client has paced it too long, and is closed as slow.
    waited: Duration,
    wait_limit: Duration,
    /// The client took frames while half the queue never came free (live traffic holds it):
    /// from then on this replay waits for two free slots, not for half the queue, and takes
    /// one, leaving the last free slot to live traffic (which closes a client whose queue it
    /// finds full).
    starved: bool,
    /// The hub's replay permit, held while the replay reads the store and let go while it
    /// waits for room (see [`replay`]).
    permit: Option<OwnedSemaphorePermit>,
    /// Where a one-probe wait that ran out left its count of the client's frames taken and
    /// of how long it took none, for the wait after it.
    stalled: Option<(u32, Duration)>,
}

impl<'a, P> ReplaySender<'a, P> {
    fn new(conn: &'a Conn<P>, stall_limit: Duration, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            conn,
            budget: 0,
            stall_limit,
            waited: Duration::ZERO,
            wait_limit: stall_limit.saturating_mul(REPLAY_WAIT_IN_IDLE_TIMEOUTS),
            starved: false,
            permit,
            stalled: None,
        }
    }

    /// Queues a frame, waiting for room as long as the client needs; `false` when the
    /// connection is closing.
    async fn send(&mut self, frame: Utf8Bytes) -> bool {
        self.send_item(Outgoing::Frame(frame)).await
    }

    /// [`send`](Self::send) of a frame [`try_send`](Self::try_send) gave back.
    async fn send_item(&mut self, mut item: Outgoing) -> bool {
        loop {
            match self.try_send(item) {
                Ok(queued) => return queued,
                Err(back) => item = back,
            }
            if !self.wait_for_room().await {
                return false;
            }
        }
    }

    /// Queues a frame if it can without waiting: `Ok(false)` when the connection is closing,
    /// the frame back when the client must take frames first ([`wait_for_room`]).
    ///
    /// [`wait_for_room`]: Self::wait_for_room
    fn try_send(&mut self, mut item: Outgoing) -> Result<bool, Outgoing> {
        let queue = &self.conn.queue;
        // Twice at most: a push refused for want of room is tried again only if room came.
        for _ in 0..2 {
            // A closing connection takes nothing more (see `Conn::push`).
            if self.conn.close.get().is_some() {
                return Ok(false);
            }
            if self.budget == 0 {
                // Room already: no wait, and the permit stays (let go at every read's first
                // send, the replay would queue behind newer resumes for each of its reads).
                if queue.room_for(self.wanted()).now_or_never().is_none() {
                    return Err(item);
                }
                self.refill();
            }
            match queue.try_push_keeping_a_slot(item) {
                Ok(()) => {
                    self.budget -= 1;
                    return Ok(true);
                }
                // Live traffic took the room: wait for it again.
                Err(back) => {
                    item = back;
                    self.budget = 0;
                }
            }
        }
        Err(item)
    }

    /// Free slots a wait for room wants: half the queue, or two once starved; at least two
    /// (one for the frame, one left for a live event), however small the queue.
    fn wanted(&self) -> usize {
        if self.starved {
            2
        } else {
            (self.conn.queue.capacity() / 2).max(2)
        }
    }

    /// Frames to queue once there is room, before looking again.
    fn refill(&mut self) {
        self.budget = if self.starved {
            1
        } else {
            (self.conn.queue.capacity() / 4).max(1)
        };
    }

    /// Waits until the client has taken frames enough for [`try_send`](Self::try_send) to
    /// queue again, letting the permit go meanwhile; `false` when the connection is closing
    /// or the client was closed as slow.
    async fn wait_for_room(&mut self) -> bool {
        self.wait(false).await == Some(true)
    }

    /// [`send_item`](Self::send_item), waiting for room one probe at most (a second, or a
    /// quarter of the idle timeout if shorter): the frame back when the client freed too
    /// little by then.
    async fn send_within_a_probe(&mut self, mut item: Outgoing) -> Result<bool, Outgoing> {
        loop {
            match self.try_send(item) {
                Ok(queued) => return Ok(queued),
                Err(back) => item = back,
            }
            match self.wait(true).await {
                Some(true) => {}
                Some(false) => return Ok(false),
                None => return Err(item),
            }
        }
    }

    async fn wait(&mut self, one_probe: bool) -> Option<bool> {
        let queue = &self.conn.queue;
        // How often a wait looks whether the client takes frames: a client that does, but
        // never frees half the queue, is found starved within a probe, not an idle timeout.
        let probe = (self.stall_limit / 4).min(STARVATION_PROBE);
        // Taken by the client since the wait began, and at the last look; and for how long
        // it took nothing, counted on from a one-probe wait just before if it still has not.
        let began = queue.popped();
        let (mut taken, mut still) = match self.stalled.take() {
            Some((taken, still)) if taken == began => (taken, still),
            _ => (began, Duration::ZERO),
        };
        loop {
            let want = self.wanted();
            if queue.room_for(want).now_or_never().is_some() {
                break;
            }
            // The client sets how long this wait lasts: another resume may read meanwhile.
            self.permit = None;
            let waiting = tokio::time::Instant::now();
            tokio::select! {
                biased;
                _ = self.conn.close.reader_closed() => return Some(false),
                room = timeout(probe, queue.room_for(want)) => {
                    self.waited = self.waited.saturating_add(waiting.elapsed());
                    if self.waited >= self.wait_limit {
                        self.conn.close_slow();
                        return Some(false);
                    }
                    if room.is_ok() {
                        break;
                    }
                    let now = queue.popped();
                    if now == taken {
                        still = still.saturating_add(probe);
                        if still >= self.stall_limit {
                            self.conn.close_slow();
                            return Some(false);
                        }
                    } else {
                        taken = now;
                        still = Duration::ZERO;
                        // The client took as many frames as the wait wants free, and still
                        // they are not: live traffic refills the queue. Two free slots will
                        // do for the rest of this replay. (A client that takes fewer only
                        // reads slowly: waiting for half the queue keeps room for live
                        // events.)
                        if now.wrapping_sub(began) as usize >= want {
                            self.starved = true;
                        }
                    }
                    if one_probe {
                        // The next wait goes on counting the stall from here.
                        self.stalled = Some((taken, still));
                        return None;
                    }
                }
            }
        }
        self.refill();
        Some(true)
    }

    /// Forgets the frames this replay may still queue without looking: before a read of the
    /// log, during which live traffic may take the room it had found.
    fn look_again(&mut self) {
        self.budget = 0;
    }
}

/// The longest a replay waiting for room goes without looking whether its client takes
/// frames.
const STARVATION_PROBE: Duration = Duration::from_secs(1);

/// The replay's end when live events dropped from the hold buffer are not in the log.
fn not_read_back() -> End {
    End::Failed(
        "events published during the replay could not be read back from the event log: reload \
         the state over HTTP; live events follow"
            .to_owned(),
    )
}

/// The replay's end when more than `limit` events follow `since`.
fn too_many(limit: usize) -> End {
    End::Failed(format!(
        "more than {limit} events to replay: reload the state over HTTP; live events follow"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::SendQueue;
    use crate::signal::Ending;
    use crate::{AllowAll, AuthenticateFn, EventRouting, Hub, HubOptions, Routed, Unauthenticated};
    use cqrs_core::memory::{InMemoryEventStore, InMemoryPubSub};
    use cqrs_core::ports::{ExpectedVersion, StoreError};
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use tokio::task::JoinHandle;
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

    /// The in-memory store, whose reads return only the events up to `visible`, and nothing
    /// at all for the next `blind` reads: what a read returns when it ran before later
    /// events were stored.
    struct Staged {
        inner: InMemoryEventStore,
        visible: AtomicU64,
        blind: AtomicUsize,
        /// The next reads that fail (the log unavailable).
        failing: AtomicUsize,
        /// Whether each read takes a millisecond, as a real store's round trip does.
        slow: AtomicBool,
        /// Whether each read waits for a permit of `gate` (counted in `waiting` meanwhile).
        gated: AtomicBool,
        gate: tokio::sync::Semaphore,
        waiting: AtomicUsize,
        /// Where each read began (its `after`).
        reads: std::sync::Mutex<Vec<Position>>,
    }

    #[async_trait::async_trait]
    impl EventStore for Staged {
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
            self.reads.lock().unwrap().push(after);
            if self.gated.load(Ordering::SeqCst) {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                self.gate.acquire().await.unwrap().forget();
            }
            let failing = self
                .failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if failing.is_ok() {
                return Err(StoreError::Unavailable {
                    backend: "test",
                    source: "down".into(),
                });
            }
            let blind = self
                .blind
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if blind.is_ok() {
                return Ok(Vec::new());
            }
            if self.slow.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let visible = self.visible.load(Ordering::SeqCst);
            let mut batch = self.inner.read_all(after, limit).await?;
            batch.retain(|r| r.position.is_some_and(|p| p.get() <= visible));
            Ok(batch)
        }

        async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
            self.inner.stream_version(stream_id).await
        }
    }

    /// A hub, and one connection subscribed to `t` in replay mode, whose send queue nothing
    /// drains unless the test does.
    struct Fixture {
        inner: Arc<HubInner<()>>,
        store: Arc<Staged>,
        conn: Arc<Conn<()>>,
        slot: Arc<Slot<()>>,
        topic: Topic,
    }

    impl Fixture {
        fn new(options: HubOptions, send_queue: usize, hold: usize) -> Self {
            let store = Arc::new(Staged {
                inner: InMemoryEventStore::new(),
                visible: AtomicU64::new(u64::MAX),
                blind: AtomicUsize::new(0),
                failing: AtomicUsize::new(0),
                slow: AtomicBool::new(false),
                gated: AtomicBool::new(false),
                gate: tokio::sync::Semaphore::new(0),
                waiting: AtomicUsize::new(0),
                reads: Default::default(),
            });
            let hub = Hub::builder(AuthenticateFn::new(|_: String| async {
                Err::<(), _>(Unauthenticated::new("not used"))
            }))
            .authorizer(AllowAll)
            .routing(OneTopic)
            .pubsub(Arc::new(InMemoryPubSub::new()))
            .event_store(store.clone())
            .options(options)
            .build()
            .unwrap();
            let inner = hub.inner.clone();
            let conn = Arc::new(Conn {
                id: 1,
                principal: (),
                queue: Arc::new(SendQueue::new(send_queue)),
                close: Default::default(),
                metrics: inner.metrics.clone(),
            });
            let slot = Arc::new(Slot::new(conn.clone(), true, hold));
            let topic = Topic::parse("t").unwrap();
            inner.registry.insert(&topic, "t", slot.clone(), || {});
            Self {
                inner,
                store,
                conn,
                slot,
                topic,
            }
        }

        /// Stores event `n` (payload `{"n": n}`) in a stream of its own.
        async fn store(&self, n: u64) -> EventRecord {
            let record = cqrs_core::testing::event_store::record(n);
            let stored = self
                .store
                .append(&format!("s-{n}"), ExpectedVersion::Any, vec![record])
                .await
                .unwrap();
            stored.into_iter().next().unwrap()
        }

        /// Publishes a stored event live, as the upstream dispatcher does.
        fn publish(&self, record: &EventRecord) {
            let routed = OneTopic.route(record).unwrap();
            self.inner.registry.dispatch(
                "t",
                &AtomicBool::new(false),
                &PushedEvent::new(routed, record.position).unwrap(),
            );
        }

        fn replay(&self, since: u64) -> JoinHandle<()> {
            let (inner, conn, slot, topic) = (
                self.inner.clone(),
                self.conn.clone(),
                self.slot.clone(),
                self.topic.clone(),
            );
            tokio::spawn(async move {
                replay(&inner, &conn, &slot, &topic, Position::new(since), None).await;
            })
        }

        /// Publishes event `n` live without a position (a publisher without a store): it is
        /// not in the log.
        fn publish_without_position(&self, n: u64) {
            let record = cqrs_core::testing::event_store::record(n);
            let routed = OneTopic.route(&record).unwrap();
            self.inner.registry.dispatch(
                "t",
                &AtomicBool::new(false),
                &PushedEvent::new(routed, None).unwrap(),
            );
        }

        /// Drains the send queue until the replay ends, then returns each frame's `n`.
        async fn drain(&self, replay: JoinHandle<()>) -> Vec<u64> {
            self.drain_marked(replay)
                .await
                .into_iter()
                .map(|n| n.expect("an event frame"))
                .collect()
        }

        /// Like [`drain`](Self::drain), with `None` for an `events_missed` frame.
        async fn drain_marked(&self, replay: JoinHandle<()>) -> Vec<Option<u64>> {
            self.drain_all(replay)
                .await
                .into_iter()
                .map(|frame| match frame.parse() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        assert_eq!(frame, "events_missed");
                        None
                    }
                })
                .collect()
        }

        /// Every frame queued until `replay` ends, as the event's `n` or the error's code.
        async fn drain_all(&self, replay: JoinHandle<()>) -> Vec<String> {
            let mut got = Vec::new();
            let mut replay = std::pin::pin!(replay);
            loop {
                tokio::select! {
                    item = self.conn.queue.pop() => got.push(item),
                    done = &mut replay => {
                        done.unwrap();
                        break;
                    }
                }
            }
            while let Some(item) = self.conn.queue.try_pop() {
                got.push(item);
            }
            got.into_iter().map(label).collect()
        }

        /// After the replay: live, a later event is queued directly, once.
        async fn assert_live(&self) {
            let later = self.store(1000).await;
            self.publish(&later);
            assert!(matches!(
                self.conn.queue.try_pop(),
                Some(Outgoing::Frame(_))
            ));
            assert!(self.conn.queue.try_pop().is_none());
        }
    }

    /// A queued frame as the event's `n` or the error's code.
    fn label(item: Outgoing) -> String {
        match item {
            Outgoing::Frame(frame) => {
                let frame: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
                match frame["event"]["n"].as_u64() {
                    Some(n) => n.to_string(),
                    None => frame["code"].as_str().unwrap().to_owned(),
                }
            }
            Outgoing::Ping => panic!("a ping"),
        }
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::task::yield_now().await;
        }
    }

    /// A client that takes a frame now and then, never idle as long as the idle timeout,
    /// paced its replay for as long as it liked, the frames queued for it (built for it
    /// alone) held all that time: past eight idle timeouts the replay closes it as slow.
    #[tokio::test(start_paused = true)]
    async fn a_replay_paced_by_a_trickling_client_ends_at_its_deadline() {
        let options = HubOptions::new()
            .ping_interval(Duration::from_millis(250))
            .idle_timeout(Duration::from_secs(1))
            .replay_batch(10);
        let f = Fixture::new(options, 4, 64);
        for n in 1..=200 {
            f.store(n).await;
        }
        let started = Instant::now();
        let replay = f.replay(0);
        // A frame every 200 ms: 200 events would take 40 s.
        let mut taken = 0;
        while !replay.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if f.conn.queue.try_pop().is_some() {
                taken += 1;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "still replaying"
            );
        }
        assert_eq!(f.conn.close.get(), Some(crate::signal::Ending::SLOW));
        assert!(
            (8..10).contains(&started.elapsed().as_secs()),
            "at eight idle timeouts: {:?}",
            started.elapsed()
        );
        assert!(taken < 200, "closed part way ({taken} taken)");
    }

    /// An `events_missed` that finds the send queue full is not sent (the client is closed as
    /// slow instead): it is not counted among the subscriptions told, which the upstream
    /// dispatcher adds to `missed_notices` ("frames queued").
    #[tokio::test]
    async fn a_missed_notice_that_finds_the_queue_full_is_not_counted() {
        let f = Fixture::new(HubOptions::new(), 1, 64);
        f.conn.push(Utf8Bytes::from_static("{}"));
        let told = f.inner.registry.missed("t", &AtomicBool::new(false));
        assert_eq!(told, 0, "nothing was queued");
        assert_eq!(f.inner.metrics.snapshot().slow_client_closes, 1);
        // With room, it is queued and counted.
        let f = Fixture::new(HubOptions::new(), 1, 64);
        let told = f.inner.registry.missed("t", &AtomicBool::new(false));
        assert_eq!(told, 1);
        assert!(f.conn.queue.try_pop().is_some());
    }

    /// A replay whose first read fails, before any read showed `since` is in the log, goes
    /// live from the start: with `since` past the end of a reset log, going live there
    /// dropped every live event up to it, after a `resume_failed` that says live events
    /// follow.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_failing_before_its_first_read_drops_no_live_event() {
        let f = Fixture::new(HubOptions::new(), 64, 64);
        for n in 1..=3 {
            f.store(n).await;
        }
        f.store.failing.store(1, Ordering::SeqCst);
        f.replay(5000).await.unwrap();
        let Some(Outgoing::Frame(frame)) = f.conn.queue.try_pop() else {
            panic!("no frame after the failed replay");
        };
        let frame: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(frame["code"], "resume_failed", "{frame}");
        let message = frame["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("unavailable") && message.contains("reload the state over HTTP"),
            "says what failed and what to do: {frame}"
        );
        assert!(f.conn.queue.try_pop().is_none());
        let fourth = f.store(4).await;
        f.publish(&fourth);
        assert!(
            matches!(f.conn.queue.try_pop(), Some(Outgoing::Frame(_))),
            "the live event at position 4 was dropped as covered by `since` 5000"
        );
    }

    /// A replay of 30 events (one read) to a queue of 8, waiting for room once it queued 6
    /// (two at a time while half the queue is free): the fixture, the replay, and the reads
    /// the store served until then.
    async fn replay_waiting_for_room() -> (Fixture, JoinHandle<()>) {
        let f = Fixture::new(HubOptions::new().replay_batch(100), 8, 64);
        for n in 1..=30 {
            f.store(n).await;
        }
        let replay = f.replay(0);
        // Waiting: its permit let go.
        let permits = f.inner.options.max_concurrent_replays;
        until("the replay to wait for room", || {
            f.conn.queue.len() == 6 && f.inner.replays.available_permits() == permits
        })
        .await;
        assert_eq!(*f.store.reads.lock().unwrap(), [Position::START]);
        (f, replay)
    }

    /// A replay whose client takes no frames for a probe (a second) keeps no more of the
    /// batch it read than the frame that waits: it reads the rest again after it. It held
    /// the whole batch (with the permit let go, for as long as the client took), so every
    /// stalled replay kept one, and `max_concurrent_replays` bounded the store's reads, not
    /// the memory.
    #[tokio::test(start_paused = true)]
    async fn a_replay_whose_client_stalls_keeps_only_the_frame_that_waits() {
        let (f, replay) = replay_waiting_for_room().await;
        tokio::time::sleep(STARVATION_PROBE * 2).await;
        assert_eq!(f.drain(replay).await, (1..=30).collect::<Vec<_>>());
        let reads = f.store.reads.lock().unwrap().clone();
        assert_eq!(
            reads.get(1),
            Some(&Position::new(7)),
            "read again after the frame that waited (7): {reads:?}"
        );
    }

    /// A client that takes frames as they come keeps its replay's batch: one read, not one
    /// per wait for room.
    #[tokio::test(start_paused = true)]
    async fn a_replay_whose_client_reads_on_keeps_its_batch() {
        let (f, replay) = replay_waiting_for_room().await;
        assert_eq!(f.drain(replay).await, (1..=30).collect::<Vec<_>>());
        let reads = f.store.reads.lock().unwrap().clone();
        assert_eq!(reads, [Position::START], "one read");
    }

    /// A replay at its seam with a live event dropped from the full hold buffer: 1-3 read, 4
    /// and 5 held and taken by the seam, which waits for room (1-3 fill the queue, nothing
    /// drains it), while 6 and 7 are held and 8 is dropped.
    async fn overflowing_seam() -> (Fixture, JoinHandle<()>) {
        // Four frames: the replay waits for two free slots once it has used its share.
        let f = Fixture::new(HubOptions::new().replay_batch(100), 4, 2);
        // 1-3 are read; 4 and 5 are stored after the read and published: held.
        f.store.visible.store(3, Ordering::SeqCst);
        let mut stored = Vec::new();
        for n in 1..=5 {
            stored.push(f.store(n).await);
        }
        f.publish(&stored[3]);
        f.publish(&stored[4]);
        let replay = f.replay(0);
        until("the seam to take the held events", || {
            f.slot.lock().frames.is_empty()
        })
        .await;
        // 6-8 arrive meanwhile: the buffer takes two and drops 8.
        f.store.visible.store(u64::MAX, Ordering::SeqCst);
        for n in 6..=8 {
            stored.push(f.store(n).await);
        }
        for record in &stored[5..] {
            f.publish(record);
        }
        assert_eq!(f.slot.lock().dropped, stored[7].position);
        (f, replay)
    }

    /// Live events overflow the hold buffer while the held ones are being flushed at the
    /// seam (the replay waits there for room in the send queue): the dropped ones are read
    /// back from the store, and every event arrives once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overflow_during_the_seam_is_read_back() {
        let (f, replay) = overflowing_seam().await;
        assert_eq!(f.drain(replay).await, [1, 2, 3, 4, 5, 6, 7, 8]);
        f.assert_live().await;
    }

    /// What [`overflowing_seam`]'s client gets when the dropped event is not read back: the
    /// events before it, `resume_failed`, then `events_missed` where it was.
    const SEAM_WITH_THE_DROP_LOST: [&str; 9] = [
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "resume_failed",
        "events_missed",
    ];

    /// As above, but the read that would get the dropped event back fails: the client is told
    /// `resume_failed`, then `events_missed` for the one dropped. The drop's mark was taken
    /// by the seam that asked for the read back, so nothing told the client of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drop_whose_read_back_fails_is_told() {
        let (f, replay) = overflowing_seam().await;
        // The read back, the next read, fails.
        f.store.failing.store(1, Ordering::SeqCst);
        let frames = f.drain_all(replay).await;
        assert_eq!(frames, SEAM_WITH_THE_DROP_LOST);
    }

    /// A live event that arrives after a drop, while the read that would get the dropped one
    /// back runs and then fails: `events_missed` comes straight after `resume_failed`, before
    /// it. It came after the held event, so the client, resuming from its last event before
    /// the notice (9), never got the dropped 8 back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drop_whose_read_back_fails_is_told_before_later_live_events() {
        let (f, replay) = overflowing_seam().await;
        f.store.gated.store(true, Ordering::SeqCst);
        f.store.failing.store(1, Ordering::SeqCst);
        let mut frames = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.store.waiting.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the read back"
            );
            frames.extend(std::iter::from_fn(|| f.conn.queue.try_pop()));
            tokio::task::yield_now().await;
        }
        // What the replay queued just before its read began; nothing is queued while it waits.
        frames.extend(std::iter::from_fn(|| f.conn.queue.try_pop()));
        let sent: Vec<String> = frames.into_iter().map(label).collect();
        assert_eq!(
            sent,
            ["1", "2", "3", "4", "5", "6", "7"],
            "before the read back"
        );
        let ninth = f.store(9).await;
        f.publish(&ninth);
        f.store.gate.add_permits(1);
        assert_eq!(
            f.drain_all(replay).await,
            ["resume_failed", "events_missed", "9"]
        );
        assert_eq!(f.inner.metrics.snapshot().missed_notices, 1);
        f.assert_live().await;
    }

    /// The dropped event is one the log never gives back (a live position it does not hold):
    /// read to its end, the replay fails and tells `events_missed` for it, rather than going
    /// live over the gap. (It went live without a word: the read back's mark was taken.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drop_the_log_never_gives_back_is_told() {
        let (f, replay) = overflowing_seam().await;
        f.store.visible.store(7, Ordering::SeqCst);
        let frames = f.drain_all(replay).await;
        assert_eq!(frames, SEAM_WITH_THE_DROP_LOST);
    }

    /// However small the send queue, the replay never takes its last free slot, which the
    /// next live event would find gone and close a reading client as slow for: with two slots
    /// and a client that takes nothing, it queues one event and waits (then closes the client
    /// as slow, after the idle timeout), where it used to fill the queue.
    #[tokio::test(start_paused = true)]
    async fn a_replay_never_takes_the_last_slot_of_a_small_queue() {
        let f = Fixture::new(HubOptions::new(), 2, 64);
        for n in 1..=2 {
            f.store(n).await;
        }
        f.replay(0).await.unwrap();
        let mut queued = 0;
        while f.conn.queue.try_pop().is_some() {
            queued += 1;
        }
        assert_eq!(queued, 1, "the replay filled the queue");
        assert_eq!(f.conn.close.get(), Some(crate::signal::Ending::SLOW));
    }

    /// Live events the log does not hold keep overflowing the hold buffer while the replay
    /// reads: each read found a new drop to read back, and the replay read the log for as
    /// long as they came. A drop known before a read that reached the log's end without it
    /// now fails the replay at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drops_the_log_never_gives_back_end_the_replay_while_they_keep_coming() {
        const PUBLISHES: usize = 100_000;
        let f = Fixture::new(HubOptions::new(), 4096, 2);
        f.store.visible.store(3, Ordering::SeqCst);
        // Live events come faster than the log answers a read: each read ends with a new drop.
        f.store.slow.store(true, Ordering::SeqCst);
        let mut stored = Vec::new();
        for n in 1..=8 {
            stored.push(f.store(n).await);
        }
        // A drop before the replay starts (two held, one dropped), so that it has one to read
        // back however late this thread publishes the others.
        for record in &stored[3..6] {
            f.publish(record);
        }
        assert!(f.slot.lock().dropped.is_some());
        let replay = f.replay(0);
        let mut published = 0;
        while !replay.is_finished() && published < PUBLISHES {
            f.publish(&stored[3 + published % 5]);
            published += 1;
            tokio::task::yield_now().await;
        }
        assert!(
            published < PUBLISHES,
            "the replay still read the log after {PUBLISHES} live events"
        );
        let frames = f.drain_all(replay).await;
        assert!(frames.contains(&"resume_failed".to_owned()), "{frames:?}");
    }

    /// A live event without a position is dropped from the full hold buffer: it cannot be
    /// read back, so `events_missed` is queued where it was lost, after the events held
    /// before it and before one that arrived after it (while the seam waited for room).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_event_without_a_position_is_told_where_it_was_lost() {
        let f = Fixture::new(HubOptions::new().replay_batch(100), 4, 2);
        for n in 1..=3 {
            f.store(n).await;
        }
        // 10 and 11 are held; 12 is dropped, and cannot be read back.
        for n in 10..=12 {
            f.publish_without_position(n);
        }
        let replay = f.replay(0);
        // The seam took 10, 11 and the loss, and waits for room: 1-3 fill the queue.
        until("the seam to take the held events", || {
            f.slot.lock().frames.is_empty()
        })
        .await;
        // 13 arrives after the loss: held, and flushed after the notice.
        f.publish_without_position(13);
        assert_eq!(
            f.drain_marked(replay).await,
            [
                Some(1),
                Some(2),
                Some(3),
                Some(10),
                Some(11),
                None,
                Some(13)
            ]
        );
        assert_eq!(f.inner.metrics.snapshot().missed_notices, 1);
        f.assert_live().await;
    }

    /// A resume from the head of the log: the first read ran before three events were
    /// stored, and they overflow the hold buffer. The read came back empty, yet the dropped
    /// event is read back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overflow_during_an_empty_read_is_read_back() {
        let f = Fixture::new(HubOptions::new().replay_batch(100), 16, 2);
        f.store.blind.store(1, Ordering::SeqCst);
        let mut stored = Vec::new();
        for n in 1..=3 {
            stored.push(f.store(n).await);
        }
        for record in &stored {
            f.publish(record);
        }
        assert_eq!(f.slot.lock().dropped, stored[2].position);
        let replay = f.replay(0);
        assert_eq!(f.drain(replay).await, [1, 2, 3]);
        f.assert_live().await;
    }

    /// A client that takes nothing while its replay waits for room is closed as slow after
    /// the idle timeout, instead of holding its connection (and the replay) until shutdown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_to_a_client_that_stopped_reading_closes_it_as_slow() {
        let f = Fixture::new(
            HubOptions::new()
                .ping_interval(Duration::from_millis(50))
                .idle_timeout(Duration::from_millis(200)),
            4,
            2,
        );
        for n in 1..=10 {
            f.store(n).await;
        }
        tokio::time::timeout(Duration::from_secs(10), f.replay(0))
            .await
            .expect("the replay gives up on the stalled client")
            .unwrap();
        assert_eq!(f.conn.close.get(), Some(Ending::SLOW));
        assert!(f.slot.lock().frames.is_empty());
    }

    /// And after the idle timeout itself, though its replay first waits one probe keeping its
    /// batch: that probe counts toward the stall (the wait after it counted from zero, and the
    /// client was closed one probe late).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stopped_reading_is_closed_after_the_idle_timeout() {
        let idle = Duration::from_secs(1);
        let options = HubOptions::new()
            .ping_interval(Duration::from_millis(250))
            .idle_timeout(idle);
        let f = Fixture::new(options, 4, 2);
        for n in 1..=10 {
            f.store(n).await;
        }
        let started = tokio::time::Instant::now();
        f.replay(0).await.unwrap();
        assert_eq!(f.conn.close.get(), Some(Ending::SLOW));
        let took = started.elapsed();
        assert!(
            took >= idle && took < idle + idle / 4,
            "closed after {took:?}"
        );
    }

    /// A replay that fails (one event may be replayed, three are stored) with events 1 to 8
    /// stored, 4 and 5 held live, and its flush of them waiting for room: 1, the failure and
    /// 4 fill the queue.
    async fn flushing_after_a_failed_resume() -> (Fixture, Vec<EventRecord>, JoinHandle<()>) {
        let options = HubOptions::new().replay_batch(1).replay_limit(1);
        let f = Fixture::new(options, 4, 2);
        let mut stored = Vec::new();
        for n in 1..=8 {
            stored.push(f.store(n).await);
        }
        f.store.visible.store(3, Ordering::SeqCst);
        f.publish(&stored[3]);
        f.publish(&stored[4]);
        let replay = f.replay(0);
        until("the flush to take the held events", || {
            f.slot.lock().frames.is_empty()
        })
        .await;
        (f, stored, replay)
    }

    /// After `resume_failed` the held events are flushed without reading the store again: live
    /// events dropped from the full buffer meanwhile are told as `events_missed` after the
    /// events held before them, not lost without a word.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_dropped_while_flushing_after_a_failed_resume_are_told() {
        let (f, stored, replay) = flushing_after_a_failed_resume().await;
        // 6 and 7 are held; 8 is dropped from the full buffer.
        for record in &stored[5..] {
            f.publish(record);
        }
        assert!(f.slot.lock().dropped.is_some());
        assert_eq!(
            f.drain_all(replay).await,
            ["1", "resume_failed", "4", "5", "6", "7", "events_missed"]
        );
        assert_eq!(f.inner.metrics.snapshot().missed_notices, 1);
        f.assert_live().await;
    }

    /// After `resume_failed`, a live event dropped from the full buffer that the replay had
    /// already sent (at or below its cursor: a late copy) is no loss: no `events_missed`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_copy_of_a_replayed_event_is_no_loss_after_a_failed_resume() {
        let (f, stored, replay) = flushing_after_a_failed_resume().await;
        // 6 and 7 are held; a late copy of 1, which the replay sent, is dropped.
        f.publish(&stored[5]);
        f.publish(&stored[6]);
        f.publish(&stored[0]);
        assert_eq!(f.slot.lock().dropped, stored[0].position);
        assert_eq!(
            f.drain_all(replay).await,
            ["1", "resume_failed", "4", "5", "6", "7"]
        );
        assert_eq!(f.inner.metrics.snapshot().missed_notices, 0);
        f.assert_live().await;
    }

    /// Live events that keep coming as fast as the client takes them would keep the seam's
    /// buffer from ever being empty: after `MAX_FLUSH_ROUNDS` batches, what is held is queued
    /// at once and the subscription goes live; here the queue has no room for it, so the
    /// client is closed as slow, as a live push would close it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_seam_that_never_empties_ends_after_its_rounds() {
        let f = Fixture::new(HubOptions::new(), 1, 16);
        // The queue is full: the seam waits for room for each event it flushes.
        assert!(f.conn.queue.try_push(Outgoing::Ping).is_ok());
        // The store shows the replay nothing: every event comes live.
        f.store.visible.store(0, Ordering::SeqCst);
        let first = f.store(1).await;
        f.publish(&first);
        let replay = f.replay(0);
        let mut n = 1;
        let mut taken = Vec::new();
        while n < 4 * MAX_FLUSH_ROUNDS as u64 {
            // The seam took what was held and waits for room, or queued it at once and found
            // no room: the client is closed as slow (the replay may not have ended yet).
            until("the seam to take the held event", || {
                f.slot.lock().frames.is_empty() || f.conn.close.get().is_some()
            })
            .await;
            if f.conn.close.get().is_some() {
                break;
            }
            // Another event arrives before the client takes the next frame.
            n += 1;
            let record = f.store(n).await;
            f.publish(&record);
            taken.push(f.conn.queue.pop().await);
        }
        assert_eq!(
            f.conn.close.get(),
            Some(Ending::SLOW),
            "the seam still flushes after {n} events"
        );
        replay.await.unwrap();
        // Live now, and closed: once the client took what was queued, an event after the one
        // that found no room is not queued in the room made.
        taken.extend(std::iter::from_fn(|| f.conn.queue.try_pop()));
        let later = f.store(n + 1).await;
        f.publish(&later);
        assert!(f.conn.queue.try_pop().is_none(), "queued after a gap");
        let events = taken
            .iter()
            .filter_map(|item| match item {
                Outgoing::Frame(frame) => {
                    let frame: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
                    frame["event"]["n"].as_u64()
                }
                Outgoing::Ping => None,
            })
            .collect::<Vec<_>>();
        assert_eq!(
            events,
            (1..=events.len() as u64).collect::<Vec<_>>(),
            "in order, once"
        );
        assert!(events.len() >= MAX_FLUSH_ROUNDS - 2, "{}", events.len());
    }

    /// A live event of another subscription of the connection, as the fan-out pushes it.
    fn live() -> Utf8Bytes {
        Utf8Bytes::from(r#"{"type":"event","live":true}"#)
    }

    /// A replay of 20 stored events into a send queue of 8 that live traffic filled first.
    async fn replay_into_a_full_queue(options: HubOptions) -> (Fixture, JoinHandle<()>) {
        let f = Fixture::new(options, 8, 2);
        for n in 1..=20 {
            f.store(n).await;
        }
        for _ in 0..8 {
            f.conn.push(live());
        }
        let replay = f.replay(0);
        (f, replay)
    }

    /// Waits for `replay` to end and takes what is left in the queue: the client, never
    /// closed, got the 20 events in order.
    async fn all_twenty_arrived(f: &Fixture, replay: JoinHandle<()>, mut events: Vec<u64>) {
        replay.await.unwrap();
        while let Some(item) = f.conn.queue.try_pop() {
            take(item, &mut events);
        }
        assert_eq!(f.conn.close.get(), None, "closed as slow");
        assert_eq!(events, (1..=20).collect::<Vec<_>>());
    }

    /// Notes the number of the event `item` carries, if it is an event frame (not a live
    /// filler or a ping).
    fn take(item: Outgoing, events: &mut Vec<u64>) {
        if let Outgoing::Frame(frame) = item {
            let frame: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
            if let Some(n) = frame["event"]["n"].as_u64() {
                events.push(n);
            }
        }
    }

    /// A client that takes frames all along, while live traffic on its other subscriptions
    /// keeps more than half its queue full, is not closed as slow by a replay that waits for
    /// half the queue: the replay takes single free slots instead, for the rest of the replay
    /// (not one idle timeout per frame), and finishes; and it never takes the last free slot,
    /// so the live traffic (which closes a client whose queue it finds full) still fits.
    // Paused time: the client's pace and the replay's probes are the test's, not the
    // machine's (a descheduled thread could look like a client that stopped reading).
    #[tokio::test(start_paused = true)]
    async fn a_replay_beside_busy_live_traffic_to_a_reading_client_finishes() {
        let started = Instant::now();
        let (f, replay) = replay_into_a_full_queue(
            HubOptions::new()
                .ping_interval(Duration::from_millis(50))
                .idle_timeout(Duration::from_millis(200)),
        )
        .await;
        // The client takes a frame every 10 ms. Live traffic, pushed as the fan-out does (a
        // full queue closes the client), takes every slot the client frees for 300 ms, past
        // the idle timeout (the replay finds itself starved), then every other one.
        let mut events = Vec::new();
        for round in 0.. {
            if replay.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Some(item) = f.conn.queue.try_pop() {
                take(item, &mut events);
            }
            if round < 30 || round % 2 == 0 {
                f.conn.push(live());
            }
            assert!(
                f.conn.close.get().is_none(),
                "closed: {:?}",
                f.conn.close.get()
            );
        }
        // One idle timeout (200 ms) to find the client starved, not one per frame (4 s).
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        all_twenty_arrived(&f, replay, events).await;
    }

    /// With the default idle timeout (75 s) and live traffic that keeps the queue all but
    /// full while the client takes a frame every 10 ms: the replay finds itself starved
    /// within a probe of at most a second, not after the whole idle timeout, during which it
    /// sent nothing and its connection answered no client frame.
    // Paused time: the client's pace and the replay's probes are the test's, not the
    // machine's (a descheduled thread could look like a client that stopped reading).
    #[tokio::test(start_paused = true)]
    async fn a_replay_starved_by_live_traffic_is_found_so_within_a_second() {
        let options = HubOptions::new();
        assert_eq!(options.idle_timeout, Duration::from_secs(75));
        let started = Instant::now();
        let (f, replay) = replay_into_a_full_queue(options).await;
        let mut events = Vec::new();
        while !replay.is_finished() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the replay still waits for half the queue; it sent {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Some(item) = f.conn.queue.try_pop() {
                take(item, &mut events);
            }
            // Live traffic leaves at most two slots free: never half the queue.
            while f.conn.queue.capacity() - f.conn.queue.len() > 2 {
                f.conn.push(live());
            }
            assert_eq!(f.conn.close.get(), None, "closed");
        }
        all_twenty_arrived(&f, replay, events).await;
    }

    /// A client that reads slowly, with no live traffic, takes fewer frames in a probe than
    /// the replay waits to be free: it is slow, not starved, so the replay goes on waiting for
    /// half the queue and never fills it past three quarters, leaving room for live events.
    /// (Found starved by any progress, the replay filled all but the last slot.) The probe is
    /// 500 ms; the client takes a frame every 350 ms, so a probe sees one taken where the
    /// replay waits for two.
    // Paused time: the client's pace and the replay's probes are the test's, not the
    // machine's (a descheduled thread could look like a client that stopped reading).
    #[tokio::test(start_paused = true)]
    async fn a_slow_client_without_live_traffic_is_not_taken_for_starved() {
        let options = HubOptions::new()
            .ping_interval(Duration::from_secs(1))
            .idle_timeout(Duration::from_secs(2));
        let f = Fixture::new(options, 8, 2);
        for n in 1..=10 {
            f.store(n).await;
        }
        let replay = f.replay(0);
        let (mut events, mut fullest) = (Vec::new(), 0);
        while !replay.is_finished() || f.conn.queue.len() > 0 {
            fullest = fullest.max(f.conn.queue.len());
            tokio::time::sleep(Duration::from_millis(350)).await;
            fullest = fullest.max(f.conn.queue.len());
            if let Some(item) = f.conn.queue.try_pop() {
                take(item, &mut events);
            }
        }
        replay.await.unwrap();
        assert_eq!(f.conn.close.get(), None, "closed as slow");
        assert_eq!(events, (1..=10).collect::<Vec<_>>());
        assert!(fullest <= 6, "the replay filled {fullest} of 8 slots");
    }
}
