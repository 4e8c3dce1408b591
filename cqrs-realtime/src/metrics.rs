//! The hub's metrics: `metrics` facade handles and counters for [`HubStats`].

use metrics::{Counter, Gauge};
use std::sync::atomic::{AtomicU64, Ordering};

/// Metric names, as the `metrics` facade reports them.
pub mod names {
    /// Gauge: open WebSocket connections.
    pub const CONNECTIONS: &str = "realtime_connections";
    /// Gauge: live subscriptions over every connection.
    pub const SUBSCRIPTIONS: &str = "realtime_subscriptions";
    /// Counter: frames written to clients (events, replies and errors).
    pub const MESSAGES_SENT: &str = "realtime_messages_sent_total";
    /// Counter: connections closed with 1008 because their send queue was full.
    pub const SLOW_CLIENT_CLOSES: &str = "realtime_slow_client_closes_total";
    /// Counter: connections closed with 1000 because nothing arrived within the idle timeout.
    pub const IDLE_CLOSES: &str = "realtime_idle_closes_total";
    /// Counter: connections closed with 1008 because their principal's credentials expired.
    pub const EXPIRED_CLOSES: &str = "realtime_expired_closes_total";
    /// Counter: handshakes refused, labelled `reason` = `unauthorized`, `revoked` (the
    /// principal was revoked while its credentials were checked), `not_websocket`,
    /// `too_many_connections`, `too_many_connections_for_principal`,
    /// `too_many_connections_for_client`, `shutting_down` or
    /// `unavailable` (the authenticator could not check the credentials, or the handshake
    /// outlasted the hub's memory of revocations).
    pub const HANDSHAKES_REFUSED: &str = "realtime_handshakes_refused_total";
    /// Counter: channel messages the hub missed because it fell behind the pub/sub.
    pub const UPSTREAM_MISSED: &str = "realtime_upstream_missed_total";
    /// Counter: `events_missed` error frames queued (one per subscription of a topic whose
    /// channel missed messages, or told for another reason; not one that found the send
    /// queue full, which closes the client instead).
    pub const MISSED_NOTICES: &str = "realtime_missed_notices_total";
    /// Counter: events a [`Publisher`](crate::Publisher), as a command's event sink, could
    /// not push, and those of the command it dropped after a failure of the pub/sub; and
    /// events a [`PublishWorker`](crate::PublishWorker) skipped, its routing unable to encode
    /// them.
    pub const PUSH_FAILURES: &str = "realtime_push_failures_total";
    /// Counter: events sent by replays (resumed subscriptions).
    pub const REPLAYED_EVENTS: &str = "realtime_replayed_events_total";
    /// Counter: connections closed with 1008 because their principal was revoked, labelled
    /// `origin` = `local` (this hub's `close_connections_of` or
    /// `close_connections_everywhere`) or `remote` (a revocation another instance published).
    pub const REVOKED_CLOSES: &str = "realtime_revoked_closes_total";
    /// Counter: messages the hub's revocation listener missed (it fell behind, or the pub/sub
    /// dropped them, as across a reconnect): revocations of other instances it may not have
    /// acted on.
    pub const REVOCATIONS_MISSED: &str = "realtime_revocations_missed_total";
    /// Gauge: 1 while the hub's revocation listener is subscribed, 0 while it is not (yet, or
    /// again: its pub/sub unreachable).
    pub const REVOCATIONS_LISTENING: &str = "realtime_revocations_listening";
}

/// Every metric the hub records, with what it measures: for the recorder's `# HELP` lines
/// ([`describe_metrics`]).
pub const METRICS: &[cqrs_core::MetricDescription] = {
    use cqrs_core::MetricDescription as M;
    &[
        M::gauge(names::CONNECTIONS, "Open WebSocket connections."),
        M::gauge(
            names::SUBSCRIPTIONS,
            "Live subscriptions over every connection.",
        ),
        M::counter(
            names::MESSAGES_SENT,
            "Frames written to clients (events, replies and errors).",
        ),
        M::counter(
            names::SLOW_CLIENT_CLOSES,
            "Connections closed with 1008 because their send queue was full.",
        ),
        M::counter(
            names::IDLE_CLOSES,
            "Connections closed with 1000 because nothing arrived within the idle timeout.",
        ),
        M::counter(
            names::EXPIRED_CLOSES,
            "Connections closed with 1008 because their principal's credentials expired.",
        ),
        M::counter(
            names::HANDSHAKES_REFUSED,
            "Handshakes refused, by reason (unauthorized, revoked, not_websocket, too_many_connections, too_many_connections_for_principal, too_many_connections_for_client, shutting_down, unavailable).",
        ),
        M::counter(
            names::UPSTREAM_MISSED,
            "Channel messages the hub missed because it fell behind the pub/sub.",
        ),
        M::counter(
            names::MISSED_NOTICES,
            "events_missed error frames queued: a subscription's channel missed messages, or a replay's buffer dropped live events.",
        ),
        M::counter(
            names::PUSH_FAILURES,
            "Events a Publisher, as a command's event sink, could not push (with the command's later events it dropped when the pub/sub failed), and events a PublishWorker skipped because its routing could not encode them.",
        ),
        M::counter(
            names::REPLAYED_EVENTS,
            "Events sent by replays (resumed subscriptions).",
        ),
        M::counter(
            names::REVOKED_CLOSES,
            "Connections closed with 1008 because their principal was revoked, by origin (local, remote).",
        ),
        M::counter(
            names::REVOCATIONS_MISSED,
            "Messages the revocation listener missed (it fell behind, or the pub/sub dropped them): revocations it may not have acted on.",
        ),
        M::gauge(
            names::REVOCATIONS_LISTENING,
            "1 while the hub's revocation listener is subscribed, 0 while it is not.",
        ),
    ]
};

/// Describes every metric in [`METRICS`] to the installed `metrics` recorder, so that
/// Prometheus's exporter writes a `# HELP` line for each. Call it once the recorder is
/// installed.
///
/// ```
/// cqrs_realtime::describe_metrics();
/// ```
pub fn describe_metrics() {
    METRICS
        .iter()
        .for_each(cqrs_core::MetricDescription::describe);
}

/// A snapshot of a hub's counters since it was built: for tests, health pages and logs. The
/// same figures go to the `metrics` facade (see [`names`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubStats {
    /// Open connections.
    pub connections: u64,
    /// Live subscriptions.
    pub subscriptions: u64,
    /// Frames written to clients.
    pub messages_sent: u64,
    /// Connections closed for being too slow.
    pub slow_client_closes: u64,
    /// Connections closed for being idle.
    pub idle_closes: u64,
    /// Connections closed because their credentials expired.
    pub expired_closes: u64,
    /// Handshakes refused.
    pub handshakes_refused: u64,
    /// Channel messages missed upstream.
    pub upstream_missed: u64,
    /// `events_missed` frames queued.
    pub missed_notices: u64,
    /// Events sent by replays.
    pub replayed_events: u64,
    /// Connections closed because their principal was revoked, here or by another instance.
    pub revoked_closes: u64,
    /// Messages the revocation listener missed.
    pub revocations_missed: u64,
    /// Whether the revocation listener is subscribed now: revocations other instances publish
    /// reach this hub (false before the first handshake, and while its pub/sub is away).
    pub revocations_listening: bool,
}

/// Handles resolved once, when the hub is built: the hot paths (a frame written, an event
/// fanned out) then touch an atomic, not the recorder's registry. Install the recorder
/// before building the hub.
///
/// Each method updates the hub's own counters ([`HubStats`]) before it calls the recorder: a
/// recorder that panics (a bug in the metrics set-up) leaves the stats exact.
pub(crate) struct Metrics {
    connections: Gauge,
    subscriptions: Gauge,
    messages_sent: Counter,
    slow_closes: Counter,
    idle_closes: Counter,
    expired_closes: Counter,
    upstream_missed: Counter,
    missed_notices: Counter,
    replayed: Counter,
    revoked_local: Counter,
    revoked_remote: Counter,
    revocations_missed: Counter,
    revocations_listening: Gauge,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    subscriptions: AtomicU64,
    messages_sent: AtomicU64,
    slow_closes: AtomicU64,
    idle_closes: AtomicU64,
    expired_closes: AtomicU64,
    refused: AtomicU64,
    upstream_missed: AtomicU64,
    missed_notices: AtomicU64,
    replayed: AtomicU64,
    revoked: AtomicU64,
    revocations_missed: AtomicU64,
    revocations_listening: std::sync::atomic::AtomicBool,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Self {
            connections: metrics::gauge!(names::CONNECTIONS),
            subscriptions: metrics::gauge!(names::SUBSCRIPTIONS),
            messages_sent: metrics::counter!(names::MESSAGES_SENT),
            slow_closes: metrics::counter!(names::SLOW_CLIENT_CLOSES),
            idle_closes: metrics::counter!(names::IDLE_CLOSES),
            expired_closes: metrics::counter!(names::EXPIRED_CLOSES),
            upstream_missed: metrics::counter!(names::UPSTREAM_MISSED),
            missed_notices: metrics::counter!(names::MISSED_NOTICES),
            replayed: metrics::counter!(names::REPLAYED_EVENTS),
            revoked_local: metrics::counter!(names::REVOKED_CLOSES, "origin" => "local"),
            revoked_remote: metrics::counter!(names::REVOKED_CLOSES, "origin" => "remote"),
            revocations_missed: metrics::counter!(names::REVOCATIONS_MISSED),
            revocations_listening: metrics::gauge!(names::REVOCATIONS_LISTENING),
            stats: Stats::default(),
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.connections.increment(1.0);
    }

    pub(crate) fn connection_closed(&self) {
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        self.connections.decrement(1.0);
    }

    pub(crate) fn subscribed(&self) {
        self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
        self.subscriptions.increment(1.0);
    }

    pub(crate) fn unsubscribed(&self) {
        self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
        self.subscriptions.decrement(1.0);
    }

    pub(crate) fn sent(&self, frames: u64) {
        self.stats
            .messages_sent
            .fetch_add(frames, Ordering::Relaxed);
        self.messages_sent.increment(frames);
    }

    pub(crate) fn slow_close(&self) {
        self.stats.slow_closes.fetch_add(1, Ordering::Relaxed);
        self.slow_closes.increment(1);
    }

    pub(crate) fn idle_close(&self) {
        self.stats.idle_closes.fetch_add(1, Ordering::Relaxed);
        self.idle_closes.increment(1);
    }

    pub(crate) fn expired(&self, connections: u64) {
        self.stats
            .expired_closes
            .fetch_add(connections, Ordering::Relaxed);
        self.expired_closes.increment(connections);
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::HANDSHAKES_REFUSED, "reason" => reason).increment(1);
    }

    pub(crate) fn upstream_missed(&self, messages: u64) {
        self.stats
            .upstream_missed
            .fetch_add(messages, Ordering::Relaxed);
        self.upstream_missed.increment(messages);
    }

    pub(crate) fn missed_notices(&self, frames: u64) {
        self.stats
            .missed_notices
            .fetch_add(frames, Ordering::Relaxed);
        self.missed_notices.increment(frames);
    }

    pub(crate) fn replayed(&self, events: u64) {
        self.stats.replayed.fetch_add(events, Ordering::Relaxed);
        self.replayed.increment(events);
    }

    /// `connections` closed for a revocation, made here (`remote` false) or by another
    /// instance.
    pub(crate) fn revoked(&self, connections: u64, remote: bool) {
        self.stats.revoked.fetch_add(connections, Ordering::Relaxed);
        if remote {
            self.revoked_remote.increment(connections);
        } else {
            self.revoked_local.increment(connections);
        }
    }

    pub(crate) fn revocations_missed(&self, messages: u64) {
        self.stats
            .revocations_missed
            .fetch_add(messages, Ordering::Relaxed);
        self.revocations_missed.increment(messages);
    }

    pub(crate) fn revocations_listening(&self, listening: bool) {
        self.stats
            .revocations_listening
            .store(listening, Ordering::Relaxed);
        self.revocations_listening
            .set(if listening { 1.0 } else { 0.0 });
    }

    pub(crate) fn snapshot(&self) -> HubStats {
        let s = &self.stats;
        HubStats {
            connections: s.connections.load(Ordering::Relaxed),
            subscriptions: s.subscriptions.load(Ordering::Relaxed),
            messages_sent: s.messages_sent.load(Ordering::Relaxed),
            slow_client_closes: s.slow_closes.load(Ordering::Relaxed),
            idle_closes: s.idle_closes.load(Ordering::Relaxed),
            expired_closes: s.expired_closes.load(Ordering::Relaxed),
            handshakes_refused: s.refused.load(Ordering::Relaxed),
            upstream_missed: s.upstream_missed.load(Ordering::Relaxed),
            missed_notices: s.missed_notices.load(Ordering::Relaxed),
            replayed_events: s.replayed.load(Ordering::Relaxed),
            revoked_closes: s.revoked.load(Ordering::Relaxed),
            revocations_missed: s.revocations_missed.load(Ordering::Relaxed),
            revocations_listening: s.revocations_listening.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::METRICS;

    /// The catalogue lists every name in [`names`](super::names), once, and nothing else, and
    /// the crate records under no other name (a literal beside a `counter!` and the like).
    #[test]
    fn every_metric_name_is_described() {
        let source = include_str!("metrics.rs");
        let named: std::collections::BTreeSet<&str> = source
            .lines()
            .filter(|l| l.trim_start().starts_with("pub const ") && l.contains(": &str = \""))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        let described: std::collections::BTreeSet<&str> = METRICS.iter().map(|m| m.name).collect();
        assert_eq!(described.len(), METRICS.len(), "a name listed twice");
        assert_eq!(named, described);
        // And nothing is recorded under a name of its own, outside `names`.
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let literal = cqrs_core::testing::metric_names_recorded_in(&src, "realtime_");
        assert!(literal.is_empty(), "{literal:?}: record through `names`");
    }
}
