//! The durable event transport port.

use super::TransportError;
use crate::EventRecord;
use async_trait::async_trait;
use std::fmt;
use std::time::Duration;

/// What a transport guarantees; conformance scenarios skip or relax by these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportCapabilities {
    /// Messages survive a restart of the process (and of the broker, within its durability).
    pub persistent: bool,
    /// Consumers in one named group split the messages between them.
    pub consumer_groups: bool,
    /// Messages with one partition key are delivered in publish order to a consumer.
    pub ordered_per_key: bool,
    /// Each message is delivered once; `false` means at-least-once (consumers dedupe by id).
    pub exactly_once: bool,
    /// A nacked or unacknowledged message comes back after the consumer's redelivery delay.
    pub redelivery_delay: bool,
}

impl TransportCapabilities {
    /// Every capability.
    pub const ALL: TransportCapabilities = TransportCapabilities {
        persistent: true,
        consumer_groups: true,
        ordered_per_key: true,
        exactly_once: true,
        redelivery_delay: true,
    };

    /// No capability: start here, or from [`ALL`](Self::ALL), and name what differs.
    ///
    /// ```
    /// use cqrs_core::ports::TransportCapabilities;
    ///
    /// // An at-least-once broker with groups, per-key order and redelivery, that keeps
    /// // messages across restarts:
    /// let redis_like = TransportCapabilities::ALL.exactly_once(false);
    /// // A fire-and-forget fan-out that keeps each key's order:
    /// let fan_out = TransportCapabilities::NONE.ordered_per_key(true);
    /// assert!(redis_like.persistent && !redis_like.exactly_once);
    /// assert!(fan_out.ordered_per_key && !fan_out.consumer_groups);
    /// ```
    pub const NONE: TransportCapabilities = TransportCapabilities {
        persistent: false,
        consumer_groups: false,
        ordered_per_key: false,
        exactly_once: false,
        redelivery_delay: false,
    };

    /// These capabilities, with [`persistent`](Self#structfield.persistent) as given.
    pub const fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// These capabilities, with [`consumer_groups`](Self#structfield.consumer_groups) as given.
    pub const fn consumer_groups(mut self, consumer_groups: bool) -> Self {
        self.consumer_groups = consumer_groups;
        self
    }

    /// These capabilities, with [`ordered_per_key`](Self#structfield.ordered_per_key) as given.
    pub const fn ordered_per_key(mut self, ordered_per_key: bool) -> Self {
        self.ordered_per_key = ordered_per_key;
        self
    }

    /// These capabilities, with [`exactly_once`](Self#structfield.exactly_once) as given.
    pub const fn exactly_once(mut self, exactly_once: bool) -> Self {
        self.exactly_once = exactly_once;
        self
    }

    /// These capabilities, with [`redelivery_delay`](Self#structfield.redelivery_delay) as
    /// given.
    pub const fn redelivery_delay(mut self, redelivery_delay: bool) -> Self {
        self.redelivery_delay = redelivery_delay;
        self
    }

    /// The capabilities named one by one, in the order of the fields.
    #[deprecated(
        note = "five `bool`s in a row are easily swapped, and a capability added later would change the arity: start from `TransportCapabilities::NONE` or `ALL` and name what differs"
    )]
    pub const fn new(
        persistent: bool,
        consumer_groups: bool,
        ordered_per_key: bool,
        exactly_once: bool,
        redelivery_delay: bool,
    ) -> Self {
        Self {
            persistent,
            consumer_groups,
            ordered_per_key,
            exactly_once,
            redelivery_delay,
        }
    }
}

/// How a consumer reads. Every interval is configurable, so tests use short ones.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// This consumer's name in its group (defaults to a random one). Every transport refuses,
    /// with [`TransportError::Invalid`], a name that a live consumer of the same topic and
    /// group, made by the same transport (or a clone of it), already has: two consumers of
    /// one name would share their deliveries' bookkeeping. Dropping a consumer frees its name.
    /// (Across processes a transport cannot tell: keep names unique there too, as the random
    /// default does.)
    pub consumer_name: String,
    /// How long one `fetch` waits for messages before returning none. Default 1 s.
    pub block: Duration,
    /// How long a nacked message, or one delivered but not acknowledged (its consumer crashed),
    /// waits before it is delivered again. Default 30 s. A transport may refuse short ones:
    /// the Redis transport refuses less than 100 ms (`cqrs_redis::MIN_REDELIVERY_DELAY`), the
    /// in-memory one less than 2 ms
    /// ([`memory::MIN_REDELIVERY_DELAY`](crate::memory::MIN_REDELIVERY_DELAY)), so keep test
    /// options at 100 ms or more if they must also run against Redis.
    pub redelivery_delay: Duration,
    /// Deliveries after which a message is dead-lettered instead of retried. Default 10; at
    /// least 1. Every transport must honour it (the conformance suite's
    /// `a_message_is_dead_lettered_after_max_deliveries`).
    pub max_deliveries: u32,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            consumer_name: format!("consumer-{}", uuid::Uuid::now_v7().simple()),
            block: Duration::from_secs(1),
            redelivery_delay: Duration::from_secs(30),
            max_deliveries: 10,
        }
    }
}

impl ConsumerOptions {
    /// Sets the consumer name.
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = name.into();
        self
    }

    /// Sets how long a fetch waits for events before it returns an empty batch;
    /// `Duration::MAX` waits as long as it takes.
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }

    /// Sets the redelivery delay. Give every consumer of a group the same one: a transport
    /// that reclaims by idle time (Redis) hands another consumer what has been idle for the
    /// reclaiming consumer's delay, so one with a shorter delay takes entries a consumer with a
    /// longer one is still handling.
    pub fn redelivery_delay(mut self, delay: Duration) -> Self {
        self.redelivery_delay = delay;
        self
    }

    /// Sets the maximum number of deliveries. Give every consumer of a group the same one:
    /// the consumer that fetches an entry past it is the one that dead-letters it.
    pub fn max_deliveries(mut self, max: u32) -> Self {
        self.max_deliveries = max;
        self
    }

    /// How long after it falls due a redelivery may still wait behind new messages (see
    /// [`Consumer::fetch`]): a quarter of the redelivery delay, at most 1 s. A transport that
    /// looks for due redeliveries now and then looks at least this often.
    ///
    /// ```
    /// use cqrs_core::ports::ConsumerOptions;
    /// use std::time::Duration;
    ///
    /// let options = ConsumerOptions::default().redelivery_delay(Duration::from_millis(400));
    /// assert_eq!(options.redelivery_lag(), Duration::from_millis(100));
    /// ```
    pub fn redelivery_lag(&self) -> Duration {
        (self.redelivery_delay / 4).min(Duration::from_secs(1))
    }

    /// The rules every transport holds these options to (a transport may add its own): a
    /// consumer name, and at least one delivery. [`EventTransport::consumer`] refuses options
    /// that break them with [`TransportError::Invalid`], naming every problem. (That the name
    /// is not in use in its group is checked by the transport, which knows its consumers; see
    /// [`consumer_name`](Self::consumer_name).)
    ///
    /// ```
    /// use cqrs_core::ports::ConsumerOptions;
    ///
    /// let err = ConsumerOptions::default().max_deliveries(0).consumer_name("").validate().unwrap_err();
    /// assert!(err.to_string().contains("max_deliveries"));
    /// assert!(err.to_string().contains("consumer_name"));
    /// ```
    pub fn validate(&self) -> Result<(), TransportError> {
        self.validate_with(Vec::new())
    }

    /// [`validate`](Self::validate), with the problems a transport's own rules found: every
    /// problem is named in one `Invalid`.
    pub fn validate_with(&self, mut problems: Vec<String>) -> Result<(), TransportError> {
        problems.splice(0..0, self.problems());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TransportError::Invalid(format!(
                "invalid consumer options: {}",
                problems.join("; ")
            )))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_deliveries == 0 {
            problems.push(
                "max_deliveries is 0: every message would be dead-lettered before any handler \
                 saw it; use at least 1"
                    .to_owned(),
            );
        }
        if self.consumer_name.is_empty() {
            problems.push("consumer_name must not be empty".to_owned());
        }
        problems
    }
}

/// A transport's handle on one delivered message, for `ack` and `nack`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryId(pub String);

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One message handed to a consumer.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Delivery {
    /// The handle to acknowledge it with.
    pub id: DeliveryId,
    /// The event.
    pub record: EventRecord,
    /// How many times it has been delivered, this time included (1 the first time). A
    /// transport that holds entries back before handing them out may report one low for
    /// some of them (its documentation says when).
    pub attempt: u32,
    /// The chain this delivery belongs to, where the transport orders per key: deliveries of
    /// one batch that share an order key must be handled one after another, in batch order,
    /// and once one of them fails, the rest of them are handed back unhandled (see
    /// [`Consumer::fetch`]). Deliveries with different order keys, or none, may be handled
    /// concurrently. [`Delivery::new`] takes the record's partition key; a transport that
    /// orders by something coarser (a lane several keys share) sets that instead.
    pub order_key: Option<String>,
}

impl Delivery {
    /// A delivery (adapters build these), ordered by the record's partition key.
    pub fn new(id: DeliveryId, record: EventRecord, attempt: u32) -> Self {
        Self {
            id,
            order_key: record.partition_key.clone(),
            record,
            attempt,
        }
    }

    /// Sets the order key: `None` for a delivery that may be handled concurrently with any
    /// other of its batch.
    pub fn with_order_key(mut self, order_key: Option<String>) -> Self {
        self.order_key = order_key;
        self
    }
}

/// A durable, at-least-once transport of events between processes, with consumer groups.
///
/// The contract (checked by [`testing::transport`](crate::testing::transport)):
///
/// * Topic names follow [`validate_topic`]'s rules;
///   `publish` and `consumer` refuse others with [`TransportError::Invalid`]. `consumer`
///   refuses a group without a name ([`validate_group`]), options that break [`ConsumerOptions::validate`], and a consumer name already in
///   use in its group (see [`ConsumerOptions::consumer_name`]).
/// * `publish` sends a batch to a topic; when it returns `Ok`, every message is stored. It
///   refuses a batch holding a payload nested deeper than
///   [`MAX_PAYLOAD_DEPTH`](crate::ports::MAX_PAYLOAD_DEPTH) whole, with
///   [`TransportError::Codec`] ([`validate_payloads`]), the bound of every event store.
/// * A record arrives as it was published, every field ([`EventRecord`]'s `==`): its stream
///   id, version and position (a transport-fed projection checkpoints by the position), its
///   metadata to the timestamp's last digit, and its payload as JSON that compares equal.
/// * Each consumer group sees every message published to its topic, including messages
///   published before the group existed. Consumers in one group split the messages.
/// * A message is delivered again, after the redelivery delay, until it is acknowledged: when
///   nacked, and when its consumer never acknowledges it (a crash).
/// * Where `ordered_per_key`, messages with one partition key reach the group's consumers in
///   publish order: a message is not handed out while an earlier one of its key is in flight,
///   except in the same batch, after it and with the same [`Delivery::order_key`] (see
///   [`Consumer::fetch`]).
/// * Consumers dedupe by `record.event_id`: a message may arrive more than once.
#[async_trait]
pub trait EventTransport: Send + Sync + 'static {
    /// What this transport guarantees.
    fn capabilities(&self) -> TransportCapabilities;

    /// Publishes a batch to a topic, in order. Refuses a topic that breaks
    /// [`validate_topic`], even with an empty batch.
    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError>;

    /// Joins consumer group `group` of `topic`, creating the group when it does not exist.
    /// Refuses, with [`TransportError::Invalid`], a topic that breaks
    /// [`validate_topic`], a group that breaks [`validate_group`], options that break
    /// [`ConsumerOptions::validate`] (or the transport's own rules), and a consumer name a live
    /// consumer of the group already has.
    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>, TransportError>;
}

/// The rules every transport holds topic names to, whatever its backend, so that a test on
/// the in-memory transport fails where production would: a topic has a name (not empty),
/// and the name holds no `{` or `}` (the Redis transport makes the topic its keys' cluster
/// hash tag, `{topic}`, which a brace would move). `publish` and `consumer` refuse a topic
/// that breaks them with [`TransportError::Invalid`], naming the topic and the rule.
///
/// ```
/// use cqrs_core::ports::validate_topic;
///
/// assert!(validate_topic("tickets").is_ok());
/// let err = validate_topic("a{b").unwrap_err();
/// assert!(err.to_string().contains("topic `a{b` must not contain `{` or `}`"));
/// assert!(validate_topic("").is_err());
/// ```
pub fn validate_topic(topic: &str) -> Result<(), TransportError> {
    if topic.is_empty() {
        return Err(TransportError::Invalid(
            "topic `` must not be empty: a topic needs a name".to_owned(),
        ));
    }
    if topic.contains(['{', '}']) {
        return Err(TransportError::Invalid(format!(
            "topic `{topic}` must not contain `{{` or `}}`: the Redis transport makes the \
             topic the hash tag of its keys, which a brace would move"
        )));
    }
    Ok(())
}

/// The rule every transport holds published payloads to: none nests arrays and objects more
/// than [`MAX_PAYLOAD_DEPTH`](crate::ports::MAX_PAYLOAD_DEPTH) deep, the bound every event
/// store holds them to. `serde_json` reads at most 128 levels, and transports and the
/// realtime hub wrap levels of their own around a payload: past the bound, a payload could
/// be published and then fail to decode on the way (its consumers dead-lettering it), or
/// pass one transport and not another. `publish` refuses a batch holding one with
/// [`TransportError::Codec`], before publishing any of it, so it fails where it is made, on
/// every transport alike (the relays skip such an event, as an event store would have
/// refused it). Records that come from an event store always pass.
///
/// ```
/// use cqrs_core::ports::{MAX_PAYLOAD_DEPTH, validate_payloads};
/// use cqrs_core::reexports::serde_json::json;
/// use cqrs_core::reexports::uuid::Uuid;
/// use cqrs_core::{EventRecord, Metadata, RecordMetadata};
///
/// let metadata = RecordMetadata::from_metadata(&Metadata::new());
/// let payload = json!({ "id": "o-1" });
/// let mut record = EventRecord::new(Uuid::now_v7(), "orders.placed", 1, payload, metadata);
/// assert!(validate_payloads(std::slice::from_ref(&record)).is_ok());
/// for _ in 0..=MAX_PAYLOAD_DEPTH {
///     record.payload = json!([record.payload]);
/// }
/// assert!(validate_payloads(&[record]).is_err());
/// ```
pub fn validate_payloads(events: &[EventRecord]) -> Result<(), TransportError> {
    let max = super::MAX_PAYLOAD_DEPTH;
    match events
        .iter()
        .find(|event| super::nests_deeper_than(&event.payload, max))
    {
        None => Ok(()),
        Some(event) => Err(TransportError::Codec(
            format!(
                "event {} ({})'s payload nests arrays and objects more than {max} deep: its \
                 consumers could not read it back; flatten it or check the depth of client data",
                event.event_id, event.event_type
            )
            .into(),
        )),
    }
}

/// The rule every transport holds consumer group names to: a group has a name (not empty).
/// `consumer` refuses an empty one with [`TransportError::Invalid`]. An empty name would be
/// no name to Redis's dead-letter replay, which sends an entry recorded without a group to
/// every group, so a replay meant for one group would reach groups that had handled the
/// event long before.
///
/// ```
/// use cqrs_core::ports::validate_group;
///
/// assert!(validate_group("billing").is_ok());
/// let err = validate_group("").unwrap_err();
/// assert!(err.to_string().contains("consumer group `` must not be empty"));
/// ```
pub fn validate_group(group: &str) -> Result<(), TransportError> {
    if group.is_empty() {
        return Err(TransportError::Invalid(
            "consumer group `` must not be empty: name the group after what its consumers do \
             (one name per handler), for instance `billing`"
                .to_owned(),
        ));
    }
    Ok(())
}

/// One member of a consumer group.
///
/// Every call that takes delivery ids refuses one that is not of this transport's form (made
/// by hand, or another transport's) as [`TransportError::Invalid`], and settles nothing of a
/// batch that holds one: passed over, a typo would leave a message to come back as if never
/// answered. An id of the right form that is no longer this consumer's (acknowledged, or
/// taken over) is left alone, as each call says.
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Up to `max` messages: redeliveries that are due first, then new ones. Waits up to the
    /// consumer's `block` interval when none is ready, then returns an empty batch. `max` 0
    /// returns an empty batch at once and takes nothing.
    ///
    /// A transport may look for due redeliveries only now and then, so "due" is weaker than
    /// it reads: a redelivery comes before any new message once it has been due for
    /// [`ConsumerOptions::redelivery_lag`] (a quarter of the redelivery delay, at most 1 s);
    /// before that, new messages may go out first. (The in-memory transport finds them at
    /// once; the Redis consumer looks every `redelivery_lag`, with one script run.)
    ///
    /// A batch may hold several messages of one key, in publish order and with one
    /// [`order_key`](Delivery::order_key): a *chain*. The caller handles a chain one message
    /// after another, in batch order, and when one fails it hands it back
    /// ([`nack`](Consumer::nack)) and every later message of its chain too, without handling
    /// them ([`defer`](Consumer::defer)); acknowledging a later one while an earlier one is
    /// unhandled breaks the key's order.
    /// [`consume_until_shutdown`](crate::projection::consume_until_shutdown) does this, with
    /// different chains handled concurrently.
    async fn fetch(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError>;

    /// Acknowledges handled messages: they are not delivered again.
    async fn ack(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError>;

    /// Hands a message back: it is delivered again after the redelivery delay. A delivery
    /// this consumer no longer owns (another consumer took it over after the delay) is left
    /// alone: its new owner's attempt stands.
    async fn nack(&mut self, id: &DeliveryId) -> Result<(), TransportError>;

    /// Hands a message back with why it failed, so a transport that dead-letters messages can
    /// keep the reason. Defaults to [`nack`](Consumer::nack).
    async fn nack_with_reason(
        &mut self,
        id: &DeliveryId,
        reason: &str,
    ) -> Result<(), TransportError> {
        let _ = reason;
        self.nack(id).await
    }

    /// Gives up on a message at once, with why: it goes where the transport keeps the messages
    /// `max_deliveries` gave up on (its dead letters), with this delivery's attempt count and
    /// `reason`, and is not delivered again; its key's later messages go on. For a failure no
    /// redelivery will mend (an event that cannot be decoded, a handler that refuses it
    /// permanently), which would otherwise hold its key for `max_deliveries` redelivery
    /// delays. A delivery this consumer no longer owns is left alone, as by `nack`. The
    /// default hands it back with the reason ([`nack_with_reason`](Consumer::nack_with_reason)),
    /// to be dead-lettered after `max_deliveries`: a transport overrides it to pass the
    /// conformance suite (`a_message_a_consumer_gives_up_on_is_dead_lettered_at_once`).
    async fn dead_letter(&mut self, id: &DeliveryId, reason: &str) -> Result<(), TransportError> {
        self.nack_with_reason(id, reason).await
    }

    /// Hands back deliveries that were not handled because an earlier delivery of their chain
    /// failed (see [`fetch`](Consumer::fetch)). Like [`nack`](Consumer::nack), except that
    /// this handing out does not count as an attempt: a poison event does not use up the
    /// `max_deliveries` of the events queued behind it. Deliveries this consumer no longer owns
    /// are left alone, as by `nack`. The default, `nack` of each, counts an attempt: a
    /// transport overrides it to pass the conformance suite (`a_deferred_delivery_is_no_attempt`).
    async fn defer(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        for id in ids {
            self.nack(id).await?;
        }
        Ok(())
    }

    /// Says that these deliveries, handed out to this consumer, are still being handled:
    /// their redelivery delay starts again, so a batch that takes longer than the delay in
    /// total is not handed out again elsewhere meanwhile. A delivery this consumer no longer
    /// owns (another consumer took it over, or it was acknowledged) is left alone. Defaults to
    /// doing nothing; every transport redelivers by time (the contract), so overrides it to
    /// pass the conformance suite (`a_delivery_kept_alive_is_not_handed_out_again`).
    ///
    /// [`consume_until_shutdown`](crate::projection::consume_until_shutdown) calls it every
    /// [`keep_alive_interval`](Consumer::keep_alive_interval) while a batch runs.
    async fn keep_alive(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        let _ = ids;
        Ok(())
    }

    /// How often a caller handling a batch should call [`keep_alive`](Consumer::keep_alive):
    /// a fraction of the redelivery delay. `None` (the default) says it need not, which the
    /// conformance suite refuses (`a_consumer_tells_its_redelivery_delay_and_keep_alive_interval`):
    /// a transport overrides it.
    fn keep_alive_interval(&self) -> Option<Duration> {
        None
    }

    /// How long a delivery handed out and not acknowledged (or nacked) waits before it is
    /// handed out again. `None` (the default) says it is not redelivered by time, which the
    /// conformance suite refuses (as for [`keep_alive_interval`](Consumer::keep_alive_interval)):
    /// a transport overrides it.
    /// [`consume_until_shutdown`](crate::projection::consume_until_shutdown) uses it to tell
    /// when a failed delivery can no longer come back (it was dead-lettered, or handled
    /// elsewhere), and reports the worker healthy again; without it, only a batch that
    /// succeeds does.
    fn redelivery_delay(&self) -> Option<Duration> {
        None
    }

    /// Leaves the group cleanly at shutdown: releases what this consumer read but never
    /// handed out (messages held back behind an earlier one of their key, or read by a fetch
    /// that was cancelled), so other consumers take them at once. Messages handed out and not
    /// acknowledged are not released: they come back to the group after the redelivery delay,
    /// as after a crash (acknowledge or [`nack`](Consumer::nack) them first). Defaults to doing
    /// nothing, for adapters that hold nothing back.
    ///
    /// The consumer stays usable after `close`, and after any error: a later
    /// [`fetch`](Consumer::fetch) goes on. The workers that consume (a
    /// [`ProjectionRunner`](crate::projection::ProjectionRunner), an
    /// [`EventBusConsumer`](crate::projection::EventBusConsumer)) keep their consumer across
    /// restarts and close it at each stop, so that what a run ended by an error could not
    /// release is taken over by the next (the conformance suite's
    /// `a_closed_consumer_goes_on_fetching`).
    async fn close(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
}
