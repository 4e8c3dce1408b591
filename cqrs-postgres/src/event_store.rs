//! The event store.

use crate::PgDatabase;
use crate::PgPooledConnection;
use crate::error::{BACKEND, is_unique_violation, store_error};
use crate::row::{self, Columns, RowError, to_i64, to_u64};
use crate::sql::Sql;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::ports::{EventStore, ExpectedVersion, StoreError};
use cqrs_core::{EventRecord, Position};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Connection, Row};

/// An event store in Postgres: one `events` table, one global order.
///
/// * **Append** is one statement (one round trip): the `append_events` function (or
///   `append_event`, for a single event) takes the schema's append lock, checks the expected
///   version, and inserts the batch with consecutive versions. All or nothing.
/// * **Optimistic concurrency**: the expected version is checked under the append lock, and
///   a unique constraint on `(stream_id, stream_version)` backs it; of 50 concurrent appends
///   at one version, one wins and 49 get [`StoreError::Conflict`] with the actual version.
/// * **Global order**: positions come from an identity column and are drawn while holding a
///   transaction-scoped advisory lock (`pg_advisory_xact_lock`) that is released at commit,
///   so they are drawn in commit order and a reader of `read_all` never skips an event that
///   commits late. The cost: appends to one schema are serialized from their append
///   statement to their commit. A plain `append` is its own transaction, so it holds the lock
///   for one statement; a command's unit of work appends in its last statement before
///   `COMMIT`; [`append_in`](Self::append_in) holds it until *your* commit. See
///   `docs/postgres.md`.
///
/// ```no_run
/// use cqrs_core::ports::EventStore;
/// use cqrs_core::{EventRecord, ExpectedVersion, Metadata, Position, RecordMetadata};
///
/// # async fn run(db: cqrs_postgres::PgDatabase) -> Result<(), Box<dyn std::error::Error>> {
/// let store = db.event_store();
/// let metadata = Metadata::new();
/// let event = EventRecord::new(
///     metadata.message_id,
///     "TicketOpened",
///     1,
///     serde_json::json!({ "ticket_id": "t1" }),
///     RecordMetadata::from_metadata(&metadata),
/// );
/// let stored = store.append("ticket-t1", ExpectedVersion::NO_STREAM, vec![event]).await?;
/// assert_eq!(stored[0].stream_version, Some(1));
/// let everything = store.read_all(Position::START, 100).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PgEventStore {
    db: PgDatabase,
}

impl PgEventStore {
    /// The event store of `db`'s schema.
    pub fn new(db: PgDatabase) -> Self {
        Self { db }
    }

    /// The database handle.
    pub fn database(&self) -> &PgDatabase {
        &self.db
    }

    /// Loads a stream's events after `after_version` on a connection you hold (a unit of
    /// work's transaction), so a command that reads and writes uses one connection.
    pub async fn load_in(
        &self,
        conn: &mut PgConnection,
        stream_id: &str,
        after_version: u64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(self.db.sql.load.clone()))
            .bind(stream_id)
            .bind(to_i64(after_version))
            .fetch_all(conn)
            .await
            .map_err(store_error)?;
        rows.iter().map(row::event).collect()
    }

    /// Reads the global order after `after`, up to `limit` events, on a connection you hold
    /// (a projection unit's transaction): a consumer that holds one connection reads on it
    /// instead of waiting for a second from the same pool.
    pub async fn read_all_in(
        &self,
        conn: &mut PgConnection,
        after: Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(AssertSqlSafe(self.db.sql.read_all.clone()))
            .bind(to_i64(after.get()))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(conn)
            .await
            .map_err(store_error)?;
        page(&rows)
    }

    /// Appends inside a transaction you hold (`&mut *tx`, of a
    /// [`PgTransaction`](crate::PgTransaction) from [`PgDatabase::begin`] or of a sqlx
    /// [`Transaction`](sqlx::Transaction): both keep track of it, and a `BEGIN` sent as plain
    /// SQL is not seen as one, so the guard below would not take its lock and errors would be
    /// read as those of a statement of its own). The append lock is then held until
    /// that transaction ends, so append last and commit soon. A version conflict found by the
    /// append functions' check leaves the transaction usable; one found by the unique
    /// constraint (an event inserted around the functions took the version) and any other
    /// failed statement abort it, as in Postgres any failed statement does: roll back then
    /// (a `COMMIT` would roll back too, without an error), or append in a savepoint
    /// (`tx.begin()`) to go on after a failure. Return a savepoint's `begin()` error: sqlx
    /// (0.9) answers one that fails or is given up with a plain `ROLLBACK`, which ends your
    /// whole transaction, and what you run after it commits statement by statement.
    ///
    /// An empty append at [`ExpectedVersion::Exactly`] is a guard ("commit my writes only if
    /// the stream is still at v"): it takes the append lock too (one more round trip), so an
    /// append to the stream from elsewhere waits until your transaction ends and cannot slip
    /// in between the check and your `COMMIT`. An empty append at `Any` checks nothing and
    /// takes no lock.
    ///
    /// The transaction must be READ COMMITTED (what [`PgDatabase::begin`](crate::PgDatabase::begin)
    /// gives): the append reads the stream's version after taking
    /// the append lock, and under REPEATABLE READ or SERIALIZABLE it would read it from the
    /// transaction's first snapshot, missing appends that committed since (an `Any` append
    /// would fail). At another level the append does nothing and fails with
    /// [`StoreError::Backend`] naming the level; the transaction stays usable.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        append_on(
            conn,
            &self.db,
            &self.db.sql,
            stream_id,
            expected,
            events,
            None,
        )
        .await
    }
}

/// An idempotency response stored by the same statement as a command's events.
pub(crate) struct Completion<'a> {
    pub(crate) scope: &'a str,
    pub(crate) key: &'a str,
    pub(crate) status: i32,
    pub(crate) body: &'a serde_json::Value,
    pub(crate) expires_at: DateTime<Utc>,
}

/// Appends on `conn` (a transaction, or a plain connection: then the statement is its own
/// transaction). `db`'s pool is only used to read the actual version after a lost race that
/// the unique constraint caught inside a transaction, which is aborted by then, and only if a
/// connection is idle or the pool has room for a new one: waiting for another holder's while
/// holding `conn` could starve the pool.
pub(crate) async fn append_on(
    conn: &mut PgConnection,
    db: &PgDatabase,
    sql: &Sql,
    stream_id: &str,
    expected: ExpectedVersion,
    events: Vec<EventRecord>,
    completion: Option<&Completion<'_>>,
) -> Result<Vec<EventRecord>, StoreError> {
    for event in &events {
        row::readable_json(&event.payload, row::MAX_EVENT_PAYLOAD_DEPTH, || {
            format!("event {}'s payload", event.event_id)
        })?;
    }
    if let Some(c) = completion {
        row::readable_json(c.body, row::MAX_JSON_DEPTH, || {
            format!("the response stored for idempotency key `{}`", c.key)
        })?;
    }
    let expected_param = match expected {
        ExpectedVersion::Any => None,
        ExpectedVersion::Exactly(v) => Some(to_i64(v)),
    };
    // An empty append at a version is a guard: the caller's transaction commits only if the
    // stream is still at that version. `append_events` takes no lock for an empty batch, so
    // an append could commit between its check and the caller's `COMMIT`, and the guard pass
    // on a stale version. Inside a transaction it takes the append lock first, in a statement
    // of its own (the function's read of the version then sees every append committed
    // before): an append elsewhere waits until the caller's transaction ends. Outside one,
    // the check is its own transaction and a lock would end with it.
    if events.is_empty() && expected_param.is_some() && conn.is_in_transaction() {
        sqlx::query(AssertSqlSafe(sql.append_guard_lock.clone()))
            .execute(&mut *conn)
            .await
            .map_err(store_error)?;
    }
    // One event (what a command records more often than not) goes through `append_event`,
    // which takes scalars: unnesting one-element arrays and aggregating the positions back
    // cost almost as much as everything else the function does (docs/benchmarks.md).
    let single = events.len() == 1;
    let statement = match (single, completion.is_some()) {
        (true, false) => sql.append_one.clone(),
        (true, true) => sql.append_one_completing.clone(),
        (false, false) => sql.append.clone(),
        (false, true) => sql.append_completing.clone(),
    };
    // sqlx encodes each value as it is bound: the borrows end here.
    let mut query = sqlx::query(AssertSqlSafe(statement))
        .bind(stream_id)
        .bind(expected_param);
    query = match events.as_slice() {
        [event] => query
            .bind(event.event_id)
            .bind(&event.event_type)
            .bind(row::schema_version(event)?)
            .bind(Json(&event.payload))
            .bind(Json(&event.metadata))
            .bind(event.partition_key.as_deref()),
        _ => {
            let columns = Columns::new(&events)?;
            query
                .bind(&columns.event_ids)
                .bind(&columns.event_types)
                .bind(&columns.schema_versions)
                .bind(&columns.payloads)
                .bind(&columns.metadata)
                .bind(&columns.partition_keys)
        }
    };
    if let Some(c) = completion {
        query = query
            .bind(c.status)
            .bind(Json(c.body))
            .bind(c.expires_at)
            .bind(c.scope)
            .bind(c.key);
    }
    let result = query.fetch_optional(&mut *conn).await;
    let row = match result {
        Ok(Some(row)) => row,
        // The statement is gated on READ COMMITTED (see `Sql::new`) and did nothing.
        Ok(None) => return Err(not_read_committed(conn, stream_id).await),
        Err(e) if is_unique_violation(&e, "events_stream_version_key") => {
            // At READ COMMITTED, only reachable when someone inserted without the append
            // functions (and their lock): an event took the version under our feet.
            let actual = if conn.is_in_transaction() {
                // The transaction is aborted: read elsewhere.
                let mut other = match other_connection(db).await {
                    Ok(other) => other,
                    Err(why) => {
                        return Err(StoreError::Unavailable {
                            backend: BACKEND,
                            source: format!(
                                "stream {stream_id} got an event at the version this append \
                                 drew, inserted around the append functions, and {why} to \
                                 read its version: {}",
                                crate::error::Described(&e)
                            )
                            .into(),
                        });
                    }
                };
                read_version(&mut other, sql, stream_id).await?
            } else {
                // The statement was its own transaction, and is over: read on its connection.
                read_version(conn, sql, stream_id).await?
            };
            return Err(StoreError::Conflict {
                stream: stream_id.to_owned(),
                expected,
                actual,
            });
        }
        Err(e) if is_unique_violation(&e, "events_event_id_key") => {
            return Err(StoreError::Backend {
                backend: BACKEND,
                source: format!("an event of this batch for stream {stream_id} is already stored (same event id; {RETRY_FOUND_IT}): {}", crate::error::Described(&e)).into(),
            });
        }
        // Outside a transaction the statement was its own: a connection lost with it leaves
        // its outcome unknown (`Timeout`), not "retry" (`Unavailable`).
        Err(e) if !conn.is_in_transaction() => {
            // The store's own connection, of `db`'s pool: a server that takes no writes (a
            // failover left the pool on the old primary) has the pool's connections replaced,
            // as a command's refused append does. (Not in a caller's transaction, which may be
            // of another pool, or begun `READ ONLY` on a primary.)
            db.retire_if_refused_as_read_only(&e);
            return Err(crate::error::commit_error(e));
        }
        Err(e) => return Err(store_error(e)),
    };
    let actual: i64 = row.try_get(0).map_err(store_error)?;
    let positions: Option<Vec<i64>> = if single {
        let position: Option<i64> = row.try_get(1).map_err(store_error)?;
        position.map(|p| vec![p])
    } else {
        row.try_get(1).map_err(store_error)?
    };
    let actual = to_u64(actual);
    let Some(positions) = positions else {
        // The version check comes first in the functions: a retry of an append whose answer
        // was lost meets the version its first try moved the stream to. Such a batch is a
        // duplicate, never a conflict (which would have the caller decide again).
        if let Some(duplicate) = already_stored(conn, sql, stream_id, &events).await? {
            return Err(duplicate);
        }
        return Err(StoreError::Conflict {
            stream: stream_id.to_owned(),
            expected,
            actual,
        });
    };
    if let ExpectedVersion::Exactly(v) = expected
        && events.is_empty()
        && v != actual
    {
        return Err(StoreError::Conflict {
            stream: stream_id.to_owned(),
            expected,
            actual,
        });
    }
    if positions.len() != events.len() {
        return Err(StoreError::Backend {
            backend: BACKEND,
            source: format!(
                "append_events stored {} events of {}; the schema's functions are not this crate's",
                positions.len(),
                events.len()
            )
            .into(),
        });
    }
    Ok(events
        .into_iter()
        .zip(positions)
        .enumerate()
        .map(|(i, (event, position))| {
            event
                .with_stream(stream_id, actual + 1 + i as u64)
                .with_position(Position::new(to_u64(position)))
        })
        .collect())
}

/// A second connection for a caller that holds one of `pool`'s: an idle one, or a new one
/// while the pool is below its maximum (a pool with few `min_connections` keeps none idle).
/// At its maximum it fails at once rather than wait, holding a connection, for another
/// holder to give one back: enough callers doing that would starve the pool. The error says
/// why no connection was had.
async fn other_connection(db: &PgDatabase) -> Result<PgPooledConnection, String> {
    let pool = &db.pool;
    let held = |conn| PgPooledConnection::new(conn, db.answer_timeout);
    if let Some(idle) = pool.try_acquire() {
        return Ok(held(idle));
    }
    if pool.size() >= pool.options().get_max_connections() {
        return Err("no idle connection is left".to_owned());
    }
    // Opens one; bounded by the pool's `acquire_timeout` should others take the room first.
    pool.acquire()
        .await
        .map(held)
        .map_err(|e| format!("no connection could be opened ({e})"))
}

/// The error of a batch holding an event id twice or one already stored, if it does.
async fn already_stored(
    conn: &mut PgConnection,
    sql: &Sql,
    stream_id: &str,
    events: &[EventRecord],
) -> Result<Option<StoreError>, StoreError> {
    if events.is_empty() {
        return Ok(None);
    }
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
    let twice = ids.iter().enumerate().any(|(i, id)| ids[..i].contains(id));
    let stored = twice
        || sqlx::query_scalar::<_, bool>(AssertSqlSafe(sql.events_stored.clone()))
            .bind(&ids)
            .fetch_one(&mut *conn)
            .await
            .map_err(store_error)?;
    Ok(stored.then(|| StoreError::Backend {
        backend: BACKEND,
        source: format!(
            "an event of this batch for stream {stream_id} is already stored, or twice in the \
             batch (same event id): an event id is stored once ({RETRY_FOUND_IT})"
        )
        .into(),
    }))
}

/// What an append finding its events stored most likely is: the retry of one whose outcome was
/// unknown.
const RETRY_FOUND_IT: &str = "when this is the retry of an append whose outcome was unknown \
    (a `Timeout`), its first attempt was stored: it took effect, so do not decide it again; \
    load the stream to go on";

async fn read_version(
    conn: &mut PgConnection,
    sql: &Sql,
    stream_id: &str,
) -> Result<u64, StoreError> {
    let version: i64 = sqlx::query_scalar(AssertSqlSafe(sql.stream_version.clone()))
        .bind(stream_id)
        .fetch_one(conn)
        .await
        .map_err(store_error)?;
    Ok(to_u64(version))
}

/// The error of an append in a transaction that is not READ COMMITTED, naming its level.
async fn not_read_committed(conn: &mut PgConnection, stream_id: &str) -> StoreError {
    let level = sqlx::query_scalar::<_, String>("SHOW transaction_isolation")
        .fetch_one(conn)
        .await
        .unwrap_or_else(|e| format!("unknown ({e})"));
    StoreError::Backend {
        backend: BACKEND,
        source: format!(
            "did not append to stream {stream_id}: the transaction's isolation level is \
             `{level}`, and appends need `read committed` (under a transaction-wide snapshot \
             the append cannot see appends that committed since, so even an `Any` append would \
             fail); begin the transaction with `BEGIN ISOLATION LEVEL READ COMMITTED` \
             (`PgDatabase::begin` does)"
        )
        .into(),
    }
}

#[async_trait]
impl EventStore for PgEventStore {
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut conn = self.db.acquire_for_store().await?;
        let append = append_on(
            &mut conn,
            &self.db,
            &self.db.sql,
            stream_id,
            expected,
            events,
            None,
        );
        // Its own commit, bounded as a unit of work's is (`PgOptions::answer_timeout`): on a
        // silent network a caller without a timeout of its own waited until TCP gave up.
        crate::sql::commit_within(self.db.answer_timeout, "the append", append).await
    }

    async fn load(
        &self,
        stream_id: &str,
        after_version: u64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut conn = self.db.acquire_for_store().await?;
        self.load_in(&mut conn, stream_id, after_version).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.db.acquire_for_store().await?;
        self.read_all_in(&mut conn, after, limit).await
    }

    async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
        let mut conn = self.db.acquire_for_store().await?;
        read_version(&mut conn, &self.db.sql, stream_id).await
    }
}

/// A page of the global order, or an error naming the position and id of its first row whose
/// content does not decode (one written around the append functions, say without
/// `correlation_id` in its metadata): readers that page again with smaller pages (a store-fed
/// projection runner, the `StoreRelay`) take the events before it, and stop at it.
fn page(rows: &[PgRow]) -> Result<Vec<EventRecord>, StoreError> {
    let mut events = Vec::with_capacity(rows.len());
    for r in rows {
        match row::checked_event(r) {
            Ok(event) => events.push(event),
            Err(RowError::Content(error)) => {
                let position = r.try_get::<i64, _>("position").ok();
                let event_id = r.try_get::<uuid::Uuid, _>("event_id").ok();
                // Its cause alone: the error below says "could not decode" already.
                let error = match error {
                    StoreError::Codec(cause) => cause,
                    other => other.into(),
                };
                return Err(StoreError::Codec(
                    format!(
                        "the event at position {} (id {}) cannot be read: {error}; readers of \
                         the global order stop at it until the row is mended (it was written \
                         around this crate's append functions) or deleted",
                        position.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                        event_id.map_or_else(|| "?".to_owned(), |id| id.to_string()),
                    )
                    .into(),
                ));
            }
            Err(RowError::Columns(error)) => return Err(error),
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    //! Needs private access: the statement that completes an idempotency key with the events
    //! is reachable only from a unit of work's commit, which rolls back when it fails.

    use super::*;
    use crate::idempotency::{self, Outcome, claim_on};
    use std::time::Duration;

    /// Under REPEATABLE READ or SERIALIZABLE, the completing append statement neither
    /// appends nor completes the key, even when the caller commits afterwards: a key is never
    /// completed without its events.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_completing_append_outside_read_committed_leaves_the_key_in_progress() {
        let Some(db) = crate::test_support::migrated_schema("completing_append_isolation").await
        else {
            return;
        };

        cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
            let sql = &db.sql;
            let day = Duration::from_secs(24 * 3600);
            let status = format!(
                "SELECT status FROM \"{}\".idempotency WHERE scope = 's' AND key = $1",
                db.schema()
            );
            for (key, begin) in [
                ("rr", "BEGIN ISOLATION LEVEL REPEATABLE READ"),
                ("ser", "BEGIN ISOLATION LEVEL SERIALIZABLE"),
            ] {
                // A key claimed and left in progress (status NULL).
                let mut claim = crate::sql::begin(&db).await.unwrap();
                let outcome = claim_on(&mut claim, sql, None, "s", key, "fp", db.clock.now(), day)
                    .await
                    .unwrap();
                assert!(matches!(outcome, Outcome::New));
                claim.commit().await.unwrap();

                let mut tx = db.pool.begin_with(begin).await.unwrap();
                let body = serde_json::json!({ "ok": true });
                let completion = Completion {
                    scope: "s",
                    key,
                    status: 200,
                    body: &body,
                    expires_at: idempotency::expiry(db.clock.now(), day),
                };
                for events in [
                    vec![crate::test_support::record()],
                    vec![crate::test_support::record(), crate::test_support::record()],
                ] {
                    let error = append_on(
                        &mut tx,
                        &db,
                        sql,
                        key,
                        ExpectedVersion::Any,
                        events,
                        Some(&completion),
                    )
                    .await
                    .expect_err("refused outside READ COMMITTED");
                    assert!(matches!(error, StoreError::Backend { .. }), "{error:?}");
                }
                // A caller that commits anyway commits no completion.
                tx.commit().await.unwrap();
                let stored: Option<i32> = sqlx::query_scalar(AssertSqlSafe(status.clone()))
                    .bind(key)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
                assert_eq!(
                    stored, None,
                    "{begin}: the key was completed with no events"
                );
                assert_eq!(db.event_store().load(key, 0).await.unwrap().len(), 0);
            }
        })
        .await;
        db.drop_schema().await.expect("drop the test schema");
    }
}
