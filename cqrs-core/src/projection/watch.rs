//! Waiting for a projection to take effect up to a write: read-your-writes.

use crate::Position;
use crate::ports::{ProjectionStore, StoreError};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The longest wait between two reads of the checkpoint, unless
/// [`poll_interval`](ProjectionWatch::poll_interval) says otherwise.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The first wait between two reads; each next one doubles, up to the poll interval.
const FIRST_POLL_DELAY: Duration = Duration::from_millis(2);

/// Waits until a projection fed from the event store has taken effect up to a position, so
/// a client that reads its read model right after a change sees that change
/// (read-your-writes), where it would otherwise meet the model a few milliseconds behind.
///
/// It reads the projection's committed checkpoint
/// ([`ProjectionStore::committed_checkpoint`]), which its runner saves in the unit of work
/// that applies the events: once the checkpoint is at or past a position, every event up to
/// it has been through the runner, committed: applied to the model, or passed over (a type
/// the projection does not take; one [`skip_after`](super::ProjectionRunner::skip_after) gave
/// up on, which it logs at `error` and counts in `cqrs_projection_skipped_total`). Any
/// instance can wait, not only the one whose runner is active, and the wait takes no lock.
/// Reads come quickly at first (2 ms apart, doubling) then every
/// [`poll_interval`](Self::poll_interval) (50 ms by default). A rebuild runs in one unit of
/// work: until it commits, the watch sees the checkpoint (and readers the model) from before.
///
/// Where the position comes from: the records a write stored carry theirs
/// ([`Committed::position`](crate::Committed::position) after
/// [`AggregateRepository::execute`](crate::AggregateRepository::execute)).
///
/// Only for a runner fed from the event store
/// ([`ProjectionRunner::from_store`](super::ProjectionRunner::from_store)), which applies
/// events in position order. One fed from a transport saves the highest position it applied,
/// out of order: its checkpoint past a position does not mean that event took effect.
///
/// ```
/// use cqrs_core::Position;
/// use cqrs_core::memory::InMemoryProjectionStore;
/// use cqrs_core::ports::ProjectionStore;
/// use cqrs_core::projection::{ProjectionWatch, WatchError};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = Arc::new(InMemoryProjectionStore::new());
/// let watch = ProjectionWatch::new(store.clone(), "open-tickets");
///
/// // What the runner commits once it applied the events up to position 7.
/// let mut unit = store.begin("open-tickets").await.unwrap();
/// store.save_checkpoint(&mut unit, "open-tickets", Position::new(7)).await.unwrap();
/// store.commit(unit).await.unwrap();
///
/// watch.wait_for(Position::new(7), Duration::from_secs(2)).await.unwrap();
/// // Position 8 is not applied: the wait gives up, saying where the projection stands.
/// let err = watch.wait_for(Position::new(8), Duration::from_millis(20)).await.unwrap_err();
/// assert!(matches!(err, WatchError::TimedOut { reached: Some(p), .. } if p == Position::new(7)));
/// # });
/// ```
pub struct ProjectionWatch<S> {
    store: Arc<S>,
    projection: Arc<str>,
    poll_interval: Duration,
}

impl<S> Clone for ProjectionWatch<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            projection: self.projection.clone(),
            poll_interval: self.poll_interval,
        }
    }
}

impl<S> fmt::Debug for ProjectionWatch<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionWatch")
            .field("projection", &self.projection)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

/// [`ProjectionWatch::wait_for`] gave up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The projection had not reached the position when the time was up: its runner is
    /// behind, stopped, stuck at an event, or not running anywhere (or the store was away
    /// all along: `last_error`).
    #[error(
        "projection `{projection}` had not taken effect up to position {wanted} after {within:?} \
         (it stands at {}): check that its runner is running and not stuck at an event \
         (cqrs_projection_lag_seconds){}",
        reached.map_or_else(|| "none".to_owned(), |p| p.to_string()),
        last_error.as_ref().map_or_else(String::new, |e| format!("; its store last answered: {e}"))
    )]
    TimedOut {
        /// The projection's name.
        projection: String,
        /// The position waited for.
        wanted: Position,
        /// Its committed checkpoint at the last read that answered.
        reached: Option<Position>,
        /// How long it waited.
        within: Duration,
        /// The error of the last read, when it failed (retryable: the wait went on), or got no
        /// answer in time (a [`StoreError::Timeout`]).
        last_error: Option<StoreError>,
    },
    /// The store refused to read the checkpoint for good (a missing table, a permission).
    #[error("could not read the checkpoint of projection `{projection}`: {source}")]
    Store {
        /// The projection's name.
        projection: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}

impl<S: ProjectionStore> ProjectionWatch<S> {
    /// A watch on the projection named `projection` (its [`Projection::name`](super::Projection::name),
    /// under which its runner keeps its checkpoint) in `store`.
    /// [`ProjectionRunner::watch`](super::ProjectionRunner::watch) makes one from a runner.
    pub fn new(store: Arc<S>, projection: impl Into<String>) -> Self {
        Self {
            store,
            projection: Arc::from(projection.into()),
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// The longest wait between two reads of the checkpoint. Default 50 ms; held within 1 ms
    /// and a minute. Shorter answers sooner and costs the store more reads.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.clamp(Duration::from_millis(1), Duration::from_secs(60));
        self
    }

    /// The projection's name.
    pub fn projection(&self) -> &str {
        &self.projection
    }

    /// Where the projection stands now: its committed checkpoint, `None` before it applied
    /// anything.
    pub async fn checkpoint(&self) -> Result<Option<Position>, StoreError> {
        self.store.committed_checkpoint(&self.projection).await
    }

    /// Whether the projection has taken effect up to `position`, now.
    pub async fn reached(&self, position: Position) -> Result<bool, StoreError> {
        Ok(self.checkpoint().await?.is_some_and(|at| at >= position))
    }

    /// Waits until the projection has taken effect up to `position`: `Ok` as soon as a read
    /// shows it, [`WatchError::TimedOut`] after `within` (and a last read, given up to one
    /// [`poll_interval`](Self::poll_interval) to answer). A read the store failed in passing
    /// ([`ErrorKind::is_retryable`](crate::ErrorKind::is_retryable)) is tried again within
    /// the time; one it refused for good ends the wait with [`WatchError::Store`].
    pub async fn wait_for(&self, position: Position, within: Duration) -> Result<(), WatchError> {
        let start = tokio::time::Instant::now();
        // A `within` too long to add (`Duration::MAX`, meaning no limit) waits a year.
        let deadline = start
            .checked_add(within)
            .unwrap_or_else(|| start + Duration::from_secs(365 * 24 * 3600));
        let mut delay = FIRST_POLL_DELAY.min(self.poll_interval);
        let mut reached = None;
        loop {
            // A read that does not answer in time counts as one that failed in passing.
            let bound = deadline.max(tokio::time::Instant::now() + self.poll_interval);
            let last_error = match tokio::time::timeout_at(bound, self.checkpoint()).await {
                Ok(Ok(at)) => {
                    if at.is_some_and(|at| at >= position) {
                        return Ok(());
                    }
                    reached = at;
                    None
                }
                Ok(Err(error)) if error.kind().is_retryable() => Some(error),
                Ok(Err(error)) => {
                    return Err(WatchError::Store {
                        projection: self.projection.to_string(),
                        source: error,
                    });
                }
                Err(_) => Some(StoreError::Timeout {
                    backend: "projection store",
                    source: "the checkpoint read got no answer in time".into(),
                }),
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(WatchError::TimedOut {
                    projection: self.projection.to_string(),
                    wanted: position,
                    reached,
                    within,
                    last_error,
                });
            }
            tokio::time::sleep_until((now + delay).min(deadline)).await;
            delay = (delay * 2).min(self.poll_interval);
        }
    }
}
