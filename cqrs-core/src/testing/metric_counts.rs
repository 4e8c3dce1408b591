//! A [`metrics::Recorder`] for tests that assert what was counted.

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counts what is recorded through the `metrics` facade, by metric name and labels
/// (`name{k=v,...}`: one series whatever order its labels were recorded in, looked up with
/// them in any order, but for a label value holding `,`, which must be written in the sorted
/// order [`series`](Self::series) shows): a counter's total, and a histogram's number of
/// samples; and a gauge's last value, apart ([`gauge`](Self::gauge)).
///
/// Install it for a test with [`metrics::with_local_recorder`] (the current thread only, so
/// tests running in parallel do not see each other's metrics; use a current-thread runtime
/// inside it), or, in an async test, around a future with [`scope`](Self::scope).
/// `with_local_recorder(&counts, || async { .. }).await` records nothing: the closure only
/// makes the future, which runs after the recorder was taken away, and every count reads 0.
///
/// ```
/// use cqrs_core::reexports::metrics::{counter, histogram, with_local_recorder};
/// use cqrs_core::testing::MetricCounts;
///
/// let counts = MetricCounts::default();
/// with_local_recorder(&counts, || {
///     counter!("orders_total", "outcome" => "ok").increment(2);
///     histogram!("order_seconds").record(0.5);
/// });
/// assert_eq!(counts.get("orders_total{outcome=ok}"), 2);
/// assert_eq!(counts.get("order_seconds{}"), 1);
/// assert_eq!(counts.get("never_recorded{}"), 0);
/// ```
#[derive(Debug, Default)]
pub struct MetricCounts {
    counts: Mutex<BTreeMap<String, Arc<Count>>>,
    gauges: Mutex<BTreeMap<String, Arc<Level>>>,
}

#[derive(Debug, Default)]
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

/// A gauge's value, as the bits of an `f64`.
#[derive(Debug, Default)]
struct Level(AtomicU64);

impl Level {
    fn update(&self, change: impl Fn(f64) -> f64) {
        // A compare-and-swap loop: gauges of one series may move from several threads.
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |bits| {
                Some(change(f64::from_bits(bits)).to_bits())
            });
    }
}

impl GaugeFn for Level {
    fn increment(&self, value: f64) {
        self.update(|level| level + value);
    }
    fn decrement(&self, value: f64) {
        self.update(|level| level - value);
    }
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::SeqCst);
    }
}

impl MetricCounts {
    /// What was counted under `name{k=v,...}` (`name{}` for none; the labels in any order),
    /// 0 when nothing was. A misspelt name or label reads 0 too: to assert that nothing was
    /// counted in a series that exists, see [`recorded`](Self::recorded).
    pub fn get(&self, name: &str) -> u64 {
        self.recorded(name).unwrap_or(0)
    }

    /// What was counted under `name{k=v,...}` (as [`get`](Self::get) names it), `None` when
    /// the series was never registered: unlike `get`, a misspelt name or label, or a label
    /// value never seen, tells itself apart from a count of 0.
    ///
    /// ```
    /// use cqrs_core::reexports::metrics::{counter, with_local_recorder};
    /// use cqrs_core::testing::MetricCounts;
    ///
    /// let counts = MetricCounts::default();
    /// with_local_recorder(&counts, || {
    ///     counter!("orders_total", "outcome" => "ok", "kind" => "web").increment(1);
    ///     counter!("orders_total", "kind" => "web", "outcome" => "ok").increment(1);
    ///     counter!("refunds_total", "kind" => "web").increment(0);
    /// });
    /// // One series, whatever order its labels were recorded or are asked in.
    /// assert_eq!(counts.recorded("orders_total{kind=web,outcome=ok}"), Some(2));
    /// assert_eq!(counts.recorded("orders_total{outcome=ok,kind=web}"), Some(2));
    /// assert_eq!(counts.recorded("refunds_total{kind=web}"), Some(0));
    /// assert_eq!(counts.recorded("refunds_totl{kind=web}"), None);
    /// ```
    pub fn recorded(&self, name: &str) -> Option<u64> {
        Self::find(&self.counts, name).map(|c| c.0.load(Ordering::SeqCst))
    }

    /// Every series recorded so far, as `name{k=v,...}` with its labels sorted, sorted (not in
    /// the order recorded).
    ///
    /// ```
    /// use cqrs_core::reexports::metrics::{counter, with_local_recorder};
    /// use cqrs_core::testing::MetricCounts;
    ///
    /// let counts = MetricCounts::default();
    /// with_local_recorder(&counts, || {
    ///     counter!("orders_total", "outcome" => "ok").increment(1);
    ///     counter!("orders_total", "outcome" => "failed").increment(1);
    /// });
    /// assert_eq!(
    ///     counts.series(),
    ///     ["orders_total{outcome=failed}", "orders_total{outcome=ok}"]
    /// );
    /// ```
    pub fn series(&self) -> Vec<String> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Runs `future` with this recorder installed on the current thread whenever it is
    /// polled: for an async test (`#[tokio::test]`), where `with_local_recorder` around an
    /// `async` block would record nothing. Tasks the future spawns are polled by the runtime,
    /// not inside it, and record elsewhere: await their work in the future (or run them in a
    /// `with_local_recorder` around `block_on`).
    ///
    /// ```
    /// use cqrs_core::reexports::metrics::counter;
    /// use cqrs_core::testing::MetricCounts;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let counts = MetricCounts::default();
    /// counts
    ///     .scope(async {
    ///         tokio::task::yield_now().await;
    ///         counter!("orders_total").increment(1);
    ///     })
    ///     .await;
    /// assert_eq!(counts.get("orders_total{}"), 1);
    /// # });
    /// ```
    pub fn scope<F: std::future::Future>(&self, future: F) -> Scoped<'_, F> {
        Scoped {
            counts: self,
            future: Box::pin(future),
        }
    }

    /// A gauge's last value under `name{k=v,...}` (as [`get`](Self::get) names it), `None`
    /// when it was never registered.
    ///
    /// ```
    /// use cqrs_core::reexports::metrics::{gauge, with_local_recorder};
    /// use cqrs_core::testing::MetricCounts;
    ///
    /// let counts = MetricCounts::default();
    /// with_local_recorder(&counts, || {
    ///     gauge!("queue_depth", "queue" => "mail").set(3.0);
    ///     gauge!("queue_depth", "queue" => "mail").decrement(1.0);
    /// });
    /// assert_eq!(counts.gauge("queue_depth{queue=mail}"), Some(2.0));
    /// assert_eq!(counts.gauge("queue_depth{queue=sms}"), None);
    /// ```
    pub fn gauge(&self, name: &str) -> Option<f64> {
        Self::find(&self.gauges, name).map(|level| f64::from_bits(level.0.load(Ordering::SeqCst)))
    }

    /// The series `name{k=v,...}` of `map`, its labels in the order recorded or in any other.
    fn find<T>(map: &Mutex<BTreeMap<String, Arc<T>>>, name: &str) -> Option<Arc<T>> {
        // Stored with its labels sorted (`slot`): as written, or sorted the same way.
        let map = map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).or_else(|| map.get(&sorted(name))).cloned()
    }

    /// The series of `key` in `map`, its labels sorted: `metrics` takes labels in any order
    /// for one series, and so does this count (one entry, not one per order recorded in).
    fn slot<T: Default>(map: &Mutex<BTreeMap<String, Arc<T>>>, key: &Key) -> Arc<T> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort_unstable();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_default()
            .clone()
    }
}

/// `name{k=v,...}` with its labels sorted, as [`MetricCounts::slot`] stores a series.
fn sorted(series: &str) -> String {
    let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
    let labels = labels.strip_suffix('}').unwrap_or(labels);
    let mut labels: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    labels.sort_unstable();
    format!("{name}{{{}}}", labels.join(","))
}

/// A future run with a [`MetricCounts`] installed at each poll: [`MetricCounts::scope`].
#[must_use = "a future does nothing until awaited"]
pub struct Scoped<'a, F> {
    counts: &'a MetricCounts,
    future: std::pin::Pin<Box<F>>,
}

impl<F> std::fmt::Debug for Scoped<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scoped").finish_non_exhaustive()
    }
}

impl<F: std::future::Future> std::future::Future for Scoped<'_, F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let counts = self.counts;
        let _installed = metrics::set_default_local_recorder(counts);
        self.future.as_mut().poll(cx)
    }
}

impl Recorder for MetricCounts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Self::slot(&self.counts, key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Self::slot(&self.gauges, key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Self::slot(&self.counts, key))
    }
}
