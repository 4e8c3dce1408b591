//! How a connection ends, and the signal that tells both of its tasks.

use crate::close_code;
use futures_util::task::AtomicWaker;
use std::sync::OnceLock;
use std::task::{Context, Poll};

/// Why a connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The client closed it or went away: answer its close (if any) and drop the socket.
    Peer,
    /// The hub closes it with this code and reason.
    Close { code: u16, reason: &'static str },
}

impl Ending {
    pub(crate) const SLOW: Ending = Ending::Close {
        code: close_code::POLICY_VIOLATION,
        reason: "slow consumer: the send queue is full",
    };
    pub(crate) const EXPIRED: Ending = Ending::Close {
        code: close_code::POLICY_VIOLATION,
        reason: "credentials expired",
    };
    pub(crate) const REVOKED: Ending = Ending::Close {
        code: close_code::POLICY_VIOLATION,
        reason: "credentials revoked",
    };
    pub(crate) const SHUTDOWN: Ending = Ending::Close {
        code: close_code::GOING_AWAY,
        reason: "server shutting down",
    };
    pub(crate) const IDLE: Ending = Ending::Close {
        code: close_code::NORMAL,
        reason: "idle timeout",
    };
    pub(crate) const TOO_BIG: Ending = Ending::Close {
        code: close_code::MESSAGE_TOO_BIG,
        reason: "message too big",
    };
    pub(crate) const INVALID_UTF8: Ending = Ending::Close {
        code: close_code::INVALID_PAYLOAD,
        reason: "a text frame or a close reason is not valid UTF-8",
    };
    pub(crate) const INTERNAL: Ending = Ending::Close {
        code: close_code::INTERNAL_ERROR,
        reason: "internal error",
    };
    pub(crate) const PROTOCOL: Ending = Ending::Close {
        code: close_code::PROTOCOL_ERROR,
        reason: "WebSocket protocol error",
    };
}

/// Set once, by whoever first decides the connection ends (the reader, the writer, the
/// dispatcher that finds the queue full, the hub shutting down); both tasks wait on it.
///
/// One waker per task instead of a `Notify`: the writer polls this on every frame it writes,
/// and registering an atomic waker takes no lock.
#[derive(Debug, Default)]
pub(crate) struct CloseSignal {
    ending: OnceLock<Ending>,
    reader: AtomicWaker,
    writer: AtomicWaker,
}

impl CloseSignal {
    /// Ends the connection with `ending`, unless it is already ending. Returns whether this
    /// call decided it.
    pub(crate) fn close(&self, ending: Ending) -> bool {
        let decided = self.ending.set(ending).is_ok();
        if decided {
            self.reader.wake();
            self.writer.wake();
        }
        decided
    }

    /// The ending, once decided.
    pub(crate) fn get(&self) -> Option<Ending> {
        self.ending.get().copied()
    }

    fn poll(&self, waker: &AtomicWaker, cx: &mut Context<'_>) -> Poll<Ending> {
        if let Some(ending) = self.get() {
            return Poll::Ready(ending);
        }
        waker.register(cx.waker());
        // Checked again after registering, so a `close` in between is not missed.
        match self.get() {
            Some(ending) => Poll::Ready(ending),
            None => Poll::Pending,
        }
    }

    /// Completes once the ending is decided; for the reader's task only.
    pub(crate) async fn reader_closed(&self) -> Ending {
        std::future::poll_fn(|cx| self.poll(&self.reader, cx)).await
    }

    /// Completes once the ending is decided; for the writer's task only.
    pub(crate) async fn writer_closed(&self) -> Ending {
        std::future::poll_fn(|cx| self.poll(&self.writer, cx)).await
    }
}
