use crate::fixtures::*;
use cqrs_core::CommandBus;
use cqrs_core::middleware::{MetricsLayer, TimeoutLayer};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Counts what is recorded, by metric name and labels (`name{k=v,...}`).
#[derive(Default)]
struct Counts(Mutex<BTreeMap<String, Arc<Count>>>);

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl HistogramFn for Count {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Counts {
    fn slot(&self, key: &Key) -> Arc<Count> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.0.lock().unwrap().entry(name).or_default().clone()
    }

    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

impl Recorder for Counts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.slot(key))
    }
}

/// A dispatch the metrics layer never sees finish (a timeout outside it fired, or the caller
/// dropped it) is still counted, as `cancelled`, with its duration.
#[test]
fn a_dispatch_dropped_before_it_finishes_is_counted_as_cancelled() {
    let counts = Counts::default();
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
