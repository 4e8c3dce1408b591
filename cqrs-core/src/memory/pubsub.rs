//! The in-memory pub/sub.

use crate::ports::{Fanout, PubSub, Subscription, TransportError};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Pub/sub within one process. Every instance made by cloning shares its channels.
#[derive(Clone, Debug)]
pub struct InMemoryPubSub {
    fanout: Fanout,
    upstream: Arc<Upstream>,
}

/// The bookkeeping of the "upstream" subscriptions an in-process pub/sub stands in for: one
/// per channel while it has local subscribers, as a broker would count them.
#[derive(Debug)]
struct Upstream {
    /// Live upstream subscriptions, by channel (none listed: none).
    live: Mutex<HashMap<Arc<str>, usize>>,
    /// Channels that lost their last local subscriber, not yet counted down.
    idle: Mutex<mpsc::UnboundedReceiver<Arc<str>>>,
    /// Upstream subscriptions ever made.
    made: AtomicU64,
}

impl Upstream {
    /// Counts down the upstream subscriptions of channels that lost their last local
    /// subscriber. Each idle notice ends the one upstream subscription its channel's
    /// subscribers shared (a new subscriber after it made a new one, counted separately).
    fn settle(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        // Std mutexes: nothing awaits while they are held.
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        while let Ok(channel) = idle.try_recv() {
            if let Some(n) = live.get_mut(&channel) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    live.remove(&channel);
                }
            }
        }
        live
    }
}

impl Default for InMemoryPubSub {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryPubSub {
    /// A pub/sub whose subscribers buffer up to 1024 messages each.
    pub fn new() -> Self {
        Self::with_capacity(1024)
    }

    /// A pub/sub whose subscribers buffer up to `capacity` messages each; a slower subscriber
    /// misses messages (at-most-once). `capacity` is clamped to
    /// `1..=`[`Fanout::MAX_CAPACITY`] (2^20).
    pub fn with_capacity(capacity: usize) -> Self {
        let (fanout, idle) = Fanout::new(capacity);
        Self {
            fanout,
            upstream: Arc::new(Upstream {
                live: Mutex::default(),
                idle: Mutex::new(idle),
                made: AtomicU64::new(0),
            }),
        }
    }

    /// How many "upstream" subscriptions are live now, over all channels: one per channel
    /// while it has local subscribers, as a broker would count them. Lets tests check the
    /// one-subscription-per-channel rule, and that the last local subscriber's drop ends it.
    pub fn upstream_subscriptions(&self) -> u64 {
        self.upstream.settle().values().map(|n| *n as u64).sum()
    }

    /// How many "upstream" subscriptions to `channel` are live now: 1 while it has local
    /// subscribers, 0 once the last one is dropped (more would break the
    /// one-subscription-per-channel rule).
    pub fn upstream_subscriptions_to(&self, channel: &str) -> usize {
        self.upstream.settle().get(channel).copied().unwrap_or(0)
    }

    /// How many "upstream" subscriptions were ever made, over all channels, including those
    /// ended since: 0 tells that nothing ever subscribed.
    pub fn upstream_subscribes(&self) -> u64 {
        self.upstream.made.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl PubSub for InMemoryPubSub {
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
        self.fanout.deliver(channel, payload);
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
        let upstream = self.upstream.clone();
        let name: Arc<str> = Arc::from(channel);
        self.fanout
            .subscribe(channel, async move {
                // Only the first local subscriber of the channel runs this.
                *upstream.settle().entry(name).or_insert(0) += 1;
                upstream.made.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await
    }
}
