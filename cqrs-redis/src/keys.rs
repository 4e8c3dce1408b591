//! The key layout. Every key of a topic carries the topic as its hash tag (`{topic}`), so they
//! all live in one slot of a Redis Cluster and the scripts may touch them together.

use cqrs_core::ports::TransportError;

/// The keys of one topic.
#[derive(Clone, Debug)]
pub(crate) struct TopicKeys {
    base: String,
    /// The stream of entries: `{prefix}:{topic}:stream`.
    pub(crate) stream: String,
    /// Each lane's last entry id, written by publishers: `{prefix}:{topic}:lanes`.
    pub(crate) lanes: String,
    /// Dead-lettered entries of every group: `{prefix}:{topic}:dead`.
    pub(crate) dead: String,
    /// The key ordering the topic's publishers use (`KeyOrdering::name`), written by the
    /// first: `{prefix}:{topic}:ordering`.
    pub(crate) ordering: String,
}

impl TopicKeys {
    /// The keys of `topic`, refused as the port refuses it (an empty name, or one with a
    /// brace: `{}x}` is no hash tag, and the topic's keys would land in different slots).
    pub(crate) fn new(prefix: &str, topic: &str) -> Result<Self, TransportError> {
        cqrs_core::ports::validate_topic(topic)?;
        let base = format!("{prefix}:{{{topic}}}");
        Ok(Self {
            stream: format!("{base}:stream"),
            lanes: format!("{base}:lanes"),
            dead: format!("{base}:dead"),
            ordering: format!("{base}:ordering"),
            base,
        })
    }

    /// The last error reported by a nack, per entry: `{prefix}:{topic}:errors:{group}`.
    pub(crate) fn errors(&self, group: &str) -> String {
        format!("{}:errors:{group}", self.base)
    }

    /// Each consumer's redelivery delay, as it joined: `{prefix}:{topic}:delays:{group}`.
    pub(crate) fn delays(&self, group: &str) -> String {
        format!("{}:delays:{group}", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_topic_hashes_to_one_slot() {
        let keys = TopicKeys::new("app", "orders").unwrap();
        assert_eq!(keys.stream, "app:{orders}:stream");
        let slot = fred::util::redis_keyslot(keys.stream.as_bytes());
        for key in [
            keys.lanes.clone(),
            keys.dead.clone(),
            keys.ordering.clone(),
            keys.errors("g"),
            keys.delays("g"),
        ] {
            assert_eq!(fred::util::redis_keyslot(key.as_bytes()), slot, "{key}");
        }
        assert!(TopicKeys::new("app", "").is_err());
        for topic in ["}x", "a{b", "{t}"] {
            assert!(TopicKeys::new("app", topic).is_err(), "{topic}");
        }
    }
}
