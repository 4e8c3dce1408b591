//! A span per dispatch.

use crate::{Dispatch, Reply};
use futures_util::future::Either;
use std::task::{Context, Poll};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

/// Wraps each dispatch in an `INFO` span named `dispatch` with the fields `kind`, `message_name`
/// (the wire name), `message_id`, `correlation_id` and `causation_id`. It logs no events of its
/// own: whatever the handler and the inner layers log falls inside the span, and a failure is
/// the caller's to log (its `DispatchError` says what failed). The ids are formatted only if a
/// subscriber records the span, and a span
/// no subscriber is interested in is not entered at all (with `tracing`'s `log` feature, which
/// axum turns on, entering and leaving even a disabled span costs a `log` check each time).
///
/// ```
/// use cqrs_core::{CommandBus, middleware::TracingLayer};
///
/// let bus = CommandBus::builder().layer(TracingLayer::new()).build().unwrap();
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingLayer {
    _private: (),
}

impl TracingLayer {
    /// A tracing layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for TracingLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

/// The service made by [`TracingLayer`].
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
}

impl<S> Service<Dispatch> for Trace<S>
where
    S: Service<Dispatch, Response = Reply>,
{
    type Response = Reply;
    type Error = S::Error;
    type Future = Either<S::Future, Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let metadata = dispatch.metadata();
        let span = tracing::info_span!(
            "dispatch",
            kind = dispatch.kind().as_str(),
            message_name = dispatch.name(),
            message_id = %metadata.message_id,
            correlation_id = %metadata.correlation_id,
            causation_id = tracing::field::Empty,
        );
        if span.is_disabled() {
            return Either::Left(self.inner.call(dispatch));
        }
        if let Some(causation) = metadata.causation_id {
            span.record("causation_id", tracing::field::display(causation));
        }
        // The inner layers' synchronous work in `call` belongs to this dispatch too.
        let inner = span.in_scope(|| self.inner.call(dispatch));
        Either::Right(inner.instrument(span))
    }
}
