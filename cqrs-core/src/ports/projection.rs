//! Ports for consumers with exactly-once effects: the inbox, checkpoints, and the transaction
//! that holds them together with a projection's own writes.

use super::StoreError;
use crate::Position;
use async_trait::async_trait;
use std::time::Duration;
use uuid::Uuid;

/// Storage for projections and other consumers: a unit of work that holds the consumer's own
/// effects together with its inbox entries (message ids it has processed) and its checkpoint
/// (a position: the store keeps the last one saved, lower or not; what to save is the
/// consumer's choice, and a `ProjectionRunner` saves the last position it applied, or, fed
/// from a transport out of global order, the highest), so a redelivered event takes effect
/// once.
///
/// The contract (checked by [`testing::projection_store`](crate::testing::projection_store)):
///
/// * Nothing written through a unit of work is visible until `commit`, and dropping an
///   uncommitted unit of work discards it.
/// * `mark_processed(consumer, id)` returns `true` the first time for a pair, `false` after that
///   pair was committed, and `false` for a pair marked earlier in the same unit (a batch may
///   hold one event twice: delivery is at least once).
/// * The `consumer` of the other methods is the one the unit was begun for: the consumer
///   whose lock it holds.
/// * `checkpoint` returns the consumer's checkpoint as the unit sees it: its own
///   `save_checkpoint` or `reset`, else the last committed one.
/// * `committed_checkpoint(consumer)` returns the last committed checkpoint, outside any
///   unit and without waiting for the consumer's lock: an open unit's saves and resets do not
///   show until it commits.
/// * `begin(consumer)` holds the consumer's lock until the unit ends: two units of one
///   consumer never overlap (a rebuild pauses the live projection this way).
/// * `reset(consumer)` removes its inbox entries and checkpoint, in the unit: its later calls
///   see them gone (a rebuild resets, then marks every event processed, in one unit).
/// * `purge_inbox(consumer, older_than)` deletes the consumer's committed inbox entries
///   processed more than `older_than` ago, and no other consumer's.
#[async_trait]
pub trait ProjectionStore: Send + Sync + 'static {
    /// The unit of work. Adapters expose their transaction through it (a Postgres projection
    /// writes its read model in the same transaction).
    type Unit: Send;

    /// Starts a unit of work for `consumer`, holding its lock.
    async fn begin(&self, consumer: &str) -> Result<Self::Unit, StoreError>;

    /// Records that `consumer` processed message `id`. `true` if it had not before: not in a
    /// committed unit, nor earlier in this one.
    async fn mark_processed(
        &self,
        unit: &mut Self::Unit,
        consumer: &str,
        id: Uuid,
    ) -> Result<bool, StoreError>;

    /// The consumer's checkpoint as this unit sees it: what the unit saved or reset, else the
    /// last committed one.
    async fn checkpoint(
        &self,
        unit: &mut Self::Unit,
        consumer: &str,
    ) -> Result<Option<Position>, StoreError>;

    /// The consumer's last committed checkpoint, read outside any unit of work, without
    /// waiting for its lock (a runner holds it while it applies): how far a projection has
    /// taken effect, for a reader waiting to see its own write
    /// ([`ProjectionWatch`](crate::projection::ProjectionWatch)). `None` when it has none
    /// (never run, or reset and committed without a new one).
    async fn committed_checkpoint(&self, consumer: &str) -> Result<Option<Position>, StoreError>;

    /// Sets the consumer's checkpoint.
    async fn save_checkpoint(
        &self,
        unit: &mut Self::Unit,
        consumer: &str,
        position: Position,
    ) -> Result<(), StoreError>;

    /// Forgets the consumer's inbox and checkpoint (before a rebuild).
    async fn reset(&self, unit: &mut Self::Unit, consumer: &str) -> Result<(), StoreError>;

    /// Makes the unit's writes durable and visible, and releases the lock.
    async fn commit(&self, unit: Self::Unit) -> Result<(), StoreError>;

    /// Deletes `consumer`'s inbox entries processed more than `older_than` ago (by the store's
    /// clock) and returns how many. The inbox keeps one entry per event a consumer processed,
    /// so without this it grows with the event log; after it, an event older than that is no
    /// longer recognised as a duplicate. [`ProjectionRunner`](crate::projection::ProjectionRunner)
    /// calls it periodically. Runs outside any unit of work.
    async fn purge_inbox(&self, consumer: &str, older_than: Duration) -> Result<u64, StoreError>;
}
