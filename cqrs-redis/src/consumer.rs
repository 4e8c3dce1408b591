//! [`RedisConsumer`]: one member of a consumer group.

use crate::connection::{self, quit_later};
use crate::entry::{self, Fields};
use crate::error::{is_nogroup, transport_error};
use crate::keys::TopicKeys;
use crate::transport::{Shared, forget_name};
use async_trait::async_trait;
use cqrs_core::ports::{Consumer, ConsumerOptions, Delivery, DeliveryId, TransportError};
use fred::clients::Client;
use fred::interfaces::{ClientLike, StreamsInterface};
use fred::prelude::Options;
use fred::types::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One member of a consumer group of a [`RedisStreamTransport`](crate::RedisStreamTransport).
///
/// Each [`fetch`](Consumer::fetch) step, on the shared connection,
///
/// 1. reads new entries with a plain `XREADGROUP >` (their fields never go through Lua), as
///    many as the batch has room for beside the entries it holds back;
///
/// then, in one script (skipped when nothing is held, no reclaim is due and no entry read is
/// in a lane or meant for one group),
///
/// 2. reclaims entries idle for the redelivery delay (`XAUTOCLAIM`): nacked ones, and those
///    left pending by a consumer that crashed;
/// 3. passes each candidate through the **order gate**: an entry in a lane (see
///    [`KeyOrdering`](crate::KeyOrdering)) is handed out only once this group acknowledged
///    the previous entry of its lane, whichever consumer handled it; until then the consumer
///    holds it (pending to it, its idle time reset at every fetch so no one reclaims it);
/// 4. dead-letters entries delivered more than `max_deliveries` times, with the last error a
///    nack reported and the delivery count, and acknowledges them.
///
/// When nothing is ready it waits on its own connection with a blocking `XREADGROUP` (fred
/// multiplexes one connection per client, so a blocking read would hold up everything else on
/// a shared one), up to the consumer's `block` interval. Entries whose `record` does not decode
/// are dead-lettered too, never handed out and never a crash.
///
/// [`ack`](Consumer::ack) is one `XACK` of all the ids plus advancing their lanes, in one
/// script.
/// [`nack`](Consumer::nack) restarts the entry's idle clock, so it is reclaimed after the
/// redelivery delay, by this consumer or another.
///
/// Errors are retryable (`Unavailable`, `Timeout`) while Redis is away: the consumer stays
/// usable and its connections reconnect by themselves, so call `fetch` again (with a backoff).
pub struct RedisConsumer {
    shared: Arc<Shared>,
    reader: Client,
    keys: TopicKeys,
    applied: String,
    errors: String,
    topic: String,
    group: String,
    options: ConsumerOptions,
    /// Entries read and not handed out yet (waiting for their turn, or over the batch size).
    held: Vec<String>,
    /// The fields of held entries, kept here so the gate script never reads them again.
    known: HashMap<String, Fields>,
    /// Entries handed out and not acknowledged, with their lane (empty for none).
    in_flight: HashMap<String, String>,
    /// Where the next `XAUTOCLAIM` continues.
    cursor: String,
    next_claim: Instant,
    claim_interval: Duration,
}

impl fmt::Debug for RedisConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConsumer")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("consumer", &self.options.consumer_name)
            .field("held", &self.held.len())
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

/// Entries one step found ready: id, delivery count, fields.
type Ready = Vec<(String, u32, Fields)>;

impl RedisConsumer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        reader: Client,
        keys: TopicKeys,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Self {
        // Look for due redeliveries a few times per redelivery delay, and at least every second.
        let claim_interval =
            (options.redelivery_delay / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        Self {
            applied: keys.applied(group),
            errors: keys.errors(group),
            shared,
            reader,
            keys,
            topic: topic.to_owned(),
            group: group.to_owned(),
            options,
            held: Vec::new(),
            known: HashMap::new(),
            in_flight: HashMap::new(),
            cursor: "0-0".to_owned(),
            next_claim: Instant::now(),
            claim_interval,
        }
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// This consumer's name in its group.
    pub fn name(&self) -> &str {
        &self.options.consumer_name
    }

    /// How many read entries this consumer holds back, waiting for their turn.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The server-side ids (`CLIENT ID`) of this consumer's own connection (blocking reads) and
    /// of the transport's shared one, as `CLIENT LIST` shows them (each connection is named
    /// after its fred client). Operators find consumers with them; tests kill them.
    pub async fn client_ids(&self) -> Result<Vec<i64>, TransportError> {
        connection::client_ids(
            &self.shared.client,
            &[self.reader.id(), self.shared.client.id()],
        )
        .await
    }

    /// Like [`nack`](Consumer::nack), recording `error` as the reason: if the entry is later
    /// dead-lettered, the dead letter carries the last error reported for it.
    pub async fn nack_with_error(
        &mut self,
        id: &DeliveryId,
        error: &str,
    ) -> Result<(), TransportError> {
        self.in_flight.remove(&id.0);
        let args = vec![
            Value::from(self.group.as_str()),
            Value::from(self.options.consumer_name.as_str()),
            Value::from(id.0.as_str()),
            Value::from(error),
        ];
        self.shared
            .scripts
            .nack
            .run(
                &self.shared.client,
                &self.shared.patient(),
                &[self.keys.stream.as_str(), self.errors.as_str()],
                args,
            )
            .await
            .map_err(transport_error)?;
        Ok(())
    }

    /// Stops consuming: entries held back (never handed out) are released at once for the
    /// other consumers of the group, and the consumer's connection closes. Entries handed out
    /// and not acknowledged come back after the redelivery delay. Dropping the consumer does
    /// the same in the background.
    pub async fn close(mut self) -> Result<(), TransportError> {
        let held = std::mem::take(&mut self.held);
        self.known.clear();
        self.release(held).await
    }

    async fn release(&self, held: Vec<String>) -> Result<(), TransportError> {
        release(
            &self.shared,
            &self.keys.stream,
            &self.group,
            &self.options,
            held,
        )
        .await
    }

    /// One script: reclaim, read, gate. Recreates the group if it vanished (a server that
    /// restarted without persistence) and tries once more.
    async fn step(&mut self, max: usize) -> Result<Ready, TransportError> {
        match self.try_step(max).await {
            Err(e) if is_nogroup(&e) => {
                self.shared.create_group(&self.keys, &self.group).await?;
                self.held.clear();
                self.known.clear();
                self.try_step(max).await.map_err(transport_error)
            }
            other => other.map_err(transport_error),
        }
    }

    async fn try_step(&mut self, max: usize) -> Result<Ready, fred::error::Error> {
        let now = Instant::now();
        let claim = self.cursor != "0-0" || now >= self.next_claim;
        // Read only what the batch has room for beside the entries already held: the held set
        // then stays about one batch (each step re-examines all of it). When none of them is
        // ready, `fetch` waits for new entries up to `max_held`, so blocked entries do not
        // stop the consumer from reading on.
        let room = self
            .shared
            .options
            .max_held
            .saturating_sub(self.held.len())
            .min(max.saturating_sub(self.held.len()));
        // A plain `XREADGROUP` from the client: the entries' fields never go through Lua.
        let fresh = if room > 0 {
            let reply = self
                .shared
                .client
                .with_options(&self.shared.patient())
                .xreadgroup::<Value, _, _, _, _>(
                    self.group.as_str(),
                    self.options.consumer_name.as_str(),
                    Some(room as u64),
                    None,
                    false,
                    self.keys.stream.as_str(),
                    ">",
                )
                .await?;
            read_entries(reply)
        } else {
            Vec::new()
        };
        if !claim && self.held.is_empty() {
            if fresh.is_empty() {
                return Ok(Vec::new());
            }
            // Nothing to reclaim, nothing held, and no new entry in a lane or meant for one
            // group only: the gate would hand every one out as it is (delivered once).
            let plain = self.options.max_deliveries >= 1
                && fresh.iter().all(|(_, f)| {
                    entry::field(f, "lane").is_none() && entry::field(f, "group").is_none()
                });
            if plain {
                return Ok(fresh.into_iter().map(|(id, f)| (id, 1, f)).collect());
            }
        }
        let mut args = vec![
            Value::from(self.group.as_str()),
            Value::from(self.options.consumer_name.as_str()),
            Value::from(millis(self.options.redelivery_delay)),
            Value::from(if claim { max as i64 } else { 0 }),
            Value::from(self.cursor.as_str()),
            Value::from(i64::from(self.options.max_deliveries)),
            Value::from(max as i64),
        ];
        let candidate = |args: &mut Vec<Value>, id: &str, kind: &str, fields: Option<&Fields>| {
            let text = |name: &str| fields.and_then(|f| entry::field(f, name)).unwrap_or("");
            args.push(Value::from(id));
            args.push(Value::from(kind));
            args.push(Value::from(text("lane")));
            args.push(Value::from(text("prev")));
            args.push(Value::from(text("group")));
        };
        for id in &self.held {
            let fields = self.known.get(id);
            candidate(
                &mut args,
                id,
                if fields.is_some() { "h" } else { "u" },
                fields,
            );
        }
        for (id, fields) in &fresh {
            candidate(&mut args, id, "f", Some(fields));
        }
        // Should the script fail, the new entries are held, and gated at the next step.
        for (id, fields) in fresh {
            self.held.push(id.clone());
            self.known.insert(id, fields);
        }
        let reply = self
            .shared
            .scripts
            .step
            .run(
                &self.shared.client,
                &self.shared.patient(),
                &[
                    self.keys.stream.as_str(),
                    self.applied.as_str(),
                    self.keys.dead.as_str(),
                    self.errors.as_str(),
                ],
                args,
            )
            .await?;
        let mut parts = entry::array(reply).into_iter();
        let cursor = parts.next().and_then(Value::into_string);
        let ready = parts.next().map(entry::array).unwrap_or_default();
        let held = parts.next().map(entry::array).unwrap_or_default();
        let dead = parts.next().and_then(|v| v.as_u64()).unwrap_or(0);
        if claim {
            self.cursor = cursor.unwrap_or_else(|| "0-0".to_owned());
            if self.cursor == "0-0" {
                self.next_claim = now + self.claim_interval;
            }
        }
        if dead > 0 {
            tracing::warn!(
                topic = %self.topic,
                group = %self.group,
                count = dead,
                "dead-lettered entries delivered more than {} times",
                self.options.max_deliveries
            );
        }
        let mut known = std::mem::take(&mut self.known);
        self.held.clear();
        let mut items = held.into_iter();
        while let (Some(id), Some(fields)) = (items.next(), items.next()) {
            let Some(id) = id.into_string() else { continue };
            if fields.is_array() {
                known.insert(id.clone(), entry::fields(fields));
            }
            self.held.push(id);
        }
        let mut out = Vec::with_capacity(ready.len() / 3);
        let mut items = ready.into_iter();
        while let (Some(id), Some(count), Some(fields)) = (items.next(), items.next(), items.next())
        {
            let Some(id) = id.into_string() else { continue };
            let count = count
                .as_u64()
                .map_or(1, |c| u32::try_from(c).unwrap_or(u32::MAX));
            let fields = if fields.is_array() {
                Some(entry::fields(fields))
            } else {
                known.remove(&id)
            };
            match fields {
                Some(fields) => out.push((id, count, fields)),
                // Not expected: the script returns the fields the client does not have. Held,
                // the next step reads them.
                None => self.held.push(id),
            }
        }
        // Keep the fields of the held entries only.
        for id in &self.held {
            if let Some(fields) = known.remove(id) {
                self.known.insert(id.clone(), fields);
            }
        }
        Ok(out)
    }

    /// Dead-letters entries that cannot be decoded.
    async fn dead_letter(&self, undecodable: Vec<(String, String)>) -> Result<(), TransportError> {
        let mut args = vec![
            Value::from(self.group.as_str()),
            Value::from(self.options.consumer_name.as_str()),
        ];
        for (id, reason) in &undecodable {
            tracing::warn!(topic = %self.topic, group = %self.group, entry = %id, "{reason}");
            args.push(Value::from(id.as_str()));
            args.push(Value::from(reason.as_str()));
        }
        self.shared
            .scripts
            .dead_letter
            .run(
                &self.shared.client,
                &self.shared.patient(),
                &[
                    self.keys.stream.as_str(),
                    self.applied.as_str(),
                    self.keys.dead.as_str(),
                    self.errors.as_str(),
                ],
                args,
            )
            .await
            .map_err(transport_error)?;
        Ok(())
    }

    /// Waits up to `wait` for new entries on this consumer's own connection; the ids read join
    /// the held ones, and the next step gates them.
    async fn wait_for_entries(
        &mut self,
        count: usize,
        wait: Duration,
    ) -> Result<(), TransportError> {
        let options = Options {
            timeout: Some(wait + self.shared.options.connection.command_timeout),
            ..Options::default()
        };
        let read = self
            .reader
            .with_options(&options)
            .xreadgroup::<Value, _, _, _, _>(
                self.group.as_str(),
                self.options.consumer_name.as_str(),
                Some(count as u64),
                Some(millis(wait).max(1) as u64),
                false,
                self.keys.stream.as_str(),
                ">",
            )
            .await;
        let reply = match read {
            Ok(reply) => reply,
            Err(e) if is_nogroup(&e) => {
                self.shared.create_group(&self.keys, &self.group).await?;
                return Ok(());
            }
            Err(e) => return Err(transport_error(e)),
        };
        for (id, fields) in read_entries(reply) {
            self.held.push(id.clone());
            self.known.insert(id, fields);
        }
        Ok(())
    }
}

/// The entries of an `XREADGROUP` reply on one stream.
fn read_entries(reply: Value) -> Vec<(String, Fields)> {
    let mut out = Vec::new();
    for stream in entry::array(reply) {
        let mut parts = entry::array(stream).into_iter();
        let _key = parts.next();
        out.extend(entry::entries(parts.next().unwrap_or(Value::Null)));
    }
    out
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

async fn release(
    shared: &Shared,
    stream: &str,
    group: &str,
    options: &ConsumerOptions,
    held: Vec<String>,
) -> Result<(), TransportError> {
    if held.is_empty() {
        return Ok(());
    }
    let mut args = vec![
        Value::from(group),
        Value::from(options.consumer_name.as_str()),
        Value::from(millis(options.redelivery_delay)),
    ];
    args.extend(held.into_iter().map(Value::from));
    shared
        .scripts
        .release
        .run(&shared.client, &shared.patient(), &[stream], args)
        .await
        .map_err(transport_error)?;
    Ok(())
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        forget_name(
            &self.shared,
            &self.keys.stream,
            &self.group,
            &self.options.consumer_name,
        );
        quit_later(self.reader.clone());
        let held = std::mem::take(&mut self.held);
        if held.is_empty() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            let stream = self.keys.stream.clone();
            let group = self.group.clone();
            let options = self.options.clone();
            handle.spawn(async move {
                if let Err(e) = release(&shared, &stream, &group, &options, held).await {
                    tracing::debug!(error = %e, "could not release held entries; they come back after the redelivery delay");
                }
            });
        }
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn fetch(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        let max = max.max(1);
        let deadline = Instant::now() + self.options.block;
        loop {
            let ready = self.step(max).await?;
            let mut deliveries = Vec::with_capacity(ready.len());
            let mut undecodable = Vec::new();
            for (id, attempt, fields) in ready {
                match entry::decode(&fields) {
                    Ok(record) => {
                        let lane = entry::field(&fields, "lane").unwrap_or_default().to_owned();
                        self.in_flight.insert(id.clone(), lane);
                        deliveries.push(Delivery::new(DeliveryId(id), record, attempt));
                    }
                    Err(reason) => undecodable.push((id, reason)),
                }
            }
            let dead_lettered = !undecodable.is_empty();
            if dead_lettered {
                self.dead_letter(undecodable).await?;
            }
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            if dead_lettered {
                // Their successors may be ready now.
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut wait = deadline - now;
            if self.next_claim > now {
                wait = wait.min(self.next_claim - now);
            } else {
                wait = wait.min(self.claim_interval);
            }
            if !self.held.is_empty() {
                wait = wait.min(self.shared.options.gate_poll);
            }
            let room = self.shared.options.max_held.saturating_sub(self.held.len());
            if room == 0 {
                tokio::time::sleep(wait).await;
            } else {
                self.wait_for_entries(room.min(max), wait).await?;
            }
        }
    }

    async fn ack(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        if ids.is_empty() {
            return Ok(());
        }
        for chunk in ids.chunks(512) {
            let mut args = Vec::with_capacity(chunk.len() * 2 + 1);
            args.push(Value::from(self.group.as_str()));
            for id in chunk {
                let lane = self
                    .in_flight
                    .get(&id.0)
                    .cloned()
                    .unwrap_or_else(|| "?".to_owned());
                args.push(Value::from(id.0.as_str()));
                args.push(Value::from(lane));
            }
            self.shared
                .scripts
                .ack
                .run(
                    &self.shared.client,
                    &self.shared.patient(),
                    &[
                        self.keys.stream.as_str(),
                        self.applied.as_str(),
                        self.errors.as_str(),
                    ],
                    args,
                )
                .await
                .map_err(transport_error)?;
            for id in chunk {
                self.in_flight.remove(&id.0);
            }
        }
        Ok(())
    }

    async fn nack(&mut self, id: &DeliveryId) -> Result<(), TransportError> {
        self.nack_with_error(id, "").await
    }

    async fn nack_with_reason(
        &mut self,
        id: &DeliveryId,
        reason: &str,
    ) -> Result<(), TransportError> {
        self.nack_with_error(id, reason).await
    }
}
