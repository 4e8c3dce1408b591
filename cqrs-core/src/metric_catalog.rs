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
        "Messages dispatched through a bus with MetricsLayer, by kind (command, query, event), message name and outcome.",
    ),
    MetricDescription::histogram(
        "cqrs_dispatch_duration_seconds",
        "How long a dispatch through a bus with MetricsLayer took, in seconds, by kind and message name.",
    ),
    counter(
        "cqrs_event_sink_failures_total",
        "Events recorded by a command that its event sink could not take, by event type.",
    ),
    counter(
        "cqrs_event_bus_given_up_total",
        "Events an event-bus relay gave up handing to its handlers (after its attempts, or at once when refused for good), by event type.",
    ),
    counter(
        "cqrs_event_bus_dead_lettered_total",
        "Events a transport-fed event bus sent to the dead letters (no redelivery mends them), by event type.",
    ),
    counter(
        "cqrs_events_unknown_total",
        "Stored events of a type this build does not know, met while decoding, by event type.",
    ),
    counter(
        "cqrs_events_handled_total",
        "Events a projection applied and committed, by projection and event type.",
    ),
    counter(
        "cqrs_projection_skipped_total",
        "Events a projection skipped (it failed on them skip_after times in a row, or could not decode them), by projection, event type and reason.",
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
        "Events a store relay skipped (the transport refused them for good), by relay, event type and reason; they stay in the event store.",
    ),
    counter(
        "cqrs_transport_trimmed_total",
        "Entries trimmed from a transport's topic once every group acknowledged them, by topic and transport.",
    ),
    counter(
        "cqrs_worker_restarts_total",
        "Times the runtime restarted a background worker after it failed, by worker.",
    ),
];

/// Describes every metric in [`METRICS`] to the installed `metrics` recorder, so that
/// Prometheus's exporter writes a `# HELP` line for each. Call it once the recorder is
/// installed (a no-op without one); the other crates have theirs (`cqrs_postgres`,
/// `cqrs_redis`, `cqrs_realtime`).
///
/// ```
/// // After installing the recorder (`metrics::set_global_recorder`):
/// cqrs_core::describe_metrics();
/// ```
pub fn describe_metrics() {
    METRICS.iter().for_each(MetricDescription::describe);
}

#[doc(hidden)]
pub mod __private {
    /// The metric names `src` (every `.rs` file below it) records: string literals starting
    /// with `prefix` on a line that names a `counter!`, `gauge!`, `histogram!` or
    /// `Key::from_static_parts`, or within the two lines after one. For each crate's test that
    /// its catalogue lists every metric it records, and nothing else.
    pub fn recorded_names(
        src: &std::path::Path,
        prefix: &str,
    ) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let mut dirs = vec![src.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("the crate's sources are readable") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("a source file reads");
                let lines: Vec<&str> = text.lines().collect();
                for (i, line) in lines.iter().enumerate() {
                    let recording = lines[i.saturating_sub(2)..=i].iter().any(|l| {
                        [
                            "counter!(",
                            "gauge!(",
                            "histogram!(",
                            "Key::from_static_parts(",
                        ]
                        .iter()
                        .any(|m| l.contains(m))
                    });
                    if !recording {
                        continue;
                    }
                    let quoted = format!("\"{prefix}");
                    let mut rest = *line;
                    while let Some(start) = rest.find(&quoted) {
                        let after = &rest[start + 1..];
                        let end = after.find('"').unwrap_or(after.len());
                        names.insert(after[..end].to_owned());
                        rest = &after[end..];
                    }
                }
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The catalogue lists every metric the crate's code records, once, and nothing else.
    #[test]
    fn every_metric_recorded_is_described() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let recorded = __private::recorded_names(&src, "cqrs_");
        let described: std::collections::BTreeSet<String> =
            METRICS.iter().map(|m| m.name.to_owned()).collect();
        assert_eq!(described.len(), METRICS.len(), "a name listed twice");
        assert_eq!(recorded, described);
    }
}
