//! The in-memory pub/sub.

use crate::ports::{Fanout, PubSub, Subscription, TransportError};
use async_trait::async_trait;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Pub/sub within one process. Every instance made by cloning shares its channels.
#[derive(Clone, Debug)]
pub struct InMemoryPubSub {
    fanout: Fanout,
    upstream_subscriptions: Arc<AtomicU64>,
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
        // There is no upstream to unsubscribe from, so the idle receiver is dropped.
        let (fanout, _idle) = Fanout::new(capacity);
        Self {
            fanout,
            upstream_subscriptions: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many times a channel was subscribed "upstream" (once per channel while it has local
    /// subscribers); lets tests check the one-subscription-per-channel rule.
    pub fn upstream_subscriptions(&self) -> u64 {
        self.upstream_subscriptions.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl PubSub for InMemoryPubSub {
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
        self.fanout.deliver(channel, payload);
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
        let counter = self.upstream_subscriptions.clone();
        self.fanout
            .subscribe(channel, async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await
    }
}
