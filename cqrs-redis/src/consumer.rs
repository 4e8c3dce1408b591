//! [`RedisConsumer`]: one member of a consumer group.

use crate::connection::{self, quit_later};
use crate::entry::{self, Fields};
use crate::error::{is_nogroup, is_unblocked, transport_error};
use crate::keys::TopicKeys;
use crate::scripts::Script;
use crate::transport::{Shared, forget_name};
use async_trait::async_trait;
use cqrs_core::ports::{Consumer, ConsumerOptions, Delivery, DeliveryId, TransportError};
use fred::clients::{Client, Pipeline};
use fred::error::ErrorKind as FredKind;
use fred::interfaces::{ClientLike, HashesInterface, StreamsInterface};
use fred::prelude::Options;
use fred::types::{ClusterHash, CustomCommand, FromValue, Value};
use std::collections::{HashMap, HashSet};
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
/// 2. passes each candidate (held entries, then new ones) through the **order gate**: an
///    entry in a lane (see [`KeyOrdering`](crate::KeyOrdering)) is handed out only once its
///    predecessor in the lane is no longer pending in the group (acknowledged or
///    dead-lettered, by whichever consumer), or right after it in the same batch (a chain,
///    which the caller handles in order, see [`Consumer::fetch`]). Until then the consumer
///    holds it (pending to it, its idle time reset so no one reclaims it).
///
/// The consumer decides the gate itself, with no round trip, when it can: entries delivered
/// once, to it, whose predecessor is none, or one it acknowledged itself, or one handed out in
/// the same batch. Otherwise one script does the gate in Redis, and also, every quarter of the
/// redelivery delay (but at least once a second, and at most every 5 ms),
///
/// 3. reclaims entries idle for the redelivery delay (`XAUTOCLAIM`): nacked ones, and those
///    left pending by a consumer that crashed. So a redelivery is found up to a quarter of the
///    delay (at most 1 s) after it fell due, and new entries may be handed out before it
///    meanwhile: the [`ConsumerOptions::redelivery_lag`] the port allows;
/// 4. dead-letters entries handed out `max_deliveries` times, with the last error a
///    nack reported and the delivery count, and acknowledges them; and entries whose `prev`
///    is no stream id, or not UTF-8, or an entry of the stream not older than themselves
///    (their place in the lane is unknown), once no older entry is pending in the group.
///
/// When nothing is ready it waits on its own connection with a blocking `XREADGROUP` (fred
/// multiplexes one connection per client, so a blocking read would hold up everything else on
/// a shared one), up to the consumer's `block` interval. Entries whose `record` does not decode
/// are dead-lettered too, never handed out and never a crash.
///
/// An entry leaves the group's pending list only after its predecessor in the lane did, so
/// that "no longer pending" keeps meaning "done with": an entry due for dead-lettering behind
/// one merely handed out in the same batch is held, with the rest of its lane, until that one
/// is done.
///
/// [`ack`](Consumer::ack) is one `XACK`, pipelined with an `HDEL` of the errors recorded for
/// the entries (one round trip). [`nack`](Consumer::nack) restarts the entry's idle clock, so it
/// is reclaimed after the redelivery delay, by this consumer or another.
/// [`defer`](Consumer::defer) does the same and takes back the delivery count this handing
/// out added.
///
/// Errors are retryable (`Unavailable`, `Timeout`) while Redis is away: the consumer stays
/// usable and its connections reconnect by themselves, so call `fetch` again (with a backoff).
pub struct RedisConsumer {
    shared: Arc<Shared>,
    reader: Client,
    keys: TopicKeys,
    errors: String,
    topic: String,
    group: String,
    options: ConsumerOptions,
    /// Entries read and not handed out yet (waiting for their turn, or over the batch size).
    held: Vec<String>,
    /// The fields of held entries, kept here so the gate script never reads them again.
    known: HashMap<String, Known>,
    /// Every held entry has been idle at most since then (read, or refreshed by the gate
    /// script): the local gate hands held entries out only while that is recent.
    held_since: Instant,
    /// Entries handed out and not acknowledged, with their lane (empty for none) and
    /// delivery count.
    in_flight: HashMap<String, InFlight>,
    /// The size of `in_flight` at which it is pruned next.
    in_flight_limit: usize,
    /// Entries handed back (nacked or deferred, or released by `close`) and still pending to
    /// this consumer, with the delivery count they were left with: they come back after the
    /// redelivery delay (at once when released), so neither `close` nor a recovery may take
    /// them as stranded, unless their count rose since (see [`RedisConsumer::stranded`]).
    returned: HashMap<String, u32>,
    /// The size of `returned` at which it is pruned next.
    returned_limit: usize,
    /// Per lane, the highest entry this consumer acknowledged: an entry whose `prev` is that
    /// one may be handed out without asking Redis (see [`RedisConsumer::gate_locally`]).
    acked: HashMap<String, String>,
    /// Held entries taken over as stranded (see [`RedisConsumer::adopt_stranded`]): delivered
    /// to this consumer by a read whose reply was lost, so released like entries read here
    /// (their count taken back).
    adopted: HashSet<String>,
    /// A step ran whose outcome is not accounted for yet: it failed (Redis may still have run
    /// it), or its `fetch` has not put what it returned in a list (and may have been dropped).
    /// The next step first takes over what it may have left pending to this consumer.
    unsure: bool,
    /// `close` took its redelivery delay out of the group's records: `Drop` need not, and a
    /// `fetch` after it (the consumer used again) records it again.
    delay_forgotten: bool,
    /// Its record in the group's delays (key `delays`), as written when it joined.
    delay_record: String,
    delays: String,
    /// Like `unsure`, for a blocking read on the consumer's own connection: it may still wait
    /// there, or be queued in fred through a reconnect.
    reader_unsure: bool,
    /// Entries let go of (released, never handed out) whose release failed: released again
    /// at the next `fetch`, `keep_alive` or `close`, or by `Drop`.
    unreleased: Released,
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

/// An entry one step found ready.
struct Ready {
    id: String,
    /// Redis's delivery count.
    count: u32,
    fields: Fields,
    /// Reclaimed by this step: the claim counted a delivery.
    claimed: bool,
    /// Read by this consumer's `XREADGROUP` and neither handed out nor reclaimed since: its
    /// first delivery in the group, so held back again, its release takes that read's count
    /// back (see [`Released`]).
    first: bool,
}

impl Ready {
    /// An entry on its first delivery, read by this consumer.
    fn first(id: String, fields: Fields) -> Self {
        Self {
            id,
            count: 1,
            fields,
            claimed: false,
            first: true,
        }
    }
}

/// A held entry's fields, and whether it was read by this consumer's `XREADGROUP` (delivered
/// once, to this consumer) rather than reclaimed or read by the gate script.
struct Known {
    fields: Fields,
    read_here: bool,
}

impl Known {
    fn read_here(fields: Fields) -> Self {
        Self {
            fields,
            read_here: true,
        }
    }
}

/// Lanes remembered in [`RedisConsumer::acked`] before it starts over (with
/// `KeyOrdering::Exact` there is one per key).
const MAX_ACKED_LANES: usize = 65_536;

/// Handed-back entries remembered in [`RedisConsumer::returned`] before it forgets those no
/// longer pending to it (entries another consumer reclaimed are never seen again here).
const MAX_RETURNED: usize = 65_536;

/// The count remembered for an entry handed back whose count this consumer does not know (a
/// release, a nack of an entry it does not have in flight): never taken for one a lost step
/// claimed.
const UNKNOWN_COUNT: u32 = u32::MAX;

/// A delivery handed out and not acknowledged.
struct InFlight {
    /// Its lane, empty for none.
    lane: String,
    /// Its delivery count as handed out.
    count: u32,
}

/// Deliveries remembered in [`RedisConsumer::in_flight`] before it forgets those no longer
/// pending to it: a caller of `fetch` may drop a delivery without answering it (the port allows
/// it: it comes again after the redelivery delay), and another consumer then reclaims and
/// acknowledges it, which this one never hears of.
const MIN_IN_FLIGHT_PRUNE: usize = 1024;

/// Entries per script call of a release.
const RELEASE_CHUNK: usize = 512;

/// The most deliveries one `fetch` hands out, whatever it is asked for: the limit goes to
/// Redis as a count, and the held-back entries are bounded anyway.
pub(crate) const MAX_FETCH: usize = 10_000;

impl RedisConsumer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        reader: Client,
        keys: TopicKeys,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
        delay_record: String,
    ) -> Self {
        // Look for due redeliveries as often as the port allows them to wait behind new
        // entries (`ConsumerOptions::redelivery_lag`: a quarter of the delay, at most 1 s).
        let claim_interval = options.redelivery_lag().max(Duration::from_millis(5));
        Self {
            errors: keys.errors(group),
            delays: keys.delays(group),
            shared,
            reader,
            keys,
            topic: topic.to_owned(),
            group: group.to_owned(),
            options,
            held: Vec::new(),
            known: HashMap::new(),
            held_since: Instant::now(),
            in_flight: HashMap::new(),
            in_flight_limit: MIN_IN_FLIGHT_PRUNE,
            returned: HashMap::new(),
            returned_limit: MAX_RETURNED,
            acked: HashMap::new(),
            adopted: HashSet::new(),
            unsure: false,
            delay_forgotten: false,
            delay_record,
            reader_unsure: false,
            unreleased: Released::default(),
            cursor: "0-0".to_owned(),
            // Entries idle for the redelivery delay are not found any sooner by claiming at
            // once; the first fetch of a new consumer stays one round trip.
            next_claim: Instant::now() + claim_interval,
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
    ///
    /// On Redis Cluster, the ids are those on the node that owns the topic's keys, where the
    /// consumer's reads and scripts run.
    pub async fn client_ids(&self) -> Result<Vec<i64>, TransportError> {
        connection::client_ids(
            &self.shared.client,
            &[self.reader.id(), self.shared.client.id()],
            self.route(),
        )
        .await
    }

    /// Routes a command without keys to the node that owns the topic's keys (client ids are
    /// per node: `CLIENT UNBLOCK` must reach the node the blocking read waits on).
    fn route(&self) -> ClusterHash {
        ClusterHash::Custom(fred::util::redis_keyslot(self.keys.stream.as_bytes()))
    }

    /// Like [`nack`](Consumer::nack), recording `error` as the reason: if the entry is later
    /// dead-lettered, the dead letter carries the last error reported for it.
    pub async fn nack_with_error(
        &mut self,
        id: &DeliveryId,
        error: &str,
    ) -> Result<(), TransportError> {
        delivery_ids(std::slice::from_ref(id))?;
        // A nack leaves the count alone. The count as handed out, until Redis says which it
        // left (higher, should a lost step of this consumer have reclaimed it meanwhile).
        let left = self
            .in_flight
            .remove(&id.0)
            .map_or(UNKNOWN_COUNT, |f| f.count);
        self.remember_returned([(id.0.clone(), left)]).await;
        let args = vec![
            Value::from(self.group.as_str()),
            Value::from(self.options.consumer_name.as_str()),
            Value::from(id.0.as_str()),
            Value::from(error),
        ];
        let left = self
            .run_script(
                &self.shared.scripts.nack,
                &[self.keys.stream.as_str(), self.errors.as_str()],
                args,
            )
            .await?;
        self.note_counts_left([id.0.as_str()], [left]);
        Ok(())
    }

    /// Stops consuming: entries held back (never handed out) are released at once for the
    /// other consumers of the group, and the consumer's connection closes. Entries handed out
    /// and not acknowledged, or nacked, come back after the redelivery delay. It also ends a
    /// blocking read a dropped `fetch` left waiting, and releases what that read was served.
    /// Dropping the consumer releases only the held entries (and those of a release that
    /// failed), in the background. Closing or
    /// dropping it also takes its redelivery delay out of the group's records
    /// ([`RedisStreamTransport::redelivery_delays`](crate::RedisStreamTransport::redelivery_delays)).
    pub async fn close(mut self) -> Result<(), TransportError> {
        Consumer::close(&mut self).await
    }

    /// Records its redelivery delay in the group again, after a `close`, now that it is used
    /// again. Best effort, tried again at the next fetch.
    async fn record_delay_again(&mut self) {
        let recorded = self
            .shared
            .client
            .with_options(&self.shared.fail_fast())
            .hset::<Value, _, _>(
                self.delays.as_str(),
                (
                    self.options.consumer_name.as_str(),
                    self.delay_record.as_str(),
                ),
            )
            .await;
        match recorded {
            Ok(_) => self.delay_forgotten = false,
            Err(error) => {
                tracing::debug!(%error, consumer = %self.options.consumer_name, "could not record the consumer's redelivery delay again")
            }
        }
    }

    /// Restarts the idle clock of `ids`, pending to this consumer, leaving their delivery
    /// counts alone: no other consumer reclaims them for a redelivery delay.
    async fn refresh(&self, ids: Vec<String>) -> Result<(), TransportError> {
        set_idle(
            &self.shared,
            &self.keys.stream,
            &self.errors,
            &self.group,
            &self.options,
            Some(Duration::ZERO),
            false,
            &ids,
        )
        .await
    }

    /// Releases the entries let go of, those of earlier releases that failed (Redis away, or
    /// the reply lost) included: kept in `unreleased` until a release of them goes through,
    /// instead of left pending here to be reclaimed after the redelivery delay with a delivery
    /// counted that no handler got. Sending one again is safe: `SET_IDLE` leaves an entry
    /// released already as it is, its count taken back once.
    async fn release_unreleased(&mut self) -> Result<(), TransportError> {
        if self.unreleased.is_empty() {
            return Ok(());
        }
        release(
            &self.shared,
            &self.keys.stream,
            &self.errors,
            &self.group,
            &self.options,
            &self.unreleased,
        )
        .await?;
        self.unreleased = Released::default();
        Ok(())
    }

    /// Takes the held entries, split by whether their delivery count still counts the read
    /// that brought them here (see [`Released`]).
    fn take_held(&mut self) -> Released {
        let released = self.held_released();
        self.held.clear();
        released
    }

    /// What releasing the held entries means, leaving them held.
    fn held_released(&self) -> Released {
        self.released(&self.held)
    }

    /// What releasing `ids`, held entries, means: split by whether their delivery count still
    /// counts the read that brought them here.
    fn released<'a>(&self, ids: impl IntoIterator<Item = &'a String>) -> Released {
        let mut released = Released::default();
        for id in ids {
            if self.known.get(id).is_some_and(|known| known.read_here) || self.adopted.contains(id)
            {
                released.read_unhanded.push(id.clone());
            } else {
                released.counted.push(id.clone());
            }
        }
        released
    }

    /// Ends a blocking read this consumer's connection may still be waiting in (its `fetch`
    /// was dropped). Best effort: a read that is not blocked, or a lookup that fails, leaves
    /// nothing to do that the release of stranded entries does not cover once it returns.
    async fn unblock_reader(&self) {
        let Ok(ids) =
            connection::client_ids(&self.shared.client, &[self.reader.id()], self.route()).await
        else {
            return;
        };
        for id in ids {
            let unblocked: Result<Value, _> = self
                .shared
                .client
                .with_options(&self.shared.patient())
                .custom(
                    CustomCommand::new("CLIENT", self.route(), false),
                    vec![Value::from("UNBLOCK"), Value::from(id)],
                )
                .await;
            if let Err(error) = unblocked {
                tracing::debug!(%error, "could not unblock the consumer's read");
            }
        }
    }

    /// Entries pending to this consumer that it neither holds nor handed out: among them
    /// those it handed back whose delivery count rose since, which only a claim of its own
    /// does (another consumer's claim takes them away): a step whose reply was lost claimed
    /// them when they came due. Left, they would wait out another redelivery delay, and the
    /// next claim would count a delivery no handler got.
    async fn stranded(&self) -> Result<Vec<String>, TransportError> {
        let held: HashSet<&str> = self.held.iter().map(String::as_str).collect();
        Ok(self
            .pending_ids()
            .await?
            .into_iter()
            .filter(|(id, count)| {
                !self.in_flight.contains_key(id)
                    && self.returned.get(id).is_none_or(|left| count > left)
                    && !held.contains(id.as_str())
            })
            .map(|(id, _)| id)
            .collect())
    }

    /// Every entry pending to this consumer, with its delivery count, a page of `XPENDING` at
    /// a time; none when the group is gone (the next step creates it again).
    async fn pending_ids(&self) -> Result<Vec<(String, u32)>, TransportError> {
        const PAGE: usize = 10_000;
        let mut ids = Vec::new();
        let mut start = "-".to_owned();
        loop {
            let reply: Result<Value, _> = self
                .shared
                .client
                .with_options(&self.shared.patient())
                .custom(
                    CustomCommand::new("XPENDING", ClusterHash::FirstKey, false),
                    vec![
                        Value::from(self.keys.stream.as_str()),
                        Value::from(self.group.as_str()),
                        Value::from(start.as_str()),
                        Value::from("+"),
                        Value::from(PAGE as i64),
                        Value::from(self.options.consumer_name.as_str()),
                    ],
                )
                .await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) if is_nogroup(&e) => return Ok(Vec::new()),
                Err(e) => return Err(transport_error(e)),
            };
            // `[id, consumer, idle, count]` each.
            let page: Vec<(String, u32)> = entry::array(reply)
                .into_iter()
                .filter_map(|pending| {
                    let mut fields = entry::array(pending).into_iter();
                    let id = fields.next()?.into_string()?;
                    let count = fields.nth(2).and_then(|c| c.as_u64());
                    Some((
                        id,
                        count.map_or(0, |c| u32::try_from(c).unwrap_or(u32::MAX)),
                    ))
                })
                .collect();
            let full = page.len() == PAGE;
            ids.extend(page);
            match ids.last() {
                // Exclusive: the page after the last id seen.
                Some((last, _)) if full => start = format!("({last}"),
                _ => return Ok(ids),
            }
        }
    }

    /// Creates the group again after Redis said it is gone, and forgets what this consumer
    /// knew of the old one. Warns when it was this consumer that created it: the entries
    /// still in the stream are all delivered again, which an operator who deleted the group on
    /// purpose (a retired group, whose consumers still run) wants to know.
    async fn recreate_group(&mut self) -> Result<(), TransportError> {
        if self.shared.create_group(&self.keys, &self.group).await? {
            tracing::warn!(
                topic = %self.topic,
                group = %self.group,
                stream = %self.keys.stream,
                "the consumer group was gone (deleted with `XGROUP DESTROY` or with its stream, or \
                 lost with a Redis restarted without persistence); created it again at the start \
                 of the stream, so every entry still in it is delivered again"
            );
        }
        self.forget_the_old_group();
        Ok(())
    }

    /// Forgets what this consumer knew of a group that is gone (deleted, or lost with a
    /// restarted server): the group made again at `0` delivers everything again, so what was
    /// held, known, adopted or acknowledged here is not, and its reclaim cursor means nothing.
    /// Deliveries in flight, and entries handed back, stay remembered until they are answered
    /// or pruned: their handlers may still answer them.
    fn forget_the_old_group(&mut self) {
        self.unreleased = Released::default();
        self.held.clear();
        self.known.clear();
        self.adopted.clear();
        self.acked.clear();
        self.cursor = "0-0".to_owned();
    }

    /// Whether the held entries' idle times are due for a restart: they were last read or
    /// refreshed an eighth of the redelivery delay ago (well before anyone may reclaim them).
    fn held_due(&self, now: Instant) -> bool {
        !self.held.is_empty()
            && now.duration_since(self.held_since) >= self.options.redelivery_delay / 8
    }

    /// One script: reclaim, read, gate. Recreates the group if it vanished (a server that
    /// restarted without persistence) and tries once more. After a read or step whose outcome
    /// is unknown, first takes over what it may have left pending here.
    async fn step(&mut self, max: usize) -> Result<Vec<Ready>, TransportError> {
        if self.unsure || self.reader_unsure {
            self.adopt_stranded().await?;
        }
        // Until `fetch` has put what this step returns in a list.
        self.unsure = true;
        match self.try_step(max).await {
            Err(e) if is_nogroup(&e) => {
                self.recreate_group().await?;
                self.try_step(max).await.map_err(transport_error)
            }
            other => other.map_err(transport_error),
        }
    }

    /// Waits until a read still waiting on the reader's connection, or queued in fred through
    /// a reconnect, has been served: a `PING` there is answered after that connection's
    /// earlier commands. Still unsure when the `PING` is not answered in time.
    async fn settle_reader(&mut self) {
        let ping = self
            .reader
            .with_options(&self.shared.patient())
            .ping::<Value>(None)
            .await;
        match ping {
            Ok(_) => self.reader_unsure = false,
            Err(error) => tracing::debug!(%error, "the consumer's read may still be waiting"),
        }
    }

    /// Takes over, as held entries, the entries pending to this consumer that it neither
    /// holds nor handed out: what a read or step whose reply was lost (it timed out while
    /// Redis still ran it, its connection dropped, its `fetch` was dropped) delivered here.
    /// Left alone they would wait out the redelivery delay, holding up their lanes, and the
    /// reclaim would count a second delivery no handler got (with `max_deliveries(1)`,
    /// dead-lettering an entry never handled). Taken over, they pass the gate like every
    /// held entry, with the delivery count that read gave them; their idle time restarts, so
    /// no claim (this consumer's next one, or another's) counts one more.
    async fn adopt_stranded(&mut self) -> Result<(), TransportError> {
        if self.reader_unsure {
            // If the reader does not settle in time, this runs again at the next step.
            self.settle_reader().await;
        }
        let stranded = self.stranded().await?;
        if !stranded.is_empty() {
            tracing::debug!(
                topic = %self.topic,
                group = %self.group,
                count = stranded.len(),
                "taking over entries whose read reply was lost"
            );
            let now = Instant::now();
            self.refresh(stranded.clone()).await?;
            self.hold_stranded(stranded, now);
        }
        self.unsure = false;
        Ok(())
    }

    /// Holds `stranded` as taken over (their read counted here, so a release takes it back),
    /// in stream order, as the gate takes them; `now` starts the hold if nothing was held.
    fn hold_stranded(&mut self, stranded: Vec<String>, now: Instant) {
        if self.held.is_empty() {
            self.held_since = now;
        }
        self.held.extend(stranded.iter().cloned());
        self.adopted.extend(stranded);
        self.held.sort_by_key(|id| entry_id(id));
    }

    async fn try_step(&mut self, max: usize) -> Result<Vec<Ready>, fred::error::Error> {
        let now = Instant::now();
        // Reclaimed entries count against `max_held` too: those of a key whose first entry is
        // still pending wait behind it, and each entry held costs every step an `XPENDING`
        // in the script (and an `XCLAIM` now and then). Without the bound, a scan of a long backlog of one
        // key (released by consumers closing during a deploy) claimed `max` more at each
        // step until it held all of it. A full set claims one entry per claim interval, its
        // scan going on where the last claim stopped: it still walks the whole pending list,
        // so an entry the held ones wait for is taken over once its consumer died.
        let held_room = self.shared.options.max_held.saturating_sub(self.held.len());
        let claim = if held_room == 0 {
            now >= self.next_claim
        } else {
            self.cursor != "0-0" || now >= self.next_claim
        };
        let claim_count = if claim { max.min(held_room).max(1) } else { 0 };
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
        // With entries acknowledged here to go by, the local gate needs to know that they are
        // still done with (see `gate_locally`): the group's oldest pending entry, asked in the
        // same round trip, right after the read.
        let mut floor = None;
        let mut fresh = if room > 0 {
            let client = self.shared.client.with_options(&self.shared.once());
            let reply = if !claim && !self.acked.is_empty() {
                let pipeline = Pipeline::from(client);
                self.read_new::<()>(&pipeline, room).await?;
                pipeline
                    .custom::<(), _>(
                        CustomCommand::new("XPENDING", ClusterHash::FirstKey, false),
                        vec![
                            Value::from(self.keys.stream.as_str()),
                            Value::from(self.group.as_str()),
                            Value::from("-"),
                            Value::from("+"),
                            Value::from(1),
                        ],
                    )
                    .await?;
                let mut replies = pipeline.all::<Vec<Value>>().await?.into_iter();
                let reply = replies.next().unwrap_or(Value::Null);
                floor = replies.next().and_then(pending_floor);
                reply
            } else {
                self.read_new(&client, room).await?
            };
            read_entries(reply)
        } else {
            Vec::new()
        };
        if self.held.is_empty() {
            self.held_since = now;
        }
        if !claim {
            if self.held.is_empty() && fresh.is_empty() {
                return Ok(Vec::new());
            }
            match self.gate_locally(fresh, max, now, floor) {
                Ok(ready) => return Ok(ready),
                Err(undecided) => fresh = undecided,
            }
        }
        // The held entries' idle times restart only once they are an eighth of the delay
        // old, as the local gate counts them: a consumer polling the gate for entries held
        // behind another consumer's would otherwise write an `XCLAIM` per held entry at every
        // poll (thousands a second, each replicated and logged).
        let refresh_held = self.held_due(now);
        let mut args = vec![
            Value::from(self.group.as_str()),
            Value::from(self.options.consumer_name.as_str()),
            Value::from(claim_idle(self.options.redelivery_delay)),
            Value::from(claim_count as i64),
            Value::from(self.cursor.as_str()),
            Value::from(i64::from(self.options.max_deliveries)),
            Value::from(max as i64),
            Value::from(if refresh_held { "1" } else { "0" }),
        ];
        // The gate's fields as stored, bytes and all: a `prev` that is not UTF-8 is malformed
        // (as the script finds it in an entry it reads itself), not empty.
        let candidate = |args: &mut Vec<Value>, id: &str, kind: &str, fields: Option<&Fields>| {
            let raw = |name: &str| {
                fields
                    .and_then(|f| entry::raw_field(f, name))
                    .map_or_else(|| Value::from(""), |v| Value::Bytes(v.clone()))
            };
            args.push(Value::from(id));
            args.push(Value::from(kind));
            args.push(raw("lane"));
            args.push(raw("prev"));
            args.push(raw("group"));
        };
        for id in &self.held {
            let fields = self.known.get(id).map(|k| &k.fields);
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
            self.known.insert(id, Known::read_here(fields));
        }
        let reply = self
            .shared
            .scripts
            .step
            .run(
                &self.shared.client,
                &self.shared.once(),
                &[
                    self.keys.stream.as_str(),
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
        let mut ids = || {
            parts
                .next()
                .map(entry::array)
                .unwrap_or_default()
                .into_iter()
                .filter_map(Value::into_string)
                .collect::<Vec<_>>()
        };
        let (dead, malformed) = (ids(), ids());
        if claim {
            self.cursor = cursor.unwrap_or_else(|| "0-0".to_owned());
            if self.cursor == "0-0" || held_room == 0 {
                self.next_claim = now + self.claim_interval;
            }
        }
        if !dead.is_empty() {
            self.count_dead_letters("max_deliveries", dead.len() as u64);
            tracing::warn!(
                topic = %self.topic,
                group = %self.group,
                count = dead.len(),
                entries = %shown_ids(&dead),
                "dead-lettered entries handed out {} times (max_deliveries) without success: \
                 `dead_letters` lists them, with their errors",
                self.options.max_deliveries
            );
        }
        if !malformed.is_empty() {
            self.count_dead_letters("malformed", malformed.len() as u64);
            tracing::warn!(
                topic = %self.topic,
                group = %self.group,
                count = malformed.len(),
                entries = %shown_ids(&malformed),
                "dead-lettered entries whose `prev` field is no stream id"
            );
        }
        // Every entry still held was read, claimed or refreshed by this step, or was when
        // `held_since` was last set.
        if refresh_held {
            self.held_since = now;
        }
        let mut known = std::mem::take(&mut self.known);
        self.held.clear();
        let mut items = held.into_iter();
        while let (Some(id), Some(fields)) = (items.next(), items.next()) {
            let Some(id) = id.into_string() else { continue };
            if fields.is_array() {
                known.insert(
                    id.clone(),
                    Known {
                        fields: entry::fields(fields),
                        read_here: false,
                    },
                );
            }
            self.held.push(id);
        }
        let mut out = Vec::with_capacity(ready.len() / 4);
        let mut items = ready.into_iter();
        while let (Some(id), Some(count), Some(fields), Some(claimed)) =
            (items.next(), items.next(), items.next(), items.next())
        {
            let Some(id) = id.into_string() else { continue };
            let count = count
                .as_u64()
                .map_or(1, |c| u32::try_from(c).unwrap_or(u32::MAX));
            let claimed = claimed.as_u64() != Some(0);
            let mine = known.remove(&id);
            let first = !claimed && mine.as_ref().is_some_and(|k| k.read_here);
            let fields = if fields.is_array() {
                Some(entry::fields(fields))
            } else {
                mine.map(|k| k.fields)
            };
            match fields {
                Some(fields) => out.push(Ready {
                    id,
                    count,
                    fields,
                    claimed,
                    first,
                }),
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
        if !self.adopted.is_empty() {
            // Those the script dead-lettered or found gone are no longer anywhere.
            let live: HashSet<&str> = (self.held.iter().map(String::as_str))
                .chain(out.iter().map(|ready| ready.id.as_str()))
                .collect();
            self.adopted.retain(|id| live.contains(id.as_str()));
        }
        Ok(out)
    }

    /// Reads up to `count` new entries (`XREADGROUP >`) on `client`, without blocking.
    async fn read_new<R: FromValue>(
        &self,
        client: &(impl StreamsInterface + Sync),
        count: usize,
    ) -> Result<R, fred::error::Error> {
        client
            .xreadgroup(
                self.group.as_str(),
                self.options.consumer_name.as_str(),
                Some(count as u64),
                None,
                false,
                self.keys.stream.as_str(),
                ">",
            )
            .await
    }

    /// Runs one of the transport's scripts on the shared connection (waiting for a reconnect,
    /// up to the command timeout).
    async fn run_script(
        &self,
        script: &Script,
        keys: &[&str],
        args: Vec<Value>,
    ) -> Result<Value, TransportError> {
        script
            .run(&self.shared.client, &self.shared.patient(), keys, args)
            .await
            .map_err(transport_error)
    }

    /// The entries pending to this consumer, for pruning `what` it remembers; `None` (logged)
    /// when Redis cannot tell, and nothing is pruned.
    async fn still_pending(&self, what: &str) -> Option<HashSet<String>> {
        match self.pending_ids().await {
            Ok(pending) => Some(pending.into_iter().map(|(id, _)| id).collect()),
            Err(error) => {
                tracing::debug!(%error, "could not prune {what}");
                None
            }
        }
    }

    /// Notes that this consumer handed `ids` back (nacked or deferred). Once it remembers
    /// many, it forgets those no longer pending to it (acknowledged or reclaimed elsewhere),
    /// asking Redis: forgetting one still pending would make `close` release it early, with a
    /// delivery a handler received taken back.
    async fn remember_returned(&mut self, ids: impl IntoIterator<Item = (String, u32)>) {
        self.returned.extend(ids);
        if self.returned.len() < self.returned_limit {
            return;
        }
        if let Some(pending) = self.still_pending("the entries handed back").await {
            self.returned.retain(|id, _| pending.contains(id));
        }
        // However many are still pending, look again only once that many more came back.
        self.returned_limit = (self.returned.len() * 2).max(MAX_RETURNED);
    }

    /// Records the delivery counts the nack or defer script says it left for entries handed
    /// back (-1: not this consumer's); those it does not say keep the count remembered before.
    fn note_counts_left<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a str>,
        counts: impl IntoIterator<Item = Value>,
    ) {
        for (id, count) in ids.into_iter().zip(counts) {
            if let (Some(left), Some(count)) = (self.returned.get_mut(id), count.as_u64()) {
                *left = u32::try_from(count).unwrap_or(UNKNOWN_COUNT);
            }
        }
    }

    /// Forgets the deliveries no longer pending to this consumer (dropped unanswered, then
    /// reclaimed and acknowledged elsewhere), asking Redis. Kept, they would grow without
    /// bound, and their lanes would count as busy here, keeping the entries held behind them
    /// instead of releasing them to other consumers.
    async fn prune_in_flight(&mut self) {
        if let Some(pending) = self.still_pending("the deliveries in flight").await {
            self.in_flight.retain(|id, _| pending.contains(id));
        }
    }

    /// Notes that this consumer acknowledged `id` of `lane` (the lane's highest so far).
    fn remember_acked(&mut self, lane: String, id: &str) {
        if self.acked.len() >= MAX_ACKED_LANES && !self.acked.contains_key(&lane) {
            self.acked.clear();
        }
        let newer = self
            .acked
            .get(&lane)
            .is_none_or(|top| entry_id(top) < entry_id(id));
        if newer {
            self.acked.insert(lane, id.to_owned());
        }
    }

    /// The order gate without a round trip, when this consumer knows enough to decide every
    /// candidate (the entries it holds, then `fresh`) itself; `None` sends them all to the gate
    /// script instead.
    ///
    /// It knows a candidate is ready when it was delivered once, to this consumer (read by its
    /// `XREADGROUP`, not reclaimed), is meant for every group, has its `lane`, `prev` and
    /// `group` fields (those present) in UTF-8, and either is in no lane, or is
    /// the first entry of its lane, or follows an entry this consumer acknowledged itself that
    /// is still not pending, or follows an entry handed out earlier in this batch (a chain, in
    /// order). That is what the script would decide: the group acknowledged the predecessor,
    /// and nobody else handled the entry.
    ///
    /// An acknowledged entry can be pending again: a group set back (`XGROUP SETID`) or
    /// created again delivers it anew, maybe to another consumer. So the acknowledgement counts
    /// only with `floor`, the group's oldest pending entry asked right after this step's read,
    /// newer than it: the predecessor was not pending then, and this is the same one check the
    /// script would make. Without `floor` (no read this step), or with an older entry pending
    /// anywhere in the group, the script decides. A candidate that follows one held back here is held back too. Held entries
    /// are decided here only while they are recent (their idle time well under the
    /// redelivery delay, so no one else reclaims them and the handler has nearly the whole
    /// delay); after that the script, which also resets their idle time.
    fn gate_locally(
        &mut self,
        fresh: Vec<(String, Fields)>,
        max: usize,
        now: Instant,
        floor: Option<(u64, u64)>,
    ) -> Result<Vec<Ready>, Vec<(String, Fields)>> {
        if self.options.max_deliveries < 1 || self.held_due(now) {
            return Err(fresh);
        }
        // Per candidate, in order (held entries, then fresh ones): handed out now (true) or
        // held back (false); by id too, for the chains.
        let mut decisions = Vec::with_capacity(self.held.len() + fresh.len());
        let mut decided: HashMap<&str, bool> = HashMap::with_capacity(decisions.capacity());
        let mut handed = 0;
        let held = self.held.iter().map(|id| {
            let known = self.known.get(id).filter(|k| k.read_here);
            (id.as_str(), known.map(|k| &k.fields))
        });
        for (id, fields) in held.chain(fresh.iter().map(|(id, f)| (id.as_str(), Some(f)))) {
            let Some(fields) = fields else {
                return Err(fresh);
            };
            // A gate field that is not UTF-8 (a `prev` then is malformed): the script decides.
            let text = |name| entry::raw_field(fields, name).map(|v| std::str::from_utf8(v));
            let (Ok(group), Ok(lane), Ok(prev)) = (
                text("group").transpose(),
                text("lane").transpose(),
                text("prev").transpose(),
            ) else {
                return Err(fresh);
            };
            if group.is_some() {
                return Err(fresh);
            }
            let ready = match lane {
                None => true,
                Some(lane) => {
                    let prev = prev.unwrap_or("");
                    let done = |acked: &String| {
                        acked == prev && floor.is_some_and(|floor| entry_id(acked) < floor)
                    };
                    if prev.is_empty() || self.acked.get(lane).is_some_and(done) {
                        true
                    } else if let Some(&before) = decided.get(prev) {
                        // A chain: ready when its predecessor is handed out in this batch.
                        before
                    } else {
                        return Err(fresh);
                    }
                }
            };
            let ready = ready && handed < max;
            handed += usize::from(ready);
            decided.insert(id, ready);
            decisions.push(ready);
        }
        let mut ready = decisions.into_iter();
        let mut out = Vec::with_capacity(handed);
        for id in std::mem::take(&mut self.held) {
            let known = ready
                .next()
                .unwrap_or(false)
                .then(|| self.known.remove(&id));
            match known.flatten() {
                Some(known) => out.push(Ready::first(id, known.fields)),
                None => self.held.push(id),
            }
        }
        for (id, fields) in fresh {
            if ready.next().unwrap_or(false) {
                out.push(Ready::first(id, fields));
            } else {
                self.held.push(id.clone());
                self.known.insert(id, Known::read_here(fields));
            }
        }
        Ok(out)
    }

    /// Holds back entries the gate found ready that are not handed out after all, as the gate
    /// would have held them: a delivery count a claim of this step added is taken back (the
    /// `defer` script), other counts are left alone.
    async fn hold_back(&mut self, entries: Vec<Ready>) -> Result<(), TransportError> {
        let mut args = vec![
            Value::from(self.group.as_str()),
            Value::from(self.options.consumer_name.as_str()),
        ];
        for ready in entries {
            if ready.claimed {
                args.push(Value::from(ready.id.as_str()));
            }
            self.held.push(ready.id.clone());
            let known = Known {
                fields: ready.fields,
                read_here: ready.first,
            };
            self.known.insert(ready.id, known);
        }
        // In stream order, as the gate takes them.
        self.held.sort_by_key(|id| entry_id(id));
        if args.len() > 2 {
            // Held, not handed back: the counts it leaves are not remembered.
            self.run_script(
                &self.shared.scripts.defer,
                &[self.keys.stream.as_str(), self.errors.as_str()],
                args,
            )
            .await?;
        }
        Ok(())
    }

    /// Counts `n` entries this consumer moved to the dead letters, in
    /// `cqrs_transport_dead_lettered_total{topic, group, transport, reason}`: the one series
    /// that counts them all, those dead-lettered after `max_deliveries` (no consume loop sees
    /// them) included. `reason`: `max_deliveries`, `malformed` (a `prev` that is no stream
    /// id), or `given_up` (undecodable, or a handler gave up on it).
    fn count_dead_letters(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        metrics::counter!(
            "cqrs_transport_dead_lettered_total",
            "topic" => self.topic.clone(),
            "group" => self.group.clone(),
            "transport" => "redis",
            "reason" => reason
        )
        .increment(n);
    }

    /// Dead-letters entries pending to this consumer, each with why (see the script): those
    /// it cannot decode, or one its handler gave up on. Returns how many were.
    async fn dead_letter_entries(
        &self,
        entries: Vec<(String, String)>,
    ) -> Result<u64, TransportError> {
        let mut args = vec![
            Value::from(self.group.as_str()),
            Value::from(self.options.consumer_name.as_str()),
        ];
        for (id, reason) in &entries {
            args.push(Value::from(id.as_str()));
            args.push(Value::from(reason.as_str()));
        }
        let dead = self
            .run_script(
                &self.shared.scripts.dead_letter,
                &[
                    self.keys.stream.as_str(),
                    self.keys.dead.as_str(),
                    self.errors.as_str(),
                ],
                args,
            )
            .await?;
        let dead = dead.as_u64().unwrap_or(0);
        self.count_dead_letters("given_up", dead);
        // The reason is a handler's error text, or a stored entry's: escaped, so a line break
        // in it cannot start a forged log line.
        for (id, reason) in &entries {
            if dead == entries.len() as u64 {
                tracing::warn!(topic = %self.topic, group = %self.group, entry = %id, reason = %reason.escape_debug(), "dead-lettered an entry");
            } else {
                // Some were left alone: taken over by another consumer, or gone.
                tracing::info!(topic = %self.topic, group = %self.group, entry = %id, dead, of = entries.len(), reason = %reason.escape_debug(), "gave up an entry, perhaps left to another consumer");
            }
        }
        Ok(dead)
    }

    /// Waits up to `wait` for new entries on this consumer's own connection; the ids read join
    /// the held ones, and the next step gates them.
    async fn wait_for_entries(
        &mut self,
        count: usize,
        wait: Duration,
    ) -> Result<(), TransportError> {
        // Saturating: a `block` or command timeout of `Duration::MAX` means "as long as it
        // takes", and fred (through tokio) takes a timeout too long for the clock as none.
        // Written once (see `once`): sent again after a reconnect, a read Redis served before
        // the connection closed would wait for new entries, its entries stranded here.
        let options = Options {
            timeout: Some(wait.saturating_add(self.shared.options.connection.command_timeout)),
            max_attempts: Some(1),
            ..Options::default()
        };
        let started = Instant::now();
        // An earlier read not known to be served (its `PING` unanswered in time) is served
        // before this one, on the same connection: once this one is answered, what that one
        // delivered is pending here, in no list, and the next step must look for it.
        let earlier_unsure = self.reader_unsure;
        self.reader_unsure = true;
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
            // The group is gone (`UNBLOCKED` when the stream was deleted during the read).
            Err(e) if is_nogroup(&e) => {
                // Refused: it read nothing.
                self.reader_unsure = false;
                self.recreate_group().await?;
                // Should the group be there after all (created again by another consumer
                // meanwhile, or a reply taken for gone that was not), what is still pending to
                // this consumer is taken over again by the next step instead of waiting out
                // the redelivery delay.
                self.unsure = true;
                return Ok(());
            }
            // Ended by Redis with an error and served nothing (`CLIENT UNBLOCK <id> ERROR`, a
            // master turned replica): the group is still there, and so is what this consumer
            // holds. A read of nothing: the next step goes on (and reports what Redis says).
            Err(e) if is_unblocked(&e) => {
                tracing::debug!(topic = %self.topic, group = %self.group, error = %e, "the consumer's blocking read was ended by the server");
                self.reader_unsure = false;
                self.unsure |= earlier_unsure;
                return Ok(());
            }
            Err(e) => {
                if *e.kind() == FredKind::Timeout
                    && self.reader.is_connected()
                    && self.shared.options.connection.replaces_unresponsive()
                {
                    // No reply within the block interval plus the command timeout, on a
                    // connection fred takes for up: dead, or the server stuck. fred's own
                    // unresponsive check skips a connection waiting in a blocking command,
                    // so replace it here (what the read may have been served is taken over
                    // by the next step), unless unresponsive connections are never replaced.
                    let reader = self.reader.clone();
                    tokio::spawn(async move {
                        if let Err(error) = reader.force_reconnection().await {
                            tracing::debug!(%error, "could not reconnect the consumer's reader");
                        }
                    });
                }
                return Err(transport_error(e));
            }
        };
        let entries = read_entries(reply);
        if self.held.is_empty() && !entries.is_empty() {
            // Delivered by this read: idle since it started, at most.
            self.held_since = started;
        }
        for (id, fields) in entries {
            self.held.push(id.clone());
            self.known.insert(id, Known::read_here(fields));
        }
        self.reader_unsure = false;
        self.unsure |= earlier_unsure;
        Ok(())
    }
}

/// Every entry pending in the group is at least this id, by an `XPENDING key group - + 1`
/// reply (its oldest pending entry); `(u64::MAX, u64::MAX)` when none is pending (an empty
/// array). `None` for a reply of another shape: the script then decides, rather than taking
/// it for "nothing pending" and trusting every acknowledgement remembered here.
fn pending_floor(reply: Value) -> Option<(u64, u64)> {
    let Value::Array(entries) = reply else {
        return None;
    };
    let Some(oldest) = entries.into_iter().next() else {
        return Some((u64::MAX, u64::MAX));
    };
    let Value::Array(fields) = oldest else {
        return None;
    };
    entry::parse_id(&fields.into_iter().next()?.into_string()?)
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

/// The first few of `ids` for a log line, with how many more there are: a step may
/// dead-letter up to four batches' worth.
fn shown_ids(ids: &[String]) -> String {
    const SHOWN: usize = 10;
    let shown = ids[..ids.len().min(SHOWN)].join(", ");
    match ids.len().checked_sub(SHOWN) {
        Some(more) if more > 0 => format!("{shown} and {more} more"),
        _ => shown,
    }
}

/// A stream entry id as `(milliseconds, sequence)`, for comparing; `(0, 0)` when malformed.
fn entry_id(id: &str) -> (u64, u64) {
    entry::parse_id(id).unwrap_or((0, 0))
}

/// Refuses a delivery id that is no stream entry id (made by hand, or another transport's):
/// Redis would refuse the whole command with its own words, reported as a backend failure.
fn delivery_ids(ids: &[DeliveryId]) -> Result<(), TransportError> {
    match ids.iter().find(|id| entry::parse_id(&id.0).is_none()) {
        None => Ok(()),
        Some(id) => Err(TransportError::Invalid(format!(
            "`{}` is no delivery id of this transport (a stream entry id, `<ms>-<seq>`): ack, \
             nack, defer, dead_letter and keep_alive take the ids `fetch` returned",
            id.0.chars().take(64).collect::<String>()
        ))),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The longest idle time a claim waits for: ten years. Redis counts idle times from an entry's
/// last delivery time, which an `XCLAIM` can set no earlier than the epoch, so a longer
/// redelivery delay (`Duration::MAX`: "never by time") would be one no entry ever reaches,
/// released ones included (see [`release`]). Capped, such a delay still never redelivers in
/// practice, and a release, which makes entries idle since the epoch, is claimed at once.
const MAX_CLAIM_IDLE: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// The min-idle time of this consumer's claims: its redelivery delay, at most
/// [`MAX_CLAIM_IDLE`].
fn claim_idle(delay: Duration) -> i64 {
    millis(delay.min(MAX_CLAIM_IDLE))
}

/// Takes a consumer's redelivery delay out of its group's records (`key`), as it stops, if
/// the record there is still its own: a consumer joining next is compared with those still
/// consuming only. Best effort: a record left behind stops counting once its consumer has been
/// idle for its window.
pub(crate) async fn forget_delay(shared: &Shared, key: &str, name: &str, record: &str) {
    let forgotten = shared
        .scripts
        .forget_delay
        .run(
            &shared.client,
            &shared.fail_fast(),
            &[key],
            vec![Value::from(name), Value::from(record)],
        )
        .await;
    if let Err(error) = forgotten {
        tracing::debug!(%error, key, consumer = name, "could not take the consumer's redelivery delay out of its group's records");
    }
}

/// Releases entries this consumer held but never handed out: idle since the epoch, longer
/// than any consumer's claim waits for (whatever its redelivery delay, `Duration::MAX`
/// included: see [`MAX_CLAIM_IDLE`]), so another consumer reclaims them at once.
async fn release(
    shared: &Shared,
    stream: &str,
    errors: &str,
    group: &str,
    options: &ConsumerOptions,
    entries: &Released,
) -> Result<(), TransportError> {
    for (take_back, ids) in [(false, &entries.counted), (true, &entries.read_unhanded)] {
        set_idle(shared, stream, errors, group, options, None, take_back, ids).await?;
    }
    Ok(())
}

/// Entries a consumer lets go of without handing them out.
#[derive(Debug, Default)]
struct Released {
    /// Delivered to this consumer by a read (`XREADGROUP`, or a claim whose reply was lost)
    /// that counted a delivery no handler got: the release takes it back, or the next
    /// consumer's claim would count it twice (with `max_deliveries(1)`, dead-lettering an
    /// entry never handled).
    read_unhanded: Vec<String>,
    /// Held after a claim that already took its count back: released as they are.
    counted: Vec<String>,
}

impl Released {
    fn is_empty(&self) -> bool {
        self.read_unhanded.is_empty() && self.counted.is_empty()
    }

    fn extend(&mut self, other: Released) {
        self.read_unhanded.extend(other.read_unhanded);
        self.counted.extend(other.counted);
    }
}

/// Sets the idle time of the entries among `ids` still pending to this consumer: `idle`, or
/// with `None` released (idle since the epoch).
#[allow(clippy::too_many_arguments)]
async fn set_idle(
    shared: &Shared,
    stream: &str,
    errors: &str,
    group: &str,
    options: &ConsumerOptions,
    idle: Option<Duration>,
    take_back: bool,
    ids: &[String],
) -> Result<(), TransportError> {
    for chunk in ids.chunks(RELEASE_CHUNK) {
        let mut args = Vec::with_capacity(chunk.len() + 4);
        args.extend([
            Value::from(group),
            Value::from(options.consumer_name.as_str()),
            idle.map_or_else(|| Value::from("released"), |idle| Value::from(millis(idle))),
            Value::from(if take_back { "1" } else { "0" }),
        ]);
        args.extend(chunk.iter().map(|id| Value::from(id.as_str())));
        let ran = shared
            .scripts
            .set_idle
            .run(&shared.client, &shared.patient(), &[stream, errors], args)
            .await;
        match ran {
            Ok(_) => {}
            // A release of a group (or stream) that is gone has nothing left to release: its
            // pending entries went with it. Failed, it would be sent again at every step, and
            // the step that makes the group again would never run.
            Err(e) if idle.is_none() && is_nogroup(&e) => return Ok(()),
            Err(e) => return Err(transport_error(e)),
        }
    }
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
        let mut held = self.take_held();
        held.extend(std::mem::take(&mut self.unreleased));
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.delay_forgotten {
            let (shared, key) = (self.shared.clone(), self.delays.clone());
            let name = self.options.consumer_name.clone();
            let record = std::mem::take(&mut self.delay_record);
            handle.spawn(async move { forget_delay(&shared, &key, &name, &record).await });
        }
        if held.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let stream = self.keys.stream.clone();
        let errors = self.errors.clone();
        let group = self.group.clone();
        let options = self.options.clone();
        handle.spawn(async move {
            if let Err(e) = release(&shared, &stream, &errors, &group, &options, &held).await {
                tracing::debug!(error = %e, "could not release held entries; they come back after the redelivery delay");
            }
        });
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn fetch(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        if self.delay_forgotten {
            self.record_delay_again().await;
        }
        if max == 0 {
            // Asked for nothing: take nothing (`XREADGROUP COUNT 0` would read everything).
            return Ok(Vec::new());
        }
        // Released before the step reads on: another consumer may take them at once.
        self.release_unreleased().await?;
        let max = max.min(MAX_FETCH);
        // `checked_add`: a `block` of `Duration::MAX` means "as long as it takes".
        let deadline = Instant::now().checked_add(self.options.block);
        let mut stepped_past_block = false;
        loop {
            let ready = self.step(max).await?;
            let mut deliveries = Vec::with_capacity(ready.len());
            let mut undecodable = Vec::new();
            // Lanes cut at an undecodable entry, and the entries held back from there on.
            let mut cut_lanes = HashSet::new();
            let mut cut = Vec::new();
            // The ids handed out or dead-lettered so far in this batch, from its first
            // undecodable entry on (a scan of the batch per undecodable entry was quadratic
            // in a flood of them).
            let mut batch_ids: Option<HashSet<String>> = None;
            for ready in ready {
                // Lossy: a lane that is not UTF-8 still orders its chain (it passed the gate).
                let lane = entry::raw_field(&ready.fields, "lane")
                    .map(|lane| String::from_utf8_lossy(lane).into_owned());
                if lane.as_ref().is_some_and(|lane| cut_lanes.contains(lane)) {
                    cut.push(ready);
                    continue;
                }
                match entry::decode(&ready.fields) {
                    Ok(record) => {
                        if let Some(ids) = &mut batch_ids {
                            ids.insert(ready.id.clone());
                        }
                        // The lane orders the chain: keys sharing one wait for each other.
                        deliveries.push(
                            Delivery::new(DeliveryId(ready.id), record, ready.count)
                                .with_order_key(lane),
                        );
                    }
                    Err(reason) => {
                        // Its predecessor, if in this batch, came before it.
                        let ids = batch_ids.get_or_insert_with(|| {
                            deliveries
                                .iter()
                                .map(|d: &Delivery| d.id.0.clone())
                                .collect()
                        });
                        let chained = entry::field(&ready.fields, "prev")
                            .is_some_and(|prev| ids.contains(prev));
                        match lane {
                            // Behind an entry only handed out in this batch: dead-lettered now,
                            // it would leave the pending list before that one, and the entries
                            // behind it, gated on it, would no longer wait for that one. So it
                            // and the rest of its lane wait; it is dead-lettered in its turn.
                            Some(lane) if chained => {
                                cut_lanes.insert(lane);
                                cut.push(ready);
                            }
                            _ => {
                                ids.insert(ready.id.clone());
                                undecodable.push((ready.id, reason));
                            }
                        }
                    }
                }
            }
            if !cut.is_empty() {
                // Before the deliveries count as handed out, like the dead letters below.
                self.hold_back(cut).await?;
            }
            let dead_lettered = !undecodable.is_empty();
            if dead_lettered {
                // Before the deliveries count as handed out: if this fails (or the fetch is
                // dropped here), they are pending to this consumer but in no list, and
                // `close` releases them at once instead of after the redelivery delay.
                self.dead_letter_entries(undecodable).await?;
            }
            // Before the deliveries count as handed out, as above: a fetch dropped in this
            // round trip (a shutdown) leaves them in no list, and `close` releases them, where
            // counted as handed out they would wait out the redelivery delay. Nothing to
            // prune when none is in flight (handlers that answer every batch).
            let prune = !self.in_flight.is_empty()
                && self.in_flight.len() + deliveries.len() >= self.in_flight_limit;
            if prune {
                self.prune_in_flight().await;
            }
            for delivery in &deliveries {
                let lane = delivery.order_key.clone().unwrap_or_default();
                self.returned.remove(&delivery.id.0);
                self.adopted.remove(&delivery.id.0);
                let count = delivery.attempt;
                self.in_flight
                    .insert(delivery.id.0.clone(), InFlight { lane, count });
            }
            if prune || self.in_flight.len() >= self.in_flight_limit {
                // However many are in flight now, look again only once that many more are.
                self.in_flight_limit = (self.in_flight.len() * 2).max(MIN_IN_FLIGHT_PRUNE);
            }
            // Everything the step returned is in a list now.
            self.unsure = false;
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if dead_lettered {
                // Their successors may be ready now. (Entries are held back above only behind
                // one handed out or dead-lettered here: never the only outcome of a step.)
                // Within the fetch's `block`, and one step past it (so a fetch with a short
                // `block` still hands out what was ready behind the dead letters): a burst of
                // undecodable entries is worked off over several fetches, and the consume
                // loop's health and shutdown checks run between them.
                let within = deadline.is_none_or(|deadline| now < deadline);
                if within || !std::mem::replace(&mut stepped_past_block, true) {
                    continue;
                }
                return Ok(Vec::new());
            }
            let mut wait = match deadline {
                Some(deadline) if now >= deadline => return Ok(Vec::new()),
                Some(deadline) => deadline - now,
                None => Duration::MAX,
            };
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
        delivery_ids(ids)?;
        for chunk in ids.chunks(512) {
            // The `XACK` and an `HDEL` of the errors recorded for the entries, pipelined: one
            // round trip, no script. Any delivery may have an error recorded, a first one
            // included: another consumer may have reclaimed the entry meanwhile (this one was
            // slower than the redelivery delay) and nacked it with an error. The `HDEL` comes
            // after the `XACK`: a nack that runs between them finds the entry no longer
            // pending and records nothing.
            let ids: Vec<&str> = chunk.iter().map(|id| id.0.as_str()).collect();
            let pipeline = Pipeline::from(self.shared.client.with_options(&self.shared.patient()));
            let queued: Result<(), _> = async {
                pipeline
                    .xack::<(), _, _, _>(
                        self.keys.stream.as_str(),
                        self.group.as_str(),
                        ids.clone(),
                    )
                    .await?;
                pipeline.hdel::<(), _, _>(self.errors.as_str(), ids).await
            }
            .await;
            queued.map_err(transport_error)?;
            pipeline
                .all::<Vec<Value>>()
                .await
                .map_err(transport_error)?;
            for id in chunk {
                self.returned.remove(&id.0);
                if let Some(InFlight { lane, .. }) = self.in_flight.remove(&id.0)
                    && !lane.is_empty()
                {
                    self.remember_acked(lane, &id.0);
                }
            }
        }
        Ok(())
    }

    async fn nack(&mut self, id: &DeliveryId) -> Result<(), TransportError> {
        self.nack_with_error(id, "").await
    }

    /// Copies the entry to the dead-letter stream with `reason`, acknowledges it and clears
    /// its recorded error, in one script, as `max_deliveries` does; left alone when another
    /// consumer took it over.
    async fn dead_letter(&mut self, id: &DeliveryId, reason: &str) -> Result<(), TransportError> {
        delivery_ids(std::slice::from_ref(id))?;
        let dead = self
            .dead_letter_entries(vec![(id.0.clone(), reason.to_owned())])
            .await?;
        self.returned.remove(&id.0);
        // Settled here, as by an ack: its lane's next entry may go (only when it was this
        // consumer's to settle).
        if let Some(InFlight { lane, .. }) = self.in_flight.remove(&id.0)
            && dead == 1
            && !lane.is_empty()
        {
            self.remember_acked(lane, &id.0);
        }
        Ok(())
    }

    /// Restarts the idle clock of these deliveries while they are pending to this consumer
    /// (`XCLAIM … IDLE 0 JUSTID`, which leaves the delivery count alone), so no other
    /// consumer reclaims them; and of the entries it holds back in a lane with an entry in
    /// flight here, which wait for that one. The other held entries (their predecessor is
    /// another consumer's, acknowledged by now perhaps, or they did not fit the batch) are
    /// released, as [`close`](Consumer::close) releases them: kept while a long batch runs,
    /// they and the rest of their lanes would wait for it although any consumer could take
    /// them.
    async fn keep_alive(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        delivery_ids(ids)?;
        let busy: HashSet<&str> = self
            .in_flight
            .values()
            .filter(|f| !f.lane.is_empty())
            .map(|f| f.lane.as_str())
            .collect();
        let waits_here = |id: &String| {
            self.known.get(id).is_some_and(|known| {
                entry::raw_field(&known.fields, "lane")
                    .is_some_and(|lane| busy.contains(String::from_utf8_lossy(lane).as_ref()))
            })
        };
        let (kept, free): (Vec<String>, Vec<String>) =
            self.held.iter().cloned().partition(waits_here);
        // The batch's refresh first: a release that fails must not leave it unrefreshed.
        self.refresh(ids.iter().map(|id| id.0.clone()).chain(kept).collect())
            .await?;
        if !free.is_empty() {
            let released = self.released(&free);
            // Out of the lists first: a release that fails leaves them pending here, in
            // `unreleased`, released again before the next step (or by `close`, or `Drop`).
            let gone: HashSet<&String> = free.iter().collect();
            self.held.retain(|id| !gone.contains(id));
            for id in &free {
                self.known.remove(id);
                self.adopted.remove(id);
            }
            // Into `unreleased` before the await below: were this future dropped there (its
            // `XPENDING` round trip, once many were handed back), entries out of the lists
            // and not yet in `unreleased` would be released by nothing, not even `Drop`.
            self.unreleased.extend(released);
            // Pending here until another consumer takes them, whether the release goes
            // through or not (its reply lost, say): not stranded, as after `close` (a `close`
            // or a recovery that took them for stranded would hold them again). A release
            // that fails is sent again (`unreleased`), not left to the redelivery delay.
            self.remember_returned(free.into_iter().map(|id| (id, UNKNOWN_COUNT)))
                .await;
        }
        // The batch is kept alive: that is what the caller asked. A release that fails
        // (Redis away) is sent again before the next step, and said there if it fails again.
        if let Err(error) = self.release_unreleased().await {
            tracing::debug!(%error, "could not release held entries; sent again before the next read");
        }
        Ok(())
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        Some(self.options.redelivery_delay / 3)
    }

    fn redelivery_delay(&self) -> Option<Duration> {
        Some(self.options.redelivery_delay)
    }

    /// Releases the entries held back at once, like [`RedisConsumer::close`]; the consumer
    /// stays usable (a later fetch reads on).
    async fn close(&mut self) -> Result<(), TransportError> {
        // A `fetch` dropped in its blocking read (a shutdown) leaves the read blocked; what
        // it is served, or was served with the reply unread, is pending to this consumer but
        // in no list. Unblock it, then release those too: their read counted a delivery.
        if self.reader_unsure {
            self.unblock_reader().await;
            // The read may also still be queued in fred (its connection reconnecting): it
            // would reach Redis after the `CLIENT UNBLOCK` and the `XPENDING` below, and what
            // it is served would wait out the redelivery delay.
            self.settle_reader().await;
        }
        // What an earlier release failed to let go of, first: a close that fails here leaves
        // it to `Drop`, with the held entries.
        self.release_unreleased().await?;
        let stranded = self.stranded().await?;
        // Held, as taken over, until released: a close that fails or is dropped in its release
        // (a shutdown's abort) leaves them to `Drop`, which releases them, their read taken
        // back, instead of to another consumer's reclaim after the redelivery delay, a
        // delivery counted that no handler got. In stream order, should the consumer go on.
        self.hold_stranded(stranded, Instant::now());
        let release = self.held_released();
        // A chunk at a time, each no longer held once released: a close that fails part-way
        // leaves `Drop` only the rest, instead of taking back the released ones' counts twice.
        for (take_back, ids) in [(false, release.counted), (true, release.read_unhanded)] {
            for chunk in ids.chunks(RELEASE_CHUNK) {
                set_idle(
                    &self.shared,
                    &self.keys.stream,
                    &self.errors,
                    &self.group,
                    &self.options,
                    None,
                    take_back,
                    chunk,
                )
                .await?;
                let released: HashSet<&String> = chunk.iter().collect();
                self.held.retain(|id| !released.contains(id));
                // Pending here until another consumer takes them: not stranded, should this
                // one fetch or close again, after a failure here too (a second release would
                // take a delivery back twice).
                self.remember_returned(chunk.iter().map(|id| (id.clone(), UNKNOWN_COUNT)))
                    .await;
            }
        }
        self.held.clear();
        self.known.clear();
        self.adopted.clear();
        self.unsure = false;
        forget_delay(
            &self.shared,
            &self.delays,
            &self.options.consumer_name,
            &self.delay_record,
        )
        .await;
        self.delay_forgotten = true;
        Ok(())
    }

    async fn defer(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        // All checked first: a bad one would fail its chunk's script after the good ones were
        // taken out of the bookkeeping, which would then come back as an attempt.
        delivery_ids(ids)?;
        for chunk in ids.chunks(512) {
            let mut args = Vec::with_capacity(chunk.len() + 2);
            args.push(Value::from(self.group.as_str()));
            args.push(Value::from(self.options.consumer_name.as_str()));
            let mut left = Vec::with_capacity(chunk.len());
            for id in chunk {
                // A deferral takes the count back by one.
                let count = self
                    .in_flight
                    .remove(&id.0)
                    .map_or(UNKNOWN_COUNT, |f| f.count.saturating_sub(1));
                left.push((id.0.clone(), count));
                args.push(Value::from(id.0.as_str()));
            }
            self.remember_returned(left).await;
            let left = self
                .run_script(
                    &self.shared.scripts.defer,
                    &[self.keys.stream.as_str(), self.errors.as_str()],
                    args,
                )
                .await?;
            self.note_counts_left(chunk.iter().map(|id| id.0.as_str()), entry::array(left));
        }
        Ok(())
    }

    async fn nack_with_reason(
        &mut self,
        id: &DeliveryId,
        reason: &str,
    ) -> Result<(), TransportError> {
        self.nack_with_error(id, reason).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_shows_the_first_ten_ids_and_counts_the_rest() {
        let ids: Vec<String> = (1..=12).map(|n| format!("{n}-0")).collect();
        assert_eq!(shown_ids(&ids[..2]), "1-0, 2-0");
        assert_eq!(
            shown_ids(&ids),
            "1-0, 2-0, 3-0, 4-0, 5-0, 6-0, 7-0, 8-0, 9-0, 10-0 and 2 more"
        );
    }

    #[test]
    fn the_oldest_pending_entry_is_read_and_any_other_reply_leaves_the_decision_to_the_script() {
        assert_eq!(
            pending_floor(Value::Array(Vec::new())),
            Some((u64::MAX, u64::MAX)),
            "nothing pending"
        );
        let oldest = Value::Array(vec![Value::Array(vec![
            Value::from("1700000000000-12"),
            Value::from("consumer-a"),
            Value::from(1500),
            Value::from(1),
        ])]);
        assert_eq!(pending_floor(oldest), Some((1_700_000_000_000, 12)));
        for unexpected in [
            Value::Null,
            Value::from(1),
            Value::Array(vec![Value::from("1-1")]),
            Value::Array(vec![Value::Array(vec![Value::from("not an id")])]),
            Value::Array(vec![Value::Array(Vec::new())]),
        ] {
            assert_eq!(pending_floor(unexpected.clone()), None, "{unexpected:?}");
        }
    }
}
