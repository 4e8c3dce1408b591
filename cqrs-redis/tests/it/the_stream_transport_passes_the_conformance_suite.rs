//! The core's event transport conformance suite, against Redis: each scenario under its own key
//! prefix, with short intervals.

use crate::support::{connect_admin, delete_prefix, key_prefix, raw, reachable, stream_options};
use cqrs_core::ports::EventTransport;
use cqrs_core::testing::Harness;
use cqrs_core::testing::transport::TransportHarness;
use cqrs_redis::{KeyOrdering, RedisStreamTransport};
use std::sync::Arc;

pub(crate) struct RedisTransportHarness {
    id: String,
    transport: RedisStreamTransport,
}

#[cqrs_core::async_trait]
impl Harness for RedisTransportHarness {
    fn test_id(&self) -> &str {
        &self.id
    }

    async fn teardown(self) {
        let admin = connect_admin().await.expect("connect for cleanup");
        delete_prefix(&admin, &key_prefix(&self.id)).await;
    }
}

#[cqrs_core::async_trait]
impl TransportHarness for RedisTransportHarness {
    fn transport(&self) -> Arc<dyn EventTransport> {
        Arc::new(self.transport.clone())
    }

    /// The topic's dead-letter stream, the group's entries.
    async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
    ) -> Option<Vec<(uuid::Uuid, u32, Option<String>)>> {
        let dead = self
            .transport
            .dead_letters(topic, None, 1000)
            .await
            .expect("read the dead letters");
        Some(
            dead.into_iter()
                .filter(|d| d.group == group)
                .map(|d| {
                    let record = d.record.expect("a dead letter that decodes");
                    (record.event_id, d.deliveries, Some(d.error))
                })
                .collect(),
        )
    }

    /// The consumer's rows in the group's `XPENDING`.
    async fn pending_to(&self, topic: &str, group: &str, consumer: &str) -> Option<usize> {
        let admin = connect_admin().await.expect("connect to read XPENDING");
        let stream = self
            .transport
            .stream_key(topic)
            .expect("the topic's stream");
        let rows = raw(
            &admin,
            "XPENDING",
            vec![
                stream.as_str().into(),
                group.into(),
                "-".into(),
                "+".into(),
                1000.into(),
                consumer.into(),
            ],
        )
        .await;
        Some(rows.into_array().len())
    }
}

/// `None` (the scenario is skipped) when Redis is unreachable and not required.
async fn harness_with(id: String, ordering: KeyOrdering) -> Option<RedisTransportHarness> {
    if !reachable().await {
        return None;
    }
    let transport = stream_options(&id)
        .key_ordering(ordering)
        .connect()
        .await
        .expect("connect the transport");
    Some(RedisTransportHarness { id, transport })
}

/// The default ordering: keys hashed into 1,024 lanes.
async fn harness(id: String) -> Option<RedisTransportHarness> {
    harness_with(id, KeyOrdering::Lanes(1024)).await
}

cqrs_core::transport_conformance!(harness);

/// The suite again with one lane per key: the chains and the lanes hash take other keys.
mod with_one_lane_per_key {
    use super::*;

    async fn harness(id: String) -> Option<RedisTransportHarness> {
        harness_with(id, KeyOrdering::Exact).await
    }

    cqrs_core::transport_conformance!(harness);
}

/// The suite again without per-key order: every entry is in no lane, handed out at once, and
/// the transport says so (`ordered_per_key` is false); the scenarios on order are left out.
mod without_key_order {
    use super::*;

    async fn harness(id: String) -> Option<RedisTransportHarness> {
        harness_with(id, KeyOrdering::Unordered).await
    }

    cqrs_core::transport_conformance!(harness, without_key_order);
}
