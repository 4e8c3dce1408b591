//! What each metric the crates record means, for the recorder's `# HELP` lines.

/// What kind of metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Set to the current value.
    Gauge,
    /// A distribution of observed values.
    Histogram,
}

/// One metric a crate records: its name, its kind, and what it measures (with its labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricDescription {
    /// The name, as the `metrics` facade records it.
    pub name: &'static str,
    /// Its kind.
    pub kind: MetricKind,
    /// What it measures, with its labels: what Prometheus's exporter writes as `# HELP`.
    pub help: &'static str,
}

impl MetricDescription {
    /// A counter.
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: MetricKind::Counter,
            help,
        }
    }

    /// A gauge.
    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: MetricKind::Gauge,
            help,
        }
    }

    /// A histogram.
    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: MetricKind::Histogram,
            help,
        }
    }

    /// Describes it to the installed `metrics` recorder (a no-op without one). Call once the
    /// recorder is installed: descriptions given to none are lost.
    pub fn describe(&self) {
        match self.kind {
            MetricKind::Counter => metrics::describe_counter!(self.name, self.help),
            MetricKind::Gauge => metrics::describe_gauge!(self.name, self.help),
            MetricKind::Histogram => metrics::describe_histogram!(self.name, self.help),
        }
    }
}

const fn counter(name: &'static str, help: &'static str) -> MetricDescription {
    MetricDescription::counter(name, help)
}

const fn gauge(name: &'static str, help: &'static str) -> MetricDescription {
    MetricDescription::gauge(name, help)
}

/// Every metric this crate records (its buses' [`MetricsLayer`](crate::middleware::MetricsLayer),
/// projections, consumers, relays, the runtime and the in-memory transport).
pub const METRICS: &[MetricDescription] = &[
    counter(
        "cqrs_dispatch_total",
        "Messages dispatched through a bus with MetricsLayer, by kind (command, query, event), message name and outcome (ok, cancelled, or the error's kind).",
    ),
    MetricDescription::histogram(
        "cqrs_dispatch_duration_seconds",
        "How long a dispatch through a bus with MetricsLayer took, in seconds, by kind and message name.",
    ),
    counter(
        "cqrs_event_sink_failures_total",
        "Events a command recorded whose in-process EventBus publish failed after the command succeeded (a handler failed; logged, not retried), by event type.",
    ),
    counter(
        "cqrs_event_bus_given_up_total",
        "Events an event-bus relay gave up handing to its handlers (after its attempts, or at once when refused for good), by event type.",
    ),
    counter(
        "cqrs_event_bus_dead_lettered_total",
        "Events a transport-fed event bus decided to dead-letter (no redelivery mends them; one whose dead letter could not be written comes back and counts again), by event type.",
    ),
    counter(
        "cqrs_events_unknown_total",
        "Events skipped because the reader's event types do not register their type (policies Skip and Ignore), read from the store or a transport, by event type (the first 64 names, then other; invalid for a malformed name).",
    ),
    counter(
        "cqrs_events_handled_total",
        "Events a projection applied and committed, by projection and event type.",
    ),
    counter(
        "cqrs_projection_skipped_total",
        "Events a store-fed projection skipped after failing on them skip_after steps in a row, by projection, event type and reason (apply: a handler error; decode: undecodable); the read model misses them until a rebuild.",
    ),
    counter(
        "cqrs_projection_dead_lettered_total",
        "Events a transport-fed projection sent to the dead letters at once (no redelivery mends them), by projection and event type.",
    ),
    gauge(
        "cqrs_projection_lag_seconds",
        "Age of the oldest event a projection is handling or holding back, in seconds (0 with none waiting, NaN while it cannot read them), by projection.",
    ),
    gauge(
        "cqrs_consumer_lag_seconds",
        "Age of the oldest event an event-bus consumer of a transport is handling or holding back, in seconds (0 with none waiting, NaN while it cannot read the transport), by topic and group.",
    ),
    counter(
        "cqrs_events_published_total",
        "Events a store relay published to its transport, by relay and event type.",
    ),
    counter(
        "cqrs_events_skipped_total",
        "Events a store relay skipped (the transport refused them for good), by relay, event type and reason (refused); they stay in the event store.",
    ),
    counter(
        "cqrs_transport_trimmed_total",
        "Entries trimmed from a transport's topic once every group acknowledged them, by topic and transport.",
    ),
    counter(
        "cqrs_worker_restarts_total",
        "Times the runtime restarted a background worker that failed, panicked or returned before shutdown, by worker.",
    ),
];

/// Describes every metric in [`METRICS`] to the installed `metrics` recorder, so that
/// Prometheus's exporter writes a `# HELP` line for each. Call it once the recorder is
/// installed (a no-op without one); the other crates have theirs (`cqrs_postgres`,
/// `cqrs_redis`, `cqrs_realtime`).
///
/// ```
/// // After installing the recorder (the `metrics` crate's `set_global_recorder`):
/// cqrs_core::describe_metrics();
/// ```
pub fn describe_metrics() {
    METRICS.iter().for_each(MetricDescription::describe);
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;

    /// The catalogue lists every metric the crate's code records, once, and nothing else.
    #[test]
    fn every_metric_recorded_is_described() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        crate::testing::assert_metrics_listed(&src, &["cqrs_"], METRICS, &[]);
    }
}
