//! Lag and pending counts per group, for metrics and operators.

use crate::entry::{array, info_field};
use crate::transport::RedisStreamTransport;
use cqrs_core::ports::TransportError;
use fred::interfaces::{ClientLike, StreamsInterface};
use fred::types::Value;

/// The state of one topic: its stream, its dead letters, its groups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStats {
    /// Entries in the stream (`XLEN`), acknowledged ones included until trimmed.
    pub length: u64,
    /// Entries in the dead-letter stream.
    pub dead_letters: u64,
    /// Each consumer group.
    pub groups: Vec<GroupStats>,
}

/// The state of one consumer group (`XINFO GROUPS`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStats {
    /// The group's name.
    pub name: String,
    /// Consumers known to the group (live or not).
    pub consumers: u64,
    /// Entries delivered and not acknowledged yet (held back by the order gate, being
    /// handled, nacked, or left by a crashed consumer).
    pub pending: u64,
    /// Entries not delivered to the group yet. `None` when Redis cannot tell (after entries
    /// were deleted in the middle of the stream).
    pub lag: Option<u64>,
    /// The last entry delivered to the group.
    pub last_delivered_id: String,
    /// How many entries the group has read, when Redis can tell.
    pub entries_read: Option<u64>,
}

impl RedisStreamTransport {
    /// Length, dead letters, and lag and pending per group, of `topic`. An unknown topic has
    /// all zeros and no group.
    pub async fn topic_stats(&self, topic: &str) -> Result<TopicStats, TransportError> {
        let keys = self.shared.keys(topic)?;
        let client = self.shared.client.with_options(&self.shared.fail_fast());
        let (length, dead_letters) = tokio::try_join!(
            client.xlen::<u64, _>(keys.stream.as_str()),
            client.xlen::<u64, _>(keys.dead.as_str()),
        )
        .map_err(|e| self.shared.error(e))?;
        if length == 0 {
            // XINFO GROUPS fails on a missing key; an empty stream may still have groups.
            let exists: u64 =
                fred::interfaces::KeysInterface::exists(&client, keys.stream.as_str())
                    .await
                    .map_err(|e| self.shared.error(e))?;
            if exists == 0 {
                return Ok(TopicStats {
                    dead_letters,
                    ..TopicStats::default()
                });
            }
        }
        let reply: Value = client
            .xinfo_groups(keys.stream.as_str())
            .await
            .map_err(|e| self.shared.error(e))?;
        let groups = array(reply)
            .into_iter()
            .map(|group| {
                let items = array(group);
                let text = |name: &str| {
                    info_field(&items, name)
                        .and_then(|v| v.as_string())
                        .unwrap_or_default()
                };
                let number = |name: &str| info_field(&items, name).and_then(|v| v.as_u64());
                GroupStats {
                    name: text("name"),
                    consumers: number("consumers").unwrap_or(0),
                    pending: number("pending").unwrap_or(0),
                    lag: number("lag"),
                    last_delivered_id: text("last-delivered-id"),
                    entries_read: number("entries-read"),
                }
            })
            .collect();
        Ok(TopicStats {
            length,
            dead_letters,
            groups,
        })
    }
}
