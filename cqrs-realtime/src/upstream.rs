//! The hub's subscriptions to pub/sub channels: one per channel in use, whatever the number of
//! topics and connections, each with a task that dispatches its messages.

use crate::PushedEvent;
use crate::metrics::Metrics;
use crate::registry::Registry;
use cqrs_core::ports::{PubSub, Subscription, TransportError};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;

struct Upstream {
    /// Subscriptions (over every connection) on topics of this channel.
    refs: usize,
    /// Receives the channel and dispatches; aborting it drops the pub/sub subscription.
    task: JoinHandle<()>,
    /// Set when the last reference goes. An abort takes effect only when the task next
    /// yields, and a receiver with messages queued does not yield for a while: without the
    /// flag, the old task could dispatch an event that a new subscription of the same
    /// channel dispatches too.
    stopped: Arc<AtomicBool>,
}

pub(crate) struct Upstreams<P> {
    pubsub: Arc<dyn PubSub>,
    prefix: String,
    registry: Arc<Registry<P>>,
    metrics: Arc<Metrics>,
    // A tokio mutex, held across the upstream subscribe: a second subscriber of a channel
    // waits until the first made it live, and then shares it.
    channels: tokio::sync::Mutex<HashMap<String, Upstream>>,
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
            channels: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Takes a reference on `channel`, subscribing upstream first when it is the first one.
    /// Returns once the upstream subscription is live. Cancel-safe: nothing is recorded until
    /// the subscription succeeded.
    pub(crate) async fn acquire(&self, channel: &str) -> Result<(), TransportError> {
        let mut channels = self.channels.lock().await;
        if let Some(upstream) = channels.get_mut(channel) {
            upstream.refs += 1;
            return Ok(());
        }
        let full = format!("{}{channel}", self.prefix);
        let subscription = self.pubsub.subscribe(&full).await?;
        tracing::debug!(channel = %full, "realtime hub subscribed upstream");
        let stopped = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(pump(
            subscription,
            self.pubsub.clone(),
            full,
            self.registry.clone(),
            self.metrics.clone(),
            stopped.clone(),
        ));
        channels.insert(
            channel.to_owned(),
            Upstream {
                refs: 1,
                task,
                stopped,
            },
        );
        Ok(())
    }

    /// Drops a reference on `channel`; the last one unsubscribes upstream.
    pub(crate) async fn release(&self, channel: &str) {
        let mut channels = self.channels.lock().await;
        if let Some(upstream) = channels.get_mut(channel) {
            upstream.refs -= 1;
            if upstream.refs == 0
                && let Some(upstream) = channels.remove(channel)
            {
                upstream.stopped.store(true, Ordering::SeqCst);
                upstream.task.abort();
            }
        }
    }

    /// How many channels the hub is subscribed to.
    pub(crate) async fn len(&self) -> usize {
        self.channels.lock().await.len()
    }
}

/// Receives one channel and dispatches every event, in the order the pub/sub delivers them:
/// one task per channel keeps the events of one aggregate in publish order.
async fn pump<P: Send + Sync + 'static>(
    mut subscription: Subscription,
    pubsub: Arc<dyn PubSub>,
    channel: String,
    registry: Arc<Registry<P>>,
    metrics: Arc<Metrics>,
    stopped: Arc<AtomicBool>,
) {
    let mut missed = 0;
    loop {
        let message = subscription.recv().await;
        // A message published after the channel was released (and maybe subscribed again)
        // is the new subscription's to dispatch.
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        let Some(message) = message else {
            tracing::warn!(%channel, "realtime upstream subscription ended; subscribing again");
            subscription = resubscribe(&*pubsub, &channel).await;
            missed = 0;
            continue;
        };
        if subscription.missed() > missed {
            let now = subscription.missed();
            metrics.upstream_missed(now - missed);
            tracing::warn!(%channel, missed = now - missed, "realtime hub fell behind the pub/sub; events were missed");
            missed = now;
        }
        match PushedEvent::decode(&message.payload) {
            Ok(event) => registry.dispatch(&event),
            Err(error) => tracing::warn!(%channel, %error, "ignored a realtime channel message"),
        }
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

    /// A released channel's task dispatches nothing more, even with messages still queued in
    /// its receiver.
    #[tokio::test]
    async fn a_released_pump_dispatches_nothing_more() {
        let pubsub: Arc<dyn PubSub> = Arc::new(InMemoryPubSub::new());
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::<()>::new(Arc::new(AllowAll)));
        let topic = Topic::parse("t").unwrap();
        let conn = Arc::new(Conn {
            id: 1,
            principal: (),
            queue: Arc::new(crate::queue::SendQueue::new(16)),
            close: Default::default(),
            metrics: metrics.clone(),
        });
        registry.insert(&topic, Arc::new(Slot::new(conn.clone(), false, 4)), || {});
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
