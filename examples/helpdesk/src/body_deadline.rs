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

/// Gives every request body a deadline, `after` from when the handler first reads it: a body
/// still awaited then, whether it stopped arriving or trickles in a byte at a time, fails with
/// [`BodyDeadlineElapsed`], which [`ApiJson`](helpdesk_api::ApiJson) answers 408
/// `request_timeout`. tower-http's `RequestBodyTimeoutLayer` times only the gap between two
/// chunks: a client sending a byte just within each gap kept its body coming until the
/// request's budget ran out, and was answered 503 `timeout`, telling it to retry.
///
/// Counted from the first read, not from the request's arrival: hyper takes one chunk at a
/// time (and answers `Expect: 100-continue` only then), so a body the server starts reading
/// late, after a slow authentication say, still arrives while it is read, and its client is
/// not blamed for the server's delay.
///
/// Never later than `latest` from the request's arrival, though: the request's own time
/// budget runs from then, and a body still trickling in when it ends would get its 503.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyDeadlineLayer {
    after: Duration,
    latest: Duration,
}

impl BodyDeadlineLayer {
    /// Bodies must have arrived `after` from their first read, and `latest` from their
    /// request's arrival.
    pub(crate) fn new(after: Duration, latest: Duration) -> Self {
        Self { after, latest }
    }
}

impl<S> Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyDeadline {
            inner,
            after: self.after,
            latest: self.latest,
        }
    }
}

/// The service of [`BodyDeadlineLayer`].
#[derive(Clone, Debug)]
pub(crate) struct BodyDeadline<S> {
    inner: S,
    after: Duration,
    latest: Duration,
}

impl<S: Service<Request>> Service<Request> for BodyDeadline<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // Checked: a budget too long for the clock (a huge request timeout) is no deadline,
        // not a panic on every request.
        let now = Instant::now();
        let latest = now
            .checked_add(self.latest)
            .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600));
        let after = self.after;
        self.inner.call(request.map(|body| {
            if body.is_end_stream() {
                // Nothing to wait for: no timer.
                body
            } else {
                Body::new(DeadlineBody {
                    inner: body,
                    after,
                    latest,
                    deadline: None,
                })
            }
        }))
    }
}

/// A body that fails with [`BodyDeadlineElapsed`] when a read waits past its deadline, `after`
/// from its first read but no later than `latest`.
struct DeadlineBody {
    inner: Body,
    after: Duration,
    latest: Instant,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let (after, latest) = (self.after, self.latest);
        let deadline = self
            .deadline
            .get_or_insert_with(|| {
                // Capped by `latest`, unless that leaves the client less than half of `after`
                // (the server read late): the delay is then the server's, and the request's
                // own budget answers it (503), not a 408 blaming the client.
                let now = Instant::now();
                // Checked, as `latest` is: past the clock's end, `latest` is the later bound.
                let after_now = now.checked_add(after).unwrap_or(latest.max(now));
                let at = if latest.saturating_duration_since(now) >= after / 2 {
                    after_now.min(latest)
                } else {
                    after_now
                };
                Box::pin(tokio::time::sleep_until(at))
            })
            .as_mut();
        match deadline.poll(cx) {
            // Past the deadline, what has arrived is still read; only a wait fails.
            Poll::Ready(()) => match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(frame.map(|frame| frame.map_err(Into::into))),
                Poll::Pending => Poll::Ready(Some(Err(Box::new(BodyDeadlineElapsed)))),
            },
            Poll::Pending => match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(frame.map(|frame| frame.map_err(Into::into))),
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use tower::ServiceExt;

    /// 100 ms from the first read, at most 400 ms from arrival.
    const DEADLINES: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_millis(400));

    /// A body of `chunks` one-byte chunks, each after a wait of `gap` (none: a bare yield), as
    /// hyper's come: one at a time, read from the socket when the body is polled.
    fn body(chunks: usize, gap: Option<Duration>) -> Body {
        Body::from_stream(stream::unfold(0, move |n| async move {
            if n == chunks {
                return None;
            }
            match gap {
                Some(gap) => tokio::time::sleep(gap).await,
                None => tokio::task::yield_now().await,
            }
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), n + 1))
        }))
    }

    /// The body's length, read by a handler that first waits `before`, with a deadline of
    /// `after` from the first read and at most `latest` from the request's arrival.
    async fn read(
        body: Body,
        before: Duration,
        (after, latest): (Duration, Duration),
    ) -> Result<usize, axum::Error> {
        let service = tower::service_fn(move |request: Request| async move {
            tokio::time::sleep(before).await;
            axum::body::to_bytes(request.into_body(), 1024)
                .await
                .map(|bytes| bytes.len())
        });
        let request = Request::new(body);
        BodyDeadlineLayer::new(after, latest)
            .layer(service)
            .oneshot(request)
            .await
    }

    /// On a paused clock: on the real one, a loaded machine's stall between two chunks could
    /// outlast the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_body_read_late_but_sent_in_time_is_read_whole() {
        // First read after `after`, and after `latest` too.
        for before in [300, 500] {
            let read = read(body(3, None), Duration::from_millis(before), DEADLINES).await;
            assert_eq!(read.expect("the body is read"), 3, "read after {before} ms");
        }
    }

    /// Read late, and trickling: the deadline is the request's `latest`, not the first read
    /// plus `after`, which would fall after the request's own budget. On a paused clock, so
    /// that a loaded machine's late wake-ups do not count.
    #[tokio::test(start_paused = true)]
    async fn a_body_read_late_that_trickles_fails_within_the_request_budget() {
        let started = Instant::now();
        let error = read(
            body(40, Some(Duration::from_millis(40))),
            Duration::from_millis(300),
            (Duration::from_millis(600), Duration::from_millis(700)),
        )
        .await
        .expect_err("the body is past its deadline");
        assert!(error.to_string().contains("deadline"), "{error}");
        // Capped at 700 ms from arrival; from the first read it would be 900 ms.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_millis(740),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_body_that_trickles_past_the_deadline_fails() {
        let error = read(
            body(5, Some(Duration::from_millis(40))),
            Duration::ZERO,
            DEADLINES,
        )
        .await
        .expect_err("the body is past its deadline");
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        let mut found = false;
        while let Some(e) = next {
            found |= e.is::<BodyDeadlineElapsed>();
            next = e.source();
        }
        assert!(found, "{error}");
    }
}
