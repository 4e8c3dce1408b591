//! A connection whose writes stop making progress is given up on.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

/// A TCP stream whose writes fail with `TimedOut` once they have made no progress for
/// `limit`. The header timeout covers a client that does not send; this covers one that
/// sends (pipelined requests, say) and never reads the answers: once its socket's buffers
/// are full, hyper waits to write with no timer running, and the connection, its buffers
/// and its task would be held for as long as the client likes (and a shutdown would wait
/// out its grace period for it).
///
/// It also holds the connection's place under the server's connection limit, for as long as
/// the socket lives: a WebSocket keeps this stream after its upgrade, when hyper's connection
/// task has ended, so a place held by that task would come free while the socket stays open.
pub(crate) struct StalledWrites {
    inner: TcpStream,
    limit: Duration,
    /// Running while a write waits.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Counted once, however often the stream is polled after giving up.
    counted: bool,
    _slot: OwnedSemaphorePermit,
    /// The connection's place in its client address's share, if it is counted: held, like
    /// the slot, by the socket, through an upgrade too.
    _held: Option<crate::server::AddressHeld>,
}

impl StalledWrites {
    pub(crate) fn new(
        inner: TcpStream,
        limit: Duration,
        slot: OwnedSemaphorePermit,
        held: Option<crate::server::AddressHeld>,
    ) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
            counted: false,
            _slot: slot,
            _held: held,
        }
    }

    /// `Pending` stays pending until `limit` has passed since the first of a run of them.
    fn check<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if !std::mem::replace(&mut self.counted, true) {
                    metrics::counter!("http_connections_stalled_total").increment(1);
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took nothing of what was written to it",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for StalledWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for StalledWrites {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(polled, cx)
    }
}
