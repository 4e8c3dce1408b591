//! The hub's subscriptions to pub/sub channels: one per channel in use, whatever the number of
//! topics and connections, each with a task that dispatches its messages.

use crate::PushedEvent;
use crate::metrics::Metrics;
use crate::registry::Registry;
use cqrs_core::Position;
use cqrs_core::ports::{PubSub, Subscription, TransportError};
use cqrs_core::runtime::Shutdown;
use futures_util::FutureExt;
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;

/// The hub's live subscription to one channel.
struct Live {
    /// Receives the channel and dispatches; aborting it drops the pub/sub subscription.
    task: JoinHandle<()>,
    /// Set when the last reference goes. An abort takes effect only when the task next
    /// yields, and a receiver with messages queued does not yield for a while: without the
    /// flag, the old task could dispatch an event that a new subscription of the same
    /// channel dispatches too.
    stopped: Arc<AtomicBool>,
}

/// One channel's state, behind a lock of its own: a slow upstream subscribe holds up the
/// subscribers of its channel only, not every other channel's subscribes and releases.
#[derive(Default)]
struct ChannelState {
    /// Subscriptions (over every connection) on topics of this channel.
    refs: usize,
    live: Option<Live>,
    /// Taken out of the map (its last reference went and its linger passed): an `acquire`
    /// that found it there before must look the channel up again.
    removed: bool,
    /// With no reference left, the task that ends the subscription once the linger has
    /// passed; a new reference within it cancels it.
    linger: Option<JoinHandle<()>>,
    /// Counts the times the last reference went: a linger acts only on its own.
    idle_epoch: u64,
}

type Channel = Arc<tokio::sync::Mutex<ChannelState>>;

pub(crate) struct Upstreams<P> {
    pubsub: Arc<dyn PubSub>,
    prefix: String,
    registry: Arc<Registry<P>>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    /// How long a channel stays subscribed after its last reference went.
    linger: Duration,
    /// How many channels may linger at once; past it, one whose last reference goes is
    /// unsubscribed at once.
    max_lingering: usize,
    /// The hub's shutdown: from then on nothing lingers.
    stopped: Shutdown,
}

/// What a channel's linger task needs once the reference that started it is gone.
#[derive(Default)]
struct Shared {
    /// Held only to look a channel up (a std mutex: never across an await).
    channels: std::sync::Mutex<HashMap<String, Channel>>,
    live: AtomicUsize,
    /// Channels within their linger (with a linger task).
    lingering: AtomicUsize,
    /// How many pump tasks exist: each holds its channel's upstream subscription until the
    /// runtime drops it, which for an aborted one comes a moment after the abort.
    /// `end_lingering` waits for none to be left.
    pumps: tokio::sync::watch::Sender<usize>,
}

/// Counts a pump task for as long as its future exists (run, aborted or finished).
struct PumpAlive(tokio::sync::watch::Sender<usize>);

impl PumpAlive {
    fn new(pumps: &tokio::sync::watch::Sender<usize>) -> Self {
        pumps.send_modify(|n| *n += 1);
        Self(pumps.clone())
    }
}

impl Drop for PumpAlive {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl<P: Send + Sync + 'static> Upstreams<P> {
    /// `linger`: how long a channel whose last subscription went stays subscribed upstream,
    /// for the next subscriber to reuse; none once `stopped` is requested.
    pub(crate) fn new(
        pubsub: Arc<dyn PubSub>,
        prefix: String,
        registry: Arc<Registry<P>>,
        metrics: Arc<Metrics>,
        linger: Duration,
        max_lingering: usize,
        stopped: Shutdown,
    ) -> Self {
        Self {
            pubsub,
            prefix,
            registry,
            metrics,
            shared: Arc::default(),
            linger,
            max_lingering,
            stopped,
        }
    }

    /// Takes a reference on `channel`, subscribing upstream first when it is the first one (a
    /// second subscriber of the channel waits until the first made it live, then shares it).
    /// Returns once the upstream subscription is live. Cancel-safe: nothing is recorded until
    /// the subscription succeeded.
    pub(crate) async fn acquire(&self, channel: &str) -> Result<(), TransportError> {
        loop {
            let slot = self
                .shared
                .map()
                .entry(channel.to_owned())
                .or_default()
                .clone();
            // Cancelled while it waits for the lock (even an uncontended lock can make the
            // task yield, when its budget is spent), the slot it may have just put in the map
            // must not stay there empty.
            let mut waiting = Waiting {
                upstreams: self,
                channel,
                slot: &slot,
                locked: false,
            };
            let locked = slot.clone().lock_owned().await;
            waiting.locked = true;
            let mut state = Pending {
                state: locked,
                upstreams: self,
                channel,
                slot: &slot,
            };
            if state.removed {
                continue;
            }
            if state.live.is_some() {
                // Within its linger: reused, and kept.
                if let Some(linger) = self.shared.take_linger(&mut state) {
                    linger.abort();
                }
                state.refs += 1;
                return Ok(());
            }
            let full = format!("{}{channel}", self.prefix);
            // Failed or cancelled here, `Pending` takes the still empty slot out of the map.
            let subscription = self.pubsub.subscribe(&full).await?;
            tracing::debug!(channel = %full, "realtime hub subscribed upstream");
            let stopped = Arc::new(AtomicBool::new(false));
            let alive = PumpAlive::new(&self.shared.pumps);
            let pumping = pump(
                subscription,
                self.pubsub.clone(),
                full,
                channel.to_owned(),
                self.registry.clone(),
                self.metrics.clone(),
                stopped.clone(),
            );
            let task = tokio::spawn(async move {
                let _alive = alive;
                pumping.await;
            });
            state.live = Some(Live { task, stopped });
            state.refs = 1;
            self.shared.live.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
    }

    /// Drops a reference on `channel`. After the last one the channel stays subscribed
    /// upstream for the linger (a client looping over `subscribe` / `unsubscribe` does not
    /// make an upstream round trip per loop), then unsubscribes; at once with no linger, or
    /// once the hub is stopping.
    pub(crate) async fn release(&self, channel: &str) {
        let Some(slot) = self.shared.map().get(channel).cloned() else {
            return;
        };
        let mut state = slot.lock().await;
        if state.refs == 0 {
            return;
        }
        state.refs -= 1;
        if state.refs > 0 {
            return;
        }
        // The lingering place is taken last (in one step, so releases racing for the last
        // one get it once), and only when the channel may linger at all.
        if self.linger.is_zero()
            || self.stopped.is_requested()
            || !self.shared.take_lingering_place(self.max_lingering)
        {
            // The task ends by itself once aborted (`end_lingering` waits for it).
            self.shared.unsubscribe(&mut state, channel, &slot);
            return;
        }
        state.idle_epoch += 1;
        state.linger = Some(tokio::spawn(linger(
            self.shared.clone(),
            self.stopped.clone(),
            channel.to_owned(),
            slot.clone(),
            state.idle_epoch,
            self.linger,
        )));
    }

    /// Ends, now, the upstream subscription of every channel that no one holds (those within
    /// their linger): for a hub that stopped, whose `closed()` must leave none behind. Returns
    /// once no channel's task is left, and with them the subscriptions they held (an aborted
    /// task is dropped, subscription included, by the runtime a moment later): those ended
    /// here, those whose last subscription was released while the hub stopped, and those a
    /// connection that ended by a panic still releases on a task of its own. Any number of
    /// callers wait alike.
    pub(crate) async fn end_lingering(&self) {
        for (channel, slot) in self.shared.slots() {
            let mut state = slot.lock().await;
            if state.refs == 0 && !state.removed {
                self.shared.unsubscribe(&mut state, &channel, &slot);
            }
        }
        let mut pumps = self.shared.pumps.subscribe();
        // The sender lives in `shared`, which `self` holds: the wait cannot fail.
        let _ = pumps.wait_for(|alive| *alive == 0).await;
    }

    /// How many channels the hub is subscribed to (lingering ones included).
    pub(crate) async fn len(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }
}

/// A hub dropped without a shutdown: no one can hold a channel any more, and a linger task
/// (whose shutdown signal can no longer come) must not keep its channel subscribed upstream
/// for the rest of its linger.
impl<P> Drop for Upstreams<P> {
    fn drop(&mut self) {
        for (channel, slot) in self.shared.slots() {
            // Held only by a linger task that is ending its channel already.
            if let Ok(mut state) = slot.try_lock() {
                self.shared.unsubscribe(&mut state, &channel, &slot);
            }
        }
    }
}

impl Shared {
    /// Every channel in the map, looked up under the map's lock and returned without it.
    fn slots(&self) -> Vec<(String, Channel)> {
        self.map()
            .iter()
            .map(|(channel, slot)| (channel.clone(), slot.clone()))
            .collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `slot` out of the map, unless another already replaced it.
    fn forget(&self, channel: &str, slot: &Channel) {
        let mut map = self.map();
        if map.get(channel).is_some_and(|c| Arc::ptr_eq(c, slot)) {
            map.remove(channel);
        }
    }

    /// Takes `slot` out of the map if no one uses it: not live, no reference, not taken out
    /// already (an `acquire` that failed or was cancelled before it made the channel live).
    fn forget_if_unused(&self, state: &mut ChannelState, channel: &str, slot: &Channel) {
        if state.live.is_none() && state.refs == 0 && !state.removed {
            state.removed = true;
            self.forget(channel, slot);
        }
    }

    /// Counts one more lingering channel, unless `max` already linger.
    fn take_lingering_place(&self, max: usize) -> bool {
        self.lingering
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Takes the channel's linger task out, uncounting it: the channel no longer lingers.
    fn take_linger(&self, state: &mut ChannelState) -> Option<JoinHandle<()>> {
        let linger = state.linger.take();
        if linger.is_some() {
            self.lingering.fetch_sub(1, Ordering::SeqCst);
        }
        linger
    }

    /// Ends `channel`'s upstream subscription (its pump task aborted: gone, and its
    /// subscription with it, once the runtime drops it) and takes it out of the map.
    fn unsubscribe(&self, state: &mut ChannelState, channel: &str, slot: &Channel) {
        if let Some(linger) = self.take_linger(state) {
            linger.abort();
        }
        if let Some(live) = state.live.take() {
            live.stopped.store(true, Ordering::SeqCst);
            live.task.abort();
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
        state.removed = true;
        self.forget(channel, slot);
    }
}

/// Unsubscribes `channel` once `after` has passed (or the hub stops first), unless it was
/// taken again meanwhile (`epoch` is no longer the channel's).
async fn linger(
    shared: Arc<Shared>,
    stopped: Shutdown,
    channel: String,
    slot: Channel,
    epoch: u64,
    after: Duration,
) {
    tokio::select! {
        () = tokio::time::sleep(after) => {}
        () = stopped.requested() => {}
    }
    let mut state = slot.lock().await;
    if state.refs == 0 && state.idle_epoch == epoch && !state.removed {
        // Not this task's own handle to abort: it is ending anyway.
        drop(shared.take_linger(&mut state));
        shared.unsubscribe(&mut state, &channel, &slot);
    }
}

/// A channel's state, locked by an `acquire`. Dropped without a live subscription and with no
/// reference (the subscribe failed, or the `acquire` was cancelled while it waited), it takes
/// the empty slot out of the map, so a channel that never became live leaves nothing behind.
struct Pending<'a, P> {
    state: tokio::sync::OwnedMutexGuard<ChannelState>,
    upstreams: &'a Upstreams<P>,
    channel: &'a str,
    slot: &'a Channel,
}

impl<P> std::ops::Deref for Pending<'_, P> {
    type Target = ChannelState;

    fn deref(&self) -> &ChannelState {
        &self.state
    }
}

impl<P> std::ops::DerefMut for Pending<'_, P> {
    fn deref_mut(&mut self) -> &mut ChannelState {
        &mut self.state
    }
}

impl<P> Drop for Pending<'_, P> {
    fn drop(&mut self) {
        let shared = &self.upstreams.shared;
        shared.forget_if_unused(&mut self.state, self.channel, self.slot);
    }
}

/// An `acquire` waiting for its channel's lock. Dropped before it got it (the `acquire` was
/// cancelled), it takes the slot out of the map if the slot is empty and unlocked: no one
/// else uses it (a holder of the lock makes it live, or takes it out itself).
struct Waiting<'a, P> {
    upstreams: &'a Upstreams<P>,
    channel: &'a str,
    slot: &'a Channel,
    locked: bool,
}

impl<P> Drop for Waiting<'_, P> {
    fn drop(&mut self) {
        if self.locked {
            return;
        }
        if let Ok(mut state) = self.slot.try_lock() {
            let shared = &self.upstreams.shared;
            shared.forget_if_unused(&mut state, self.channel, self.slot);
        }
    }
}

/// How many of a channel's latest positions the hub remembers, to push each once.
pub(crate) const RECENT_POSITIONS: usize = 1024;

/// The positions a channel delivered last (at most [`RECENT_POSITIONS`]): a message at one of
/// them is a copy of an event already pushed (a relay or publisher that shipped a batch again
/// after a crash or a failed publish), and is dropped. Only exact copies: an event that
/// arrives late, after a higher position, from a publisher that does not publish in position
/// order, is still pushed.
#[derive(Default)]
pub(crate) struct RecentPositions {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
}

impl RecentPositions {
    /// Whether `position` is new on this channel; it is remembered from now on. Events
    /// without a position are always new.
    pub(crate) fn first_time(&mut self, position: Option<Position>) -> bool {
        let Some(position) = position else {
            return true;
        };
        if !self.seen.insert(position.get()) {
            return false;
        }
        if self.order.len() == RECENT_POSITIONS
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.order.push_back(position.get());
        true
    }
}

/// How often a channel's task checks its subscription's missed count while no message comes:
/// a loss the pub/sub records on its own (the Redis adapter after a reconnect) is told to the
/// clients within this time, not at the channel's next message.
const MISSED_CHECK: Duration = Duration::from_secs(1);

/// Receives one channel and dispatches every event, in the order the pub/sub delivers them:
/// one task per channel keeps the events in publish order. A copy of an event it dispatched
/// recently is dropped ([`RecentPositions`]).
///
/// When the subscription's [`missed`](Subscription::missed) count grows (checked before each
/// message is dispatched, and every [`MISSED_CHECK`]), or the subscription ended and had to be
/// made again, every subscription of a topic on the channel gets an `events_missed` frame
/// ([`Registry::missed`]), queued before the events that follow the gap.
///
/// A panic while dispatching (a metrics recorder's bug, reached when a slow client is closed)
/// does not end the task, which would leave the channel subscribed with nobody dispatching:
/// the message may have reached only some subscriptions, so they are all told
/// `events_missed`, as for a subscription that had to be made again, and the task goes on,
/// after a short wait that doubles while the panics repeat (a panic on every message must
/// not make the task spin, nor log a line a message).
async fn pump<P: Send + Sync + 'static>(
    mut subscription: Subscription,
    pubsub: Arc<dyn PubSub>,
    full: String,
    channel: String,
    registry: Arc<Registry<P>>,
    metrics: Arc<Metrics>,
    stopped: Arc<AtomicBool>,
) {
    let pump = Pump {
        pubsub,
        full,
        channel,
        registry,
        metrics,
        stopped,
    };
    let mut state = PumpState::default();
    // One interval for the task's life: made again after each panic, its first tick (at once)
    // would run the missed check again at once.
    let mut check =
        tokio::time::interval_at(tokio::time::Instant::now() + MISSED_CHECK, MISSED_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = PANIC_BACKOFF_MIN;
    let mut panics: u64 = 0;
    let mut logged: Option<tokio::time::Instant> = None;
    loop {
        let received = AssertUnwindSafe(pump.receive(&mut subscription, &mut state, &mut check))
            .catch_unwind()
            .await;
        if received.is_ok() || pump.stopped.load(Ordering::SeqCst) {
            return;
        }
        panics += 1;
        // One line per `PANIC_LOG_EVERY` at most, whatever the rate of panics.
        let now = tokio::time::Instant::now();
        if logged.is_none_or(|at| now.duration_since(at) >= PANIC_LOG_EVERY) {
            logged = Some(now);
            tracing::error!(
                channel = %pump.full,
                panics,
                "the realtime channel's dispatcher panicked; it goes on, and the channel's subscribers are told they may have missed events"
            );
        }
        // The message being dispatched (maybe to some subscriptions only) is lost: tell them
        // all before anything else, then count it (the recorder may be what panicked).
        let told = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pump.registry.missed(&pump.channel, &pump.stopped)
        }))
        .unwrap_or(0);
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pump.metrics.missed_notices(told);
        }));
        // A panic that repeats on every message must not make the task spin: wait a little
        // more after each one (messages meanwhile wait in the subscription, or are counted as
        // missed there and told at the next check); a turn without a panic starts over.
        if std::mem::take(&mut state.dispatched) {
            backoff = PANIC_BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(PANIC_BACKOFF_MAX);
    }
}

/// The first wait after a channel's task panicked; it doubles after each panic in a row, up
/// to [`PANIC_BACKOFF_MAX`].
const PANIC_BACKOFF_MIN: Duration = Duration::from_millis(10);
const PANIC_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A channel's task logs its panics once per this period at most.
const PANIC_LOG_EVERY: Duration = Duration::from_secs(10);

/// What a channel's task works with.
struct Pump<P> {
    pubsub: Arc<dyn PubSub>,
    /// The channel's name upstream (with the hub's prefix).
    full: String,
    /// The routing's name for the channel.
    channel: String,
    registry: Arc<Registry<P>>,
    metrics: Arc<Metrics>,
    stopped: Arc<AtomicBool>,
}

/// What a channel's task remembers across messages (and across a panic).
#[derive(Default)]
struct PumpState {
    /// The subscription's missed count already told.
    missed: u64,
    recent: RecentPositions,
    /// A message was dispatched in full since the last panic.
    dispatched: bool,
}

impl<P: Send + Sync + 'static> Pump<P> {
    /// Receives and dispatches until the channel is released.
    async fn receive(
        &self,
        subscription: &mut Subscription,
        state: &mut PumpState,
        check: &mut tokio::time::Interval,
    ) {
        let (full, channel) = (&self.full, &self.channel);
        let (registry, metrics) = (&*self.registry, &*self.metrics);
        loop {
            // `Subscription::recv` is cancel-safe: a lag it saw is already in `missed()`.
            let message = tokio::select! {
                biased;
                message = subscription.recv() => Some(message),
                _ = check.tick() => None,
            };
            // A message published after the channel was released (and maybe subscribed
            // again) is the new subscription's to dispatch.
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            let message = match message {
                Some(Some(message)) => message,
                // The periodic check.
                None => {
                    notice_missed(self, subscription, &mut state.missed);
                    continue;
                }
                Some(None) => {
                    tracing::warn!(channel = %full, "realtime upstream subscription ended; subscribing again");
                    *subscription = resubscribe(&*self.pubsub, full).await;
                    state.missed = 0;
                    if self.stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    // Whatever was published while there was no subscription is lost.
                    let told = registry.missed(channel, &self.stopped);
                    count(|| metrics.missed_notices(told));
                    continue;
                }
            };
            notice_missed(self, subscription, &mut state.missed);
            match PushedEvent::decode(&message.payload) {
                Ok(event) if state.recent.first_time(event.position()) => {
                    let told = registry.dispatch(channel, &self.stopped, &event);
                    state.dispatched = true;
                    if told > 0 {
                        tracing::debug!(channel = %full, subscriptions = told, "a message named topics of another channel; their subscribers were told to resume");
                        count(|| metrics.missed_notices(told));
                    }
                    // The writers drain their queues before the next event is pushed: a
                    // burst (a relay catching up, a batch published at once) would otherwise
                    // fill a prompt reader's queue before its writer ran once (on one thread,
                    // up to the scheduler's budget of events) and close it as slow.
                    tokio::task::yield_now().await;
                }
                Ok(event) => {
                    tracing::debug!(channel = %full, position = ?event.position(), "dropped a copy of an event already pushed");
                }
                Err(error) => {
                    // An event the hub cannot read (one from a publisher on another wire
                    // version during a rolling deploy, a damaged message) is lost to its
                    // subscribers as surely as one that never came: they are told to resume.
                    let told = registry.missed(channel, &self.stopped);
                    tracing::warn!(channel = %full, %error, subscriptions = told, "could not read a realtime channel message; subscribers were told to resume");
                    count(|| metrics.upstream_missed(1));
                    count(|| metrics.missed_notices(told));
                }
            }
        }
    }
}

/// When `subscription` missed more messages than `missed` (the count already handled), tells
/// the channel's subscriptions and counts them. The count handled is recorded first and the
/// subscriptions told before the recorder is called: a recorder that panics (a bug in the
/// metrics set-up) neither makes the same loss handled again, nor costs the message being
/// received (its panic is caught here).
fn notice_missed<P: Send + Sync + 'static>(
    pump: &Pump<P>,
    subscription: &Subscription,
    missed: &mut u64,
) {
    let now = subscription.missed();
    if now <= *missed {
        return;
    }
    let lost = now - *missed;
    *missed = now;
    let told = pump.registry.missed(&pump.channel, &pump.stopped);
    tracing::warn!(channel = %pump.full, missed = lost, subscriptions = told, "realtime hub missed pub/sub messages; subscribers were told to resume");
    count(|| pump.metrics.upstream_missed(lost));
    count(|| pump.metrics.missed_notices(told));
}

/// Runs `record` (calls into the metrics recorder) and catches its panic: the hub's own
/// counters are updated before the recorder is called, so nothing is left half done.
fn count(record: impl FnOnce()) {
    if std::panic::catch_unwind(AssertUnwindSafe(record)).is_err() {
        tracing::debug!("the metrics recorder panicked; the hub's counters are updated");
    }
}

/// Subscribes again with backoff (100 ms doubling to 5 s) until it works. Live events in the
/// meantime are missed: clients close such gaps by resuming.
async fn resubscribe(pubsub: &dyn PubSub, channel: &str) -> Subscription {
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::time::sleep(backoff).await;
        match pubsub.subscribe(channel).await {
            Ok(subscription) => return subscription,
            Err(error) => {
                tracing::warn!(%channel, %error, ?backoff, "realtime upstream subscribe failed");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Conn, Slot};
    use crate::{AllowAll, Routed, Topic};
    use cqrs_core::memory::InMemoryPubSub;

    /// Upstreams on `pubsub`, without a prefix, for subscriptions of no principal.
    fn upstreams_on(pubsub: Arc<dyn PubSub>, linger: Duration) -> Upstreams<()> {
        Upstreams::new(
            pubsub,
            String::new(),
            Arc::new(Registry::<()>::new(Arc::new(AllowAll), usize::MAX)),
            Arc::new(Metrics::new()),
            linger,
            1024,
            Shutdown::new().1,
        )
    }

    /// An in-memory pub/sub whose subscribes to `slow` never answer.
    struct SlowOnOne(InMemoryPubSub);

    #[async_trait::async_trait]
    impl PubSub for SlowOnOne {
        async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
            self.0.publish(channel, payload).await
        }

        async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
            if channel == "slow" {
                std::future::pending::<()>().await;
            }
            self.0.subscribe(channel).await
        }
    }

    /// A subscribe that hangs upstream holds up its own channel only: other channels are
    /// acquired and released meanwhile, and a second subscriber of the slow one waits.
    #[tokio::test]
    async fn a_slow_upstream_subscribe_holds_up_its_channel_only() {
        let upstreams = Arc::new(upstreams_on(
            Arc::new(SlowOnOne(InMemoryPubSub::new())),
            Duration::ZERO,
        ));
        upstreams.acquire("live").await.unwrap();
        let slow = tokio::spawn({
            let upstreams = upstreams.clone();
            async move { upstreams.acquire("slow").await }
        });
        tokio::task::yield_now().await;
        let others = async {
            upstreams.acquire("live").await.unwrap();
            upstreams.release("live").await;
            upstreams.acquire("other").await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(5), others)
            .await
            .expect("other channels are not held up");
        assert_eq!(upstreams.len().await, 2);
        let second = tokio::time::timeout(Duration::from_millis(50), upstreams.acquire("slow"));
        assert!(
            second.await.is_err(),
            "the slow channel's second subscriber waits"
        );
        slow.abort();
        assert!(slow.await.unwrap_err().is_cancelled());
        // A cancelled subscribe leaves nothing behind.
        upstreams.release("live").await;
        upstreams.release("other").await;
        assert_eq!(upstreams.len().await, 0);
        assert!(
            upstreams.shared.map().is_empty(),
            "no empty slot is left in the map"
        );
    }

    /// An `acquire` cancelled while its first poll of the channel's lock yields (the task's
    /// budget spent, the lock free) leaves no empty slot in the map.
    #[tokio::test]
    async fn an_acquire_cancelled_at_the_lock_leaves_no_slot() {
        let upstreams = upstreams_on(Arc::new(InMemoryPubSub::new()), Duration::ZERO);
        let yielded = std::future::poll_fn(|cx| {
            // Spend the task's budget: the lock's first poll then yields, as it may at any
            // time on a busy runtime.
            let mut spent = false;
            for _ in 0..10_000 {
                let spend = std::pin::pin!(tokio::task::consume_budget());
                if spend.poll(cx).is_pending() {
                    spent = true;
                    break;
                }
            }
            assert!(spent, "the budget was spent");
            let mut acquire = std::pin::pin!(upstreams.acquire("c"));
            std::task::Poll::Ready(acquire.as_mut().poll(cx).is_pending())
            // Dropped here: cancelled.
        })
        .await;
        assert!(yielded, "the acquire waited for the lock");
        assert!(
            upstreams.shared.map().is_empty(),
            "the cancelled acquire left its slot in the map"
        );
        assert_eq!(upstreams.len().await, 0);
    }

    /// A channel's task, once released, pushes nothing to a subscription registered after
    /// (the channel's next task serves it), and tells it nothing; and a message naming a
    /// topic of another channel pushes nothing to that topic's subscriptions but tells them,
    /// once, to resume.
    #[test]
    fn a_released_or_foreign_channel_pushes_nothing() {
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::<()>::new(Arc::new(AllowAll), usize::MAX);
        let (mine, theirs) = (
            Topic::parse("mine").unwrap(),
            Topic::parse("theirs").unwrap(),
        );
        let conn = Arc::new(Conn {
            id: 1,
            principal: (),
            queue: Arc::new(crate::queue::SendQueue::new(16)),
            close: Default::default(),
            metrics,
        });
        registry.insert(
            &mine,
            "c",
            Arc::new(Slot::new(conn.clone(), false, 4)),
            || {},
        );
        registry.insert(
            &theirs,
            "d",
            Arc::new(Slot::new(conn.clone(), false, 4)),
            || {},
        );
        let event = PushedEvent::new(
            Routed::new(serde_json::json!({}))
                .topic(mine.clone())
                .topic(theirs.clone()),
            Some(Position::new(1)),
        )
        .unwrap();

        let released = AtomicBool::new(true);
        registry.dispatch("c", &released, &event);
        assert_eq!(registry.missed("c", &released), 0);
        assert!(conn.queue.try_pop().is_none(), "a released channel pushed");

        let queued = || {
            let mut frames = Vec::new();
            while let Some(item) = conn.queue.try_pop() {
                if let crate::queue::Outgoing::Frame(frame) = item {
                    frames.push(frame.as_str().to_owned());
                }
            }
            frames
        };
        let live = AtomicBool::new(false);
        registry.dispatch("c", &live, &event);
        let pushed = queued();
        assert_eq!(pushed.len(), 2, "one event, one notice: {pushed:?}");
        assert!(
            pushed[0].contains(r#""type":"event""#) && pushed[0].contains(r#""topic":"mine""#),
            "{pushed:?}"
        );
        assert!(
            pushed[1].contains("events_missed") && pushed[1].contains(r#""topic":"theirs""#),
            "the subscription of the other channel's topic is told to resume: {pushed:?}"
        );
        // Told once: the next such message adds nothing for it.
        registry.dispatch("c", &live, &event);
        let again = queued();
        assert_eq!(again.len(), 1, "{again:?}");
    }

    /// Ending the lingering channels returns once their upstream subscriptions are gone, not
    /// merely once their tasks were told to end: what `Hub::closed` promises.
    #[tokio::test(flavor = "current_thread")]
    async fn ending_the_lingering_channels_waits_until_their_subscriptions_are_gone() {
        let pubsub = InMemoryPubSub::new();
        let upstreams = upstreams_on(Arc::new(pubsub.clone()), Duration::from_secs(3600));
        upstreams.acquire("c").await.unwrap();
        upstreams.release("c").await;
        assert_eq!(pubsub.upstream_subscriptions_to("c"), 1, "lingering");
        upstreams.end_lingering().await;
        assert_eq!(
            pubsub.upstream_subscriptions_to("c"),
            0,
            "still subscribed upstream once the lingering channels were ended"
        );
        assert_eq!(upstreams.len().await, 0);
    }

    /// Once the hub stops, a last subscription released unsubscribes at once; ending the
    /// lingering channels waits for that subscription to be gone too, so `closed()` leaves
    /// none behind.
    #[tokio::test]
    async fn ending_the_lingering_channels_waits_for_channels_released_while_stopping() {
        let pubsub = InMemoryPubSub::new();
        let (stop, stopped) = Shutdown::new();
        let upstreams = Upstreams::new(
            Arc::new(pubsub.clone()) as Arc<dyn PubSub>,
            String::new(),
            Arc::new(Registry::<()>::new(Arc::new(AllowAll), usize::MAX)),
            Arc::new(Metrics::new()),
            Duration::from_secs(3600),
            1024,
            stopped,
        );
        upstreams.acquire("c").await.unwrap();
        stop.trigger();
        upstreams.release("c").await;
        upstreams.end_lingering().await;
        assert_eq!(
            pubsub.upstream_subscriptions_to("c"),
            0,
            "still subscribed upstream once the lingering channels were ended"
        );
        assert_eq!(upstreams.len().await, 0);
    }

    /// Each position is new once; the memory keeps the latest `RECENT_POSITIONS` only.
    #[test]
    fn recent_positions_are_remembered_within_a_bound() {
        let mut recent = RecentPositions::default();
        assert!(recent.first_time(None) && recent.first_time(None));
        let total = RECENT_POSITIONS as u64 + 10;
        for p in 1..=total {
            assert!(recent.first_time(Some(Position::new(p))));
        }
        assert!(!recent.first_time(Some(Position::new(total))));
        assert!(
            !recent.first_time(Some(Position::new(11))),
            "still remembered"
        );
        assert!(recent.first_time(Some(Position::new(10))), "forgotten");
        assert_eq!(recent.seen.len(), RECENT_POSITIONS);
        assert_eq!(recent.order.len(), RECENT_POSITIONS);
    }

    /// A released channel's task dispatches nothing more, even with messages still queued in
    /// its receiver.
    #[tokio::test]
    async fn a_released_pump_dispatches_nothing_more() {
        let pubsub: Arc<dyn PubSub> = Arc::new(InMemoryPubSub::new());
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::<()>::new(Arc::new(AllowAll), usize::MAX));
        let topic = Topic::parse("t").unwrap();
        let conn = Arc::new(Conn {
            id: 1,
            principal: (),
            queue: Arc::new(crate::queue::SendQueue::new(16)),
            close: Default::default(),
            metrics: metrics.clone(),
        });
        registry.insert(
            &topic,
            "c",
            Arc::new(Slot::new(conn.clone(), false, 4)),
            || {},
        );
        let subscription = pubsub.subscribe("c").await.unwrap();
        let event = PushedEvent::new(
            Routed::new(serde_json::json!({})).topic(topic.clone()),
            None,
        )
        .unwrap();
        let payload: Arc<str> = Arc::from(event.encode(&[&topic]).unwrap());
        for _ in 0..3 {
            pubsub.publish("c", payload.clone()).await.unwrap();
        }

        let stopped = Arc::new(AtomicBool::new(true));
        tokio::time::timeout(
            Duration::from_secs(10),
            pump(
                subscription,
                pubsub.clone(),
                "c".to_owned(),
                "c".to_owned(),
                registry.clone(),
                metrics.clone(),
                stopped,
            ),
        )
        .await
        .expect("a stopped pump returns");
        assert!(conn.queue.try_pop().is_none(), "nothing was dispatched");
    }
}
