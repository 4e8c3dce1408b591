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

    async fn commit(&self, unit: InMemoryUnit) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut committed = self.committed();
        for consumer in &unit.reset {
            committed.processed.remove(consumer);
            committed.checkpoints.remove(consumer);
        }
        for (consumer, ids) in unit.processed {
            let inbox = committed.processed.entry(consumer).or_default();
            inbox.extend(ids.into_iter().map(|id| (id, now)));
        }
        committed.checkpoints.extend(unit.checkpoints);
        drop(committed);
        for effect in unit.effects {
            effect();
        }
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
