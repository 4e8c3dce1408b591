//! A time budget per dispatch.

use crate::{BoxError, Dispatch, DispatchError, MessageKind, Reply};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

/// Fails a dispatch that runs longer than its budget with [`DispatchError::Timeout`]; the
/// handler's future is dropped at its next `.await`.
///
/// The budget starts when the dispatch first waits (unlike tower's own `Timeout`, which starts
/// it at `call`): a handler that finishes without waiting never touches the timer, which keeps
/// the common, fast path free of clock reads, and work done before the first `.await` is not
/// counted. The runtime must have tokio's time driver (`enable_time`, or `enable_all`, as
/// `#[tokio::main]` has): without it, tokio panics in each dispatch that waits, and the bus
/// fails that dispatch with the panic (kind `internal`).
///
/// What the budget covers: the dispatch through the layers inside this one and the handler. Not covered: waiting for those layers to be ready
/// (`poll_ready`: a concurrency limit's queue, for instance; put such a layer outside this
/// one, or bound it itself), and a command's [`EventSink`](crate::EventSink), which runs
/// after the layers: a sink that is an [`EventBus`](crate::EventBus) takes a `TimeoutLayer` of
/// its own.
///
/// ```
/// use cqrs_core::{CommandBus, middleware::TimeoutLayer};
/// use std::time::Duration;
///
/// let bus = CommandBus::builder().layer(TimeoutLayer::new(Duration::from_secs(5))).build().unwrap();
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer {
    budget: Duration,
}

impl TimeoutLayer {
    /// A layer that allows each dispatch `budget`.
    pub fn new(budget: Duration) -> Self {
        Self { budget }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            budget: self.budget,
        }
    }
}

/// The service made by [`TimeoutLayer`].
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    budget: Duration,
}

impl<S> Service<Dispatch> for Timeout<S>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: Into<BoxError>,
{
    type Response = Reply;
    type Error = DispatchError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| DispatchError::from_layer(e.into()))
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let kind = dispatch.kind();
        let name = dispatch.name();
        TimeoutFuture {
            inner: self.inner.call(dispatch),
            sleep: None,
            kind,
            name,
            budget: self.budget,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`Timeout`] dispatch.
    #[derive(Debug)]
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        kind: MessageKind,
        name: &'static str,
        budget: Duration,
    }
}

impl<F, E> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<Reply, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Reply, DispatchError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(|e| DispatchError::from_layer(e.into())));
        }
        let budget = *this.budget;
        if !ran_out(this.sleep, budget, cx) {
            return Poll::Pending;
        }
        Poll::Ready(Err(DispatchError::Timeout {
            kind: *this.kind,
            name: this.name,
            after: budget,
        }))
    }
}

/// A future given `budget`, counted from its first wait, as [`TimeoutFuture`] does, for any
/// output (each event handler's, [`EventBusBuilder::handler_timeout`]): a future that finishes
/// without waiting never reads the clock. Past the budget it ends with `Err(budget)`, the inner
/// future dropped there inside a panic guard: one that panics when dropped unfinished (a guard
/// checking its work finished) still times out, instead of failing the handler as a panic. A
/// finished one is dropped inside a guard too.
///
/// [`EventBusBuilder::handler_timeout`]: crate::EventBusBuilder::handler_timeout
#[derive(Debug)]
pub(crate) struct Budgeted<F> {
    inner: Option<F>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    budget: Duration,
}

impl<F> Budgeted<F> {
    pub(crate) fn new(inner: F, budget: Duration) -> Self {
        Self {
            inner: Some(inner),
            sleep: None,
            budget,
        }
    }
}

impl<F: Future + Unpin> Future for Budgeted<F> {
    type Output = Result<F::Output, Duration>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let budget = this.budget;
        // Polled again after it ended (it ran out; or it finished, after which no caller may
        // poll it): out.
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(budget));
        };
        if let Poll::Ready(output) = Pin::new(inner).poll(cx) {
            // Dropped here, inside a panic guard, as an unbudgeted event handler's finished
            // future is: one that panics when dropped after its work is done does not fail
            // the handler (kept, it was dropped in the caller's poll, and read as a panic).
            crate::panic::drop_finished(this.inner.take());
            return Poll::Ready(Ok(output));
        }
        if ran_out(&mut this.sleep, budget, cx) {
            crate::panic::drop_cancelled(this.inner.take());
            Poll::Ready(Err(budget))
        } else {
            Poll::Pending
        }
    }
}

/// Whether `budget` has run out, its timer started in `sleep` at the first call (the future's
/// first wait).
#[inline]
fn ran_out(
    sleep: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    budget: Duration,
    cx: &mut Context<'_>,
) -> bool {
    sleep
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(budget)))
        .as_mut()
        .poll(cx)
        .is_ready()
}
