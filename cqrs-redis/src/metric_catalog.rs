//! What each metric this crate records means, for the recorder's `# HELP` lines.

use cqrs_core::MetricDescription;

/// Every metric this crate records (its consumers and stream maintenance), but
/// `cqrs_transport_trimmed_total`, which it records as the core's in-memory transport does
/// (`cqrs_core::METRICS` describes it).
pub const METRICS: &[MetricDescription] = &[
    MetricDescription::counter(
        "cqrs_transport_dead_lettered_total",
        "Entries a consumer moved to the dead-letter stream, by topic, group, transport and reason (max_deliveries: handed out that many times unacknowledged; given_up: undecodable, or a handler gave up; malformed: its id is no stream id).",
    ),
    MetricDescription::gauge(
        "cqrs_redis_group_pending",
        "Entries a consumer group took and has not acknowledged (XINFO GROUPS pending; NaN while it cannot be read), by topic and group.",
    ),
    MetricDescription::gauge(
        "cqrs_redis_group_lag",
        "Entries of the stream a consumer group has not taken yet (XINFO GROUPS lag; NaN when Redis cannot tell), by topic and group.",
    ),
    MetricDescription::gauge(
        "cqrs_redis_stream_length",
        "Entries in a topic's stream (XLEN; NaN while it cannot be read), by topic.",
    ),
    MetricDescription::gauge(
        "cqrs_redis_dead_letters",
        "Entries in a topic's dead-letter stream (NaN while it cannot be read), by topic.",
    ),
];

/// Describes every metric in [`METRICS`] to the installed `metrics` recorder, so that
/// Prometheus's exporter writes a `# HELP` line for each (with `cqrs_core::describe_metrics`
/// for the core's). Call it once the recorder is installed.
///
/// ```
/// cqrs_redis::describe_metrics();
/// ```
pub fn describe_metrics() {
    METRICS.iter().for_each(MetricDescription::describe);
}

#[cfg(test)]
mod tests {
    use super::METRICS;

    /// The catalogue lists every metric the crate's code records, once, and nothing else.
    #[test]
    fn every_metric_recorded_is_described() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        // Series of the core's own (`cqrs_transport_trimmed_total`) are the core's to
        // describe: a recorder keeps the first description it is given.
        cqrs_core::testing::assert_metrics_listed(&src, &["cqrs_"], METRICS, cqrs_core::METRICS);
    }
}
