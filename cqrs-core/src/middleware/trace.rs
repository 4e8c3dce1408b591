//! A span per dispatch.

use crate::{BoxError, Dispatch, DispatchError, Metadata, Reply};
use futures_util::future::Either;
use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

/// Wraps each dispatch in an `INFO` span named `dispatch` with the fields `kind`, `message_name`
/// (the wire name), `message_id`, `correlation_id` and `causation_id`, and, once the dispatch
/// ended, `outcome` (`ok`, or the error's [`ErrorKind`](crate::ErrorKind): `forbidden`,
/// `timeout`, ...) and, for a failure, `error` (its message). A dispatch dropped before it ended
/// has no `outcome`. It logs no events of its own: whatever the handler and the inner layers log
/// falls inside the span, and a failure is the caller's to log (its `DispatchError` says what
/// failed); the span's `error` is the message as the caller gets it, causes that it keeps out of
/// its text included only as far as it shows them, so mind what your errors say. The ids are formatted only if a subscriber records the span, and a span
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
/// context the message carries with [`on_span`](Self::on_span), and hand the span's own
/// context on to what the handler records with [`inject`](Self::inject).
#[derive(Clone, Default)]
pub struct TracingLayer {
    /// One reference for both hooks: the layer stack is cloned on every dispatch.
    hooks: Option<Arc<Hooks>>,
}

/// What [`TracingLayer::on_span`] and [`TracingLayer::inject`] set.
#[derive(Clone, Default)]
struct Hooks {
    on_span: Option<SpanHook>,
    inject: Option<InjectHook>,
}

/// What [`TracingLayer::on_span`] calls.
type SpanHook = Arc<dyn Fn(&tracing::Span, &Metadata) + Send + Sync>;

/// What [`TracingLayer::inject`] calls.
type InjectHook = Arc<dyn Fn(&tracing::Span, &mut Metadata) + Send + Sync>;

impl TracingLayer {
    /// Sets a hook, keeping the other.
    fn with_hooks(mut self, set: impl FnOnce(&mut Hooks)) -> Self {
        let mut hooks = self.hooks.as_deref().cloned().unwrap_or_default();
        set(&mut hooks);
        self.hooks = Some(Arc::new(hooks));
        self
    }
}

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
    ///         cqrs_core::reexports::tracing::trace!(parent: span, %parent, "continues a distributed trace");
    ///     }
    /// });
    /// let bus = CommandBus::builder().layer(tracing).build().unwrap();
    /// ```
    pub fn on_span<F>(self, hook: F) -> Self
    where
        F: Fn(&tracing::Span, &Metadata) + Send + Sync + 'static,
    {
        self.with_hooks(|hooks| hooks.on_span = Some(Arc::new(hook)))
    }

    /// Calls `hook` with each dispatch's span and the message's metadata, to change, after
    /// [`on_span`](Self::on_span) and before the inner layers and the handler run: the place
    /// to write the span's own trace context into `metadata.trace_context`. The handler's
    /// context then carries it, and so do the events it records (and the commands it sends
    /// with [`Metadata::caused`]): their handlers, on this instance or another, continue this
    /// dispatch's span, also for a request that came with no trace context at all. With
    /// `tracing-opentelemetry`, that is `propagator.inject_context(&span.context(), &mut
    /// carrier)`, where the carrier writes `metadata.trace_context`. Not called for a span no
    /// subscriber is interested in.
    ///
    /// ```
    /// use cqrs_core::{CommandBus, middleware::TracingLayer};
    ///
    /// let tracing = TracingLayer::new().inject(|span, metadata| {
    ///     // With OpenTelemetry: the span's context as a W3C `traceparent`.
    ///     if let Some(id) = span.id() {
    ///         metadata.trace_context.insert("x-span-id".into(), id.into_u64().to_string());
    ///     }
    /// });
    /// let bus = CommandBus::builder().layer(tracing).build().unwrap();
    /// ```
    pub fn inject<F>(self, hook: F) -> Self
    where
        F: Fn(&tracing::Span, &mut Metadata) + Send + Sync + 'static,
    {
        self.with_hooks(|hooks| hooks.inject = Some(Arc::new(hook)))
    }
}

impl fmt::Debug for TracingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracingLayer")
            .field("hooks", &self.hooks)
            .finish()
    }
}

impl<S> Layer<S> for TracingLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            hooks: self.hooks.clone(),
        }
    }
}

/// The service made by [`TracingLayer`].
#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
    hooks: Option<Arc<Hooks>>,
}

impl<S: fmt::Debug> fmt::Debug for Trace<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("inner", &self.inner)
            .field("hooks", &self.hooks)
            .finish()
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("on_span", &self.on_span.as_ref().map(|_| ".."))
            .field("inject", &self.inject.as_ref().map(|_| ".."))
            .finish()
    }
}

impl<S> Service<Dispatch> for Trace<S>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: fmt::Display + 'static,
{
    type Response = Reply;
    type Error = S::Error;
    type Future = Either<S::Future, Traced<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut dispatch: Dispatch) -> Self::Future {
        let metadata = dispatch.metadata();
        let span = tracing::info_span!(
            "dispatch",
            kind = dispatch.kind().as_str(),
            message_name = dispatch.name(),
            message_id = %metadata.message_id,
            correlation_id = %metadata.correlation_id,
            causation_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        if span.is_disabled() {
            return Either::Left(self.inner.call(dispatch));
        }
        if let Some(causation) = metadata.causation_id {
            span.record("causation_id", tracing::field::display(causation));
        }
        if let Some(hooks) = &self.hooks {
            if let Some(on_span) = &hooks.on_span {
                on_span(&span, metadata);
            }
            if let Some(inject) = &hooks.inject {
                inject(&span, dispatch.metadata_mut());
            }
        }
        // The inner layers' synchronous work in `call` belongs to this dispatch too.
        let inner = span.in_scope(|| self.inner.call(dispatch));
        Either::Right(Traced {
            inner: inner.instrument(span),
        })
    }
}

pin_project_lite::pin_project! {
    /// A dispatch in its span, which it tells how the dispatch ended.
    pub struct Traced<F> {
        #[pin]
        inner: Instrumented<F>,
    }
}

impl<F> fmt::Debug for Traced<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Traced").finish_non_exhaustive()
    }
}

impl<F, E> Future for Traced<F>
where
    F: Future<Output = Result<Reply, E>>,
    E: fmt::Display + 'static,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.project().inner;
        let result = ready!(inner.as_mut().poll(cx));
        let span = inner.span();
        match &result {
            Ok(_) => {
                span.record("outcome", "ok");
            }
            Err(error) => {
                span.record("outcome", kind_of(error));
                span.record("error", tracing::field::display(error));
            }
        }
        Poll::Ready(result)
    }
}

/// The kind of a layer's error, as [`DispatchError::kind`] would say it once the bus has it:
/// the core's own and a boxed one (tower's layers') are told apart; any other is `internal`.
fn kind_of<E: 'static>(error: &E) -> &'static str {
    let error: &dyn Any = error;
    let kind = if let Some(own) = error.downcast_ref::<DispatchError>() {
        own.kind()
    } else if let Some(boxed) = error.downcast_ref::<BoxError>() {
        match boxed.downcast_ref::<DispatchError>() {
            Some(own) => own.kind(),
            None => crate::error::middleware_kind(boxed.as_ref()),
        }
    } else {
        crate::ErrorKind::Internal
    };
    kind.as_str()
}
