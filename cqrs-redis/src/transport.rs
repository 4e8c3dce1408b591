//! [`RedisStreamTransport`]: the core's event transport on Redis Streams.

use crate::connection::{self, quit_later};
use crate::consumer::{RedisConsumer, forget_delay};
use crate::error::{ConnectError, backend, client_error, is_busygroup, transport_error};
use crate::keys::TopicKeys;
use crate::options::{KeyOrdering, RedisStreamOptions};
use crate::scripts::Scripts;
use async_trait::async_trait;
use cqrs_core::EventRecord;
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventTransport, TransportCapabilities, TransportError,
};
use cqrs_core::runtime::{Health, HealthCheck};
use fred::clients::Client;
use fred::interfaces::{ClientLike, KeysInterface, StreamsInterface};
use fred::prelude::Options;
use fred::types::{ClusterHash, SetOptions, Value};
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many events one publish script carries; larger batches are split into several scripts,
/// each sent once the one before succeeded (see [`send_in_order`]).
const PUBLISH_CHUNK: usize = 256;

/// The most record bytes one publish script carries, so that a chunk goes out well within its
/// timeout on a modest link (8 MiB take 0.7 s at 100 Mbit/s). A chunk whose timeout runs out
/// while fred writes it is sent whole all the same and lands: its publish fails (`Timeout`),
/// and every retry of the batch would append it again without ever succeeding.
const PUBLISH_CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// The slowest link to Redis a publish is given time for: a publish's timeout is the command
/// timeout plus the time its records take to send at this rate (0.1 s a MiB). A single event
/// larger than a chunk goes alone, with that much longer.
const PUBLISH_BYTES_PER_SECOND: f64 = 10.0 * 1024.0 * 1024.0;

/// How long a publish of `bytes` of records may take: see [`PUBLISH_BYTES_PER_SECOND`].
fn publish_timeout(command_timeout: Duration, bytes: usize) -> Duration {
    command_timeout.saturating_add(Duration::from_secs_f64(
        bytes as f64 / PUBLISH_BYTES_PER_SECOND,
    ))
}

/// The largest encoded record: Redis's default `proto-max-bulk-len` (512 MiB), less room for
/// the command around it.
const MAX_RECORD_BYTES: usize = 512 * 1024 * 1024 - 64 * 1024;

/// The record an entry carries: the event as JSON, refused as a `Codec` error past
/// [`MAX_RECORD_BYTES`] (Redis refuses an argument that large by closing the connection, and
/// every retry would do the same; a `Codec` error lets the relay skip the event).
fn encoded(event: &EventRecord) -> Result<String, TransportError> {
    let record = serde_json::to_string(event).map_err(|e| TransportError::Codec(e.into()))?;
    check_record_size(event, record.len())?;
    Ok(record)
}

fn check_record_size(event: &EventRecord, size: usize) -> Result<(), TransportError> {
    if size > MAX_RECORD_BYTES {
        return Err(TransportError::Codec(
            format!(
                "event {} ({}) is {size} bytes encoded, over the {MAX_RECORD_BYTES} one Redis \
                 argument takes",
                event.event_id, event.event_type
            )
            .into(),
        ));
    }
    Ok(())
}

/// Whether an event of `size` record bytes starts a new chunk after one of `count` events and
/// `bytes` record bytes (a chunk holds at least one event, whatever its size).
fn starts_a_chunk(count: usize, bytes: usize, size: usize) -> bool {
    count >= PUBLISH_CHUNK || bytes.saturating_add(size) > PUBLISH_CHUNK_BYTES
}

/// What every handle on one transport shares.
pub(crate) struct Shared {
    /// For everything but blocking reads: publishes, scripts, acks, admin.
    pub(crate) client: Client,
    pub(crate) scripts: Scripts,
    pub(crate) options: RedisStreamOptions,
    /// The topics whose recorded key ordering this transport found to be its own (checked
    /// once per topic and process, at its first publish).
    pub(crate) ordering_checked: Mutex<HashSet<String>>,
    /// Pings `client`, replacing its connection when it died silently.
    pub(crate) watchdog: tokio::task::JoinHandle<()>,
    /// The topics whose last publish failed for a reason of the server's (out of memory, a
    /// demoted primary, a missing permission: `PING` still answers then), with the reason;
    /// `publish_failing` says whether there is any, for one load on the usual path.
    pub(crate) publish_failing: std::sync::atomic::AtomicBool,
    pub(crate) publish_failures: Mutex<std::collections::HashMap<String, String>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.watchdog.abort();
        quit_later(self.client.clone());
    }
}

impl Shared {
    /// A failed command's error: a timeout while the client is not connected is reported as
    /// `Unavailable` (see [`client_error`]).
    pub(crate) fn error(&self, error: fred::error::Error) -> TransportError {
        client_error(&self.client, error)
    }

    pub(crate) fn keys(&self, topic: &str) -> Result<TopicKeys, TransportError> {
        TopicKeys::new(&self.options.key_prefix, topic)
    }

    /// Refuses to publish to `topic` with a key ordering other than the one its publishers
    /// use: an event chained in a lane of another setting would not wait for the events of
    /// its key still in flight, and the key's order would break without an error. The first
    /// publisher of a topic records its setting (`SET NX`); each transport checks once per
    /// topic, then remembers it (no round trip on later publishes).
    async fn check_ordering(&self, topic: &str, keys: &TopicKeys) -> Result<(), TransportError> {
        let checked = || {
            self.ordering_checked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if checked().contains(topic) {
            return Ok(());
        }
        let mine = self.options.key_ordering.name();
        let recorded: Option<String> = self
            .client
            .with_options(&self.fail_fast())
            .set(
                keys.ordering.as_str(),
                mine.as_str(),
                None,
                Some(SetOptions::NX),
                true,
            )
            .await
            .map_err(|e| self.error(e))?;
        match recorded {
            Some(theirs) if theirs != mine => {
                let error = TransportError::Invalid(format!(
                    "topic `{topic}` is published with key ordering `{theirs}`, and this \
                     transport uses `{mine}`: a key's events would lose their order. Give every \
                     publisher of the topic the same `key_ordering`; to change it, see \
                     \"Changing `key_ordering`\" in docs/redis.md (drain the topic, then \
                     delete `{}` and the lanes hash)",
                    keys.ordering
                ));
                self.record_failure(topic, &error);
                Err(error)
            }
            _ => {
                checked().insert(topic.to_owned());
                Ok(())
            }
        }
    }

    /// Records `error` as `topic`'s publish failure: the health check reports it until a
    /// publish to the topic succeeds.
    fn record_failure(&self, topic: &str, error: &TransportError) {
        let mut failures = self
            .publish_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        failures.insert(topic.to_owned(), error.to_string());
        self.publish_failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Options for commands that must fail fast while Redis is unreachable.
    pub(crate) fn fail_fast(&self) -> Options {
        Options {
            fail_fast: true,
            timeout: Some(self.options.connection.command_timeout),
            ..Options::default()
        }
    }

    /// [`fail_fast`](Self::fail_fast) for a publish carrying `bytes` of records, with time to
    /// send them ([`publish_timeout`]).
    fn fail_fast_for(&self, bytes: usize) -> Options {
        Options {
            timeout: Some(publish_timeout(
                self.options.connection.command_timeout,
                bytes,
            )),
            ..self.fail_fast()
        }
    }

    /// Options for every other command: wait for a reconnect, up to the command timeout.
    pub(crate) fn patient(&self) -> Options {
        Options {
            timeout: Some(self.options.connection.command_timeout),
            ..Options::default()
        }
    }

    /// [`patient`](Self::patient), written to Redis at most once: for a command that delivers
    /// entries to its consumer (a read, a step). fred sends the commands in flight on a
    /// connection that closed again on the new one; one Redis ran before the close would then
    /// be run twice, and the second reply would stand in for the first, whose entries stay
    /// pending to the consumer in none of its lists. Written once, such a command fails, and
    /// the consumer, unsure, takes over what it may have been served.
    pub(crate) fn once(&self) -> Options {
        Options {
            max_attempts: Some(1),
            ..self.patient()
        }
    }

    /// Creates `group` at the start of the stream (`0`, so entries published before the group
    /// existed are delivered too), and the stream with it; an existing group is left alone.
    /// Whether it created the group.
    pub(crate) async fn create_group(
        &self,
        keys: &TopicKeys,
        group: &str,
    ) -> Result<bool, TransportError> {
        match self
            .client
            .with_options(&self.patient())
            .xgroup_create::<Value, _, _, _>(keys.stream.as_str(), group, "0", true)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_busygroup(&e) => Ok(false),
            Err(e) => Err(transport_error(e)),
        }
    }
}

/// A durable, at-least-once [`EventTransport`] on Redis Streams with consumer groups.
///
/// * **Publish**: one stream per topic; a batch is one Lua script (split in chunks of 256
///   events, each sent once the one before succeeded, so a failed chunk stops the batch and
///   its retry keeps every key in order) that appends each event and chains it
///   into its order lane (one event: a smaller script, or a plain `XADD` when it is in no
///   lane). It fails fast with [`TransportError::Unavailable`] while Redis is
///   unreachable: the outbox relay retries.
/// * **Consume**: [`consumer`](EventTransport::consumer) joins a consumer group, created on
///   demand at `0`. See [`RedisConsumer`] for reading, the order gate, redelivery and
///   dead-lettering.
/// * **Operate**: [`topic_stats`](Self::topic_stats) (lag, pending),
///   [`dead_letters`](Self::dead_letters) and [`replay_dead_letters`](Self::replay_dead_letters),
///   [`trim`](Self::trim), [`prune_consumers`](Self::prune_consumers); or run a
///   [`StreamMaintenance`](crate::StreamMaintenance) worker.
///
/// Cloning is cheap; clones share one connection (fred multiplexes it) and each consumer
/// opens one more for its blocking reads. `docs/redis.md` states the guarantees and the key
/// layout.
#[derive(Clone)]
pub struct RedisStreamTransport {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for RedisStreamTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStreamTransport")
            .field(
                "url",
                &crate::options::redacted_url(&self.shared.options.connection.url),
            )
            .field("key_prefix", &self.shared.options.key_prefix)
            .field("key_ordering", &self.shared.options.key_ordering)
            .finish_non_exhaustive()
    }
}

impl RedisStreamOptions {
    /// Validates the options (reporting every problem at once), connects, checks that the
    /// server is Redis 7.0 or later, warns when its `maxmemory-policy` may evict the
    /// transport's keys (`allkeys-*`; see the crate's guide), and loads the scripts.
    pub async fn connect(self) -> Result<RedisStreamTransport, ConnectError> {
        self.validate()?;
        // Quits if a later step fails or the connect is given up.
        let client = connection::client(&self.connection).await?;
        connection::check_version(&client, true).await?;
        connection::check_eviction(&client).await;
        let scripts = Scripts::load(&client)
            .await
            .map_err(|e| ConnectError::Redis(transport_error(e)))?;
        let client = client.keep();
        Ok(RedisStreamTransport {
            shared: Arc::new(Shared {
                watchdog: connection::watchdog(client.clone(), &self.connection, None),
                client,
                scripts,
                options: self,
                ordering_checked: Mutex::new(HashSet::new()),
                publish_failing: std::sync::atomic::AtomicBool::new(false),
                publish_failures: Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }
}

impl RedisStreamTransport {
    /// The options this transport was made with.
    pub fn options(&self) -> &RedisStreamOptions {
        &self.shared.options
    }

    /// The key of `topic`'s stream (`{prefix}:{topic}:stream`), for operators and tools.
    pub fn stream_key(&self, topic: &str) -> Result<String, TransportError> {
        Ok(self.shared.keys(topic)?.stream)
    }

    /// The key of `topic`'s dead-letter stream (`{prefix}:{topic}:dead`).
    pub fn dead_letter_key(&self, topic: &str) -> Result<String, TransportError> {
        Ok(self.shared.keys(topic)?.dead)
    }

    /// Joins consumer group `group` of `topic` like [`EventTransport::consumer`], returning the
    /// concrete consumer with its extra operations (nack with an error, close).
    ///
    /// The consumer name must be unique in its group; the default of [`ConsumerOptions`] is a
    /// random one. A name already used by a live consumer of this process, through this
    /// transport or another connected with the same URL, is refused.
    pub async fn redis_consumer(
        &self,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Result<RedisConsumer, TransportError> {
        let keys = self.shared.keys(topic)?;
        cqrs_core::ports::validate_group(group)?;
        consumer_option_problems(&options)?;
        self.shared.create_group(&keys, group).await?;
        {
            // A std mutex: nothing awaits while it is held.
            let mut names = LIVE_NAMES.lock().unwrap_or_else(|p| p.into_inner());
            if !names.insert(name_key(
                &self.shared,
                &keys.stream,
                group,
                &options.consumer_name,
            )) {
                return Err(TransportError::Invalid(format!(
                    "consumer name `{}` is already in use in group `{group}` of topic `{topic}` \
                     in this process; the usual cause is one `ConsumerOptions` reused for two \
                     consumers (its default name is drawn once, when it is built): build a \
                     fresh `ConsumerOptions::default()` for each consumer, or give each a \
                     distinct `.consumer_name(..)`",
                    options.consumer_name
                )));
            }
        }
        // Until the consumer owns the name, this frees it: on a failed connect, and when this
        // future is dropped while connecting (a caller's timeout), which would otherwise leave
        // the name taken for the life of the process.
        let mut claim = NameClaim {
            armed: true,
            shared: &self.shared,
            stream: &keys.stream,
            group,
            name: &options.consumer_name,
        };
        // While the claim holds the name: a join dropped here frees it.
        let record = delay_record(&options);
        // Armed before the record is written (taking out one never written does nothing): a
        // join dropped from here on (a caller's timeout while the reader connects) takes it
        // out, or the group would list a consumer that never was for the record's window.
        let mut delay_claim = DelayClaim {
            armed: true,
            shared: &self.shared,
            key: keys.delays(group),
            name: &options.consumer_name,
            record: &record,
        };
        self.join_delays(&keys, topic, group, &options, &record)
            .await;
        let reader = match connection::client(&self.shared.options.connection).await {
            Ok(reader) => reader,
            Err(e) => {
                // No consumer after all: its record goes (best effort).
                delay_claim.armed = false;
                forget_delay(
                    &self.shared,
                    &delay_claim.key,
                    &options.consumer_name,
                    &record,
                )
                .await;
                return Err(match e {
                    ConnectError::Redis(e) => e,
                    other => backend(other.to_string()),
                });
            }
        };
        delay_claim.armed = false;
        drop(delay_claim);
        claim.armed = false;
        drop(claim);
        Ok(RedisConsumer::new(
            self.shared.clone(),
            reader.keep(),
            keys,
            topic,
            group,
            options,
            record,
        ))
    }

    /// The redelivery delay of each consumer of `group` that is still consuming, by consumer
    /// name, as each recorded it when it joined: the consumers of a group should share one
    /// (see "Redelivery" in `docs/redis.md`), and a consumer that joins with another one logs
    /// a warning naming them. A consumer counts as still consuming while it is in the group
    /// and has been idle (`XINFO CONSUMERS`) for no longer than twice the longer of its
    /// redelivery delay and its `block`, plus a second; one that closed is left out at once
    /// (and counts again once it fetches again, recording its delay without comparing it).
    /// Consumers of builds before this record had none, and are not listed. It also deletes the
    /// records of consumers gone from the group.
    ///
    /// ```no_run
    /// # async fn run(transport: cqrs_redis::RedisStreamTransport) -> Result<(), cqrs_core::ports::TransportError> {
    /// let delays = transport.redelivery_delays("tickets", "notifications").await?;
    /// # use std::time::Duration;
    /// let distinct: std::collections::BTreeSet<Duration> =
    ///     delays.iter().map(|(_, delay)| *delay).collect();
    /// if distinct.len() > 1 {
    ///     eprintln!("group `notifications` mixes redelivery delays: {delays:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn redelivery_delays(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Vec<(String, Duration)>, TransportError> {
        let keys = self.shared.keys(topic)?;
        cqrs_core::ports::validate_group(group)?;
        self.delays(&keys, group, None).await
    }

    /// Records the consumer `joining` names with its record ([`delay_record`]) in the group,
    /// when given, and returns the others' delays (see
    /// [`redelivery_delays`](Self::redelivery_delays)), sorted by name.
    async fn delays(
        &self,
        keys: &TopicKeys,
        group: &str,
        joining: Option<(&str, &str)>,
    ) -> Result<Vec<(String, Duration)>, TransportError> {
        let (name, record) = joining.unwrap_or(("", ""));
        let reply = self
            .shared
            .scripts
            .delays
            .run(
                &self.shared.client,
                &self.shared.fail_fast(),
                &[keys.stream.as_str(), keys.delays(group).as_str()],
                vec![Value::from(group), Value::from(name), Value::from(record)],
            )
            .await
            .map_err(|e| self.shared.error(e))?;
        let mut fields = crate::entry::array(reply)
            .into_iter()
            .map(|v| v.into_string().unwrap_or_default());
        let mut delays = Vec::new();
        while let (Some(name), Some(record)) = (fields.next(), fields.next()) {
            let ms = record
                .split(' ')
                .next()
                .and_then(|ms| ms.parse::<u64>().ok());
            if let Some(ms) = ms {
                delays.push((name, Duration::from_millis(ms)));
            }
        }
        delays.sort();
        Ok(delays)
    }

    /// Records a joining consumer's redelivery delay, and warns when consumers of the group
    /// still consuming use another: one with a shorter delay takes over entries one with a
    /// longer delay still handles. Only said: a deploy that changes the delay runs old and
    /// new consumers side by side for a while, and refusing the new ones would stall it.
    async fn join_delays(
        &self,
        keys: &TopicKeys,
        topic: &str,
        group: &str,
        options: &ConsumerOptions,
        record: &str,
    ) {
        let mine = millis(options.redelivery_delay);
        let joining = (options.consumer_name.as_str(), record);
        match self.delays(keys, group, Some(joining)).await {
            Ok(others) => {
                let differ: Vec<String> = others
                    .iter()
                    .filter(|(_, delay)| millis(*delay) != mine)
                    .map(|(name, delay)| format!("`{name}` {delay:?}"))
                    .collect();
                if !differ.is_empty() {
                    tracing::warn!(
                        topic,
                        group,
                        consumer = %options.consumer_name,
                        redelivery_delay = ?options.redelivery_delay,
                        others = %differ.join(", "),
                        "consumers of this group use another redelivery_delay: one with a shorter delay takes over entries one with a longer delay is still handling (handled twice, a key's order broken); give every consumer of a group the same delay (see \"Redelivery\" in docs/redis.md)"
                    );
                }
            }
            // A check, not a condition of joining: the consumer works without it.
            Err(error) => tracing::debug!(
                topic,
                group,
                %error,
                "could not compare the group's redelivery delays"
            ),
        }
    }

    /// Claims this transport's key prefix for `owner` (a name or id of the deployment: a
    /// database and schema, a service): the first claim records `owner` under the key
    /// `{prefix}:owner` (`SET NX`), a claim by the same owner passes, and one by another is
    /// refused ([`TransportError::Invalid`], naming both and what to do). Two deployments that
    /// share a prefix by mistake (a default left unchanged) would read each other's events;
    /// call it at start-up to refuse that instead. It does not expire: a deployment gone for
    /// good leaves its claim until the key is deleted. An empty `owner` is refused. The key
    /// lives in the database the URL selects, while pub/sub channels span every database of
    /// the server: deployments on different database numbers with one prefix are not caught.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let transport = cqrs_redis::RedisStreamOptions::new("redis://127.0.0.1:6379")
    ///     .key_prefix("orders")
    ///     .connect()
    ///     .await?;
    /// transport.claim_prefix("postgres db orders, schema orders").await?;
    /// # Ok(()) }
    /// ```
    pub async fn claim_prefix(&self, owner: &str) -> Result<(), TransportError> {
        if owner.is_empty() {
            return Err(TransportError::Invalid(
                "a key prefix's owner must not be empty: name the deployment that uses it"
                    .to_owned(),
            ));
        }
        let prefix = &self.shared.options.key_prefix;
        // No topic's key: those all hold a hash tag (`{topic}`).
        let key = format!("{prefix}:owner");
        let recorded: Option<String> = self
            .shared
            .client
            .with_options(&self.shared.fail_fast())
            .set(key.as_str(), owner, None, Some(SetOptions::NX), true)
            .await
            .map_err(|e| self.shared.error(e))?;
        match recorded {
            Some(theirs) if theirs != owner => Err(TransportError::Invalid(format!(
                "the Redis key prefix `{prefix}` belongs to `{theirs}`, not to `{owner}`: two \
                 deployments sharing a prefix read each other's events. Give this one a prefix \
                 of its own; if `{theirs}` is gone for good, delete the key `{key}`"
            ))),
            _ => Ok(()),
        }
    }

    /// Who claimed the key prefix ([`claim_prefix`](Self::claim_prefix)), or `None` when no
    /// one has (or the claim was lost with Redis's data): a running deployment reads it to
    /// name whoever took its prefix.
    pub async fn prefix_owner(&self) -> Result<Option<String>, TransportError> {
        let key = format!("{}:owner", self.shared.options.key_prefix);
        self.shared
            .client
            .with_options(&self.shared.fail_fast())
            .get(key.as_str())
            .await
            .map_err(|e| self.shared.error(e))
    }

    /// The server-side ids (`CLIENT ID`) of this transport's shared connection. Operators use
    /// them to find the transport in `CLIENT LIST`; tests kill them to simulate a network
    /// failure.
    pub async fn client_ids(&self) -> Result<Vec<i64>, TransportError> {
        connection::client_ids(
            &self.shared.client,
            &[self.shared.client.id()],
            ClusterHash::Random,
        )
        .await
    }

    /// Appends the six script arguments of `event`; returns the size of its record, in bytes.
    fn encode(&self, event: &EventRecord, args: &mut Vec<Value>) -> Result<usize, TransportError> {
        let record = encoded(event)?;
        let size = record.len();
        let key = event.partition_key.as_deref();
        let lane = self
            .shared
            .options
            .key_ordering
            .lane(key)
            .unwrap_or_default();
        args.extend([
            Value::from(lane),
            Value::from(event.event_id.to_string()),
            Value::from(event.event_type.as_str()),
            Value::from(i64::from(event.schema_version)),
            Value::from(key.unwrap_or_default()),
            Value::from(record),
        ]);
        Ok(size)
    }
}

/// A consumer name taken and not yet handed to its consumer; frees it when dropped.
struct NameClaim<'a> {
    armed: bool,
    shared: &'a Shared,
    stream: &'a str,
    group: &'a str,
    name: &'a str,
}

impl Drop for NameClaim<'_> {
    fn drop(&mut self) {
        if self.armed {
            forget_name(self.shared, self.stream, self.group, self.name);
        }
    }
}

/// A joining consumer's delay record, taken out of its group's records (on a task of its own)
/// if the join is dropped before the consumer exists.
struct DelayClaim<'a> {
    armed: bool,
    shared: &'a Arc<Shared>,
    key: String,
    name: &'a str,
    record: &'a str,
}

impl Drop for DelayClaim<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Without a runtime (one shutting down), the record ages out of its window.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            let key = std::mem::take(&mut self.key);
            let (name, record) = (self.name.to_owned(), self.record.to_owned());
            handle.spawn(async move { forget_delay(&shared, &key, &name, &record).await });
        }
    }
}

/// `(Redis URL, stream key, group, consumer name)` of the live consumers of this process, of
/// every transport: two consumers of one name, each of its own transport, would each release
/// the other's entries as stranded when it closes (its own lists are all it knows). Keyed by
/// the URL as given: a server's own id (`INFO`'s `run_id`) changes when it restarts, and on a
/// cluster it is one node's, a random one.
static LIVE_NAMES: Mutex<BTreeSet<(String, String, String, String)>> = Mutex::new(BTreeSet::new());

fn name_key(
    shared: &Shared,
    stream: &str,
    group: &str,
    name: &str,
) -> (String, String, String, String) {
    (
        shared.options.connection.url.clone(),
        stream.to_owned(),
        group.to_owned(),
        name.to_owned(),
    )
}

pub(crate) fn forget_name(shared: &Shared, stream: &str, group: &str, name: &str) {
    let mut names = LIVE_NAMES.lock().unwrap_or_else(|p| p.into_inner());
    names.remove(&name_key(shared, stream, group, name));
}

#[async_trait]
impl EventTransport for RedisStreamTransport {
    fn capabilities(&self) -> TransportCapabilities {
        let ordered = self.shared.options.key_ordering != KeyOrdering::Unordered;
        TransportCapabilities::ALL
            .ordered_per_key(ordered)
            .exactly_once(false)
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        let outcome = self.publish_batch(topic, events).await;
        let failing = &self.shared.publish_failing;
        let failures = || {
            self.shared
                .publish_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        match &outcome {
            // Nothing sent, nothing learnt.
            Ok(()) if events.is_empty() => {}
            // One relaxed load on the usual path.
            Ok(()) => {
                if failing.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut failures = failures();
                    failures.remove(topic);
                    failing.store(!failures.is_empty(), std::sync::atomic::Ordering::Relaxed);
                }
            }
            // The caller's mistakes, not the server's state; except a key ordering other
            // than the topic's, which `check_ordering` recorded: every publish to the topic
            // fails until the deployment agrees.
            Err(TransportError::Invalid(_) | TransportError::Codec(_)) => {}
            Err(error) => self.shared.record_failure(topic, error),
        }
        outcome
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        Ok(Box::new(self.redis_consumer(topic, group, options).await?))
    }
}

impl RedisStreamTransport {
    async fn publish_batch(
        &self,
        topic: &str,
        events: &[EventRecord],
    ) -> Result<(), TransportError> {
        // The topic first: an empty batch to a topic no consumer could join is refused too.
        let keys = self.shared.keys(topic)?;
        if events.is_empty() {
            return Ok(());
        }
        cqrs_core::ports::validate_payloads(events)?;
        self.shared.check_ordering(topic, &keys).await?;
        if let [event] = events
            && self
                .shared
                .options
                .key_ordering
                .lane(event.partition_key.as_deref())
                .is_none()
        {
            // One event in no lane: nothing to chain, so a plain `XADD` does (a script call
            // costs Redis several times an `XADD`). The fields are the publish script's.
            let record = encoded(event)?;
            let mut fields: Vec<(&str, Value)> = vec![
                ("id", Value::from(event.event_id.to_string())),
                ("type", Value::from(event.event_type.as_str())),
                ("v", Value::from(i64::from(event.schema_version))),
            ];
            // Here (no key ordering) an empty key is none, as the script has it.
            if let Some(key) = event.partition_key.as_deref().filter(|k| !k.is_empty()) {
                fields.push(("key", Value::from(key)));
            }
            let options = self.shared.fail_fast_for(record.len());
            fields.push(("record", Value::from(record)));
            let _: Value = self
                .shared
                .client
                .with_options(&options)
                .xadd(keys.stream.as_str(), false, None::<()>, "*", fields)
                .await
                .map_err(|e| self.shared.error(e))?;
            return Ok(());
        }
        let key_list = [keys.stream.as_str(), keys.lanes.as_str()];
        if let [event] = events {
            // One event in a lane: the batch script's loops and tables cost more than the
            // event's own work.
            let mut args = Vec::with_capacity(6);
            let size = self.encode(event, &mut args)?;
            let options = self.shared.fail_fast_for(size);
            self.shared
                .scripts
                .publish_one
                .run(&self.shared.client, &options, &key_list, args)
                .await
                .map_err(|e| self.shared.error(e))?;
            return Ok(());
        }
        let mut chunks = Vec::with_capacity(events.len().div_ceil(PUBLISH_CHUNK));
        let mut args = Vec::with_capacity(events.len().min(PUBLISH_CHUNK) * 6);
        let mut bytes = 0;
        for event in events {
            let size = self.encode(event, &mut args)?;
            // The events before this one, in the chunk being filled.
            let count = args.len() / 6 - 1;
            if count > 0 && starts_a_chunk(count, bytes, size) {
                // This event starts the next chunk.
                let this_one = args.split_off(args.len() - 6);
                chunks.push((std::mem::replace(&mut args, this_one), bytes));
                bytes = 0;
            }
            bytes += size;
        }
        chunks.push((args, bytes));
        let script = &self.shared.scripts.publish;
        let shared = &self.shared;
        send_in_order(chunks, |(args, bytes)| async move {
            let options = shared.fail_fast_for(bytes);
            script.run(&shared.client, &options, &key_list, args).await
        })
        .await
        .map_err(|e| self.shared.error(e))?;
        Ok(())
    }
}

#[async_trait]
impl HealthCheck for RedisStreamTransport {
    /// `PING` within the command timeout: unhealthy with the reason when it fails; degraded,
    /// naming why, while the last publish failed although Redis answers (out of memory under
    /// `noeviction`, a demoted primary, `MISCONF`, a missing permission, a key ordering other
    /// than the one the topic's first publisher recorded: the outbox then backs up); else
    /// healthy.
    async fn check(&self) -> Health {
        match self
            .shared
            .client
            .with_options(&self.shared.fail_fast())
            .ping::<String>(None)
            .await
        {
            Ok(_)
                if self
                    .shared
                    .publish_failing
                    .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                let failures = self
                    .shared
                    .publish_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let mut topics: Vec<_> = failures.iter().collect();
                topics.sort();
                let why: Vec<String> = topics
                    .iter()
                    .take(3)
                    .map(|(topic, why)| format!("`{topic}`: {why}"))
                    .collect();
                let more = topics.len().saturating_sub(3);
                Health::Degraded(format!(
                    "redis answers, but the last publish to {} topic(s) failed: {}{}",
                    topics.len(),
                    why.join("; "),
                    if more > 0 {
                        format!(" (and {more} more)")
                    } else {
                        String::new()
                    }
                ))
            }
            Ok(_) => Health::Healthy,
            Err(e) => Health::Unhealthy(format!("redis: {e}")),
        }
    }
}

/// Sends the chunks of one batch one after another, each only once the one before succeeded,
/// and stops at the first failure. Sent back to back instead (pipelined), a chunk could fail
/// in Redis (a `BUSY` or `OOM` reply, a write lost with its connection while fred resends the
/// next on a new one) and a later chunk succeed: the caller's retry of the batch would then
/// append the earlier chunk's events after the later one's, and a key whose events span both
/// would be handled out of order. Stopped at the failure, the retry appends the rest in order
/// (after duplicates of what did go through, which the inbox drops). Each chunk after the
/// first costs a round trip; only batches over [`PUBLISH_CHUNK`] events have more than one.
async fn send_in_order<A, E, F, Fut>(chunks: Vec<A>, mut send: F) -> Result<(), E>
where
    F: FnMut(A) -> Fut,
    Fut: std::future::Future<Output = Result<Value, E>>,
{
    for chunk in chunks {
        send(chunk).await?;
    }
    Ok(())
}

/// The shortest redelivery delay a Redis consumer accepts. The delay is also how long an entry
/// must sit unacknowledged before another consumer may take it over, while its consumer
/// refreshes its entries every third of it: much shorter, and a consumer still handling an
/// entry can lose it to another (handled twice, out of order).
pub const MIN_REDELIVERY_DELAY: Duration = Duration::from_millis(100);

/// A consumer's record in its group's delays: `<redelivery delay ms> <window ms> <token>`, the
/// window being how long it may be idle and still consuming (twice the longer of its delay and
/// its `block`, plus a second).
///
/// A token unique to this join ends it: the record a consumer takes out as it stops is its own,
/// not that of a later consumer of the same name.
pub(crate) fn delay_record(options: &ConsumerOptions) -> String {
    let (delay, block) = (options.redelivery_delay, options.block);
    let window = millis(delay.max(block))
        .saturating_mul(2)
        .saturating_add(1_000)
        // Lua reads numbers as doubles: past 2^53 they would round.
        .min(1 << 53);
    format!(
        "{} {window} {}",
        millis(delay),
        uuid::Uuid::new_v4().simple()
    )
}

/// Whole milliseconds, `u64::MAX` for more (a delay of `Duration::MAX`).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Refuses consumer options that would break the transport's guarantees, naming each problem.
fn consumer_option_problems(options: &ConsumerOptions) -> Result<(), TransportError> {
    let mut problems = Vec::new();
    if options.redelivery_delay < MIN_REDELIVERY_DELAY {
        problems.push(format!(
            "redelivery_delay is {:?}, below the {:?} a Redis consumer needs: it is also how \
             long an entry waits before another consumer may take it over, and a shorter one \
             hands entries still being handled to a second consumer",
            options.redelivery_delay, MIN_REDELIVERY_DELAY
        ));
    }
    options.validate_with(problems)
}

#[cfg(test)]
mod tests {

    /// A batch is cut at 256 events, or where its records would pass 8 MiB (a chunk of large
    /// events past Redis's query buffer limit had Redis close the connection, at every retry,
    /// and a large one outlasts its timeout on a slow link); one event larger than that still
    /// goes, alone.
    #[test]
    fn chunks_are_cut_by_count_and_by_bytes() {
        assert!(!starts_a_chunk(1, 10, 10));
        assert!(starts_a_chunk(PUBLISH_CHUNK, 10, 10));
        assert!(!starts_a_chunk(3, PUBLISH_CHUNK_BYTES - 10, 10));
        assert!(starts_a_chunk(3, PUBLISH_CHUNK_BYTES - 10, 11));
        assert!(starts_a_chunk(1, usize::MAX, 1), "no overflow");
    }

    /// A publish has the command timeout plus 0.1 s a MiB of records: a chunk of 8 MiB 0.8 s
    /// more, a small event next to nothing.
    #[test]
    fn a_publish_has_time_to_send_its_records() {
        let command = Duration::from_secs(2);
        assert_eq!(publish_timeout(command, 0), command);
        assert_eq!(
            publish_timeout(command, PUBLISH_CHUNK_BYTES),
            command + Duration::from_millis(800)
        );
        assert!(publish_timeout(command, 1024) < command + Duration::from_micros(100));
        assert_eq!(publish_timeout(Duration::MAX, usize::MAX), Duration::MAX);
    }

    /// A record past Redis's argument limit is a `Codec` error on every path (the relay skips
    /// it), the plain `XADD` of one event in no lane included: sent, it made Redis close the
    /// connection at every retry.
    #[test]
    fn a_record_past_the_argument_limit_is_a_codec_error() {
        let event = cqrs_core::testing::event_store::record(1);
        assert!(check_record_size(&event, MAX_RECORD_BYTES).is_ok());
        assert!(matches!(
            check_record_size(&event, MAX_RECORD_BYTES + 1),
            Err(TransportError::Codec(_))
        ));
    }

    use super::*;

    /// The chunks of a batch are sent one after another, each only once the one before
    /// succeeded: when the first fails, the later ones are never sent, so a retry of the batch
    /// cannot store a key's later events before its earlier ones.
    #[tokio::test]
    async fn a_chunk_is_sent_only_after_the_one_before_it_succeeded() {
        let sent = Mutex::new(Vec::new());
        let outcome = send_in_order(vec![1, 2, 3], |chunk| {
            sent.lock().unwrap().push(chunk);
            async move {
                // Not done at once, as a reply from Redis is not.
                tokio::task::yield_now().await;
                if chunk == 1 {
                    Err("the first chunk failed")
                } else {
                    Ok(Value::Null)
                }
            }
        })
        .await;
        assert_eq!(outcome, Err("the first chunk failed"));
        assert_eq!(
            *sent.lock().unwrap(),
            [1],
            "nothing sent after a failed chunk"
        );

        let sent = Mutex::new(Vec::new());
        let outcome = send_in_order(vec![1, 2, 3], |chunk| {
            sent.lock().unwrap().push(chunk);
            async move { Ok::<_, &str>(Value::Null) }
        })
        .await;
        assert_eq!(outcome, Ok(()));
        assert_eq!(*sent.lock().unwrap(), [1, 2, 3], "every chunk, in order");
    }
}
