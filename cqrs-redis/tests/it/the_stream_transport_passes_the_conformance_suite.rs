//! The core's event transport conformance suite, against Redis: each scenario under its own key
//! prefix, with short intervals.

use crate::support::{connect_admin, delete_prefix, key_prefix, reachable, stream_options};
use cqrs_core::ports::EventTransport;
use cqrs_core::testing::Harness;
use cqrs_core::testing::transport::TransportHarness;
use cqrs_redis::RedisStreamTransport;
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
}

/// `None` (the scenario is skipped) when Redis is unreachable and not required.
async fn harness(id: String) -> Option<RedisTransportHarness> {
    if !reachable().await {
        return None;
    }
    let transport = stream_options(&id)
        .connect()
        .await
        .expect("connect the transport");
    Some(RedisTransportHarness { id, transport })
}

cqrs_core::transport_conformance!(harness);
