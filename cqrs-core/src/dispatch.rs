//! The type-erased request and response that tower middleware sees, and the innermost service.

use crate::bus::{Registries, run_event_handlers};
use crate::{
    BoxError, CommandContext, DispatchError, EventEnvelope, Extensions, MessageKind, Metadata,
    QueryContext,
};
use futures_util::future::BoxFuture;
use std::any::{Any, TypeId};
use std::fmt;
use std::future::{Future, poll_fn};
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
    type_id: TypeId,
    extensions: Extensions,
    body: Body,
}

enum Body {
    Message {
        metadata: Metadata,
        payload: Box<dyn Any + Send>,
    },
    Event(EventEnvelope),
}

impl Dispatch {
    pub(crate) fn message(
        kind: MessageKind,
        name: &'static str,
        type_id: TypeId,
        metadata: Metadata,
        payload: Box<dyn Any + Send>,
    ) -> Self {
        Self {
            kind,
            name,
            type_id,
            extensions: Extensions::new(),
            body: Body::Message { metadata, payload },
        }
    }

    pub(crate) fn for_event(envelope: EventEnvelope) -> Self {
        Self {
            kind: MessageKind::Event,
            name: envelope.name(),
            type_id: envelope.payload_type_id(),
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
    pub(crate) output: Option<Box<dyn Any + Send>>,
    pub(crate) events: Vec<EventEnvelope>,
    pub(crate) extensions: Extensions,
    pub(crate) handlers: usize,
}

impl Reply {
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
    type Future = BoxFuture<'static, Result<Reply, DispatchError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let Dispatch {
            kind,
            name,
            type_id,
            extensions,
            body,
        } = dispatch;
        match body {
            Body::Message { metadata, payload } => match kind {
                MessageKind::Command => match self.registries.commands.get(&type_id) {
                    Some(handler) => handler.call_erased(
                        payload,
                        CommandContext::with_extensions(metadata, extensions),
                    ),
                    None => Box::pin(std::future::ready(Err(DispatchError::NoHandler {
                        kind,
                        name,
                    }))),
                },
                _ => match self.registries.queries.get(&type_id) {
                    Some(handler) => handler
                        .call_erased(payload, QueryContext::with_extensions(metadata, extensions)),
                    None => Box::pin(std::future::ready(Err(DispatchError::NoHandler {
                        kind,
                        name,
                    }))),
                },
            },
            Body::Event(envelope) => {
                let registries = self.registries.clone();
                Box::pin(async move {
                    let handlers = registries
                        .events
                        .get(&type_id)
                        .map_or(&[][..], Vec::as_slice);
                    let count = run_event_handlers(handlers, &envelope).await?;
                    Ok(Reply {
                        output: None,
                        events: Vec::new(),
                        extensions,
                        handlers: count,
                    })
                })
            }
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
        let mut service = self.0.clone();
        Box::pin(async move {
            poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(|e| DispatchError::from_layer(e.into()))?;
            service
                .call(dispatch)
                .await
                .map_err(|e| DispatchError::from_layer(e.into()))
        })
    }
}

/// Runs a handler future, turning a panic into [`DispatchError::Panicked`].
pub(crate) fn guarded<T, F>(kind: MessageKind, name: &'static str, fut: F) -> Guarded<F>
where
    F: Future<Output = Result<T, crate::HandlerError>>,
{
    Guarded {
        inner: fut,
        kind,
        name,
    }
}

pin_project_lite::pin_project! {
    pub(crate) struct Guarded<F> {
        #[pin]
        inner: F,
        kind: MessageKind,
        name: &'static str,
    }
}

impl<T, F> Future for Guarded<F>
where
    F: Future<Output = Result<T, crate::HandlerError>>,
{
    type Output = Result<T, DispatchError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(out))) => Poll::Ready(Ok(out)),
            Ok(Poll::Ready(Err(e))) => Poll::Ready(Err(DispatchError::Handler(e))),
            Err(payload) => Poll::Ready(Err(DispatchError::Panicked {
                kind: *this.kind,
                name: this.name,
                message: crate::panic::panic_message(payload.as_ref()),
            })),
        }
    }
}

pub(crate) type ErasedFuture = Pin<Box<dyn Future<Output = Result<Reply, DispatchError>> + Send>>;
