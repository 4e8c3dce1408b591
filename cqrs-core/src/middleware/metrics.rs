//! Dispatch counts and latencies through the `metrics` facade.

use crate::{BoxError, Dispatch, DispatchError, ErrorKind, MessageKind, Reply};
use metrics::{Key, Label};
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::{Layer, Service};

/// Records every dispatch in the `metrics` facade:
///
/// * `cqrs_dispatch_total{kind, message, outcome}`: a counter; `outcome` is `ok`, the error's
///   kind (`invalid`, `conflict`, `timeout`, ...), or `cancelled` for a dispatch dropped before
///   it finished (a timeout layer outside this one fired, the caller gave up, or a layer
///   outside this one panicked while this one's future was pending: the caller then gets
///   `internal`, which this layer cannot see);
/// * `cqrs_dispatch_duration_seconds{kind, message}`: a histogram.
///
/// A dispatch is counted from the moment it reaches this layer's `call`: one that fails or is
/// given up while a layer inside is not ready yet (tower's `poll_ready`: a
/// `ConcurrencyLimitLayer` inside this one, full) has no message yet here and is not counted.
/// Put this layer inside such layers to count only what they let through, or outside to count
/// everything else.
///
/// Label values are the message's wire name and fixed words, never ids, so cardinality stays
/// bounded. Install any `metrics` recorder (a Prometheus exporter, say) to collect them.
///
/// A command's [`EventSink`](crate::EventSink) runs after the layers, so neither its time nor
/// its failure is in these figures: a sink that is an [`EventBus`](crate::EventBus) takes a
/// `MetricsLayer` of its own, which records each publish.
///
/// ```
/// use cqrs_core::{CommandBus, middleware::MetricsLayer};
///
/// let bus = CommandBus::builder().layer(MetricsLayer::new()).build().unwrap();
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsLayer {
    _private: (),
}

impl MetricsLayer {
    /// A metrics layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics { inner }
    }
}

/// The service made by [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct Metrics<S> {
    inner: S,
}

impl<S> Service<Dispatch> for Metrics<S>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: Into<BoxError>,
{
    type Response = Reply;
    type Error = DispatchError;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| DispatchError::from_layer(e.into()))
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let (kind, name, start) = (dispatch.kind(), dispatch.name(), Instant::now());
        // A layer inside that panics in `call` (not in its future) is counted too, as
        // `internal`, like a panic in its future; the bus then fails the dispatch with it.
        let inner =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.call(dispatch)))
                .unwrap_or_else(|payload| {
                    record(kind, name, Outcome::Failed(ErrorKind::Internal), start);
                    std::panic::resume_unwind(payload)
                });
        MetricsFuture {
            kind,
            name,
            start,
            recorded: false,
            inner,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`Metrics`] dispatch.
    #[derive(Debug)]
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        kind: MessageKind,
        name: &'static str,
        start: Instant,
        recorded: bool,
    }

    impl<F> PinnedDrop for MetricsFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.recorded {
                record(*this.kind, this.name, Outcome::Cancelled, *this.start);
            }
        }
    }
}

fn record(kind: MessageKind, name: &'static str, outcome: Outcome, start: Instant) {
    let seconds = start.elapsed().as_secs_f64();
    let Some(keys) = keys_of(kind, name) else {
        // More message names than the table holds: the macros build the keys each time.
        let kind = kind.as_str();
        metrics::counter!("cqrs_dispatch_total", "kind" => kind, "message" => name, "outcome" => outcome.as_str())
            .increment(1);
        metrics::histogram!("cqrs_dispatch_duration_seconds", "kind" => kind, "message" => name)
            .record(seconds);
        return;
    };
    metrics::with_recorder(|recorder| {
        recorder
            .register_counter(&keys.total[outcome.index()], &METADATA)
            .increment(1);
        recorder
            .register_histogram(&keys.duration, &METADATA)
            .record(seconds);
    });
}

/// What the `metrics` macros would pass for a metric of this module.
static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// How a dispatch ended, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Cancelled,
    Failed(ErrorKind),
}

impl Outcome {
    const ALL: [Outcome; 11] = [
        Outcome::Ok,
        Outcome::Cancelled,
        Outcome::Failed(ErrorKind::Invalid),
        Outcome::Failed(ErrorKind::Unauthorized),
        Outcome::Failed(ErrorKind::Forbidden),
        Outcome::Failed(ErrorKind::NotFound),
        Outcome::Failed(ErrorKind::Conflict),
        Outcome::Failed(ErrorKind::RateLimited),
        Outcome::Failed(ErrorKind::Timeout),
        Outcome::Failed(ErrorKind::Unavailable),
        Outcome::Failed(ErrorKind::Internal),
    ];

    /// Its place in [`Outcome::ALL`] (and in [`Keys::total`]).
    fn index(self) -> usize {
        match self {
            Outcome::Ok => 0,
            Outcome::Cancelled => 1,
            Outcome::Failed(kind) => match kind {
                ErrorKind::Invalid => 2,
                ErrorKind::Unauthorized => 3,
                ErrorKind::Forbidden => 4,
                ErrorKind::NotFound => 5,
                ErrorKind::Conflict => 6,
                ErrorKind::RateLimited => 7,
                ErrorKind::Timeout => 8,
                ErrorKind::Unavailable => 9,
                ErrorKind::Internal => 10,
            },
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed(kind) => kind.as_str(),
        }
    }
}

/// The metric keys of one message: built the first time it is dispatched and kept for the
/// life of the process (a few hundred bytes per message name), so that recording a dispatch
/// allocates nothing and takes no lock. The recorder still looks each key up (by the hash the
/// key carries); holding its handles instead would tie them to one recorder.
struct Keys {
    kind: MessageKind,
    name: &'static str,
    total: [Key; Outcome::ALL.len()],
    duration: Key,
}

impl Keys {
    fn leak(kind: MessageKind, name: &'static str) -> &'static Keys {
        let labels = |extra: Option<&'static str>| -> &'static [Label] {
            let mut labels = vec![
                Label::from_static_parts("kind", kind.as_str()),
                Label::from_static_parts("message", name),
            ];
            labels.extend(extra.map(|outcome| Label::from_static_parts("outcome", outcome)));
            Box::leak(labels.into_boxed_slice())
        };
        Box::leak(Box::new(Keys {
            kind,
            name,
            total: Outcome::ALL.map(|outcome| {
                Key::from_static_parts("cqrs_dispatch_total", labels(Some(outcome.as_str())))
            }),
            duration: Key::from_static_parts("cqrs_dispatch_duration_seconds", labels(None)),
        }))
    }
}

/// Slots for message names; a process with more (unlikely) records the rest through the
/// macros, which allocate.
const SLOTS: usize = 1024;
/// How many slots a lookup tries before it gives up.
const PROBES: usize = 32;

/// The keys of every message dispatched so far, found by the address of its name: an
/// open-addressed table of slots that are filled once and never change, so a lookup is a few
/// atomic loads. The same name at two addresses (two copies of a constant) takes two slots,
/// with equal keys.
static TABLE: [OnceLock<&'static Keys>; SLOTS] = [const { OnceLock::new() }; SLOTS];

fn keys_of(kind: MessageKind, name: &'static str) -> Option<&'static Keys> {
    let hash = (name.as_ptr() as usize ^ name.len().rotate_left(17) ^ kind as usize)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as usize);
    let start = hash >> (usize::BITS - SLOTS.trailing_zeros());
    (0..PROBES)
        .map(|probe| *TABLE[(start + probe) % SLOTS].get_or_init(|| Keys::leak(kind, name)))
        .find(|keys| keys.kind == kind && std::ptr::eq(keys.name, name))
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Reply, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Reply, DispatchError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        // A panic inside (a layer's; the handler's own is an error by now) is counted as
        // `internal`, not as `cancelled` when this future is dropped, then goes on to the
        // bus, which fails the dispatch with it.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx)));
        let result = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(r)) => r.map_err(|e| DispatchError::from_layer(e.into())),
            Err(payload) => {
                *this.recorded = true;
                let outcome = Outcome::Failed(ErrorKind::Internal);
                record(*this.kind, this.name, outcome, *this.start);
                std::panic::resume_unwind(payload);
            }
        };
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::Failed(e.kind()),
        };
        *this.recorded = true;
        record(*this.kind, this.name, outcome, *this.start);
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_gets_its_own_keys_and_a_full_table_falls_back_to_the_macros() {
        let names: Vec<&'static str> = (0..SLOTS + 64)
            .map(|i| &*Box::leak(format!("test.message_{i}").into_boxed_str()))
            .collect();
        let found: Vec<_> = names
            .iter()
            .map(|name| keys_of(MessageKind::Query, name))
            .collect();
        assert!(
            found.iter().any(Option::is_none),
            "more names than slots, yet every one found a slot"
        );
        for (name, keys) in names.iter().zip(&found) {
            let Some(keys) = keys else { continue };
            assert!(std::ptr::eq(keys.name, *name));
            assert!(std::ptr::eq(
                *keys,
                keys_of(MessageKind::Query, name).unwrap()
            ));
            let labels: Vec<_> = keys.total[Outcome::Failed(ErrorKind::NotFound).index()]
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            assert_eq!(
                labels,
                [
                    "kind=query",
                    &format!("message={name}"),
                    "outcome=not_found"
                ]
            );
        }
        // Recording a name without a slot still works (through the macros).
        record(
            MessageKind::Query,
            names[names.len() - 1],
            Outcome::Ok,
            Instant::now(),
        );
    }

    #[test]
    fn outcomes_are_indexed_in_the_order_of_all() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?}");
        }
    }
}
