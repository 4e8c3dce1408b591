//! The in-memory projection store: inbox and checkpoints.

use crate::Position;
use crate::clock::{Clock, SystemClock};
use crate::ports::{ProjectionStore, StoreError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

#[derive(Default)]
struct Committed {
    /// Per consumer, each processed message id and when its unit committed.
    processed: HashMap<String, HashMap<Uuid, DateTime<Utc>>>,
    checkpoints: HashMap<String, Position>,
}

/// Inbox entries and checkpoints in process memory.
///
/// A unit of work holds the consumer's lock and stages its writes; `commit` applies them at
/// once, with the effects the projection staged through [`InMemoryUnit::on_commit`].
#[derive(Clone)]
pub struct InMemoryProjectionStore {
    committed: Arc<Mutex<Committed>>,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    clock: Arc<dyn Clock>,
}

impl Default for InMemoryProjectionStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InMemoryProjectionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryProjectionStore")
            .finish_non_exhaustive()
    }
}

impl InMemoryProjectionStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// An empty store on the given clock, which dates inbox entries for
    /// [`purge_inbox`](ProjectionStore::purge_inbox) (tests use a
    /// [`ManualClock`](crate::clock::ManualClock)).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            committed: Arc::default(),
            locks: Arc::default(),
            clock,
        }
    }

    fn committed(&self) -> std::sync::MutexGuard<'_, Committed> {
        // A std mutex: nothing awaits while it is held.
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Effect = Box<dyn FnOnce() + Send>;

/// A unit of work of the [`InMemoryProjectionStore`].
///
/// Memory has no rollback, so a projection stages its effects with
/// [`on_commit`](InMemoryUnit::on_commit): they run when the unit commits, together with its
/// inbox entries and checkpoint, and are dropped with an uncommitted unit.
///
/// The effects run first, in the order staged, and the inbox entries and checkpoint are
/// committed only after the last one returned. If one panics, the panic propagates out of
/// `commit` and the unit's inbox entries, checkpoint and reset are not committed: its events
/// are processed again, as after a rolled-back Postgres transaction, instead of being marked
/// processed with their read-model change lost. (The effects staged before the panicking one
/// have run and stay: memory cannot undo them.) A `ProjectionRunner` fed by a transport
/// catches a panic in `commit` and takes the batch's events one per unit, to find the one
/// whose effect panics: that one is handed back as an attempt (and dead-lettered after its
/// deliveries), and each of the others takes effect once more in that step (a step cut short,
/// by an outage or a restart, may run them again when the batch comes back). A lone event
/// whose unit panics once is handed back without an attempt (the store's passing fault, for
/// all the runner can tell); from its next such panic on, each counts. One fed by the event
/// store commits the batch's events one per unit too, up to the one whose effect panics,
/// which fails the step: each earlier one takes effect once more at most, and the failing
/// one's own effects staged before the one that panics run again at every retry.
pub struct InMemoryUnit {
    _lock: tokio::sync::OwnedMutexGuard<()>,
    reset: HashSet<String>,
    processed: HashMap<String, HashSet<Uuid>>,
    checkpoints: HashMap<String, Position>,
    effects: Vec<Effect>,
}

impl InMemoryUnit {
    /// Runs `effect` when this unit commits, in the order staged; never if it does not.
    pub fn on_commit(&mut self, effect: impl FnOnce() + Send + 'static) {
        self.effects.push(Box::new(effect));
    }
}

impl std::fmt::Debug for InMemoryUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryUnit").finish_non_exhaustive()
    }
}

#[async_trait]
impl ProjectionStore for InMemoryProjectionStore {
    type Unit = InMemoryUnit;

    async fn begin(&self, consumer: &str) -> Result<InMemoryUnit, StoreError> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(consumer.to_owned()).or_default().clone()
        };
        Ok(InMemoryUnit {
            _lock: lock.lock_owned().await,
            reset: HashSet::new(),
            processed: HashMap::new(),
            checkpoints: HashMap::new(),
            effects: Vec::new(),
        })
    }

    async fn mark_processed(
        &self,
        unit: &mut InMemoryUnit,
        consumer: &str,
        id: Uuid,
    ) -> Result<bool, StoreError> {
        let seen_before = !unit.reset.contains(consumer)
            && self
                .committed()
                .processed
                .get(consumer)
                .is_some_and(|s| s.contains_key(&id));
        if seen_before {
            return Ok(false);
        }
        Ok(unit
            .processed
            .entry(consumer.to_owned())
            .or_default()
            .insert(id))
    }

    async fn checkpoint(
        &self,
        unit: &mut InMemoryUnit,
        consumer: &str,
    ) -> Result<Option<Position>, StoreError> {
        if let Some(p) = unit.checkpoints.get(consumer) {
            return Ok(Some(*p));
        }
        if unit.reset.contains(consumer) {
            return Ok(None);
        }
        Ok(self.committed().checkpoints.get(consumer).copied())
    }

    async fn committed_checkpoint(&self, consumer: &str) -> Result<Option<Position>, StoreError> {
        Ok(self.committed().checkpoints.get(consumer).copied())
    }

    async fn save_checkpoint(
        &self,
        unit: &mut InMemoryUnit,
        consumer: &str,
        position: Position,
    ) -> Result<(), StoreError> {
        unit.checkpoints.insert(consumer.to_owned(), position);
        Ok(())
    }

    async fn reset(&self, unit: &mut InMemoryUnit, consumer: &str) -> Result<(), StoreError> {
        unit.reset.insert(consumer.to_owned());
        unit.processed.remove(consumer);
        unit.checkpoints.remove(consumer);
        Ok(())
    }

    /// Runs the staged effects first, then makes the inbox entries and checkpoints visible,
    /// all while the unit still holds the consumer's lock. An effect that panics stops the
    /// commit there: the panic reaches the caller and nothing of the unit is committed (see
    /// [`InMemoryUnit`]).
    async fn commit(&self, unit: InMemoryUnit) -> Result<(), StoreError> {
        let InMemoryUnit {
            _lock,
            reset,
            processed,
            checkpoints,
            effects,
        } = unit;
        // Not under `committed`: an effect may read this store.
        for effect in effects {
            effect();
        }
        let now = self.clock.now();
        let mut committed = self.committed();
        for consumer in &reset {
            committed.processed.remove(consumer);
            committed.checkpoints.remove(consumer);
        }
        for (consumer, ids) in processed {
            let inbox = committed.processed.entry(consumer).or_default();
            inbox.extend(ids.into_iter().map(|id| (id, now)));
        }
        committed.checkpoints.extend(checkpoints);
        Ok(())
    }

    async fn purge_inbox(&self, consumer: &str, older_than: Duration) -> Result<u64, StoreError> {
        // An age past what the clock can go back to purges nothing.
        let Some(cutoff) = chrono::Duration::from_std(older_than)
            .ok()
            .and_then(|age| self.clock.now().checked_sub_signed(age))
        else {
            return Ok(0);
        };
        let mut committed = self.committed();
        let Some(inbox) = committed.processed.get_mut(consumer) else {
            return Ok(0);
        };
        let before = inbox.len();
        inbox.retain(|_, processed_at| *processed_at >= cutoff);
        let purged = before - inbox.len();
        if inbox.is_empty() {
            committed.processed.remove(consumer);
        }
        Ok(purged as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A staged effect that panics fails the commit like a rolled-back transaction: the
    /// panic reaches the caller, and neither the inbox entry nor the checkpoint is committed,
    /// so the event is processed again (as on Postgres) instead of being marked processed
    /// with its read-model change lost.
    #[tokio::test]
    async fn a_panicking_effect_commits_neither_the_inbox_nor_the_checkpoint() {
        let store = InMemoryProjectionStore::new();
        let id = Uuid::now_v7();
        let mut unit = store.begin("c").await.unwrap();
        assert!(store.mark_processed(&mut unit, "c", id).await.unwrap());
        store
            .save_checkpoint(&mut unit, "c", Position::new(5))
            .await
            .unwrap();
        unit.on_commit(|| panic!("the read model refused the change"));
        let committed = crate::panic::CatchUnwind::new(async { store.commit(unit).await }).await;
        match committed {
            Err(message) => assert_eq!(message, "the read model refused the change"),
            Ok(result) => panic!("the panic did not reach the caller: {result:?}"),
        }

        // The consumer's lock was released with the unit.
        let mut unit = tokio::time::timeout(Duration::from_secs(5), store.begin("c"))
            .await
            .expect("the consumer's lock is free")
            .unwrap();
        assert_eq!(store.checkpoint(&mut unit, "c").await.unwrap(), None);
        assert!(
            store.mark_processed(&mut unit, "c", id).await.unwrap(),
            "the event was marked processed though its effect never took place"
        );
        let applied = Arc::new(AtomicUsize::new(0));
        unit.on_commit({
            let applied = applied.clone();
            move || {
                applied.fetch_add(1, Ordering::SeqCst);
            }
        });
        store.commit(unit).await.unwrap();
        assert_eq!(applied.load(Ordering::SeqCst), 1);
        let mut unit = store.begin("c").await.unwrap();
        assert!(!store.mark_processed(&mut unit, "c", id).await.unwrap());
    }
}
