//! Every open connection of a hub: what shutdown closes, and the keepalive that pings them
//! and closes those whose credentials expired.

use crate::metrics::Metrics;
use crate::queue::SendQueue;
use crate::signal::{CloseSignal, Ending};
use chrono::{DateTime, Utc};
use cqrs_core::clock::Clock;
use cqrs_core::runtime::Shutdown;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Handle {
    close: Arc<CloseSignal>,
    queue: Arc<SendQueue>,
    /// When the principal's credentials expire (`Authenticator::expires_at`).
    expires_at: Option<DateTime<Utc>>,
    /// The principal's key (`Authenticator::connection_key`), for closing its connections.
    key: Option<String>,
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

    pub(crate) fn insert(
        &self,
        id: u64,
        close: Arc<CloseSignal>,
        queue: Arc<SendQueue>,
        expires_at: Option<DateTime<Utc>>,
        key: Option<String>,
    ) {
        self.lock().insert(
            id,
            Handle {
                close,
                queue,
                expires_at,
                key,
            },
        );
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

    /// Closes with `ending` every connection of the principal whose key is `key`; returns how
    /// many this call closed (not those already closing).
    pub(crate) fn close_keyed(&self, key: &str, ending: Ending) -> usize {
        self.lock()
            .values()
            .filter(|handle| handle.key.as_deref() == Some(key) && handle.close.close(ending))
            .count()
    }

    /// Closes with 1008 every connection whose credentials expired at or before `now`, and
    /// queues a WebSocket ping to every other one. A connection whose queue is full, or has
    /// one slot left, is not pinged: it has frames to write, and the next event (which the
    /// ping must not leave without room) decides whether it is too slow.
    /// Returns how many connections this call closed.
    pub(crate) fn tick(&self, now: DateTime<Utc>) -> u64 {
        let mut expired = 0;
        for handle in self.lock().values() {
            if handle.expires_at.is_some_and(|at| at <= now) {
                // Counted once: a closing connection stays listed until its task ends.
                if handle.close.close(Ending::EXPIRED) {
                    expired += 1;
                }
                continue;
            }
            handle.queue.try_push_ping();
        }
        expired
    }
}

/// Every `interval`, until the hub is gone or `stopped` is requested (it ends then, not at its
/// next tick): pings every connection of `connections` and closes those whose credentials
/// expired by `clock`.
pub(crate) async fn keepalive(
    connections: std::sync::Weak<Connections>,
    interval: Duration,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    stopped: Shutdown,
) {
    // An interval too long for the clock (near `Duration::MAX`) never comes round: no ticks.
    let Some(first) = tokio::time::Instant::now().checked_add(interval) else {
        return;
    };
    let mut tick = tokio::time::interval_at(first, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped.requested() => return,
        }
        let Some(connections) = connections.upgrade() else {
            return;
        };
        if stopped.is_requested() {
            return;
        }
        let expired = connections.tick(clock.now());
        if expired > 0 {
            // A recorder that panics must not end this task: every connection's pings and
            // expiry depend on it.
            let counted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                metrics.expired(expired);
            }));
            if counted.is_err() {
                tracing::error!("the metrics recorder panicked counting expired connections");
            }
            tracing::debug!(
                connections = expired,
                "closed connections whose credentials expired"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_core::clock::SystemClock;

    /// The keepalive ends when the hub stops, not at its next tick a ping interval later.
    #[tokio::test(start_paused = true)]
    async fn the_keepalive_ends_when_the_hub_stops() {
        let connections = Arc::new(Connections::default());
        let (trigger, stopped) = Shutdown::new();
        let task = tokio::spawn(keepalive(
            Arc::downgrade(&connections),
            Duration::from_secs(3600),
            Arc::new(SystemClock),
            Arc::new(Metrics::new()),
            stopped,
        ));
        tokio::task::yield_now().await;
        trigger.trigger();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the keepalive ended with the hub, before its next tick")
            .unwrap();
    }
}
