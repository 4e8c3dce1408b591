//! The type-erased request and response that tower middleware sees, and the innermost service.

use crate::bus::{Registries, run_event_handlers};
use crate::{BoxError, DispatchError, EventEnvelope, Extensions, MessageKind, Metadata};
use futures_util::future::BoxFuture;
use std::any::Any;
use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// One message on its way through a bus's middleware: what a [`tower::Layer`] added with
/// `CommandBus::builder().layer(..)` (or the query or event bus) receives.
///
/// Layers read the kind, name and metadata, may change the metadata and extensions, and may
/// refuse the dispatch by returning an error (a [`HandlerError`](crate::HandlerError) keeps its
/// kind). The payload stays opaque.
pub struct Dispatch {
    kind: MessageKind,
    name: &'static str,
    extensions: Extensions,
    body: Body,
}

enum Body {
    Message {
        metadata: Metadata,
        call: Pin<Box<dyn Call>>,
    },
    Event(EventEnvelope),
}

/// The names of the handlers an event dispatch is for
/// ([`EventBus::publish_to`](crate::EventBus::publish_to)), in its extensions: kept out of
/// [`Dispatch`] itself, whose size every layered command and query moves.
pub(crate) struct OnlyHandlers(pub(crate) Arc<[Arc<str>]>);

impl Dispatch {
    pub(crate) fn message(
        kind: MessageKind,
        name: &'static str,
        metadata: Metadata,
        call: Pin<Box<dyn Call>>,
    ) -> Self {
        Self {
            kind,
            name,
            extensions: Extensions::new(),
            body: Body::Message { metadata, call },
        }
    }

    pub(crate) fn for_event(envelope: EventEnvelope) -> Self {
        Self {
            kind: MessageKind::Event,
            name: envelope.name(),
            extensions: Extensions::new(),
            body: Body::Event(envelope),
        }
    }

    /// Which bus this dispatch is on.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// The message's wire name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The message's metadata.
    pub fn metadata(&self) -> &Metadata {
        match &self.body {
            Body::Message { metadata, .. } => metadata,
            Body::Event(envelope) => &envelope.metadata,
        }
    }

    /// The message's metadata, mutably (a layer may set the principal or trace fields).
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match &mut self.body {
            Body::Message { metadata, .. } => metadata,
            Body::Event(envelope) => &mut envelope.metadata,
        }
    }

    /// Values for the handler's context (commands and queries).
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// Values for the handler's context, mutably.
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// The event, when this is an event dispatch.
    pub fn event(&self) -> Option<&EventEnvelope> {
        match &self.body {
            Body::Event(envelope) => Some(envelope),
            Body::Message { .. } => None,
        }
    }
}

impl fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatch")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("metadata", self.metadata())
            .finish_non_exhaustive()
    }
}

/// What a dispatch produced: the handler's output (commands and queries), the events a command
/// recorded, and the number of event handlers that ran.
pub struct Reply {
    /// The finished call, which holds the handler's output (commands and queries).
    pub(crate) call: Option<Pin<Box<dyn Call>>>,
    pub(crate) events: Vec<EventEnvelope>,
    pub(crate) extensions: Extensions,
    pub(crate) handlers: usize,
}

impl Reply {
    /// Moves the handler's output out, when it is an `O`.
    pub(crate) fn take_output<O: Send + 'static>(&mut self) -> Option<O> {
        let mut slot: Option<O> = None;
        if let Some(call) = self.call.as_mut() {
            call.as_mut().take_output(&mut slot);
        }
        slot
    }

    /// The events the command recorded. A layer that stores them (an outbox) may take them.
    pub fn events(&self) -> &[EventEnvelope] {
        &self.events
    }

    /// Takes the recorded events out, so they are not handed to the bus's event sink.
    pub fn take_events(&mut self) -> Vec<EventEnvelope> {
        std::mem::take(&mut self.events)
    }

    /// The context's extensions after the handler ran (a layer gets its transaction back here).
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// For an event dispatch, how many handlers ran.
    pub fn handlers(&self) -> usize {
        self.handlers
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("events", &self.events.len())
            .field("handlers", &self.handlers)
            .finish_non_exhaustive()
    }
}

/// The innermost service of every bus: finds the handler and runs it. Layers wrap this.
#[derive(Clone)]
pub struct Dispatcher {
    registries: Arc<Registries>,
}

impl Dispatcher {
    pub(crate) fn new(registries: Arc<Registries>) -> Self {
        Self { registries }
    }
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dispatcher")
    }
}

impl Service<Dispatch> for Dispatcher {
    type Response = Reply;
    type Error = DispatchError;
    type Future = DispatcherFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let Dispatch {
            extensions, body, ..
        } = dispatch;
        match body {
            Body::Message { metadata, mut call } => {
                call.as_mut().start(&self.registries, metadata, extensions);
                DispatcherFuture(Running::Message(Some(call)))
            }
            Body::Event(envelope) => publish(self.registries.clone(), envelope, extensions),
        }
    }
}

/// The event branch of [`Dispatcher::call`].
fn publish(
    registries: Arc<Registries>,
    envelope: EventEnvelope,
    extensions: Extensions,
) -> DispatcherFuture {
    DispatcherFuture(Running::Event(Box::pin(async move {
        let handlers = registries.event_handlers(&envelope);
        let only = extensions.get::<OnlyHandlers>().map(|o| &*o.0);
        let count =
            run_event_handlers(handlers, only, &envelope, registries.event_handler_timeout).await?;
        Ok(Reply {
            call: None,
            events: Vec::new(),
            extensions,
            handlers: count,
        })
    })))
}

/// The future of the innermost service, [`Dispatcher`]: the handler's run.
pub struct DispatcherFuture(Running);

enum Running {
    /// A command or query: the boxed call, handed back in the [`Reply`] once done.
    Message(Option<Pin<Box<dyn Call>>>),
    Event(BoxFuture<'static, Result<Reply, DispatchError>>),
}

impl fmt::Debug for DispatcherFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DispatcherFuture")
    }
}

impl Future for DispatcherFuture {
    type Output = Result<Reply, DispatchError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Running::Message(slot) => {
                let Some(call) = slot.as_mut() else {
                    return Poll::Ready(Err(DispatchError::Middleware(
                        "a dispatch was polled after it completed".into(),
                    )));
                };
                match call.as_mut().poll_run(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok((events, extensions))) => Poll::Ready(Ok(Reply {
                        call: slot.take(),
                        events,
                        extensions,
                        handlers: 1,
                    })),
                    Poll::Ready(Err(e)) => {
                        *slot = None;
                        Poll::Ready(Err(e))
                    }
                }
            }
            Running::Event(run) => run.as_mut().poll(cx),
        }
    }
}

/// One command or query on its way through the layers, type-erased: the message until the
/// [`Dispatcher`] starts it with the context the layers prepared, then the handler's run, then
/// the output. One box holds all three, so a layered dispatch allocates it instead of a boxed
/// payload, a boxed dispatcher future and a boxed output.
pub(crate) trait Call: Send {
    /// Looks the handler up and starts it (or records why it cannot run).
    fn start(
        self: Pin<&mut Self>,
        registries: &Registries,
        metadata: Metadata,
        extensions: Extensions,
    );

    /// Runs the handler: its recorded events and the context's extensions once done; the
    /// output stays inside for [`Call::take_output`].
    fn poll_run(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(Vec<EventEnvelope>, Extensions), DispatchError>>;

    /// Moves the output into `slot` when `slot` is an `Option` of the output type.
    fn take_output(self: Pin<&mut Self>, slot: &mut dyn Any);
}

/// What a started call produces: the output, the recorded events, the extensions.
pub(crate) type CallResult<O> = Result<(O, Vec<EventEnvelope>, Extensions), DispatchError>;

pin_project_lite::pin_project! {
    #[project = TypedCallProj]
    enum TypedCall<O, Mk, F> {
        Waiting { make: Option<Mk> },
        Running { #[pin] run: F },
        Done { output: Option<O> },
        Failed { error: Option<DispatchError> },
    }
}

/// Boxes a call: `make` finds the handler in the registries and returns its run.
pub(crate) fn typed_call<O, Mk, F>(make: Mk) -> Pin<Box<dyn Call>>
where
    O: Send + 'static,
    Mk: FnOnce(&Registries, Metadata, Extensions) -> Result<F, DispatchError> + Send + 'static,
    F: Future<Output = CallResult<O>> + Send + 'static,
{
    Box::pin(TypedCall::<O, Mk, F>::Waiting { make: Some(make) })
}

impl<O, Mk, F> Call for TypedCall<O, Mk, F>
where
    O: Send + 'static,
    Mk: FnOnce(&Registries, Metadata, Extensions) -> Result<F, DispatchError> + Send,
    F: Future<Output = CallResult<O>> + Send,
{
    fn start(
        mut self: Pin<&mut Self>,
        registries: &Registries,
        metadata: Metadata,
        extensions: Extensions,
    ) {
        let make = match self.as_mut().project() {
            TypedCallProj::Waiting { make } => make.take(),
            _ => None,
        };
        let Some(make) = make else { return };
        match make(registries, metadata, extensions) {
            Ok(run) => self.set(TypedCall::Running { run }),
            Err(error) => self.set(TypedCall::Failed { error: Some(error) }),
        }
    }

    fn poll_run(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(Vec<EventEnvelope>, Extensions), DispatchError>> {
        let result = match self.as_mut().project() {
            TypedCallProj::Running { run } => match run.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => result,
            },
            TypedCallProj::Failed { error } => Err(error.take().unwrap_or_else(|| {
                DispatchError::Middleware("a dispatch was polled after it completed".into())
            })),
            TypedCallProj::Waiting { .. } | TypedCallProj::Done { .. } => {
                Err(DispatchError::Middleware(
                    "a dispatch was polled before it started or after it completed".into(),
                ))
            }
        };
        Poll::Ready(match result {
            Ok((output, events, extensions)) => {
                self.set(TypedCall::Done {
                    output: Some(output),
                });
                Ok((events, extensions))
            }
            Err(e) => {
                self.set(TypedCall::Done { output: None });
                Err(e)
            }
        })
    }

    fn take_output(self: Pin<&mut Self>, slot: &mut dyn Any) {
        if let (TypedCallProj::Done { output }, Some(slot)) =
            (self.project(), slot.downcast_mut::<Option<O>>())
        {
            *slot = output.take();
        }
    }
}

/// A layered service behind a trait object, called through `&self`: each call clones the
/// concrete service stack by value (reference counts, no allocation) and boxes its future.
pub(crate) trait ErasedService: Send + Sync {
    fn call(&self, dispatch: Dispatch) -> BoxFuture<'static, Result<Reply, DispatchError>>;
}

pub(crate) struct Layered<S>(pub(crate) S);

impl<S> ErasedService for Layered<S>
where
    S: Service<Dispatch, Response = Reply> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    fn call(&self, dispatch: Dispatch) -> BoxFuture<'static, Result<Reply, DispatchError>> {
        let (kind, name) = (dispatch.kind(), dispatch.name());
        let failed = |payload: Box<dyn Any + Send>| -> BoxFuture<'static, _> {
            Box::pin(std::future::ready(Err(layer_panicked(kind, name, payload))))
        };
        // A layer is code like a handler: one that panics fails this dispatch, not the caller
        // (a server's connection task). Its synchronous clone, `poll_ready`, `call` and the
        // clone's drop are guarded here, its future by `LayerGuard`.
        let mut service = match catch_unwind(AssertUnwindSafe(|| self.0.clone())) {
            Ok(service) => service,
            Err(payload) => return failed(payload),
        };
        //
        // Most stacks are ready at once: then only the stack's future is boxed, not the
        // service and the dispatch beside it. A stack that is not ready (a concurrency limit)
        // is asked again with the caller's waker below, so no wake-up is lost.
        let mut noop = Context::from_waker(std::task::Waker::noop());
        let ready = match catch_unwind(AssertUnwindSafe(|| service.poll_ready(&mut noop))) {
            Ok(ready) => ready,
            Err(payload) => {
                // Dropped inside a guard too: a second panic must not reach the caller.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(service)));
                return failed(payload);
            }
        };
        match ready {
            Poll::Ready(Ok(())) => {
                // The clone moves in, so it is dropped inside the guard.
                let called = catch_unwind(AssertUnwindSafe(move || {
                    let mut service = service;
                    service.call(dispatch)
                }));
                match called {
                    Ok(future) => Box::pin(LayerGuard {
                        inner: Some(future),
                        kind,
                        name,
                    }),
                    Err(payload) => failed(payload),
                }
            }
            Poll::Ready(Err(e)) => {
                let error = DispatchError::from_layer(e.into());
                if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(service))) {
                    return failed(payload);
                }
                Box::pin(std::future::ready(Err(error)))
            }
            Poll::Pending => Box::pin(LayerGuard {
                inner: Some(async move {
                    poll_fn(|cx| service.poll_ready(cx)).await?;
                    service.call(dispatch).await
                }),
                kind,
                name,
            }),
        }
    }
}

/// A layer panicked: this dispatch fails as [`DispatchError::Middleware`] (kind `internal`).
fn layer_panicked(
    kind: MessageKind,
    name: &'static str,
    payload: Box<dyn Any + Send>,
) -> DispatchError {
    DispatchError::Middleware(
        format!(
            "a layer of the {kind} bus panicked while dispatching `{name}`: {}",
            crate::panic::into_message(payload)
        )
        .into(),
    )
}

pin_project_lite::pin_project! {
    /// A layer stack's future, polled inside `catch_unwind`, its error made a [`DispatchError`].
    /// The future is also dropped inside `catch_unwind` (with this guard: once it returned or
    /// panicked, or when the dispatch is dropped before, a timeout, a caller gone), so a layer
    /// holding a guard that panics on drop fails nothing but its own dispatch.
    struct LayerGuard<F> {
        #[pin]
        inner: Option<F>,
        kind: MessageKind,
        name: &'static str,
    }

    impl<F> PinnedDrop for LayerGuard<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            drop_layer_future(this.inner, *this.kind, this.name);
        }
    }
}

/// Drops a layer stack's future in place, keeping a panic in its drop here (logged).
fn drop_layer_future<F>(mut inner: Pin<&mut Option<F>>, kind: MessageKind, name: &'static str) {
    if inner.is_none() {
        return;
    }
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| inner.set(None))) {
        tracing::error!(
            %kind,
            message_name = name,
            panic = %crate::panic::into_message(payload),
            "a layer's future panicked when it was dropped; the panic stops here"
        );
    }
}

impl<F, E> Future for LayerGuard<F>
where
    F: Future<Output = Result<Reply, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Reply, DispatchError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            // Only `drop` empties it.
            return Poll::Pending;
        };
        // After a panic the future is never polled again (and dropped in the guard with this
        // one): asserting unwind safety is sound (as for handlers).
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => {
                Poll::Ready(result.map_err(|e| DispatchError::from_layer(e.into())))
            }
            Err(payload) => Poll::Ready(Err(layer_panicked(*this.kind, this.name, payload))),
        }
    }
}

/// Calls `start` (a handler's `handle`, which builds its future) so that a panic in it, before
/// there is a future, becomes a panic of the future: [`guarded`] then reports it like any
/// other. `#[async_trait]` handlers never panic here; hand-written ones may.
#[inline(always)]
pub(crate) fn started<'a, T: 'a>(
    start: impl FnOnce() -> futures_util::future::BoxFuture<'a, T>,
) -> futures_util::future::BoxFuture<'a, T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)) {
        Ok(future) => future,
        Err(payload) => Box::pin(async move { std::panic::resume_unwind(payload) }),
    }
}

/// Runs a handler future, turning a panic into [`DispatchError::Panicked`]; a panic while the
/// future is dropped (a handler's guard that checks, on drop, that its work finished, when the
/// dispatch times out or its caller gives up) is logged and goes no further.
pub(crate) fn guarded<T, F>(kind: MessageKind, name: &'static str, fut: F) -> Guarded<F>
where
    F: Future<Output = Result<T, crate::HandlerError>> + Unpin,
{
    Guarded {
        inner: Some(fut),
        kind,
        name,
    }
}

/// [`guarded`], and the finished future dropped inside the guard too: for an event's handlers,
/// which run side by side (`join_all`), so a panic in one's drop must not unwind through the
/// others and cancel them. A command or query dispatch has no such neighbours, and keeps the
/// faster plain drop.
pub(crate) fn guarded_to_the_end<T, F>(
    kind: MessageKind,
    name: &'static str,
    fut: F,
) -> Guarded<F, true>
where
    F: Future<Output = Result<T, crate::HandlerError>> + Unpin,
{
    Guarded {
        inner: Some(fut),
        kind,
        name,
    }
}

/// The handler's future is boxed (`async_trait`), so it is `Unpin` and held in an `Option`:
/// dropped inside a panic guard when it panicked or when the dispatch is dropped before it
/// returned, and once it returned plainly, or inside the guard too with `DROP_GUARDED`.
pub(crate) struct Guarded<F: Unpin, const DROP_GUARDED: bool = false> {
    inner: Option<F>,
    kind: MessageKind,
    name: &'static str,
}

impl<F: Unpin, const DROP_GUARDED: bool> Guarded<F, DROP_GUARDED> {
    /// Drops the handler's future, keeping a panic in its drop here.
    #[inline(always)]
    fn release(&mut self) {
        if let Some(inner) = self.inner.take()
            && let Err(payload) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(inner)))
        {
            tracing::error!(
                kind = %self.kind,
                message_name = self.name,
                panic = %crate::panic::into_message(payload),
                "a handler's future panicked when it was dropped; the panic stops here"
            );
        }
    }
}

impl<F: Unpin, const DROP_GUARDED: bool> Drop for Guarded<F, DROP_GUARDED> {
    // As `poll`: `catch_unwind`'s landing pad keeps a plain `#[inline]` from being taken, and
    // on the fast path (the future already released) this is one check.
    #[inline(always)]
    fn drop(&mut self) {
        self.release();
    }
}

impl<T, F, const DROP_GUARDED: bool> Future for Guarded<F, DROP_GUARDED>
where
    F: Future<Output = Result<T, crate::HandlerError>> + Unpin,
{
    type Output = Result<T, DispatchError>;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            panic!("a dispatch polled after it completed");
        };
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Pin::new(inner).poll(cx)));
        let output = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(out))) => Ok(out),
            Ok(Poll::Ready(Err(e))) => Err(DispatchError::Handler(e)),
            Err(payload) => {
                // A future that panicked may still hold what it had (a hand-written one keeps
                // its fields): dropped inside the guard.
                this.release();
                return Poll::Ready(Err(DispatchError::Panicked {
                    kind: this.kind,
                    name: this.name,
                    message: crate::panic::into_message(payload),
                }));
            }
        };
        // Returned: an `async` future (every `#[async_trait]` handler's) drops what it holds
        // before it returns, so dropping it now does not panic, and the fast path keeps no
        // guard (`release`), which cost a bare dispatch ~25 ns. A hand-written future that
        // keeps a guard past returning is covered only with `DROP_GUARDED` (event handlers).
        if DROP_GUARDED {
            this.release();
        } else {
            this.inner = None;
        }
        Poll::Ready(output)
    }
}
