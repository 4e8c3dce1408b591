//! A connection's bounded send queue.
//!
//! A `VecDeque` behind a mutex that only the dispatcher (push), the replay (push) and the
//! connection's writer (pop) take, each for a few instructions. Not a tokio `mpsc`: that
//! allocates a block of 32 slots per channel up front, which is 1.4 KiB of the ~9 KiB an idle
//! connection cost with it (measured with the `ws_fanout` harness, at the same latency), and it
//! cannot express the replay's "wait until half the queue is free".

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

/// What a connection's writer takes from its queue.
pub(crate) enum Outgoing {
    /// A text frame.
    Frame(Utf8Bytes),
    /// A WebSocket ping (the hub's keepalive).
    Ping,
}

/// Capacity kept when the queue empties; a burst's larger buffer is given back.
const KEEP: usize = 8;

pub(crate) struct SendQueue {
    // A std mutex: nothing awaits while it is held.
    items: Mutex<VecDeque<Outgoing>>,
    capacity: usize,
    /// The writer, waiting for items.
    writer: AtomicWaker,
    /// The replay, waiting for room.
    room: AtomicWaker,
    /// Items taken so far (wrapping): whether the client makes progress.
    popped: AtomicU32,
}

impl SendQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            writer: AtomicWaker::new(),
            room: AtomicWaker::new(),
            popped: AtomicU32::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Outgoing>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues `item`, or hands it back when the queue is full.
    pub(crate) fn try_push(&self, item: Outgoing) -> Result<(), Outgoing> {
        {
            let mut items = self.lock();
            if items.len() >= self.capacity {
                return Err(item);
            }
            items.push_back(item);
        }
        self.writer.wake();
        Ok(())
    }

    /// Queues `item` if a slot stays free after it (a queue of one: if it is empty), or hands
    /// it back: for the replay, which must not be what leaves no room for the next live event
    /// (that would close a client that reads as slow). Checked under the lock, so a live push
    /// between a wait for room and this push cannot make it take the last slot.
    pub(crate) fn try_push_keeping_a_slot(&self, item: Outgoing) -> Result<(), Outgoing> {
        {
            let mut items = self.lock();
            let keep = usize::from(self.capacity > 1);
            if items.len() + 1 + keep > self.capacity {
                return Err(item);
            }
            items.push_back(item);
        }
        self.writer.wake();
        Ok(())
    }

    /// Queues a keepalive ping into an empty queue, or one that keeps a free slot after it: a
    /// ping must not be what leaves no room for the next event (which would close the client
    /// as slow one frame early), but an idle connection is pinged whatever the capacity.
    /// Returns whether it was queued.
    pub(crate) fn try_push_ping(&self) -> bool {
        {
            let mut items = self.lock();
            if !items.is_empty() && items.len() + 1 >= self.capacity {
                return false;
            }
            items.push_back(Outgoing::Ping);
        }
        self.writer.wake();
        true
    }

    /// The next item, for the writer.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Outgoing> {
        if let Some(item) = self.try_pop() {
            return Poll::Ready(item);
        }
        self.writer.register(cx.waker());
        // Checked again after registering, so a push in between is not missed.
        match self.try_pop() {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        }
    }

    pub(crate) async fn pop(&self) -> Outgoing {
        std::future::poll_fn(|cx| self.poll_pop(cx)).await
    }

    /// The next item, if there is one.
    pub(crate) fn try_pop(&self) -> Option<Outgoing> {
        let item = {
            let mut items = self.lock();
            let item = items.pop_front();
            if items.is_empty() && items.capacity() > KEEP {
                items.shrink_to(KEEP);
            }
            item
        };
        if item.is_some() {
            self.popped.fetch_add(1, Ordering::Relaxed);
            self.room.wake();
        }
        item
    }

    /// Items queued now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// How many items were taken so far (wrapping): a count that moved means the client
    /// took something in between.
    pub(crate) fn popped(&self) -> u32 {
        self.popped.load(Ordering::Relaxed)
    }

    /// Waits for room for the answer to a client's frame: two free slots, so the answer leaves
    /// one for the next event. A client that took nothing for `idle` is slow: `false`. One
    /// that kept reading while live events kept the queue one short of two free slots is not:
    /// its answer may then take the last slot (waiting up to `idle` again for it).
    pub(crate) async fn room_for_an_answer(&self, idle: std::time::Duration) -> bool {
        let taken = self.popped();
        if tokio::time::timeout(idle, self.room_for(2)).await.is_ok() {
            return true;
        }
        self.popped() != taken && tokio::time::timeout(idle, self.room_for(1)).await.is_ok()
    }

    /// Completes once at least `free` slots are free (at most the capacity).
    pub(crate) async fn room_for(&self, free: usize) {
        let free = free.min(self.capacity);
        std::future::poll_fn(|cx| {
            if self.capacity - self.lock().len() >= free {
                return Poll::Ready(());
            }
            self.room.register(cx.waker());
            if self.capacity - self.lock().len() >= free {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::{Outgoing, SendQueue};

    /// A ping never takes the last free slot: the event after it still fits.
    #[test]
    fn a_ping_leaves_room_for_the_next_event() {
        let queue = SendQueue::new(3);
        assert!(queue.try_push_ping(), "room for a ping and an event");
        assert!(queue.try_push(Outgoing::Frame("a".into())).is_ok());
        assert!(!queue.try_push_ping(), "a ping would take the last slot");
        assert!(queue.try_push(Outgoing::Frame("b".into())).is_ok());
        assert!(queue.try_push(Outgoing::Frame("c".into())).is_err());
    }

    /// A client that keeps reading while live events keep its queue one short of two free
    /// slots gets room for its answer (the last slot) after `idle`; one that reads nothing is
    /// slow.
    #[tokio::test(start_paused = true)]
    async fn a_reading_client_gets_room_for_an_answer_and_one_reading_nothing_does_not() {
        use std::sync::Arc;
        use std::time::Duration;
        let idle = Duration::from_millis(100);

        let queue = Arc::new(SendQueue::new(2));
        queue.try_push(Outgoing::Frame("e0".into())).ok().unwrap();
        // The writer takes a frame every 10 ms and the next event takes its place at once.
        let busy = tokio::spawn({
            let queue = queue.clone();
            async move {
                for n in 1.. {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    // No await between the two: the wait never sees the queue empty.
                    assert!(queue.try_pop().is_some());
                    queue
                        .try_push(Outgoing::Frame(format!("e{n}").into()))
                        .ok()
                        .unwrap();
                }
            }
        });
        assert!(queue.room_for_an_answer(idle).await, "it kept reading");
        busy.abort();

        let stuck = SendQueue::new(2);
        stuck.try_push(Outgoing::Frame("e0".into())).ok().unwrap();
        assert!(
            !stuck.room_for_an_answer(idle).await,
            "it took nothing for the idle timeout"
        );
    }

    /// An idle connection is pinged whatever its capacity, one of a single slot too (else it
    /// would be closed at every idle timeout).
    #[test]
    fn an_empty_queue_takes_a_ping_whatever_its_capacity() {
        let queue = SendQueue::new(1);
        assert!(queue.try_push_ping());
        assert!(!queue.try_push_ping(), "full");
    }
}
