use crate::fixtures::*;
use cqrs_core::CommandBus;
use cqrs_core::middleware::{MetricsLayer, TimeoutLayer};
use cqrs_core::testing::MetricCounts;
use std::time::Duration;

/// A dispatch the metrics layer never sees finish (a timeout outside it fired, or the caller
/// dropped it) is still counted, as `cancelled`, with its duration.
#[test]
fn a_dispatch_dropped_before_it_finishes_is_counted_as_cancelled() {
    let counts = MetricCounts::default();
    let bus = CommandBus::builder()
        .layer(TimeoutLayer::new(Duration::from_millis(20)))
        .layer(MetricsLayer::new())
        .handler(HangHandler)
        .handler(AddHandler)
        .build()
        .unwrap();
    metrics::with_local_recorder(&counts, || {
        run(async {
            bus.dispatch(Hang).await.unwrap_err();
            bus.dispatch(Add::default()).await.unwrap();
        })
    });
    assert_eq!(
        counts.get("cqrs_dispatch_total{kind=command,message=test.hang,outcome=cancelled}"),
        1
    );
    assert_eq!(
        counts.get("cqrs_dispatch_duration_seconds{kind=command,message=test.hang}"),
        1
    );
    assert_eq!(
        counts.get("cqrs_dispatch_total{kind=command,message=test.add,outcome=ok}"),
        1
    );
}

/// A failed dispatch is counted under its error's kind, the message's name beside it.
#[test]
fn a_failure_is_counted_under_its_kind() {
    let counts = MetricCounts::default();
    let bus = CommandBus::builder()
        .layer(MetricsLayer::new())
        .handler(AddHandler)
        .build()
        .unwrap();
    metrics::with_local_recorder(&counts, || {
        run(async {
            for _ in 0..2 {
                bus.dispatch(Add {
                    panic: true,
                    ..Add::default()
                })
                .await
                .unwrap_err();
            }
            bus.dispatch(Add::default()).await.unwrap();
        })
    });
    assert_eq!(
        counts.get("cqrs_dispatch_total{kind=command,message=test.add,outcome=internal}"),
        2
    );
    assert_eq!(
        counts.get("cqrs_dispatch_total{kind=command,message=test.add,outcome=ok}"),
        1
    );
    assert_eq!(
        counts.get("cqrs_dispatch_duration_seconds{kind=command,message=test.add}"),
        3
    );
}
