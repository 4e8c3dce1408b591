//! The future of a [`Metrics`](super::Metrics) dispatch.

use super::DispatchCounters;
use cqrs_core::Reply;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

pin_project_lite::pin_project! {
    /// Polls the inner dispatch and counts its outcome when it finishes. Not boxed: it is the
    /// inner future plus one reference count.
    #[derive(Debug)]
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        counters: Arc<DispatchCounters>,
    }
}

impl<F> MetricsFuture<F> {
    pub(super) fn new(inner: F, counters: Arc<DispatchCounters>) -> Self {
        Self { inner, counters }
    }
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Reply, E>>,
{
    type Output = Result<Reply, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let counter = match &result {
            Ok(_) => &this.counters.succeeded,
            Err(_) => &this.counters.failed,
        };
        DispatchCounters::add(counter);
        Poll::Ready(result)
    }
}
