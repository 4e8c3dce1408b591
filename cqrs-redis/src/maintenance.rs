//! Trimming, pruning idle consumers, and a worker that does both on a schedule and records
//! the stats as metrics.

use crate::stats::TopicStats;
use crate::transport::RedisStreamTransport;
use async_trait::async_trait;
use cqrs_core::BoxError;
use cqrs_core::ports::TransportError;
use cqrs_core::runtime::{Health, Worker, WorkerContext};
use fred::types::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// What a [`trim`](RedisStreamTransport::trim) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TrimReport {
    /// Entries removed.
    pub removed: u64,
    /// The bound: the oldest entry some group still needs, or its last-delivered id (one entry
    /// earlier than the first it was not delivered yet). `None` when the stream has no group
    /// or some group has read nothing yet (nothing may go: that group needs every entry).
    pub bound: Option<String>,
}

/// A consumer group the last maintenance round found without a consumer, with entries it
/// has not read ([`StreamMaintenance::groups_without_consumers`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub struct GroupWithoutConsumers {
    /// The topic whose stream the group reads.
    pub topic: String,
    /// The group.
    pub group: String,
    /// The entries it has not read: those its consumers, once back, would catch up on.
    pub unread: u64,
}

impl RedisStreamTransport {
    /// Trims `topic`'s stream by `MINID` below the oldest entry that some group still needs:
    /// the oldest pending one, or its last-delivered id (one entry more than it needs: the
    /// first not delivered yet comes after it), whichever comes first, over every group. Reading the groups and trimming is one script, so no group moves in
    /// between. Never a blind `MAXLEN`: an entry that some group has not acknowledged stays.
    ///
    /// Bounded by the groups that exist: a group created later starts at the oldest entry
    /// left. A stream without groups is not trimmed.
    ///
    /// Approximate trimming (the default) removes whole stream nodes only, and at most
    /// [`trim_limit`](crate::RedisStreamOptions::trim_limit) entries a call (10,000 by
    /// default), so one call does not block Redis for long: call it again while it removes
    /// entries ([`StreamMaintenance`] does). Exact trimming removes everything below the bound
    /// at once.
    pub async fn trim(&self, topic: &str) -> Result<TrimReport, TransportError> {
        let keys = self.shared.keys(topic)?;
        let mode = if self.shared.options.trim_approximate {
            "~"
        } else {
            "="
        };
        let reply = self
            .shared
            .scripts
            .trim
            .run(
                &self.shared.client,
                &self.shared.fail_fast(),
                &[keys.stream.as_str()],
                vec![
                    Value::from(mode),
                    Value::from(i64::try_from(self.shared.options.trim_limit).unwrap_or(i64::MAX)),
                ],
            )
            .await
            .map_err(|e| self.shared.error(e))?;
        let mut parts = crate::entry::array(reply).into_iter();
        let removed = parts.next().and_then(|v| v.as_u64()).unwrap_or(0);
        let bound = parts
            .next()
            .and_then(Value::into_string)
            .filter(|b| !b.is_empty());
        Ok(TrimReport { removed, bound })
    }

    /// Deletes the consumers of `group` that hold no pending entry and have been idle for at
    /// least `idle` (each restart of a process leaves its old consumer name behind). A consumer
    /// with pending entries is never deleted. Returns the names deleted.
    pub async fn prune_consumers(
        &self,
        topic: &str,
        group: &str,
        idle: Duration,
    ) -> Result<Vec<String>, TransportError> {
        let keys = self.shared.keys(topic)?;
        let reply = self
            .shared
            .scripts
            .prune
            .run(
                &self.shared.client,
                &self.shared.fail_fast(),
                &[keys.stream.as_str()],
                vec![
                    Value::from(group),
                    Value::from(i64::try_from(idle.as_millis()).unwrap_or(i64::MAX)),
                ],
            )
            .await
            .map_err(|e| self.shared.error(e))?;
        Ok(crate::entry::array(reply)
            .into_iter()
            .filter_map(Value::into_string)
            .collect())
    }
}

/// A [`Worker`] that keeps topics tidy: every interval it trims each topic
/// ([`trim`](RedisStreamTransport::trim), called again while it removes entries, up to 100
/// times a topic each round: with the default limit, a million entries a round), trims its dead letters older than
/// `dead_letter_retention` ([`trim_dead_letters`](RedisStreamTransport::trim_dead_letters)),
/// prunes consumers idle for a day
/// ([`prune_consumers`](RedisStreamTransport::prune_consumers)), and records gauges:
/// `cqrs_redis_stream_length` and `cqrs_redis_dead_letters` by `topic`,
/// `cqrs_redis_group_pending` and `cqrs_redis_group_lag` by `topic` and `group`; and a
/// counter of the entries its trims removed, `cqrs_transport_trimmed_total` by `topic` (with
/// `transport="redis"`).
///
/// A gauge whose value is unknown is set to NaN rather than left at a stale value (NaN matches
/// no alert threshold): a group's lag while Redis cannot tell it (Redis 7.0 after an entry
/// was deleted in the middle of the stream), every gauge of a topic whose stats could not be
/// read that round. The gauges of a group that was deleted are set to 0 once (it holds nothing
/// back), then no longer updated. A step that fails (trimming, reading the
/// stats, pruning a group) is logged and does not skip the others.
///
/// A group left without a consumer (its last one pruned) that has entries it has not read
/// holds every entry from its last read on: the stream is never trimmed past it. Each round
/// names such groups ([`groups_without_consumers`](Self::groups_without_consumers)), warns of
/// each once, and the worker reports itself [`Degraded`](Health::Degraded) while there is one:
/// start its consumers, or delete a retired group (`XGROUP DESTROY`).
///
/// ```no_run
/// use cqrs_redis::{RedisStreamOptions, StreamMaintenance};
/// use std::time::Duration;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = RedisStreamOptions::new("redis://127.0.0.1:6379").connect().await?;
/// let maintenance = StreamMaintenance::new(transport, ["tickets", "users"])
///     .interval(Duration::from_secs(60));
/// // Hand it to the runtime: `RuntimeBuilder::worker(maintenance)`.
/// # let _ = maintenance; Ok(()) }
/// ```
#[derive(Debug)]
pub struct StreamMaintenance {
    transport: RedisStreamTransport,
    topics: Vec<String>,
    interval: Duration,
    consumer_idle: Duration,
    dead_letter_retention: Option<Duration>,
    /// Per topic, the groups whose gauges the last round set: one gone since has its gauges
    /// set to [`UNKNOWN`] once.
    reported: Mutex<HashMap<String, HashSet<String>>>,
    /// Per topic, the groups the last round that read its stats found without a consumer
    /// and with entries they have not read, and how many.
    unread: Mutex<HashMap<String, Vec<(String, u64)>>>,
}

/// The value of a gauge whose value is unknown: NaN, which Prometheus exports as such and which
/// no comparison (an alert's threshold) matches, instead of a stale value.
const UNKNOWN: f64 = f64::NAN;

/// The most [`trim`](RedisStreamTransport::trim) calls a round makes on one topic: each
/// removes up to the transport's `trim_limit`, and a backlog is worked off over rounds, none of
/// which runs for ever.
const MAX_TRIMS_PER_ROUND: u32 = 100;

/// How long after a round the next one comes: `interval`, or after `failures` failed rounds
/// in a row, 1 s doubled for each failure but the first, at most `interval`.
fn next_round_after(interval: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return interval;
    }
    let backoff = Duration::from_secs(1).saturating_mul(1 << (failures - 1).min(20));
    backoff.min(interval)
}

/// The shortest [`StreamMaintenance::dead_letter_retention`].
const MIN_DEAD_LETTER_RETENTION: Duration = Duration::from_secs(60);

impl StreamMaintenance {
    /// Maintenance of `topics`, every 60 s, pruning consumers idle for 24 h.
    pub fn new(
        transport: RedisStreamTransport,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            transport,
            topics: topics.into_iter().map(Into::into).collect(),
            interval: Duration::from_secs(60),
            consumer_idle: Duration::from_secs(24 * 3600),
            dead_letter_retention: Some(Duration::from_secs(30 * 24 * 3600)),
            reported: Mutex::new(HashMap::new()),
            unread: Mutex::new(HashMap::new()),
        }
    }

    /// How often it runs. Default 60 s; at least 1 ms (a zero interval would run the rounds
    /// back to back).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long a consumer without pending entries must have been idle to be deleted.
    /// Default 24 h.
    pub fn consumer_idle(mut self, idle: Duration) -> Self {
        self.consumer_idle = idle;
        self
    }

    /// How long dead letters are kept before each round deletes them
    /// ([`trim_dead_letters`](RedisStreamTransport::trim_dead_letters)): nothing else removes
    /// them, and a stream of poison events must not grow Redis without end. Default 30 days;
    /// `None` keeps them until replayed or discarded. At least 1 minute: a shorter retention
    /// (zero above all) is raised to that, since it would delete every dead letter each round,
    /// before anyone could look at it.
    pub fn dead_letter_retention(mut self, retention: Option<Duration>) -> Self {
        self.dead_letter_retention = retention.map(|r| r.max(MIN_DEAD_LETTER_RETENTION));
        self
    }

    /// One round over every topic. A topic that fails does not keep the others from their
    /// round; the first failure is returned once all were tried.
    pub async fn run_once(&self) -> Result<(), TransportError> {
        let mut first_failure = None;
        for topic in &self.topics {
            // Each failed step was logged, naming the topic: not once more here.
            if let Err(error) = self.maintain(topic).await {
                first_failure.get_or_insert(error);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Trims one topic, reports its gauges and prunes its idle consumers. A step that fails
    /// is logged and does not skip the others; the first failure is returned at the end.
    async fn maintain(&self, topic: &str) -> Result<(), TransportError> {
        let mut first_failure = None;
        if let Some(retention) = self.dead_letter_retention {
            match self.transport.trim_dead_letters(topic, retention).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(%topic, removed, ?retention, "deleted dead letters past their retention");
                }
                Err(error) => {
                    tracing::warn!(%topic, %error, "could not delete old dead letters");
                    first_failure.get_or_insert(error);
                }
            }
        }
        if let Err(error) = self.trim(topic).await {
            tracing::warn!(%topic, %error, "could not trim the stream");
            first_failure.get_or_insert(error);
        }
        let (groups, stats) = match self.transport.topic_stats(topic).await {
            Ok(stats) => {
                self.record(topic, Some(&stats));
                (
                    stats.groups.iter().map(|g| g.name.clone()).collect(),
                    Some(stats),
                )
            }
            Err(error) => {
                tracing::warn!(%topic, %error, "could not read the stream's stats");
                first_failure.get_or_insert(error);
                // Unknown now: no gauge keeps a stale value. The groups of the last round
                // are still pruned.
                (self.record(topic, None), None)
            }
        };
        let mut pruned: HashMap<String, u64> = HashMap::new();
        for group in groups {
            match self
                .transport
                .prune_consumers(topic, &group, self.consumer_idle)
                .await
            {
                Ok(names) => {
                    pruned.insert(group, names.len() as u64);
                }
                Err(error) => {
                    tracing::warn!(%topic, %group, %error, "could not prune idle consumers");
                    first_failure.get_or_insert(error);
                }
            }
        }
        if let Some(stats) = stats {
            self.note_unread(topic, &stats, &pruned);
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Keeps, for `topic`, the groups left without a consumer (after this round's pruning)
    /// that have entries they have not read: such a group holds every entry from its last
    /// read on, so the stream is never trimmed past it. Warns of each one the first round it
    /// is found.
    fn note_unread(&self, topic: &str, stats: &TopicStats, pruned: &HashMap<String, u64>) {
        let unread: Vec<(String, u64)> = stats
            .groups
            .iter()
            .filter(|g| g.consumers <= pruned.get(&g.name).copied().unwrap_or(0))
            .filter_map(|g| Some((g.name.clone(), g.lag.filter(|&lag| lag > 0)?)))
            .collect();
        let mut by_topic = self.unread.lock().unwrap_or_else(|p| p.into_inner());
        let before = by_topic.remove(topic).unwrap_or_default();
        for (group, lag) in &unread {
            if !before.iter().any(|(known, _)| known == group) {
                tracing::warn!(
                    %topic,
                    %group,
                    unread = lag,
                    "a consumer group has no consumer and entries it has not read: the stream \
                     is not trimmed past them; start its consumers, or delete the group if it \
                     is retired (XGROUP DESTROY)"
                );
            }
        }
        if !unread.is_empty() {
            by_topic.insert(topic.to_owned(), unread);
        }
    }

    /// The groups the last round found without a consumer and with entries they have not read,
    /// by topic and group. Each holds back the trimming of its topic's stream
    /// (see [`trim`](RedisStreamTransport::trim)): a retired or renamed consumer's group, to
    /// delete (`XGROUP DESTROY`), or one whose consumers are all down. The worker reports
    /// itself [`Degraded`](Health::Degraded) while there is one.
    pub fn groups_without_consumers(&self) -> Vec<GroupWithoutConsumers> {
        let by_topic = self.unread.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<GroupWithoutConsumers> = by_topic
            .iter()
            .flat_map(|(topic, groups)| {
                groups.iter().map(|(group, unread)| GroupWithoutConsumers {
                    topic: topic.clone(),
                    group: group.clone(),
                    unread: *unread,
                })
            })
            .collect();
        all.sort();
        all
    }

    /// Trims `topic`, again while a call removes entries (one approximate call removes at most
    /// the transport's `trim_limit`), up to [`MAX_TRIMS_PER_ROUND`] calls. Exact trimming
    /// removes everything it may in one call.
    async fn trim(&self, topic: &str) -> Result<(), TransportError> {
        let again = self.transport.shared.options.trim_approximate;
        for _ in 0..MAX_TRIMS_PER_ROUND {
            let report = self.transport.trim(topic).await?;
            // Counted call by call: shutdown may end the round between two calls.
            if report.removed > 0 {
                tracing::debug!(topic = %topic, removed = report.removed, "trimmed");
                metrics::counter!("cqrs_transport_trimmed_total", "topic" => topic.to_owned(), "transport" => "redis")
                    .increment(report.removed);
            }
            if !again || report.removed == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Sets `topic`'s gauges from `stats`, and to NaN ([`UNKNOWN`]) those whose value is
    /// unknown: all of them without `stats`, and a group's lag that Redis cannot tell. The
    /// gauges of groups reported before that are gone are set to 0 (not set again after
    /// that): a deleted group holds nothing back, and a NaN kept until the process restarts
    /// would set off every "unknown" alert (`x != x`) for good. Returns the groups reported
    /// before this call.
    fn record(&self, topic: &str, stats: Option<&TopicStats>) -> Vec<String> {
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let before = reported.remove(topic).unwrap_or_default();
        let group_gauges = |group: &str, pending: f64, lag: f64| {
            let labels = [("topic", topic.to_owned()), ("group", group.to_owned())];
            metrics::gauge!("cqrs_redis_group_pending", &labels).set(pending);
            metrics::gauge!("cqrs_redis_group_lag", &labels).set(lag);
        };
        let (length, dead_letters) = stats.map_or((UNKNOWN, UNKNOWN), |s| {
            (s.length as f64, s.dead_letters as f64)
        });
        metrics::gauge!("cqrs_redis_stream_length", "topic" => topic.to_owned()).set(length);
        metrics::gauge!("cqrs_redis_dead_letters", "topic" => topic.to_owned()).set(dead_letters);
        let Some(stats) = stats else {
            for group in &before {
                group_gauges(group, UNKNOWN, UNKNOWN);
            }
            let groups = before.iter().cloned().collect();
            reported.insert(topic.to_owned(), before);
            return groups;
        };
        let mut now = HashSet::with_capacity(stats.groups.len());
        for group in &stats.groups {
            let lag = group.lag.map_or(UNKNOWN, |lag| lag as f64);
            group_gauges(&group.name, group.pending as f64, lag);
            now.insert(group.name.clone());
        }
        for gone in before.difference(&now) {
            group_gauges(gone, 0.0, 0.0);
        }
        let groups = before.into_iter().collect();
        reported.insert(topic.to_owned(), now);
        groups
    }
}

#[async_trait]
impl Worker for StreamMaintenance {
    fn name(&self) -> &str {
        "redis-stream-maintenance"
    }

    /// Returns as soon as shutdown is requested, in the middle of a round too: with Redis
    /// unresponsive each of a round's commands may wait up to the command timeout, and a round
    /// could outlast the runtime's shutdown grace. A round cut short loses nothing: each trim
    /// and prune is one script, run whole or not at all, and the next start does a full round.
    ///
    /// Its commands fail at once while the connection is known to be down (a reconnect in
    /// progress, the watchdog's forced one included): such a round leaves the worker
    /// `Degraded` and its gauges unknown (NaN) until a round succeeds. After a failed round the
    /// next comes sooner than `interval`: 1 s later, then twice as long after each failure in
    /// a row, up to `interval`, so the worker is healthy again soon after Redis is back.
    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        let mut failures = 0u32;
        loop {
            let round = tokio::select! {
                biased;
                _ = ctx.shutdown.requested() => return Ok(()),
                round = self.run_once() => round,
            };
            match round {
                Ok(()) => {
                    failures = 0;
                    let unread = self.groups_without_consumers();
                    ctx.health.set(if unread.is_empty() {
                        Health::Healthy
                    } else {
                        // Without the counts, which grow each round: a reason that changes is
                        // logged again by a server that logs its readiness reasons.
                        let groups: Vec<String> = unread
                            .iter()
                            .map(|idle| format!("`{}` of `{}`", idle.group, idle.topic))
                            .collect();
                        Health::Degraded(format!(
                            "consumer groups without a consumer hold back trimming: {}; start \
                             their consumers, or delete retired groups (XGROUP DESTROY)",
                            groups.join(", ")
                        ))
                    });
                }
                // Redis away: say so and try again soon; the runtime need not restart us.
                Err(e) => {
                    failures = failures.saturating_add(1);
                    ctx.health.set(Health::Degraded(e.to_string()));
                }
            }
            tokio::select! {
                _ = ctx.shutdown.requested() => return Ok(()),
                _ = tokio::time::sleep(next_round_after(self.interval, failures)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::next_round_after;
    use std::time::Duration;

    /// After a failed round the next comes after 1 s, then 2, 4, ... up to the interval; after
    /// a good one, the interval.
    #[test]
    fn a_failed_round_is_tried_again_sooner() {
        let minute = Duration::from_secs(60);
        let secs = |s| Duration::from_secs(s);
        assert_eq!(next_round_after(minute, 0), minute);
        let waits: Vec<Duration> = (1..=8).map(|f| next_round_after(minute, f)).collect();
        assert_eq!(
            waits,
            [
                secs(1),
                secs(2),
                secs(4),
                secs(8),
                secs(16),
                secs(32),
                minute,
                minute
            ]
        );
        assert_eq!(next_round_after(minute, u32::MAX), minute);
        // An interval shorter than the backoff's start is kept.
        let short = Duration::from_millis(50);
        assert_eq!(next_round_after(short, 1), short);
    }
}
