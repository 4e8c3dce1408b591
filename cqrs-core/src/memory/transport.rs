//! The in-memory event transport.

use crate::EventRecord;
use crate::ports::{
    Consumer, ConsumerOptions, Delivery, DeliveryId, EventTransport, TransportCapabilities,
    TransportError,
};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Dead letters a group keeps by default, the newest: nothing else removes them, and a stream
/// of poison events must not grow a long-running process without end.
pub const DEAD_LETTERS_KEPT: usize = 10_000;

/// The shortest redelivery delay a consumer of the in-memory transport takes: a zero one hands
/// a delivery to the next fetch while its handler still runs, and its keep-alive interval
/// (a third of the delay, at least 1 ms) would not be below it.
pub const MIN_REDELIVERY_DELAY: Duration = Duration::from_millis(2);

struct InFlight {
    consumer: String,
    attempt: u32,
    due: Instant,
    /// Why the last attempt failed, when its consumer said (`nack_with_reason`).
    error: Option<String>,
}

/// A message a group gave up on: the record, how often it was handed out, and the last
/// failure reported for it.
type DeadLetter = (EventRecord, u32, Option<String>);

#[derive(Default)]
struct Group {
    /// Indexes into the topic's log never delivered to this group, in order.
    waiting: VecDeque<usize>,
    /// Never delivered either, moved out of `waiting` because a message of their key was in
    /// flight: by key, in order. A fetch looks at each waiting message once, not at the whole
    /// backlog of a busy key on every fetch.
    parked: HashMap<String, VecDeque<usize>>,
    /// Delivered, not acknowledged, by index.
    in_flight: BTreeMap<usize, InFlight>,
    /// The newest dead letters, as many as the transport keeps.
    dead: VecDeque<DeadLetter>,
    /// The names of the group's live consumers: a name in use is refused.
    consumers: HashSet<String>,
}

#[derive(Default)]
struct Topic {
    /// The messages from index `base` on (what [`InMemoryTransport::trim`] left).
    log: VecDeque<EventRecord>,
    /// The index of `log`'s first message: indexes stay valid when the front is trimmed.
    base: usize,
    groups: HashMap<String, Group>,
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Topic>,
}

/// An event transport in process memory, with consumer groups, per-key order and redelivery:
/// for tests, examples and single-process servers. Nothing survives the process.
///
/// Per-key order is strict: a fetch hands out a key's messages only as a chain, in order
/// (several of one free key may come in one batch, as the port allows), and while a message
/// of a key is in flight in a group, no later fetch hands out that key's later messages, so a
/// nacked message is redelivered before its successors. It orders by the exact key: keys
/// never wait for one another here, where Redis's default (`KeyOrdering::Lanes`) has keys
/// that share a lane wait for each other's failures.
#[derive(Clone)]
pub struct InMemoryTransport {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    /// Shared by the clones, as the state is: a limit set on one holds for every handle.
    dead_letters_kept: Arc<AtomicUsize>,
}

impl Default for InMemoryTransport {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            changed: Arc::default(),
            dead_letters_kept: Arc::new(AtomicUsize::new(DEAD_LETTERS_KEPT)),
        }
    }
}

impl std::fmt::Debug for InMemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryTransport").finish_non_exhaustive()
    }
}

impl InMemoryTransport {
    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many dead letters each group keeps, the newest (default [`DEAD_LETTERS_KEPT`]; at
    /// least 1). It is the transport's: every clone of it, earlier ones included, keeps as
    /// many.
    pub fn dead_letters_kept(self, kept: usize) -> Self {
        self.dead_letters_kept.store(kept.max(1), Ordering::Relaxed);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A std mutex: nothing awaits while it is held.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages of `topic` that group `group` gave up on, after `max_deliveries` or when a
    /// consumer gave them up ([`Consumer::dead_letter`]), with their delivery counts: the newest
    /// ones kept ([`dead_letters_kept`](Self::dead_letters_kept)), oldest first.
    pub fn dead_letters(&self, topic: &str, group: &str) -> Vec<(EventRecord, u32)> {
        self.dead_letters_with_errors(topic, group)
            .into_iter()
            .map(|(record, deliveries, _)| (record, deliveries))
            .collect()
    }

    /// As [`dead_letters`](Self::dead_letters), each with the last reason a consumer handed it
    /// back with ([`Consumer::nack_with_reason`]), in whichever attempt, or gave it up with
    /// ([`Consumer::dead_letter`]) (as the Redis transport's dead letters); `None` when no
    /// attempt gave one (plain `nack`s, or no answer at all, as after a crash).
    pub fn dead_letters_with_errors(
        &self,
        topic: &str,
        group: &str,
    ) -> Vec<(EventRecord, u32, Option<String>)> {
        self.lock()
            .topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .map(|g| g.dead.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Drops the messages of `topic` older than the oldest one any group still holds
    /// (waiting, held back behind its key, or in flight), and returns how many: every group
    /// acknowledged or dead-lettered those. The transport keeps every message until then, so a
    /// long-running process calls this periodically (as `cqrs_redis::StreamMaintenance` trims
    /// a Redis stream). A group made afterwards starts after them; with no group at all,
    /// nothing is dropped (a group made later still sees every message).
    ///
    /// One message still held keeps every message after it, as in Redis: a delivery its
    /// handler never finishes, or a group nobody consumes any more, which keeps the whole log
    /// from its first unread message on. Remove a group that is gone for good with
    /// [`delete_group`](Self::delete_group).
    ///
    /// ```
    /// use cqrs_core::memory::InMemoryTransport;
    /// use cqrs_core::ports::{ConsumerOptions, EventTransport};
    /// # use cqrs_core::{EventEnvelope, EventRecord, Metadata};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let record = EventRecord::from_envelope(&EventEnvelope::new(cqrs_core::doc::TicketOpened { ticket_id: "t1".into() }, Metadata::new()))?;
    /// let transport = InMemoryTransport::new();
    /// let mut consumer = transport.consumer("tickets", "stats", ConsumerOptions::default()).await?;
    /// transport.publish("tickets", &[record]).await?;
    /// let batch = consumer.fetch(10).await?;
    /// consumer.ack(&batch.iter().map(|d| d.id.clone()).collect::<Vec<_>>()).await?;
    /// assert_eq!(transport.trim("tickets"), 1);
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn trim(&self, topic: &str) -> usize {
        let mut state = self.lock();
        let Some(t) = state.topics.get_mut(topic) else {
            return 0;
        };
        let end = t.base + t.log.len();
        // The lowest index some group still needs: waiting (in order) or in flight.
        let Some(keep_from) = t
            .groups
            .values()
            .map(|g| {
                let waiting = g.waiting.iter().min().copied().unwrap_or(end);
                let parked = g.parked.values().filter_map(|q| q.front()).min().copied();
                let in_flight = g.in_flight.keys().next().copied().unwrap_or(end);
                waiting.min(in_flight).min(parked.unwrap_or(end))
            })
            .min()
        else {
            return 0;
        };
        let dropped = keep_from - t.base;
        t.log.drain(..dropped);
        t.base = keep_from;
        if dropped > 0 {
            metrics::counter!("cqrs_transport_trimmed_total", "topic" => topic.to_owned(), "transport" => "memory")
                .increment(dropped as u64);
        }
        dropped
    }

    /// Removes group `group` of `topic` with its dead letters and what it had not acknowledged,
    /// so [`trim`](Self::trim) no longer keeps messages for it (Redis's `XGROUP DESTROY`).
    /// Returns whether there was such a group. A group with a live consumer is refused:
    /// drop its consumers first.
    ///
    /// ```
    /// use cqrs_core::memory::InMemoryTransport;
    /// use cqrs_core::ports::{ConsumerOptions, EventTransport};
    /// # use cqrs_core::{EventEnvelope, EventRecord, Metadata};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let record = EventRecord::from_envelope(&EventEnvelope::new(cqrs_core::doc::TicketOpened { ticket_id: "t1".into() }, Metadata::new()))?;
    /// let transport = InMemoryTransport::new();
    /// let mut stats = transport.consumer("tickets", "stats", ConsumerOptions::default()).await?;
    /// drop(transport.consumer("tickets", "retired", ConsumerOptions::default()).await?);
    /// transport.publish("tickets", &[record]).await?;
    /// let batch = stats.fetch(10).await?;
    /// stats.ack(&batch.iter().map(|d| d.id.clone()).collect::<Vec<_>>()).await?;
    /// assert_eq!(transport.trim("tickets"), 0, "kept for the group that never read it");
    /// assert!(transport.delete_group("tickets", "retired")?);
    /// assert_eq!(transport.trim("tickets"), 1);
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn delete_group(&self, topic: &str, group: &str) -> Result<bool, TransportError> {
        let mut state = self.lock();
        let Some(t) = state.topics.get_mut(topic) else {
            return Ok(false);
        };
        match t.groups.get(group) {
            None => Ok(false),
            Some(g) if !g.consumers.is_empty() => Err(TransportError::Invalid(format!(
                "group `{group}` of topic `{topic}` has {} live consumer(s) in this process; \
                 drop them before deleting the group",
                g.consumers.len()
            ))),
            Some(_) => {
                t.groups.remove(group);
                Ok(true)
            }
        }
    }

    /// Messages of `topic` that group `group` has not acknowledged yet (waiting or in flight).
    pub fn backlog(&self, topic: &str, group: &str) -> usize {
        let state = self.lock();
        match state.topics.get(topic) {
            Some(t) => match t.groups.get(group) {
                Some(g) => {
                    g.waiting.len()
                        + g.parked.values().map(VecDeque::len).sum::<usize>()
                        + g.in_flight.len()
                }
                None => t.log.len(),
            },
            None => 0,
        }
    }
}

#[async_trait]
impl EventTransport for InMemoryTransport {
    fn capabilities(&self) -> TransportCapabilities {
        TransportCapabilities::ALL
            .persistent(false)
            .exactly_once(false)
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        crate::ports::validate_topic(topic)?;
        crate::ports::validate_payloads(events)?;
        {
            let mut state = self.lock();
            let topic = state.topics.entry(topic.to_owned()).or_default();
            for event in events {
                let index = topic.base + topic.log.len();
                topic.log.push_back(event.clone());
                for group in topic.groups.values_mut() {
                    group.waiting.push_back(index);
                }
            }
        }
        self.changed.notify_waiters();
        Ok(())
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        crate::ports::validate_topic(topic)?;
        crate::ports::validate_group(group)?;
        let mut problems = Vec::new();
        if options.redelivery_delay < MIN_REDELIVERY_DELAY {
            problems.push(format!(
                "redelivery_delay is {:?}, below the {MIN_REDELIVERY_DELAY:?} the in-memory \
                 transport needs: a delivery due again before its handler could answer for it \
                 is handed to another consumer at once, and dead-lettered mid-run on its last \
                 attempt (a Redis consumer needs 100 ms)",
                options.redelivery_delay
            ));
        }
        options.validate_with(problems)?;
        {
            let mut state = self.lock();
            let t = state.topics.entry(topic.to_owned()).or_default();
            let (base, end) = (t.base, t.base + t.log.len());
            // A new group starts at the beginning of the topic (what is left of it).
            let g = t.groups.entry(group.to_owned()).or_insert_with(|| Group {
                waiting: (base..end).collect(),
                ..Group::default()
            });
            if !g.consumers.insert(options.consumer_name.clone()) {
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
        Ok(Box::new(InMemoryConsumer {
            transport: self.clone(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            options,
        }))
    }
}

struct InMemoryConsumer {
    transport: InMemoryTransport,
    topic: String,
    group: String,
    options: ConsumerOptions,
}

impl InMemoryConsumer {
    /// Takes what is ready; returns it, or when the next redelivery falls due.
    fn take(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let now = Instant::now();
        let mut state = self.transport.lock();
        let Some(Topic { log, base, groups }) = state.topics.get_mut(&self.topic) else {
            return (Vec::new(), None);
        };
        let Some(group) = groups.get_mut(&self.group) else {
            return (Vec::new(), None);
        };
        // Indexes this group holds are never trimmed: `trim` keeps from the lowest one.
        let base = *base;
        let record = |i: usize| &log[i - base];
        let key_of = |i: usize| record(i).partition_key.as_deref();
        let mut out = Vec::new();
        let mut next_due: Option<Instant> = None;

        // Dead-letter what has been delivered too often.
        let exhausted: Vec<usize> = group
            .in_flight
            .iter()
            .filter(|(_, f)| f.due <= now && f.attempt >= self.options.max_deliveries)
            .map(|(i, _)| *i)
            .collect();
        for i in exhausted {
            if let Some(f) = group.in_flight.remove(&i) {
                let dead = (record(i).clone(), f.attempt, f.error);
                self.bury(group, dead, "after its last delivery");
            }
        }

        // Keys with a message in flight, and the first in-flight index of each key.
        let mut first_of_key: HashMap<Option<&str>, usize> = HashMap::new();
        for i in group.in_flight.keys() {
            first_of_key.entry(key_of(*i)).or_insert(*i);
        }
        // Redeliveries that are due, oldest first; only the first in flight of its key.
        let due: Vec<usize> = group
            .in_flight
            .iter()
            .filter(|(i, f)| {
                let key = key_of(**i);
                f.due <= now && (key.is_none() || first_of_key.get(&key) == Some(*i))
            })
            .map(|(i, _)| *i)
            .take(max)
            .collect();
        for i in due {
            if let Some(f) = group.in_flight.get_mut(&i) {
                f.attempt += 1;
                f.consumer.clone_from(&self.options.consumer_name);
                f.due = due_after(now, self.options.redelivery_delay);
                out.push(Delivery::new(
                    DeliveryId(i.to_string()),
                    record(i).clone(),
                    f.attempt,
                ));
            }
        }
        // New messages whose key has nothing in flight from an earlier batch. Successive
        // messages of one key may go out together, in order: a chain (see `Consumer::fetch`).
        let busy: HashSet<&str> = first_of_key.into_keys().flatten().collect();
        let deliver = |group: &mut Group, i: usize, out: &mut Vec<Delivery>| {
            group.in_flight.insert(
                i,
                InFlight {
                    consumer: self.options.consumer_name.clone(),
                    attempt: 1,
                    due: due_after(now, self.options.redelivery_delay),
                    error: None,
                },
            );
            out.push(Delivery::new(
                DeliveryId(i.to_string()),
                record(i).clone(),
                1,
            ));
        };
        // First the parked messages of keys free again, in log order across those keys (as
        // if they had stayed in `waiting`): they are older than anything still waiting.
        let mut free: std::collections::BinaryHeap<std::cmp::Reverse<(usize, String)>> = group
            .parked
            .iter()
            .filter(|(key, _)| !busy.contains(key.as_str()))
            .filter_map(|(key, queue)| Some(std::cmp::Reverse((*queue.front()?, key.clone()))))
            .collect();
        while out.len() < max {
            let Some(std::cmp::Reverse((i, key))) = free.pop() else {
                break;
            };
            let Some(queue) = group.parked.get_mut(&key) else {
                continue;
            };
            queue.pop_front();
            match queue.front() {
                Some(&next) => free.push(std::cmp::Reverse((next, key))),
                None => {
                    group.parked.remove(&key);
                }
            }
            deliver(group, i, &mut out);
        }
        // Until the batch is full: what is left after it stays as it is, so a fetch costs the
        // messages it looks at, and a message held back is parked under its key, looked at
        // again only once its key is free.
        while out.len() < max {
            let Some(i) = group.waiting.pop_front() else {
                break;
            };
            if let Some(key) = key_of(i)
                && (busy.contains(key) || group.parked.contains_key(key))
            {
                group.parked.entry(key.to_owned()).or_default().push_back(i);
                continue;
            }
            deliver(group, i, &mut out);
        }
        // The next redelivery that can happen: only the first in flight of a key is handed
        // out again, so a later one's due time (past, after a `defer`) is no reason to wake.
        let mut first_of_key: HashMap<Option<&str>, usize> = HashMap::new();
        for i in group.in_flight.keys() {
            first_of_key.entry(key_of(*i)).or_insert(*i);
        }
        for (i, f) in &group.in_flight {
            let key = key_of(*i);
            if key.is_none() || first_of_key.get(&key) == Some(i) {
                next_due = Some(next_due.map_or(f.due, |d| d.min(f.due)));
            }
        }
        (out, next_due)
    }
}

/// `now + delay`, or about a century ahead when that does not fit the clock
/// (`Duration::MAX` as "never").
fn due_after(now: Instant, delay: Duration) -> Instant {
    now.checked_add(delay)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Drop for InMemoryConsumer {
    /// Frees the consumer's name in its group. What it took and did not acknowledge stays in
    /// flight, and comes back after the redelivery delay, as after a crash.
    fn drop(&mut self) {
        let mut state = self.transport.lock();
        if let Some(group) = state
            .topics
            .get_mut(&self.topic)
            .and_then(|t| t.groups.get_mut(&self.group))
        {
            group.consumers.remove(&self.options.consumer_name);
        }
    }
}

impl InMemoryConsumer {
    /// Keeps `dead` among `group`'s dead letters (the oldest dropped past the transport's
    /// bound), and says so as loud as the Redis transport: the event leaves the group's read
    /// models.
    fn bury(&self, group: &mut Group, dead: DeadLetter, why: &'static str) {
        let (record, deliveries, error) = &dead;
        tracing::warn!(
            topic = %self.topic,
            group = %self.group,
            event_id = %record.event_id,
            event_type = %record.event_type.escape_debug(),
            deliveries,
            error = error.as_deref().unwrap_or("(none reported)"),
            why,
            "dead-lettered an event"
        );
        while group.dead.len() >= self.transport.dead_letters_kept.load(Ordering::Relaxed) {
            group.dead.pop_front();
        }
        group.dead.push_back(dead);
    }

    /// Runs `change` on each delivery of `ids` ([`positions`]) in flight
    /// in this consumer's group and handed out to this consumer. A delivery another consumer
    /// took over (after the redelivery delay) is left alone, as the Redis transport's scripts
    /// leave an entry pending to another consumer.
    fn in_flight(
        &self,
        ids: &[DeliveryId],
        mut change: impl FnMut(&mut InFlight),
    ) -> Result<(), TransportError> {
        let positions = positions(ids)?;
        let mut state = self.transport.lock();
        let Some(group) = state
            .topics
            .get_mut(&self.topic)
            .and_then(|t| t.groups.get_mut(&self.group))
        else {
            return Ok(());
        };
        for i in positions {
            if let Some(f) = group
                .in_flight
                .get_mut(&i)
                .filter(|f| f.consumer == self.options.consumer_name)
            {
                change(f);
            }
        }
        Ok(())
    }
}

/// The log position `id` names (an id is its delivery's position), refusing one not of this
/// transport's form (made by hand, or another transport's), as the Redis transport does,
/// instead of passing over it: a test on memory meets the error a server on Redis gets.
fn position(id: &DeliveryId) -> Result<usize, TransportError> {
    id.0.parse().map_err(|_| {
        TransportError::Invalid(format!(
            "`{}` is no delivery id of the in-memory transport: ack, nack, defer, dead_letter \
             and keep_alive take the ids `fetch` returned",
            id.0.chars().take(64).collect::<String>()
        ))
    })
}

/// The positions of `ids` ([`position`]), or the first refusal: a batch holding a refused id
/// settles nothing.
fn positions(ids: &[DeliveryId]) -> Result<Vec<usize>, TransportError> {
    ids.iter().map(position).collect()
}

#[async_trait]
impl Consumer for InMemoryConsumer {
    async fn fetch(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // `None`: a `block` too long for the clock (`Duration::MAX`) waits as long as it takes.
        let deadline = Instant::now().checked_add(self.options.block);
        loop {
            // Register interest before looking, so a publish in between is not missed.
            let changed = self.transport.changed.clone();
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (batch, next_due) = self.take(max);
            if !batch.is_empty() {
                return Ok(batch);
            }
            let now = Instant::now();
            if deadline.is_some_and(|deadline| now >= deadline) {
                return Ok(Vec::new());
            }
            let wake = match (next_due, deadline) {
                (Some(due), Some(deadline)) => Some(due.min(deadline)),
                (due, deadline) => due.or(deadline),
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = async {
                    match wake {
                        Some(wake) => tokio::time::sleep_until(wake.max(now)).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    async fn ack(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        let positions = positions(ids)?;
        {
            let mut state = self.transport.lock();
            if let Some(group) = state
                .topics
                .get_mut(&self.topic)
                .and_then(|t| t.groups.get_mut(&self.group))
            {
                for i in positions {
                    group.in_flight.remove(&i);
                }
            }
        }
        self.transport.changed.notify_waiters();
        Ok(())
    }

    /// Left alone when another consumer took the delivery over (as by Redis's script).
    async fn nack(&mut self, id: &DeliveryId) -> Result<(), TransportError> {
        let due = due_after(Instant::now(), self.options.redelivery_delay);
        self.in_flight(std::slice::from_ref(id), |f| f.due = due)
    }

    async fn nack_with_reason(
        &mut self,
        id: &DeliveryId,
        reason: &str,
    ) -> Result<(), TransportError> {
        let due = due_after(Instant::now(), self.options.redelivery_delay);
        self.in_flight(std::slice::from_ref(id), |f| {
            f.due = due;
            f.error = Some(reason.to_owned());
        })
    }

    /// Only a delivery this consumer still owns (as by Redis's script).
    async fn dead_letter(&mut self, id: &DeliveryId, reason: &str) -> Result<(), TransportError> {
        let i = position(id)?;
        {
            let mut state = self.transport.lock();
            let Some(Topic { log, base, groups }) = state.topics.get_mut(&self.topic) else {
                return Ok(());
            };
            let Some(group) = groups.get_mut(&self.group) else {
                return Ok(());
            };
            let owned = group
                .in_flight
                .get(&i)
                .is_some_and(|f| f.consumer == self.options.consumer_name);
            if owned
                && let Some(f) = group.in_flight.remove(&i)
                && let Some(dead) = i.checked_sub(*base).and_then(|at| log.get(at))
            {
                let dead = (dead.clone(), f.attempt, Some(reason.to_owned()));
                self.bury(group, dead, "its consumer gave it up");
            }
        }
        self.transport.changed.notify_waiters();
        Ok(())
    }

    /// Only the deliveries this consumer still owns (as by Redis's script): a defer of one
    /// another consumer took over would take back that consumer's attempt.
    async fn defer(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        let due = due_after(Instant::now(), self.options.redelivery_delay);
        self.in_flight(ids, |f| {
            f.due = due;
            // Not handled: this handing out was no attempt.
            f.attempt = f.attempt.saturating_sub(1);
        })
    }

    async fn keep_alive(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        let due = due_after(Instant::now(), self.options.redelivery_delay);
        self.in_flight(ids, |f| f.due = due)
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        // A third of the delay, at least 1 ms (the timer's resolution): below the delay, which
        // is at least `MIN_REDELIVERY_DELAY`, and above zero, as the port promises.
        Some((self.options.redelivery_delay / 3).max(Duration::from_millis(1)))
    }

    fn redelivery_delay(&self) -> Option<Duration> {
        Some(self.options.redelivery_delay)
    }
}
