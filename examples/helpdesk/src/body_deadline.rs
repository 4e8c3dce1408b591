//! A deadline on receiving a request's whole body.

use axum::BoxError;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use helpdesk_api::BodyDeadlineElapsed;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// Gives every request body a deadline, `after` from when the request comes in: a body still
/// awaited then, whether it stopped arriving or trickles in a byte at a time, fails with
/// [`BodyDeadlineElapsed`], which [`ApiJson`](helpdesk_api::ApiJson) answers 408
/// `request_timeout`. tower-http's `RequestBodyTimeoutLayer` times only the gap between two
/// chunks: a client sending a byte just within each gap kept its body coming until the
/// request's budget ran out, and was answered 503 `timeout`, telling it to retry.
///
/// What arrived in time is read whenever the handler likes: only a read that has to wait for
/// the client past the deadline fails, so a server slow to read a body is not blamed on it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyDeadlineLayer {
    after: Duration,
}

impl BodyDeadlineLayer {
    /// Bodies must have arrived `after` from the start of their request.
    pub(crate) fn new(after: Duration) -> Self {
        Self { after }
    }
}

impl<S> Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyDeadline {
            inner,
            after: self.after,
        }
    }
}

/// The service of [`BodyDeadlineLayer`].
#[derive(Clone, Debug)]
pub(crate) struct BodyDeadline<S> {
    inner: S,
    after: Duration,
}

impl<S: Service<Request>> Service<Request> for BodyDeadline<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let deadline = Instant::now() + self.after;
        self.inner.call(request.map(|body| {
            if body.is_end_stream() {
                // Nothing to wait for: no timer.
                body
            } else {
                Body::new(DeadlineBody {
                    inner: body,
                    deadline: Box::pin(tokio::time::sleep_until(deadline)),
                })
            }
        }))
    }
}

/// A body that fails with [`BodyDeadlineElapsed`] when a read waits past its deadline.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|frame| frame.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyDeadlineElapsed)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
