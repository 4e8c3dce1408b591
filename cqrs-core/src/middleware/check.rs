//! A check before every dispatch, written as one closure.

use crate::{BoxError, Dispatch, DispatchError, HandlerError, Reply};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// Runs `check` on every dispatch before the layers inside it and the handler see it, and
/// refuses the dispatch with the check's error: an authorization rule, a tenant or feature check, without
/// writing a tower `Service`. The caller gets the [`HandlerError`] as from a handler's refusal
/// ([`DispatchError::Handler`], its kind and code kept), and layers outside this one see it
/// like any outcome (traced, counted).
///
/// The layers inside are asked whether they are ready (tower's `poll_ready`) before the check
/// runs, as tower's contract has it: with a `ConcurrencyLimitLayer` on the bus, inside this
/// one or outside, a dispatch the check refuses waits for a slot first.
///
/// The check is synchronous and sees the [`Dispatch`]: its kind, name, metadata (the
/// principal a gateway put there) and extensions. A check that needs I/O (a permission lookup)
/// belongs in the handler, or in a layer of your own (see [the module docs](super)).
///
/// On an [`EventBus`](crate::EventBus) fed by a transport, mind that the principal is not
/// stored with events (it lives in the process that dispatched the command; events carry the
/// `actor` string): a check on the principal refuses every such event, and a consumer sends a
/// refused event to the dead letters once its deliveries are spent.
///
/// ```
/// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler};
/// use cqrs_core::middleware::{CheckLayer, TracingLayer};
/// use cqrs_core::{CommandBus, Dispatch, ErrorKind, HandlerError, Metadata, Principal};
///
/// /// The caller, as the gateway authenticated them.
/// struct Agent;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let bus = CommandBus::builder()
///     .layer(TracingLayer::new())
///     .layer(CheckLayer::new(|dispatch: &Dispatch| {
///         match dispatch.metadata().principal_as::<Agent>() {
///             Some(_) => Ok(()),
///             None => Err(HandlerError::forbidden(format!("`{}` is for agents", dispatch.name()))),
///         }
///     }))
///     .handler(OpenTicketHandler)
///     .build()?;
///
/// let refused = bus.dispatch(OpenTicket { title: "hi".into() }).await.unwrap_err();
/// assert_eq!(refused.kind(), ErrorKind::Forbidden);
///
/// let agent = Metadata::new().with_principal(Principal::new(Agent));
/// assert!(bus.dispatch_with(OpenTicket { title: "hi".into() }, agent).await.is_ok());
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct CheckLayer<F> {
    // Shared, so that the per-dispatch clone of the layer stack copies a reference count, not
    // whatever the closure captured (a set of allowed names, say).
    check: Arc<F>,
}

impl<F> Clone for CheckLayer<F> {
    fn clone(&self) -> Self {
        Self {
            check: self.check.clone(),
        }
    }
}

impl<F> CheckLayer<F>
where
    F: Fn(&Dispatch) -> Result<(), HandlerError>,
{
    /// A layer that runs `check` on every dispatch.
    pub fn new(check: F) -> Self {
        Self {
            check: Arc::new(check),
        }
    }
}

impl<F> fmt::Debug for CheckLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckLayer").finish_non_exhaustive()
    }
}

impl<S, F> Layer<S> for CheckLayer<F> {
    type Service = Check<S, F>;

    fn layer(&self, inner: S) -> Check<S, F> {
        Check {
            inner,
            check: self.check.clone(),
        }
    }
}

/// The service made by [`CheckLayer`].
pub struct Check<S, F> {
    inner: S,
    check: Arc<F>,
}

impl<S: Clone, F> Clone for Check<S, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            check: self.check.clone(),
        }
    }
}

impl<S: fmt::Debug, F> fmt::Debug for Check<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, F> Service<Dispatch> for Check<S, F>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: Into<BoxError>,
    F: Fn(&Dispatch) -> Result<(), HandlerError>,
{
    type Response = Reply;
    type Error = DispatchError;
    type Future = CheckFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| DispatchError::from_layer(e.into()))
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        // Refused without a call to the inner service: the handler never runs, and nothing
        // is allocated for the refusal beyond the error itself.
        match (self.check)(&dispatch) {
            Ok(()) => CheckFuture::passed(self.inner.call(dispatch)),
            Err(refused) => CheckFuture::refused(refused),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`Check`] dispatch.
    #[derive(Debug)]
    pub struct CheckFuture<F> {
        // The inner dispatch, when the check passed.
        #[pin]
        inner: Option<F>,
        // The check's refusal, until polled.
        refused: Option<HandlerError>,
    }
}

impl<F> CheckFuture<F> {
    /// The inner dispatch's future: the check passed.
    pub(crate) fn passed(inner: F) -> Self {
        Self {
            inner: Some(inner),
            refused: None,
        }
    }

    /// A refusal, answered when polled; the inner service was not called.
    pub(crate) fn refused(refused: HandlerError) -> Self {
        Self {
            inner: None,
            refused: Some(refused),
        }
    }
}

impl<F, E> Future for CheckFuture<F>
where
    F: Future<Output = Result<Reply, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Reply, DispatchError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(refused) = this.refused.take() {
            return Poll::Ready(Err(DispatchError::Handler(refused)));
        }
        match this.inner.as_pin_mut() {
            Some(inner) => inner
                .poll(cx)
                .map_err(|e| DispatchError::from_layer(e.into())),
            None => panic!("a refused dispatch polled after it completed"),
        }
    }
}
