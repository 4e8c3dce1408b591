//! A span per dispatch.

use crate::{Dispatch, Metadata, Reply};
use futures_util::future::Either;
use std::fmt;
use std::sync::Arc;
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
///
/// To continue a distributed trace (OpenTelemetry), give the span its parent from the trace
/// context the message carries with [`on_span`](Self::on_span).
#[derive(Clone, Default)]
pub struct TracingLayer {
    on_span: Option<SpanHook>,
}

/// What [`TracingLayer::on_span`] calls.
type SpanHook = Arc<dyn Fn(&tracing::Span, &Metadata) + Send + Sync>;

impl TracingLayer {
    /// A tracing layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `hook` with each dispatch's span and the message's metadata, after the span is
    /// made and before it is first entered: the place to set its parent from the trace
    /// context the metadata carries (`traceparent`, which an event recorded by a command, or
    /// a command sent with [`Metadata::caused`], inherits, across a durable transport too).
    /// With `tracing-opentelemetry`, that is
    /// `span.set_parent(propagator.extract(&carrier))`, where the carrier reads
    /// `metadata.trace_context`; its parent can only be set before the span starts, which is
    /// why a layer of your own inside this one (whose `call` runs in the span) is too late.
    /// Not called for a span no subscriber is interested in.
    ///
    /// ```
    /// use cqrs_core::{CommandBus, middleware::TracingLayer};
    ///
    /// let tracing = TracingLayer::new().on_span(|span, metadata| {
    ///     if let Some(parent) = metadata.trace_context.get("traceparent") {
    ///         // With OpenTelemetry: `span.set_parent(...)` from it.
    ///         tracing::trace!(parent: span, %parent, "continues a distributed trace");
    ///     }
    /// });
    /// let bus = CommandBus::builder().layer(tracing).build().unwrap();
    /// ```
    pub fn on_span<F>(mut self, hook: F) -> Self
    where
        F: Fn(&tracing::Span, &Metadata) + Send + Sync + 'static,
    {
        self.on_span = Some(Arc::new(hook));
        self
    }
}

impl fmt::Debug for TracingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracingLayer")
            .field("on_span", &self.on_span.as_ref().map(|_| ".."))
            .finish()
    }
}

impl<S> Layer<S> for TracingLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            on_span: self.on_span.clone(),
        }
    }
}

/// The service made by [`TracingLayer`].
#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
    on_span: Option<SpanHook>,
}

impl<S: fmt::Debug> fmt::Debug for Trace<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("inner", &self.inner)
            .field("on_span", &self.on_span.as_ref().map(|_| ".."))
            .finish()
    }
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
        if let Some(hook) = &self.on_span {
            hook(&span, metadata);
        }
        // The inner layers' synchronous work in `call` belongs to this dispatch too.
        let inner = span.in_scope(|| self.inner.call(dispatch));
        Either::Right(inner.instrument(span))
    }
}
