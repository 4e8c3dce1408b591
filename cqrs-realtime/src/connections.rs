//! Every open connection of a hub: what shutdown closes and the keepalive pings.

use crate::queue::{Outgoing, SendQueue};
use crate::signal::{CloseSignal, Ending};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Handle {
    close: Arc<CloseSignal>,
    queue: Arc<SendQueue>,
}

/// The open connections, by id. Touched when a connection opens or closes, at shutdown, and
/// once per ping interval; never per event.
#[derive(Default)]
pub(crate) struct Connections {
    // A std mutex: nothing awaits while it is held.
    open: Mutex<HashMap<u64, Handle>>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Handle>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, id: u64, close: Arc<CloseSignal>, queue: Arc<SendQueue>) {
        self.lock().insert(id, Handle { close, queue });
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes every connection with `ending`.
    pub(crate) fn close_all(&self, ending: Ending) {
        for handle in self.lock().values() {
            handle.close.close(ending);
        }
    }

    /// Queues a WebSocket ping to every connection. A connection whose queue is full is
    /// skipped: it has frames to write, and the next event decides whether it is too slow.
    pub(crate) fn ping_all(&self) {
        for handle in self.lock().values() {
            let _ = handle.queue.try_push(Outgoing::Ping);
        }
    }
}

/// Pings every connection of `connections` every `interval`, until the hub is gone or
/// `stopped` says so.
pub(crate) async fn keepalive(
    connections: std::sync::Weak<Connections>,
    interval: Duration,
    stopped: impl Fn() -> bool,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(connections) = connections.upgrade() else {
            return;
        };
        if stopped() {
            return;
        }
        connections.ping_all();
    }
}
