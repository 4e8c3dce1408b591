//! The core's pub/sub conformance suite, against Redis: each scenario under its own channel
//! prefix (pub/sub ignores the database number), with a second instance for the cross-process
//! scenario.

use crate::support::{connection, reachable};
use cqrs_core::ports::PubSub;
use cqrs_core::testing::Harness;
use cqrs_core::testing::pubsub::PubSubHarness;
use cqrs_redis::{RedisPubSub, RedisPubSubOptions};
use std::sync::Arc;

pub(crate) struct RedisPubSubHarness {
    id: String,
    first: RedisPubSub,
    second: RedisPubSub,
}

impl Harness for RedisPubSubHarness {
    fn test_id(&self) -> &str {
        &self.id
    }
}

impl PubSubHarness for RedisPubSubHarness {
    fn pubsub(&self) -> Arc<dyn PubSub> {
        Arc::new(self.first.clone())
    }

    fn other_instance(&self) -> Option<Arc<dyn PubSub>> {
        Some(Arc::new(self.second.clone()))
    }

    fn upstream_subscriptions(&self, channel: &str) -> Option<usize> {
        Some(self.first.upstream_subscriptions(channel))
    }

    fn listens_upstream(&self, channel: &str) -> Option<bool> {
        Some(self.first.upstream_subscriptions(channel) > 0)
    }
}

/// Pub/sub options isolated under the channel prefix `cqrs-test:{id}`.
pub(crate) fn options(id: &str) -> RedisPubSubOptions {
    RedisPubSubOptions::with_connection(connection()).channel_prefix(format!("cqrs-test:{id}"))
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
    Some(RedisPubSubHarness { id, first, second })
}

cqrs_core::pubsub_conformance!(harness);
