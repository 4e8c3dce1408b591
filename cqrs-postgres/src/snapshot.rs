//! The snapshot store.

use crate::PgDatabase;
use crate::error::store_error;
use crate::row::{to_i64, to_u64};
use async_trait::async_trait;
use cqrs_core::ports::{Snapshot, SnapshotStore, StoreError};
use sqlx::{AssertSqlSafe, Row};

/// Aggregate snapshots in Postgres: one row per stream, replaced by a newer version, or by an
/// older one when the stream's events back the older one and not the stored one.
///
/// A snapshot is backed when the stream has an event at its version (the event it names, if
/// it names one). After events were restored from a backup older than the snapshots, a stored
/// snapshot can be ahead of the stream or of another history: no load can use it, so the next
/// save of a snapshot the stream backs replaces it instead of being ignored (else every load
/// would replay the whole stream until a save got past it). A stale save never replaces a
/// backed snapshot with an older one, bar a race with a newer save whose append committed
/// while the stale save ran (it then stores a backed, older snapshot: a load replays a longer
/// tail until the next save).
///
/// Pass it to [`AggregateRepository::with_snapshots`](cqrs_core::AggregateRepository::with_snapshots)
/// so loading a long stream reads only its tail.
///
/// ```no_run
/// use cqrs_core::ports::{Snapshot, SnapshotStore};
///
/// # async fn run(db: cqrs_postgres::PgDatabase) -> Result<(), cqrs_core::ports::StoreError> {
/// let snapshots = db.snapshot_store();
/// snapshots.save("ticket-t1", Snapshot::new(100, serde_json::json!({ "open": true }))).await?;
/// // An older snapshot does not replace a newer one.
/// snapshots.save("ticket-t1", Snapshot::new(50, serde_json::json!({ "open": false }))).await?;
/// assert_eq!(snapshots.load("ticket-t1").await?.map(|s| s.version), Some(100));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PgSnapshotStore {
    db: PgDatabase,
}

impl PgSnapshotStore {
    /// The snapshot store of `db`'s schema.
    pub fn new(db: PgDatabase) -> Self {
        Self { db }
    }
}

#[async_trait]
impl SnapshotStore for PgSnapshotStore {
    async fn load(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        // A connection of the crate's own: given up (a caller's timeout) on a silent network,
        // it settles within the answer timeout or is closed, instead of staying out of the pool.
        let mut conn = self.db.acquire_for_store().await?;
        let row = sqlx::query(AssertSqlSafe(self.db.sql.snapshot_load.clone()))
            .bind(stream_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.db.store_error(e))?;
        row.map(|row| {
            let version: i64 = row.try_get(0).map_err(store_error)?;
            let state: serde_json::Value = row.try_get(1).map_err(store_error)?;
            let last_event_id: Option<uuid::Uuid> = row.try_get(2).map_err(store_error)?;
            let snapshot = Snapshot::new(to_u64(version), state);
            Ok(match last_event_id {
                Some(id) => snapshot.with_last_event(id),
                None => snapshot,
            })
        })
        .transpose()
    }

    async fn save(&self, stream_id: &str, snapshot: Snapshot) -> Result<(), StoreError> {
        crate::row::readable_json(&snapshot.state, crate::row::MAX_JSON_DEPTH, || {
            format!("the snapshot of stream `{stream_id}`")
        })?;
        let mut conn = self.db.acquire_for_store().await?;
        let save = sqlx::query(AssertSqlSafe(self.db.sql.snapshot_save.clone()))
            .bind(stream_id)
            .bind(to_i64(snapshot.version))
            .bind(&snapshot.state)
            .bind(snapshot.last_event_id)
            .execute(&mut *conn);
        // Bounded: an aggregate repository saves in a task that nobody cuts off, and on a
        // silent network the statement would wait (and hold its connection) until TCP gives
        // up, about 15 minutes. A save past the bound may still land; a newer one replaces it.
        match tokio::time::timeout(self.db.answer_timeout, save).await {
            Ok(saved) => saved.map(|_| ()).map_err(|e| self.db.store_error(e)),
            Err(_) => Err(StoreError::Timeout {
                backend: crate::error::BACKEND,
                source: crate::sql::no_answer(
                    self.db.answer_timeout,
                    "a snapshot's save",
                    "its connection is closed unless the answer comes in time",
                )
                .into(),
            }),
        }
    }
}
