//! What each metric this crate records means, for the recorder's `# HELP` lines.

use cqrs_core::MetricDescription;

/// Every metric this crate records (its outbox relay's).
pub const METRICS: &[MetricDescription] = &[
    MetricDescription::gauge(
        "cqrs_outbox_unpublished",
        "Events stored but not yet published by the outbox relay (its backlog; estimated past backlog_count_limit, NaN while it cannot be counted), by relay; exported every metrics_interval.",
    ),
    MetricDescription::gauge(
        "cqrs_outbox_oldest_unpublished_seconds",
        "Age of the oldest event the outbox relay has not published, in seconds (0 with no backlog, NaN while it cannot be read), by relay.",
    ),
    MetricDescription::counter(
        "cqrs_outbox_published_total",
        "Events the outbox relay published to its transport, by relay.",
    ),
    MetricDescription::counter(
        "cqrs_outbox_skipped_total",
        "Events the outbox relay skipped, by relay and reason (undecodable, refused: for good by the transport, invalid_topic); they stay in the event store.",
    ),
    MetricDescription::counter(
        "cqrs_outbox_publish_failures_total",
        "Failed rounds of the outbox relay (it tries again with backoff), by relay and cause (postgres, transport, timeout).",
    ),
];

/// Describes every metric in [`METRICS`] to the installed `metrics` recorder, so that
/// Prometheus's exporter writes a `# HELP` line for each (with `cqrs_core::describe_metrics`
/// for the core's). Call it once the recorder is installed.
///
/// ```
/// cqrs_postgres::describe_metrics();
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
        cqrs_core::testing::assert_metrics_listed(&src, &["cqrs_"], METRICS, &[]);
    }
}
