//! The hub's subscriptions to pub/sub channels: one per channel in use, whatever the number of
//! topics and connections, each with a task that dispatches its messages.

use crate::PushedEvent;
use crate::metrics::Metrics;
use crate::registry::Registry;
use cqrs_core::Position;
use cqrs_core::ports::{PubSub, Subscription, TransportError};
use std::collections::{HashMap, HashSet, VecDeque};
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
    /// Taken out of the map (its last reference went): an `acquire` that found it there
    /// before must look the channel up again.
    removed: bool,
}

type Channel = Arc<tokio::sync::Mutex<ChannelState>>;

pub(crate) struct Upstreams<P> {
    pubsub: Arc<dyn PubSub>,
    prefix: String,
    registry: Arc<Registry<P>>,
    metrics: Arc<Metrics>,
    /// Held only to look a channel up (a std mutex: never across an await).
    channels: std::sync::Mutex<HashMap<String, Channel>>,
    live: AtomicUsize,
}

impl<P: Send + Sync + 'static> Upstreams<P> {
    pub(crate) fn new(
        pubsub: Arc<dyn PubSub>,
        prefix: String,
        registry: Arc<Registry<P>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pubsub,
            prefix,
            registry,
            metrics,
            channels: std::sync::Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
        }
    }

    /// Takes a reference on `channel`, subscribing upstream first when it is the first one (a
    /// second subscriber of the channel waits until the first made it live, then shares it).
    /// Returns once the upstream subscription is live. Cancel-safe: nothing is recorded until
    /// the subscription succeeded.
    pub(crate) async fn acquire(&self, channel: &str) -> Result<(), TransportError> {
        loop {
            let slot = self.map().entry(channel.to_owned()).or_default().clone();
            let mut state = Pending {
                state: slot.clone().lock_owned().await,
                upstreams: self,
                channel,
                slot: &slot,
            };
            if state.removed {
                continue;
            }
            if state.live.is_some() {
                state.refs += 1;
                return Ok(());
            }
            let full = format!("{}{channel}", self.prefix);
            // Failed or cancelled here, `Pending` takes the still empty slot out of the map.
            let subscription = self.pubsub.subscribe(&full).await?;
            tracing::debug!(channel = %full, "realtime hub subscribed upstream");
            let stopped = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(pump(
                subscription,
                self.pubsub.clone(),
                full,
                channel.to_owned(),
                self.registry.clone(),
                self.metrics.clone(),
                stopped.clone(),
            ));
            state.live = Some(Live { task, stopped });
            state.refs = 1;
            self.live.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
    }

    /// Drops a reference on `channel`; the last one unsubscribes upstream.
    pub(crate) async fn release(&self, channel: &str) {
        let Some(slot) = self.map().get(channel).cloned() else {
            return;
        };
        let mut state = slot.lock().await;
        if state.refs == 0 {
            return;
        }
        state.refs -= 1;
        if state.refs == 0 {
            if let Some(live) = state.live.take() {
                live.stopped.store(true, Ordering::SeqCst);
                live.task.abort();
                self.live.fetch_sub(1, Ordering::SeqCst);
            }
            state.removed = true;
            self.forget(channel, &slot);
        }
    }

    /// How many channels the hub is subscribed to.
    pub(crate) async fn len(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl<P> Upstreams<P> {
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
        if self.state.live.is_none() && self.state.refs == 0 && !self.state.removed {
            self.state.removed = true;
            self.upstreams.forget(self.channel, self.slot);
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
async fn pump<P: Send + Sync + 'static>(
    mut subscription: Subscription,
    pubsub: Arc<dyn PubSub>,
    full: String,
    channel: String,
    registry: Arc<Registry<P>>,
    metrics: Arc<Metrics>,
    stopped: Arc<AtomicBool>,
) {
    let mut missed = 0;
    let mut recent = RecentPositions::default();
    let mut check = tokio::time::interval(MISSED_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // `Subscription::recv` is cancel-safe: a lag it saw is already in `missed()`.
        let message = tokio::select! {
            biased;
            message = subscription.recv() => Some(message),
            _ = check.tick() => None,
        };
        // A message published after the channel was released (and maybe subscribed again)
        // is the new subscription's to dispatch.
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        let message = match message {
            Some(Some(message)) => message,
            // The periodic check.
            None => {
                notice_missed(
                    &subscription,
                    &mut missed,
                    &channel,
                    &full,
                    &registry,
                    &metrics,
                );
                continue;
            }
            Some(None) => {
                tracing::warn!(channel = %full, "realtime upstream subscription ended; subscribing again");
                subscription = resubscribe(&*pubsub, &full).await;
                missed = 0;
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                // Whatever was published while there was no subscription is lost.
                metrics.missed_notices(registry.missed(&channel));
                continue;
            }
        };
        notice_missed(
            &subscription,
            &mut missed,
            &channel,
            &full,
            &registry,
            &metrics,
        );
        match PushedEvent::decode(&message.payload) {
            Ok(event) if recent.first_time(event.position()) => registry.dispatch(&event),
            Ok(event) => {
                tracing::debug!(channel = %full, position = ?event.position(), "dropped a copy of an event already pushed");
            }
            Err(error) => {
                tracing::warn!(channel = %full, %error, "ignored a realtime channel message")
            }
        }
    }
}

/// When `subscription` missed more messages than `missed` (the count already handled), counts
/// them and tells the channel's subscriptions.
fn notice_missed<P: Send + Sync + 'static>(
    subscription: &Subscription,
    missed: &mut u64,
    channel: &str,
    full: &str,
    registry: &Registry<P>,
    metrics: &Metrics,
) {
    let now = subscription.missed();
    if now <= *missed {
        return;
    }
    metrics.upstream_missed(now - *missed);
    let told = registry.missed(channel);
    metrics.missed_notices(told);
    tracing::warn!(channel = %full, missed = now - *missed, subscriptions = told, "realtime hub missed pub/sub messages; subscribers were told to resume");
    *missed = now;
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
        let upstreams = Arc::new(Upstreams::new(
            Arc::new(SlowOnOne(InMemoryPubSub::new())),
            String::new(),
            Arc::new(Registry::<()>::new(Arc::new(AllowAll), usize::MAX)),
            Arc::new(Metrics::new()),
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
            upstreams.map().is_empty(),
            "no empty slot is left in the map"
        );
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
