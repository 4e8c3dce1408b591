//! Dispatch counts and latencies through the `metrics` facade.

use crate::{BoxError, Dispatch, DispatchError, MessageKind, Reply};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::{Layer, Service};

/// Records every dispatch in the `metrics` facade:
///
/// * `cqrs_dispatch_total{kind, message, outcome}`: a counter; `outcome` is `ok`, the error's
///   kind (`invalid`, `conflict`, `timeout`, ...), or `cancelled` for a dispatch dropped before
///   it finished (a timeout layer outside this one fired, or the caller gave up);
/// * `cqrs_dispatch_duration_seconds{kind, message}`: a histogram.
///
/// Label values are the message's wire name and fixed words, never ids, so cardinality stays
/// bounded. Install any `metrics` recorder (a Prometheus exporter, say) to collect them.
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
        MetricsFuture {
            kind: dispatch.kind(),
            name: dispatch.name(),
            start: Instant::now(),
            recorded: false,
            inner: self.inner.call(dispatch),
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
                record(*this.kind, this.name, "cancelled", *this.start);
            }
        }
    }
}

fn record(kind: MessageKind, name: &'static str, outcome: &'static str, start: Instant) {
    let kind = kind.as_str();
    metrics::counter!("cqrs_dispatch_total", "kind" => kind, "message" => name, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("cqrs_dispatch_duration_seconds", "kind" => kind, "message" => name)
        .record(start.elapsed().as_secs_f64());
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Reply, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Reply, DispatchError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r.map_err(|e| DispatchError::from_layer(e.into())),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind().as_str(),
        };
        *this.recorded = true;
        record(*this.kind, this.name, outcome, *this.start);
        Poll::Ready(result)
    }
}
