//! Every open connection of a hub: what shutdown closes, and the keepalive that pings them
//! and closes those whose credentials expired.

use crate::metrics::Metrics;
use crate::queue::SendQueue;
use crate::signal::{CloseSignal, Ending};
use chrono::{DateTime, Utc};
use cqrs_core::clock::Clock;
use cqrs_core::runtime::Shutdown;
use std::collections::{HashMap, VecDeque};
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

/// The most revocations remembered for handshakes in flight; past it the oldest are
/// forgotten (and a handshake that began before them is asked to try again).
const MOST_REMEMBERED: usize = 100_000;

/// The open connections, by id, and the revocations of the last moments. Touched when a
/// connection opens or closes, at a revocation, at shutdown, and once per ping interval;
/// never per event.
pub(crate) struct Connections {
    // A std mutex: nothing awaits while it is held.
    state: Mutex<State>,
    /// How long a revocation is remembered: longer than a handshake's credentials check may
    /// take.
    remember_for: Duration,
}

#[derive(Default)]
struct State {
    open: HashMap<u64, Handle>,
    /// Revocations made so far; a handshake notes it before its credentials are checked.
    revocations: u64,
    /// The recent ones: their number, when, and the key.
    recent: VecDeque<(u64, tokio::time::Instant, String)>,
    /// The number of each key's latest revocation among the recent ones: a handshake's
    /// check is one lookup, however many revocations were made since it began.
    latest: HashMap<String, u64>,
    /// The number of the last revocation forgotten.
    forgotten_up_to: u64,
}

/// Why a connection was not listed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotListed {
    /// Its principal was revoked after the handshake noted [`Connections::revocations`].
    Revoked,
    /// Revocations made since that note were forgotten: the handshake took too long to tell.
    Unknown,
}

impl Connections {
    /// Remembering each revocation `remember_for`.
    pub(crate) fn new(remember_for: Duration) -> Self {
        Self {
            state: Mutex::default(),
            remember_for,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many revocations were made so far: noted by a handshake before it checks the
    /// credentials, and handed back to [`insert`](Self::insert).
    pub(crate) fn revocations(&self) -> u64 {
        self.lock().revocations
    }

    /// Lists a connection, unless its principal (`key`) was revoked after the handshake noted
    /// `revocations_before` (its credentials were checked before the revocation was made, and
    /// it would otherwise be admitted after the revocation closed the others).
    pub(crate) fn insert(
        &self,
        id: u64,
        close: Arc<CloseSignal>,
        queue: Arc<SendQueue>,
        expires_at: Option<DateTime<Utc>>,
        key: Option<String>,
        revocations_before: u64,
    ) -> Result<(), NotListed> {
        let mut state = self.lock();
        if let Some(key) = &key
            && state.revocations > revocations_before
        {
            if state.forgotten_up_to > revocations_before {
                return Err(NotListed::Unknown);
            }
            if state
                .latest
                .get(key)
                .is_some_and(|latest| *latest > revocations_before)
            {
                return Err(NotListed::Revoked);
            }
        }
        state.open.insert(
            id,
            Handle {
                close,
                queue,
                expires_at,
                key,
            },
        );
        Ok(())
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().open.remove(&id);
    }

    /// Closes every connection with `ending`.
    pub(crate) fn close_all(&self, ending: Ending) {
        for handle in self.lock().open.values() {
            handle.close.close(ending);
        }
    }

    /// Closes with `ending` every connection of the principal whose key is `key`; returns how
    /// many this call closed (not those already closing). Remembers the revocation for the
    /// handshakes whose credentials are being checked now.
    pub(crate) fn close_keyed(&self, key: &str, ending: Ending) -> usize {
        let now = tokio::time::Instant::now();
        let mut state = self.lock();
        state.revocations += 1;
        let number = state.revocations;
        state.recent.push_back((number, now, key.to_owned()));
        state.latest.insert(key.to_owned(), number);
        let remember_for = self.remember_for;
        while let Some((_, at, _)) = state.recent.front() {
            let stale = now.saturating_duration_since(*at) > remember_for;
            if !(stale || state.recent.len() > MOST_REMEMBERED) {
                break;
            }
            let Some((number, _, key)) = state.recent.pop_front() else {
                break;
            };
            state.forgotten_up_to = number;
            // Unless the key was revoked again since, which is remembered.
            if state.latest.get(&key) == Some(&number) {
                state.latest.remove(&key);
            }
        }
        state
            .open
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
        for handle in self.lock().open.values() {
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

    fn listed(
        connections: &Connections,
        id: u64,
        key: &str,
        revocations_before: u64,
    ) -> Result<(), NotListed> {
        connections.insert(
            id,
            Arc::default(),
            Arc::new(SendQueue::new(4)),
            None,
            Some(key.to_owned()),
            revocations_before,
        )
    }

    /// A listing is refused for a key revoked after its handshake noted the revocations, and
    /// only for that key; noted after, it is listed. A revocation forgotten (past the time a
    /// check may take) leaves a handshake that noted before it unable to tell: `Unknown`.
    #[tokio::test(start_paused = true)]
    async fn a_key_revoked_after_the_note_is_not_listed() {
        let connections = Connections::new(Duration::from_secs(1));
        let before = connections.revocations();
        assert_eq!(connections.close_keyed("a", Ending::REVOKED), 0);
        assert_eq!(
            listed(&connections, 1, "a", before),
            Err(NotListed::Revoked)
        );
        assert_eq!(listed(&connections, 2, "b", before), Ok(()));
        let after = connections.revocations();
        assert_eq!(listed(&connections, 3, "a", after), Ok(()));
        assert_eq!(
            connections.close_keyed("a", Ending::REVOKED),
            1,
            "the one listed"
        );

        let noted = connections.revocations();
        connections.close_keyed("c", Ending::REVOKED);
        tokio::time::advance(Duration::from_secs(2)).await;
        // The next revocation forgets the one older than a second.
        connections.close_keyed("d", Ending::REVOKED);
        assert_eq!(listed(&connections, 4, "e", noted), Err(NotListed::Unknown));
        let now = connections.revocations();
        assert_eq!(listed(&connections, 5, "c", now), Ok(()));

        // A key revoked again is remembered by its latest revocation when the first is
        // forgotten; a handshake noted right after the last forgotten one can still tell.
        let connections = Connections::new(Duration::from_secs(1));
        connections.close_keyed("a", Ending::REVOKED);
        let between = connections.revocations();
        tokio::time::advance(Duration::from_secs(2)).await;
        connections.close_keyed("a", Ending::REVOKED);
        assert_eq!(
            listed(&connections, 6, "a", between),
            Err(NotListed::Revoked)
        );
        assert_eq!(listed(&connections, 7, "b", between), Ok(()));
        assert_eq!(listed(&connections, 8, "a", 0), Err(NotListed::Unknown));
        tokio::time::advance(Duration::from_secs(2)).await;
        let last = connections.revocations();
        connections.close_keyed("c", Ending::REVOKED);
        assert_eq!(
            listed(&connections, 9, "a", last),
            Ok(()),
            "its revocation is forgotten, and made before this note"
        );
    }

    /// The keepalive ends when the hub stops, not at its next tick a ping interval later.
    #[tokio::test(start_paused = true)]
    async fn the_keepalive_ends_when_the_hub_stops() {
        let connections = Arc::new(Connections::new(Duration::from_secs(20)));
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
