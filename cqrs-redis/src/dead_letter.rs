//! Dead letters: entries a group gave up on, listed and replayed.

use crate::entry::{self, Fields};
use crate::transport::RedisStreamTransport;
use cqrs_core::EventRecord;
use cqrs_core::ports::TransportError;
use fred::interfaces::{ClientLike, StreamsInterface};
use fred::types::Value;

/// An entry a consumer group gave up on: handed out `max_deliveries` times, or not
/// decodable. It stays in the topic's dead-letter stream (`{prefix}:{topic}:dead`) until
/// replayed or discarded.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id in the dead-letter stream; replay and discard take it.
    pub id: String,
    /// The id the entry had in the topic's stream.
    pub entry_id: String,
    /// The group that gave up on it.
    pub group: String,
    /// The consumer that dead-lettered it.
    pub consumer: String,
    /// How many times it was handed out to a consumer before the group gave up on it.
    pub deliveries: u32,
    /// Why: the last error a nack reported for it, "undecodable entry: ...", or "delivered N
    /// times without an acknowledgement".
    pub error: String,
    /// The event, when its record decodes.
    pub record: Option<EventRecord>,
    /// The entry's fields as they were in the topic's stream (values as lossy UTF-8).
    pub fields: Vec<(String, String)>,
    /// How many of the entry's fields the dead letter left out: 0, unless the entry had more
    /// than 1,000 fields (written by hand: Redis's scripts cannot copy an entry that large),
    /// when only the transport's own fields (`id`, `type`, `record`, ...) were kept.
    pub dropped_fields: u64,
}

impl DeadLetter {
    fn from_entry(id: String, fields: Fields) -> Self {
        let text = |name: &str| entry::field(&fields, name).unwrap_or_default().to_owned();
        let original: Fields = fields
            .iter()
            .filter(|(name, _)| !name.starts_with(b"dead."))
            .cloned()
            .collect();
        Self {
            entry_id: text("dead.entry"),
            group: text("dead.group"),
            consumer: text("dead.consumer"),
            deliveries: text("dead.deliveries").parse().unwrap_or(0),
            error: text("dead.error"),
            dropped_fields: text("dead.dropped").parse().unwrap_or(0),
            record: entry::decode(&original).ok(),
            fields: original
                .into_iter()
                .map(|(name, value)| {
                    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    (text(&name), text(&value))
                })
                .collect(),
            id,
        }
    }
}

/// A dead letter published again.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Replayed {
    /// The dead letter's id (it is gone from the dead-letter stream now).
    pub dead_letter_id: String,
    /// The new entry's id in the topic's stream.
    pub entry_id: String,
}

impl RedisStreamTransport {
    /// Up to `count` dead letters of `topic`, oldest first, after dead letter `after` (from the
    /// start when `None`): page with the last id of the previous page. An `after` that is no
    /// stream id (`<ms>-<seq>`) is [`TransportError::Invalid`].
    pub async fn dead_letters(
        &self,
        topic: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<DeadLetter>, TransportError> {
        let keys = self.shared.keys(topic)?;
        let start = match after {
            None => "-".to_owned(),
            Some(id) => match entry::parse_id(id) {
                // Nothing comes after the largest id (Redis refuses an interval past it).
                Some((u64::MAX, u64::MAX)) => return Ok(Vec::new()),
                Some(_) => format!("({id}"),
                None => {
                    return Err(TransportError::Invalid(format!(
                        "`{id}` is no dead letter id: page with the `id` of the last dead \
                         letter of the previous page (`<milliseconds>-<sequence>`)"
                    )));
                }
            },
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let reply: Value = self
            .shared
            .client
            .with_options(&self.shared.fail_fast())
            .xrange(keys.dead.as_str(), start, "+", Some(count as u64))
            .await
            .map_err(|e| self.shared.error(e))?;
        Ok(entry::entries(reply)
            .into_iter()
            .map(|(id, fields)| DeadLetter::from_entry(id, fields))
            .collect())
    }

    /// Publishes dead letters again, each to the group that gave up on it only (the other
    /// groups skip the entry), and removes them from the dead-letter stream, in one script.
    /// Ids not found, and strings that are no stream ids (`<ms>-<seq>`), are left out of the
    /// answer, which lists the others in the order they were published again, each under its
    /// id as Redis writes it and once, however often `ids` names it (`1000-05` and `1000-5`
    /// are one entry). So are, left in the dead-letter stream with a warning, dead
    /// letters whose group no longer exists on the topic (deleted, or renamed): published
    /// for it, every other group would acknowledge the entry unhandled and the event would
    /// be gone. Create the group again (or consume under its name) to replay them.
    ///
    /// Order: the dead letters of one call are published again in the order of their
    /// original entries (where each event was first published, also for one dead-lettered
    /// again after an earlier replay), whatever the order of `ids`. Those of one order lane (one key, with
    /// [`KeyOrdering::Exact`](crate::KeyOrdering::Exact)) and one group are chained to each
    /// other: the group hands each out only once the one replayed before it is acknowledged
    /// or dead-lettered, so replaying an event and the ones of its key dead-lettered behind
    /// it (together, in one call) handles them in their order. The first of a chain waits
    /// for nothing: replays are not chained to the lane's live entries, so they are handed
    /// out as soon as they are read, not after the events of their key published since; and
    /// chains of separate calls are independent of each other. Entries in no lane stay in
    /// none.
    ///
    /// An undecodable entry is replayed as it was (a consumer that now understands it can take
    /// it); it is dead-lettered again otherwise.
    ///
    /// An error (`Unavailable`, `Timeout`) may come after the script ran, its reply lost: the
    /// dead letters were then replayed, and a retry with the same ids answers with none (not
    /// found). Each replayed entry carries the dead letter's id in its `replayed` field: look
    /// for it in the topic's stream to tell.
    pub async fn replay_dead_letters(
        &self,
        topic: &str,
        ids: &[String],
    ) -> Result<Vec<Replayed>, TransportError> {
        let ids = stream_ids(ids);
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.shared.keys(topic)?;
        let reply = self
            .shared
            .scripts
            .replay
            .run(
                &self.shared.client,
                &self.shared.fail_fast(),
                &[keys.stream.as_str(), keys.dead.as_str()],
                ids.into_iter().map(Value::from).collect(),
            )
            .await
            .map_err(|e| self.shared.error(e))?;
        let mut parts = entry::array(reply).into_iter();
        let (replayed, gone) = (
            entry::array(parts.next().unwrap_or(Value::Null)),
            entry::array(parts.next().unwrap_or(Value::Null)),
        );
        let mut gone = gone.into_iter();
        while let (Some(dead), Some(group)) = (gone.next(), gone.next()) {
            tracing::warn!(
                topic,
                dead_letter = dead.as_str().as_deref().unwrap_or("?"),
                group = group.as_str().as_deref().unwrap_or("?"),
                "dead letter not replayed: its group no longer exists on the topic (no \
                 consumer would handle it); it stays in the dead-letter stream"
            );
        }
        let mut out = Vec::new();
        let mut items = replayed.into_iter();
        while let (Some(dead), Some(entry)) = (items.next(), items.next()) {
            if let (Some(dead_letter_id), Some(entry_id)) =
                (dead.into_string(), entry.into_string())
            {
                out.push(Replayed {
                    dead_letter_id,
                    entry_id,
                });
            }
        }
        Ok(out)
    }

    /// Deletes `topic`'s dead letters older than `older_than` (by their entry ids, which are
    /// the times they were dead-lettered), and returns how many. Nothing else removes dead
    /// letters; [`StreamMaintenance`](crate::StreamMaintenance) calls this with its
    /// [`dead_letter_retention`](crate::StreamMaintenance::dead_letter_retention).
    pub async fn trim_dead_letters(
        &self,
        topic: &str,
        older_than: std::time::Duration,
    ) -> Result<u64, TransportError> {
        let keys = self.shared.keys(topic)?;
        // The server's clock, which gave the dead letters their ids: this host's may be ahead
        // (deleting them early) or behind. Asked of the node that holds the key.
        let node =
            fred::types::ClusterHash::Custom(fred::util::redis_keyslot(keys.dead.as_bytes()));
        let time: Value = self
            .shared
            .client
            .with_options(&self.shared.fail_fast())
            .custom(
                fred::types::CustomCommand::new("TIME", node, false),
                Vec::<Value>::new(),
            )
            .await
            .map_err(|e| self.shared.error(e))?;
        let seconds = entry::array(time)
            .first()
            .and_then(Value::as_u64)
            .ok_or_else(|| TransportError::Backend {
                backend: "redis",
                source: "TIME answered without seconds".into(),
            })?;
        let now = std::time::Duration::from_secs(seconds);
        let Some(bound) = now.checked_sub(older_than) else {
            return Ok(0);
        };
        // Exact, not `~`: a dead letter is kept for its full retention, and they are few.
        let removed: Value = self
            .shared
            .client
            .with_options(&self.shared.fail_fast())
            .custom(
                fred::types::CustomCommand::new("XTRIM", fred::types::ClusterHash::FirstKey, false),
                vec![
                    Value::from(keys.dead.as_str()),
                    Value::from("MINID"),
                    Value::from(format!("{}-0", bound.as_millis())),
                ],
            )
            .await
            .map_err(|e| self.shared.error(e))?;
        Ok(removed.as_u64().unwrap_or(0))
    }

    /// Deletes dead letters for good. Returns how many existed (a string that is no stream
    /// id, `<ms>-<seq>`, names none).
    pub async fn discard_dead_letters(
        &self,
        topic: &str,
        ids: &[String],
    ) -> Result<u64, TransportError> {
        let ids = stream_ids(ids);
        if ids.is_empty() {
            return Ok(0);
        }
        let keys = self.shared.keys(topic)?;
        self.shared
            .client
            .with_options(&self.shared.fail_fast())
            .xdel(keys.dead.as_str(), ids)
            .await
            .map_err(|e| self.shared.error(e))
    }
}

/// The ids among `ids` that are stream entry ids (`<ms>-<seq>`, both decimal), each once and
/// written as Redis writes it. Any other (a typo, a blank line of an operator's list) names no
/// dead letter, and Redis would fail the whole call on it, so it is left out, as an id not
/// found is. Redis reads `1000-05` as `1000-5`: taken as written, a list naming one entry both
/// ways would replay it twice.
fn stream_ids(ids: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.iter()
        .filter_map(|id| entry::parse_id(id))
        .filter(|id| seen.insert(*id))
        .map(|(ms, seq)| format!("{ms}-{seq}"))
        .collect()
}
