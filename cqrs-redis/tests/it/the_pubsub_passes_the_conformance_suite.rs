//! The core's pub/sub conformance suite, against Redis: each scenario under its own channel
//! prefix (pub/sub ignores the database number), with a second instance for the cross-process
//! scenario. Upstream subscriptions are counted by Redis (`PUBSUB NUMSUB`, asked on a client of
//! the harness's own), not by the adapter's bookkeeping.

use crate::support::{connect_admin, connection, raw, reachable};
use cqrs_core::ports::PubSub;
use cqrs_core::testing::Harness;
use cqrs_core::testing::pubsub::PubSubHarness;
use cqrs_redis::{RedisPubSub, RedisPubSubOptions};
use fred::clients::Client;
use fred::interfaces::ClientLike;
use fred::types::Value;
use std::sync::Arc;

pub(crate) struct RedisPubSubHarness {
    id: String,
    first: RedisPubSub,
    second: RedisPubSub,
    /// Asks Redis what it holds; subscribes to nothing itself.
    admin: Client,
}

#[cqrs_core::async_trait]
impl Harness for RedisPubSubHarness {
    fn test_id(&self) -> &str {
        &self.id
    }

    async fn teardown(self) {
        let _ = self.admin.quit().await;
    }
}

/// How many clients Redis counts as subscribed to `channel` (the full name, prefix included).
pub(crate) async fn numsub(admin: &Client, channel: &str) -> usize {
    let reply = raw(admin, "PUBSUB", vec!["NUMSUB".into(), channel.into()]).await;
    reply
        .into_array()
        .get(1)
        .and_then(Value::as_u64)
        .map_or(0, |n| n as usize)
}

#[cqrs_core::async_trait]
impl PubSubHarness for RedisPubSubHarness {
    fn pubsub(&self) -> Arc<dyn PubSub> {
        Arc::new(self.first.clone())
    }

    fn other_instance(&self) -> Option<Arc<dyn PubSub>> {
        Some(Arc::new(self.second.clone()))
    }

    /// Redis's count of subscribers to the channel: the test id in the channel prefix keeps
    /// other tests out of it, and the second instance subscribes only in the cross-instance
    /// scenario, to a channel of its own.
    async fn upstream_subscriptions(&self, channel: &str) -> Option<usize> {
        let full = format!("{}:{channel}", prefix(&self.id));
        Some(numsub(&self.admin, &full).await)
    }

    async fn listens_upstream(&self, channel: &str) -> Option<bool> {
        self.upstream_subscriptions(channel).await.map(|n| n > 0)
    }
}

/// The channel prefix of the test `id`.
pub(crate) fn prefix(id: &str) -> String {
    format!("cqrs-test:{id}")
}

/// Pub/sub options isolated under the channel prefix `cqrs-test:{id}`.
pub(crate) fn options(id: &str) -> RedisPubSubOptions {
    RedisPubSubOptions::with_connection(connection()).channel_prefix(prefix(id))
}

/// `None` (the scenario is skipped) when Redis is unreachable and not required.
async fn harness(id: String) -> Option<RedisPubSubHarness> {
    if !reachable().await {
        return None;
    }
    let first = options(&id).connect().await.expect("connect the pub/sub");
    let second = options(&id)
        .connect()
        .await
        .expect("connect a second pub/sub");
    let admin = connect_admin().await.expect("connect the admin client");
    Some(RedisPubSubHarness {
        id,
        first,
        second,
        admin,
    })
}

cqrs_core::pubsub_conformance!(harness);
