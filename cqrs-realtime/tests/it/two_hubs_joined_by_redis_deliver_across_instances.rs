//! Two hubs, each with its own Redis connections, joined by Redis pub/sub: once through
//! `cqrs_redis::RedisPubSub`, and once through a minimal `PubSub` on fred and the core's
//! `Fanout` (what the hub needs from the port, independent of the adapter's other features).

use crate::support::{TEST_LIMIT, TestHub};
use async_trait::async_trait;
use cqrs_core::ports::{Fanout, PubSub, Subscription, TransportError};
use cqrs_core::testing::{require_services, test_id, with_timeout};
use cqrs_realtime::HubOptions;
use fred::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

struct RedisTestPubSub {
    commands: Client,
    subscriber: fred::clients::SubscriberClient,
    fanout: Fanout,
}

fn redis_error(error: fred::error::Error) -> TransportError {
    TransportError::Backend {
        backend: "redis",
        source: Box::new(error),
    }
}

impl RedisTestPubSub {
    async fn connect(url: &str) -> Result<Self, fred::error::Error> {
        let config = Config::from_url(url)?;
        let commands = Builder::from_config(config.clone()).build()?;
        commands.init().await?;
        let subscriber = Builder::from_config(config).build_subscriber_client()?;
        subscriber.init().await?;
        let (fanout, _idle) = Fanout::new(1024);
        let mut messages = subscriber.message_rx();
        let deliver = fanout.clone();
        tokio::spawn(async move {
            while let Ok(message) = messages.recv().await {
                if let Some(payload) = message.value.as_str() {
                    deliver.deliver(&message.channel, Arc::from(&*payload));
                }
            }
        });
        Ok(Self {
            commands,
            subscriber,
            fanout,
        })
    }
}

#[async_trait]
impl PubSub for RedisTestPubSub {
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
        self.commands
            .publish::<i64, _, _>(channel, payload.to_string())
            .await
            .map(drop)
            .map_err(redis_error)
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
        let subscriber = self.subscriber.clone();
        let name = channel.to_owned();
        self.fanout
            // Boxed: fred's subscribe future is over 20 KB.
            .subscribe(
                channel,
                Box::pin(async move {
                    // fred completes SUBSCRIBE once written; the PING behind it is answered
                    // once Redis ran it, as the port's "returns once live" asks. Without it a
                    // publish right after could reach Redis first (seen under CI load).
                    subscriber.subscribe(name).await.map_err(redis_error)?;
                    subscriber.ping::<Value>(None).await.map_err(redis_error)?;
                    Ok(())
                }),
            )
            .await
    }
}

/// How long connecting may take before Redis counts as unreachable (a failure under
/// `CQRS_REQUIRE_SERVICES=1`): generous, for a loaded machine.
const CONNECT: Duration = Duration::from_secs(15);

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn minimal(url: &str) -> Option<Arc<RedisTestPubSub>> {
    let connected = tokio::time::timeout(CONNECT, RedisTestPubSub::connect(url))
        .await
        .ok()
        .and_then(Result::ok);
    let reachable = connected.is_some();
    if !require_services("redis", url, reachable) {
        return None;
    }
    connected.map(Arc::new)
}

async fn adapter(url: &str, prefix: &str) -> Option<Arc<dyn PubSub>> {
    let connected = tokio::time::timeout(
        CONNECT,
        cqrs_redis::RedisPubSubOptions::new(url)
            .channel_prefix(prefix)
            .connect(),
    )
    .await
    .ok()
    .and_then(Result::ok);
    let reachable = connected.is_some();
    if !require_services("redis", url, reachable) {
        return None;
    }
    connected.map(|p| Arc::new(p) as Arc<dyn PubSub>)
}

/// A client on hub B receives what was published through hub A, authorized on B, and each hub
/// holds one Redis subscription for the `tickets` channel (`redis_channel`) however many topics
/// its clients follow.
async fn scenario(
    a: Arc<dyn PubSub>,
    b: Arc<dyn PubSub>,
    options: HubOptions,
    redis_channel: &str,
    commands: &Client,
) {
    let a = TestHub::start_on(a, options.clone(), |b| b).await;
    let b = TestHub::start_on(b, options, |b| b).await;

    let mut agent_on_b = b.connect("agent-a1").await;
    agent_on_b.subscribe("tickets").await;
    agent_on_b.subscribe("ticket:t1").await;
    let mut customer_on_b = b.connect("user-u2").await;
    customer_on_b.subscribe("tickets").await;
    let mut agent_on_a = a.connect("agent-a2").await;
    agent_on_a.subscribe("ticket:t1").await;

    // Published by instance A (its own store and publisher).
    a.publish("t1", "u1", 1).await;
    a.publish("t2", "u2", 2).await;

    let mut topics = [agent_on_b.event().await, agent_on_b.event().await];
    topics.sort_by(|x, y| x.topic.cmp(&y.topic));
    assert_eq!(
        topics
            .iter()
            .map(|e| (e.topic.as_str(), e.seq))
            .collect::<Vec<_>>(),
        [("ticket:t1", 1), ("tickets", 1)]
    );
    assert_eq!(agent_on_b.event().await.seq, 2);
    // The customer sees only its own ticket's event.
    let event = customer_on_b.event().await;
    assert_eq!((event.ticket.as_str(), event.seq), ("t2", 2));
    assert_eq!(agent_on_a.event().await.seq, 1);

    let numsub: HashMap<String, i64> = commands.pubsub_numsub(redis_channel).await.unwrap();
    assert_eq!(numsub.get(redis_channel), Some(&2), "{numsub:?}");
    assert_eq!(b.hub.upstream_channels().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_redis_pubsub_adapter() {
    with_timeout(TEST_LIMIT, async {
        let url = redis_url();
        let id = test_id("two_hubs_adapter");
        let (Some(a), Some(b), Some(commands)) = (
            adapter(&url, &id).await,
            adapter(&url, &id).await,
            minimal(&url).await,
        ) else {
            return;
        };
        let channel = format!("{id}:realtime:tickets");
        scenario(a, b, HubOptions::new(), &channel, &commands.commands).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_minimal_redis_pubsub() {
    with_timeout(TEST_LIMIT, async {
        let url = redis_url();
        let (Some(a), Some(b)) = (minimal(&url).await, minimal(&url).await) else {
            return;
        };
        let id = test_id("two_hubs_minimal");
        let options = HubOptions::new().channel_prefix(format!("{id}:realtime:"));
        let channel = format!("{id}:realtime:tickets");
        let commands = a.commands.clone();
        scenario(a, b, options, &channel, &commands).await;
    })
    .await;
}

/// A revocation through one hub closes the principal's connections on the other, over Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_the_other_instance() {
    with_timeout(TEST_LIMIT, async {
        let url = redis_url();
        let id = test_id("two_hubs_revocation");
        let (Some(a), Some(b)) = (adapter(&url, &id).await, adapter(&url, &id).await) else {
            return;
        };
        crate::a_revocation_closes_the_principals_connections_on_every_instance::scenario(
            a,
            b,
            HubOptions::new(),
        )
        .await;
    })
    .await;
}
