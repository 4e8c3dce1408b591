//! The pub/sub port: at-most-once fan-out to every live subscriber, and the local fan-out that
//! keeps one upstream subscription per channel per process.

use super::TransportError;
use async_trait::async_trait;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::{OnceCell, broadcast, mpsc};

/// One message on a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PubSubMessage {
    /// The channel it was published on.
    pub channel: Arc<str>,
    /// The payload (JSON text, for the realtime hub).
    pub payload: Arc<str>,
}

/// Fan-out to every current subscriber of a channel, across processes. At-most-once: a
/// subscriber that is not connected, or too slow, misses messages. Durable delivery is the
/// [`EventTransport`](super::EventTransport)'s job.
///
/// The contract (checked by [`testing::pubsub`](crate::testing::pubsub)):
///
/// * `subscribe` returns once the subscription is live: every message published after it
///   returns reaches the subscriber (while it keeps up).
/// * Every subscriber of a channel gets each message; subscribers of other channels do not.
/// * One process holds at most one upstream subscription per channel, however many local
///   subscribers it has ([`Fanout`] does this for adapters).
/// * Messages from one publisher on one channel arrive in publish order.
#[async_trait]
pub trait PubSub: Send + Sync + 'static {
    /// Publishes a message to everyone subscribed to `channel` now.
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError>;

    /// Subscribes to `channel`; returns once the subscription is live.
    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError>;
}

/// A live subscription to one channel. Dropping it unsubscribes.
pub struct Subscription {
    channel: Arc<str>,
    receiver: broadcast::Receiver<PubSubMessage>,
    missed: u64,
    /// The fan-out's count of messages lost before their channel was known, and its value
    /// when this subscription began.
    lost: Arc<AtomicU64>,
    lost_before: u64,
    /// The channel's count of messages the adapter dropped on it, and its value when this
    /// subscription began.
    channel_lost: Arc<AtomicU64>,
    channel_lost_before: u64,
    _guard: Arc<SubscriberGuard>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("missed", &self.missed())
            .finish()
    }
}

impl Subscription {
    /// The next message, or `None` once the pub/sub has shut down. Messages this subscriber was
    /// too slow to take are skipped and counted in [`missed`](Self::missed).
    pub async fn recv(&mut self) -> Option<PubSubMessage> {
        loop {
            match self.receiver.recv().await {
                Ok(message) => return Some(message),
                Err(broadcast::error::RecvError::Lagged(n)) => self.missed += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// How many messages this subscriber missed: because it fell behind, because the adapter
    /// dropped them on its channel, or because the adapter dropped them before it could tell
    /// their channel (those are counted by every subscription of the process, so some may
    /// have been other channels').
    pub fn missed(&self) -> u64 {
        let lost = self.lost.load(Ordering::Relaxed) - self.lost_before;
        let channel_lost = self.channel_lost.load(Ordering::Relaxed) - self.channel_lost_before;
        self.missed + lost + channel_lost
    }
}

struct ChannelState {
    sender: broadcast::Sender<PubSubMessage>,
    live: Arc<OnceCell<()>>,
    subscribers: usize,
    /// Messages of this channel the adapter dropped ([`Fanout::lost_on`]).
    lost: Arc<AtomicU64>,
}

struct FanoutInner {
    channels: Mutex<HashMap<Arc<str>, Arc<Mutex<ChannelState>>>>,
    idle: mpsc::UnboundedSender<Arc<str>>,
    capacity: usize,
    lost: Arc<AtomicU64>,
}

/// Removes one local subscriber when the last clone of a [`Subscription`]'s guard drops.
struct SubscriberGuard {
    channel: Arc<str>,
    fanout: Weak<FanoutInner>,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let Some(fanout) = self.fanout.upgrade() else {
            return;
        };
        // A std mutex: nothing awaits while it is held.
        let mut channels = fanout.channels.lock().unwrap_or_else(|p| p.into_inner());
        let now_idle = channels.get(&self.channel).is_some_and(|state| {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            state.subscribers -= 1;
            state.subscribers == 0
        });
        if now_idle {
            channels.remove(&self.channel);
            let _ = fanout.idle.send(self.channel.clone());
        }
    }
}

/// Local fan-out for pub/sub adapters: one upstream subscription per channel per process,
/// shared by every local subscriber.
///
/// An adapter calls [`subscribe`](Fanout::subscribe) with a future that subscribes upstream;
/// only the first local subscriber of a channel runs it, and every subscriber waits until it
/// succeeded. The adapter hands each upstream message to [`deliver`](Fanout::deliver), and
/// unsubscribes upstream from the channels that [`Fanout::new`]'s receiver yields once their
/// last local subscriber is gone (check [`is_subscribed`](Fanout::is_subscribed) first: a new
/// subscriber may have come in the meantime).
///
/// ```
/// use cqrs_core::ports::Fanout;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let (fanout, mut idle) = Fanout::new(64);
/// let mut a = fanout.subscribe("news", async { Ok(()) }).await?;
/// let mut b = fanout.subscribe("news", async { unreachable!("subscribed upstream once") }).await?;
/// fanout.deliver("news", "hello".into());
/// assert_eq!(&*a.recv().await.unwrap().payload, "hello");
/// assert_eq!(&*b.recv().await.unwrap().payload, "hello");
/// drop((a, b));
/// assert_eq!(&*idle.recv().await.unwrap(), "news");
/// # Ok::<_, cqrs_core::ports::TransportError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Fanout {
    inner: Arc<FanoutInner>,
}

impl fmt::Debug for Fanout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let channels = self.inner.channels.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("Fanout")
            .field("channels", &channels)
            .finish()
    }
}

impl Fanout {
    /// The largest per-subscriber buffer, in messages: 2^20 (1,048,576). Each subscribed
    /// channel allocates its buffer up front, and tokio's broadcast channel panics above
    /// `usize::MAX / 2`.
    pub const MAX_CAPACITY: usize = 1 << 20;

    /// A fan-out whose subscribers each buffer up to `capacity` messages, and the receiver of
    /// channels that lost their last local subscriber. `capacity` is clamped to
    /// `1..=`[`MAX_CAPACITY`](Self::MAX_CAPACITY).
    pub fn new(capacity: usize) -> (Self, mpsc::UnboundedReceiver<Arc<str>>) {
        let (idle, idle_rx) = mpsc::unbounded_channel();
        (
            Self {
                inner: Arc::new(FanoutInner {
                    channels: Mutex::new(HashMap::new()),
                    idle,
                    capacity: capacity.clamp(1, Self::MAX_CAPACITY),
                    lost: Arc::default(),
                }),
            },
            idle_rx,
        )
    }

    /// Adds a local subscriber to `channel`. The first subscriber of a channel runs `upstream`
    /// (the others wait for it); when it fails, the next subscriber tries again.
    pub async fn subscribe<F>(
        &self,
        channel: &str,
        upstream: F,
    ) -> Result<Subscription, TransportError>
    where
        F: Future<Output = Result<(), TransportError>>,
    {
        let channel: Arc<str> = Arc::from(channel);
        let (live, receiver, channel_lost, channel_lost_before) = {
            // A std mutex: nothing awaits while it is held.
            let mut channels = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let state = channels.entry(channel.clone()).or_insert_with(|| {
                Arc::new(Mutex::new(ChannelState {
                    sender: broadcast::channel(self.inner.capacity).0,
                    live: Arc::new(OnceCell::new()),
                    subscribers: 0,
                    lost: Arc::default(),
                }))
            });
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            state.subscribers += 1;
            // The loss count as the receiver starts, under the lock `lost_on` takes: a loss
            // is either before it (not this subscription's) or counted.
            (
                state.live.clone(),
                state.sender.subscribe(),
                state.lost.clone(),
                state.lost.load(Ordering::Relaxed),
            )
        };
        let guard = Arc::new(SubscriberGuard {
            channel: channel.clone(),
            fanout: Arc::downgrade(&self.inner),
        });
        // The receiver exists before the upstream subscription is live, so nothing published
        // after this returns can be missed. Only the first subscriber runs `upstream`; the
        // others wait for it here.
        live.get_or_try_init(|| upstream).await?;
        let lost = self.inner.lost.clone();
        Ok(Subscription {
            channel,
            receiver,
            missed: 0,
            lost_before: lost.load(Ordering::Relaxed),
            lost,
            channel_lost_before,
            channel_lost,
            _guard: guard,
        })
    }

    /// Records `count` messages the adapter dropped before it could tell their channel (its
    /// client's own buffer overflowed): every subscription counts them as missed, so the loss
    /// is seen, at the price of counting other channels' messages too.
    pub fn lost(&self, count: u64) {
        self.inner.lost.fetch_add(count, Ordering::Relaxed);
    }

    /// Records `count` messages of `channel` the adapter dropped (a payload it could not
    /// deliver): that channel's subscriptions count them as missed, others do not. Returns
    /// whether `channel` has local subscribers (nothing is recorded otherwise).
    pub fn lost_on(&self, channel: &str, count: u64) -> bool {
        let state = {
            let channels = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            channels.get(channel).cloned()
        };
        let Some(state) = state else {
            return false;
        };
        let state = state.lock().unwrap_or_else(|p| p.into_inner());
        state.lost.fetch_add(count, Ordering::Relaxed);
        true
    }

    /// Hands a message that arrived from upstream to every local subscriber of `channel`.
    /// Returns how many received it.
    pub fn deliver(&self, channel: &str, payload: Arc<str>) -> usize {
        // The map's own `Arc<str>` names the channel in the message: no copy per message.
        let found = {
            let channels = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            channels
                .get_key_value(channel)
                .map(|(name, state)| (name.clone(), state.clone()))
        };
        let Some((channel, state)) = found else {
            return 0;
        };
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.sender
            .send(PubSubMessage { channel, payload })
            .unwrap_or(0)
    }

    /// Whether `channel` has local subscribers.
    pub fn is_subscribed(&self, channel: &str) -> bool {
        let channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        channels.contains_key(channel)
    }

    /// The channels with local subscribers (an adapter resubscribes to them after a reconnect).
    pub fn channels(&self) -> Vec<Arc<str>> {
        let channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        channels.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A capacity past what a broadcast channel takes (`usize::MAX`, as a setting taken from
    /// configuration might be) is clamped to `MAX_CAPACITY`: the first subscriber of a channel
    /// panicked in `broadcast::channel`.
    #[tokio::test]
    async fn a_capacity_past_the_maximum_is_clamped() {
        let (fanout, _idle) = Fanout::new(usize::MAX);
        let mut subscription = fanout.subscribe("news", async { Ok(()) }).await.unwrap();
        assert_eq!(fanout.deliver("news", "hello".into()), 1);
        assert_eq!(&*subscription.recv().await.unwrap().payload, "hello");
        assert_eq!(fanout.inner.capacity, 1 << 20);
        let (zero, _idle) = Fanout::new(0);
        assert_eq!(zero.inner.capacity, 1);
    }

    /// A message dropped on one channel is missed by that channel's subscriptions only (one
    /// bad payload on one channel made every subscription of the process report a loss);
    /// losses of no known channel still reach everyone.
    #[tokio::test]
    async fn a_loss_on_one_channel_is_missed_there_only() {
        let (fanout, _idle) = Fanout::new(8);
        let news = fanout.subscribe("news", async { Ok(()) }).await.unwrap();
        let also_news = fanout.subscribe("news", async { Ok(()) }).await.unwrap();
        let sport = fanout.subscribe("sport", async { Ok(()) }).await.unwrap();
        assert!(fanout.lost_on("news", 2));
        assert!(
            !fanout.lost_on("weather", 1),
            "no subscriber, nothing recorded"
        );
        assert_eq!(
            (news.missed(), also_news.missed(), sport.missed()),
            (2, 2, 0)
        );
        let later = fanout.subscribe("news", async { Ok(()) }).await.unwrap();
        assert_eq!(later.missed(), 0, "a loss before it began is not its own");
        fanout.lost(1);
        assert_eq!((news.missed(), sport.missed(), later.missed()), (3, 1, 1));
    }
}
