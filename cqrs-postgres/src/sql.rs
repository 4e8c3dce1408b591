//! Every statement this crate runs, rendered once per schema.
//!
//! The schema is part of each statement's text (Postgres cannot bind identifiers), so the
//! statements are built when a [`PgDatabase`](crate::PgDatabase) is made, from a schema name
//! that [`valid_schema`] checked, and shared behind `Arc<str>`: running one costs a reference
//! count, and sqlx's per-connection statement cache hits on the same text every time.

use crate::lock;
use std::sync::Arc;

/// The longest schema name: the relays' channel is `{schema}_events`, and Postgres
/// identifiers and channel names hold 63 bytes.
pub(crate) const MAX_SCHEMA_LEN: usize = 56;

/// Rows one purge statement (or one statement of a consumer's reset) deletes at most; a purge
/// repeats it until fewer come back.
pub(crate) const PURGE_BATCH: i64 = 5_000;

/// How every transaction this crate opens begins (see [`begin`]).
pub(crate) const BEGIN_READ_COMMITTED: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// Begins a transaction the way this crate begins every one: at READ COMMITTED, whatever the
/// session's default, since its statements rely on each seeing what committed before it (a
/// fresh snapshot after the append lock).
///
/// The wait for a connection runs on the caller's task (a caller that gives up leaves the
/// pool's queue); the wait for the `BEGIN`'s answer is bounded by `db`'s `answer_timeout`.
/// A caller that gives up before the answer leaves nothing open: sqlx (0.9) counts a
/// transaction only once the server confirmed its `BEGIN`, and such a connection went back to
/// the pool inside a transaction nothing would end (the next user's writes reported as stored
/// while uncommitted, holding their locks); [`PgTransaction`](crate::PgTransaction) rolls it
/// back once answered, or closes the connection.
pub(crate) async fn begin(db: &crate::PgDatabase) -> Result<crate::PgTransaction, sqlx::Error> {
    begin_on(db.pool.acquire().await?, db.answer_timeout).await
}

/// [`begin`] on a connection the caller already has (acquired on its own task, so that a
/// caller that gives up leaves the pool's queue).
pub(crate) async fn begin_on(
    connection: sqlx::pool::PoolConnection<sqlx::Postgres>,
    answer_timeout: std::time::Duration,
) -> Result<crate::PgTransaction, sqlx::Error> {
    crate::PgTransaction::begin(connection, BEGIN_READ_COMMITTED, answer_timeout).await
}

/// Runs `commit` (a `COMMIT`, with the statements of the commit before it), failing past
/// `limit` (`answer_timeout`) as an unknown outcome, like any commit whose answer was lost:
/// on a network that drops packets nothing else would end the wait for ~15 minutes. Given up,
/// its transaction is dropped (its `ROLLBACK` queued), and the connection closed unless the
/// answers come in time ([`PgTransaction`](crate::PgTransaction)). `what` names it in the
/// error.
pub(crate) async fn commit_within<T>(
    limit: std::time::Duration,
    what: &str,
    commit: impl std::future::Future<Output = Result<T, cqrs_core::ports::StoreError>>,
) -> Result<T, cqrs_core::ports::StoreError> {
    tokio::time::timeout(limit, commit)
        .await
        .unwrap_or_else(|_| {
            Err(crate::error::commit_error(sqlx::Error::Io(no_answer(
                limit,
                what,
                CLOSED_ON_RELEASE,
            ))))
        })
}

/// `work`'s outcome, or past `limit` the timed-out I/O error ([`no_answer`]) saying `what` got
/// no answer, and `then`.
pub(crate) async fn answered_within<T>(
    limit: std::time::Duration,
    what: &str,
    then: &str,
    work: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::Io(no_answer(limit, what, then))))
}

/// What [`no_answer`] says of work given up inside a transaction (its `ROLLBACK` queued): its
/// connection is closed unless the answers come in time.
pub(crate) const CLOSED_ON_RELEASE: &str =
    "it is given up, and its connection closed unless the server answers in time";

/// The error of work whose answer did not come within `answer_timeout`: a timed-out I/O
/// error, which this crate maps to an unavailable database.
pub(crate) fn no_answer(
    answer_timeout: std::time::Duration,
    what: &str,
    then: &str,
) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the server did not answer {what} within {answer_timeout:?} (answer_timeout); {then}"
        ),
    )
}

/// Runs a purge statement that deletes at most [`PURGE_BATCH`] rows until one deletes fewer,
/// and returns how many it deleted in all, with `db`'s errors. Each statement commits on its
/// own, so an error (a `statement_timeout`) keeps what the earlier batches deleted.
pub(crate) async fn purge_in_batches<F, Fut>(
    db: &crate::PgDatabase,
    mut batch: F,
) -> Result<u64, cqrs_core::ports::StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<sqlx::postgres::PgQueryResult, sqlx::Error>>,
{
    let mut total = 0;
    loop {
        let deleted = batch()
            .await
            .map_err(|e| db.store_error(e))?
            .rows_affected();
        total += deleted;
        if deleted < PURGE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Why a schema name is refused, if it is.
pub(crate) fn valid_schema(schema: &str) -> Result<(), String> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || schema.len() > MAX_SCHEMA_LEN || schema.starts_with("pg_") {
        return Err(format!(
            "schema `{}` is not a valid name: use 1 to {MAX_SCHEMA_LEN} lower-case ASCII letters, \
             digits and `_`, starting with a letter or `_`, and not starting with `pg_`",
            schema.chars().take(80).collect::<String>()
        ));
    }
    // This crate quotes the name, but the application's own SQL qualifies its tables with it
    // as it is (`{schema}.tickets`, as the docs show): a keyword there is a syntax error.
    if KEYWORDS_NOT_A_SCHEMA.contains(&schema) {
        return Err(format!(
            "schema `{schema}` is an SQL keyword, which unquoted SQL (`{schema}.tickets`) cannot \
             name: pick another name (say `{schema}_data`)"
        ));
    }
    Ok(())
}

/// PostgreSQL's keywords that may not qualify a table name unquoted: the reserved ones and
/// those reserved but for functions and types (PostgreSQL 17's list, Appendix C).
const KEYWORDS_NOT_A_SCHEMA: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// The columns of an event row, in the order [`crate::row`] reads them.
const EVENT_COLUMNS: &str = "position, stream_id, stream_version, event_id, event_type, \
                             schema_version, payload, metadata, partition_key";

#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) schema: String,
    pub(crate) channel: String,
    pub(crate) append_lock: i64,

    pub(crate) append: Arc<str>,
    pub(crate) append_completing: Arc<str>,
    pub(crate) append_one: Arc<str>,
    pub(crate) append_one_completing: Arc<str>,
    pub(crate) append_guard_lock: Arc<str>,
    pub(crate) load: Arc<str>,
    pub(crate) read_all: Arc<str>,
    pub(crate) stream_version: Arc<str>,
    pub(crate) events_stored: Arc<str>,

    pub(crate) snapshot_load: Arc<str>,
    pub(crate) snapshot_save: Arc<str>,

    pub(crate) idempotency_claim: Arc<str>,
    pub(crate) idempotency_read: Arc<str>,
    pub(crate) idempotency_complete: Arc<str>,
    pub(crate) idempotency_purge: Arc<str>,

    pub(crate) inbox_insert: Arc<str>,
    pub(crate) checkpoint_load: Arc<str>,
    pub(crate) checkpoint_save: Arc<str>,
    pub(crate) consumer_reset: Arc<str>,
    pub(crate) inbox_purge: Arc<str>,

    pub(crate) relay_ensure: Arc<str>,
    pub(crate) relay_lock_and_read: Arc<str>,
    pub(crate) relay_advance: Arc<str>,
    pub(crate) relay_backlog: Arc<str>,
    pub(crate) relay_checkpoint: Arc<str>,

    pub(crate) migrated_version_and_writable: Arc<str>,
}

impl Sql {
    pub(crate) fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        // The functions rely on READ COMMITTED: after the append lock, their next statement
        // must see every append that committed before. A transaction-wide snapshot (a caller's
        // REPEATABLE READ transaction in `append_in`) would miss them, and an `Any` append
        // would hit the unique constraint. So the call is gated on the level: a one-time
        // filter, evaluated before the function would run, that costs no round trip; under
        // any other level the statement returns no row and does nothing.
        let is_read_committed = "current_setting('transaction_isolation') = 'read committed'";
        let read_committed = format!("WHERE {is_read_committed}");
        let append_call = format!(
            "SELECT actual_version, positions FROM {s}.append_events($1, $2, $3, $4, $5, $6, $7, $8) \
             {read_committed}"
        );
        let append_one_call = format!(
            "SELECT actual_version, event_position FROM {s}.append_event($1, $2, $3, $4, $5, $6, $7, $8) \
             {read_committed}"
        );
        // A data-modifying CTE runs to completion whether or not the query reads it: the
        // idempotency response is stored in the same statement (and round trip) as the
        // events. For the same reason the gate on the call does not reach it: it is gated
        // too, or a statement that appended nothing would complete the key.
        let completing = |call: &str| {
            format!(
                "WITH completed AS (UPDATE {s}.idempotency SET status = $9, body = $10, \
                 expires_at = $11 WHERE scope = $12 AND key = $13 AND {is_read_committed}) {call}"
            )
        };
        let f = |text: String| -> Arc<str> { Arc::from(text) };
        let append_lock = lock::key(&[schema, "append"]);
        Self {
            schema: schema.to_owned(),
            channel: format!("{schema}_events"),
            append_lock,

            append_completing: f(completing(&append_call)),
            append: f(append_call),
            append_one_completing: f(completing(&append_one_call)),
            append_one: f(append_one_call),
            // Taken before an empty append at a version inside a transaction (the function
            // takes no lock for an empty batch): see `append_on`. Gated like the call, so
            // outside READ COMMITTED it takes nothing and the call reports the level.
            append_guard_lock: f(format!(
                "SELECT pg_advisory_xact_lock({append_lock}) {read_committed}"
            )),
            load: f(format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events WHERE stream_id = $1 AND stream_version > $2 \
                 ORDER BY stream_version"
            )),
            read_all: f(format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events WHERE position > $1 ORDER BY position LIMIT $2"
            )),
            stream_version: f(format!(
                "SELECT coalesce(max(stream_version), 0) FROM {s}.events WHERE stream_id = $1"
            )),
            events_stored: f(format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.events WHERE event_id = ANY($1))"
            )),

            snapshot_load: f(format!(
                "SELECT version, state, \
                 CASE WHEN last_event_version = version THEN last_event_id END \
                 FROM {s}.snapshots WHERE stream_id = $1"
            )),
            // A newer snapshot replaces the stored one; an older one only when the stream
            // backs it (has an event at its version, the one it names if it names one) and
            // not the stored one (no event at its version: ahead of a stream restored from an
            // older backup; or another event than the one it names: another history). Else a
            // snapshot no load can use would keep every later save out and every load would
            // replay the whole stream. Checked on the unique index, by the statement's
            // snapshot: an append and a newer save committed while it ran can still be
            // replaced by a stale save, which the stream does back (a load replays a longer
            // tail until the next save).
            snapshot_save: f(format!(
                "INSERT INTO {s}.snapshots AS t \
                 (stream_id, version, state, last_event_id, last_event_version) \
                 VALUES ($1, $2, $3, $4, CASE WHEN $4::uuid IS NULL THEN NULL ELSE $2 END) \
                 ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, \
                 state = EXCLUDED.state, last_event_id = EXCLUDED.last_event_id, \
                 last_event_version = EXCLUDED.last_event_version, \
                 updated_at = now() WHERE t.version < EXCLUDED.version \
                 OR (EXISTS (SELECT 1 FROM {s}.events e WHERE e.stream_id = EXCLUDED.stream_id \
                 AND e.stream_version = EXCLUDED.version \
                 AND (EXCLUDED.last_event_id IS NULL OR e.event_id = EXCLUDED.last_event_id)) \
                 AND NOT EXISTS (SELECT 1 FROM {s}.events e WHERE e.stream_id = t.stream_id \
                 AND e.stream_version = t.version AND (t.last_event_id IS NULL \
                 OR t.last_event_version IS DISTINCT FROM t.version \
                 OR e.event_id = t.last_event_id)))"
            )),

            // `idempotency_claim` (migration 3, applied and checksummed, so unchanged) decides
            // with the `bigint` locks it is handed; this statement decides first, with the
            // key's lock in the two-`int4` space, and hands the function a lock only this
            // session holds. See `IDEMPOTENCY_CLAIM` for how and why.
            idempotency_claim: f(IDEMPOTENCY_CLAIM.replace("{s}", &s)),
            // What a claim that found the key held for another fingerprint answers from: a
            // statement of its own, so its snapshot is newer than the claim's look at the
            // holder (see `IDEMPOTENCY_CLAIM`).
            idempotency_read: f(format!(
                "SELECT fingerprint, status, body FROM {s}.idempotency \
                 WHERE scope = $1 AND key = $2 AND expires_at > $3 AND status IS NOT NULL"
            )),
            idempotency_complete: f(format!(
                "UPDATE {s}.idempotency SET status = $1, body = $2, expires_at = $3 \
                 WHERE scope = $4 AND key = $5"
            )),
            // Purges delete a batch at a time ($last), so a backlog of millions of rows is
            // worked off in statements that each finish inside a `statement_timeout`.
            // The conditions again outside the subquery: a key claimed again since the purge's
            // snapshot (its row updated and locked by the claim's transaction) must be judged
            // by its new version, which Postgres rechecks only against the outer condition.
            // `SKIP LOCKED`: a purge neither waits behind a command nor makes one wait.
            idempotency_purge: f(format!(
                "DELETE FROM {s}.idempotency WHERE (scope, key) IN ( \
                 SELECT scope, key FROM {s}.idempotency \
                 WHERE expires_at <= $1 AND status IS NOT NULL LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 AND expires_at <= $1 AND status IS NOT NULL"
            )),

            // Dated now, not at the transaction's start (the column's default, `now()`): the
            // unit began before it waited for its consumer's lock and before the events it
            // processed first, and `purge_inbox` measures age from this date.
            inbox_insert: f(format!(
                "INSERT INTO {s}.inbox (consumer, message_id, processed_at) \
                 VALUES ($1, $2, clock_timestamp()) ON CONFLICT DO NOTHING"
            )),
            checkpoint_load: f(format!(
                "SELECT position FROM {s}.checkpoints WHERE consumer = $1"
            )),
            checkpoint_save: f(format!(
                "INSERT INTO {s}.checkpoints (consumer, position) VALUES ($1, $2) \
                 ON CONFLICT (consumer) DO UPDATE SET position = EXCLUDED.position, updated_at = now()"
            )),
            // A batch of the consumer's inbox at a time ($2), like the purges: a rebuild runs
            // it until fewer come back, in its unit, so a large inbox is forgotten in
            // statements that each finish inside a `statement_timeout`. Each batch starts at
            // the message id the previous one ended at ($3, by the primary key): the entries
            // deleted earlier in the same transaction are still in the index until it
            // commits, and a scan from the start would walk past all of them every time. The
            // checkpoint goes with the first batch (the later ones find none): a small inbox
            // costs one round trip. Returns how many entries the batch selected and the last
            // id: not how many it deleted, which a purge deleting some of them at the same
            // time makes fewer, and a full batch that looked short would end the reset early.
            consumer_reset: f(format!(
                "WITH forgotten AS (DELETE FROM {s}.checkpoints WHERE consumer = $1), \
                 batch AS (SELECT message_id FROM {s}.inbox WHERE consumer = $1 \
                 AND message_id >= $3 ORDER BY message_id LIMIT $2), \
                 deleted AS (DELETE FROM {s}.inbox WHERE consumer = $1 \
                 AND message_id IN (SELECT message_id FROM batch)) \
                 SELECT (SELECT count(*) FROM batch), \
                 (SELECT message_id FROM batch ORDER BY message_id DESC LIMIT 1)"
            )),
            // `SKIP LOCKED`: the entries a rebuild is forgetting are locked until it commits,
            // and a purge that waited for them would hold the locks it took meanwhile, which
            // the rebuild may wait for in turn (a deadlock). They are gone once it commits.
            inbox_purge: f(format!(
                "DELETE FROM {s}.inbox WHERE consumer = $1 AND message_id IN ( \
                 SELECT message_id FROM {s}.inbox WHERE consumer = $1 \
                 AND processed_at < now() - make_interval(secs => $2) LIMIT $3 \
                 FOR UPDATE SKIP LOCKED)"
            )),

            // Looks first: an `INSERT` that meets the row would wait for a transaction holding
            // an uncommitted update of it (a batch whose `COMMIT` never arrived, idle until
            // Postgres ends it), and every standby's batch with it. The snapshot's committed
            // row answers at once.
            relay_ensure: f(format!(
                "INSERT INTO {s}.relay_checkpoints (relay, position) SELECT $1::text, $2::bigint \
                 WHERE NOT EXISTS (SELECT 1 FROM {s}.relay_checkpoints WHERE relay = $1::text) \
                 ON CONFLICT (relay) DO NOTHING"
            )),
            // One round trip: lock this relay's checkpoint row (or learn that another relay
            // holds it: no row) and read the batch after it.
            relay_lock_and_read: f(format!(
                "WITH cp AS (SELECT position FROM {s}.relay_checkpoints WHERE relay = $1 \
                 FOR UPDATE SKIP LOCKED) \
                 SELECT cp.position AS checkpoint, e.* FROM cp LEFT JOIN LATERAL \
                 (SELECT {EVENT_COLUMNS} FROM {s}.events WHERE position > cp.position \
                 ORDER BY position LIMIT $2) e ON true ORDER BY e.position"
            )),
            // The batch's commit does not wait for its WAL to reach the disk
            // (`synchronous_commit` off for this transaction, set in the same statement: no
            // round trip more). A crash of the server may then lose the last advances, and the
            // relay ships those events again: at least once, as it promises anyway. Meanwhile
            // its commits no longer queue their own flushes among the appends' own.
            relay_advance: f(format!(
                "UPDATE {s}.relay_checkpoints SET position = $2, updated_at = now() \
                 WHERE relay = $1 AND set_config('synchronous_commit', 'off', true) = 'off'"
            )),
            // The first $2 events past the checkpoint, counted (an index range, bounded), and
            // the span of positions past it, for a backlog longer than that. The checkpoint
            // is a scalar subquery, computed once, that starts the index range: compared in a
            // join, it made Postgres walk the whole table in order and filter row by row, or
            // read the whole backlog and sort it.
            relay_backlog: f(format!(
                "WITH checkpoint AS (SELECT coalesce((SELECT position FROM {s}.relay_checkpoints \
                 WHERE relay = $1), 0) AS position), \
                 first AS (SELECT e.recorded_at FROM {s}.events e \
                 WHERE e.position > (SELECT position FROM checkpoint) \
                 ORDER BY e.position LIMIT $2) \
                 SELECT (SELECT count(*) FROM first), \
                 (SELECT extract(epoch FROM now() - min(recorded_at))::float8 FROM first), \
                 (SELECT max(position) FROM {s}.events) - (SELECT position FROM checkpoint)"
            )),
            relay_checkpoint: f(format!(
                "SELECT position FROM {s}.relay_checkpoints WHERE relay = $1"
            )),
            // The health check's query: the latest migration applied, 0 for none (a failed
            // one leaves a row with `success` false), and whether the server takes writes.
            migrated_version_and_writable: f(format!(
                "SELECT coalesce(max(version), 0), \
                        current_setting('transaction_read_only') = 'off' \
                 FROM {s}._sqlx_migrations WHERE success"
            )),
        }
    }

    /// A migration file with this schema's names and keys filled in.
    pub(crate) fn render(&self, migration: &str) -> String {
        migration
            .replace("__SCHEMA__", &self.schema)
            .replace("__APPEND_LOCK__", &self.append_lock.to_string())
            .replace("__CHANNEL__", &self.channel)
    }

    /// The advisory lock key of a projection consumer.
    pub(crate) fn consumer_lock(&self, consumer: &str) -> i64 {
        lock::key(&[&self.schema, "consumer", consumer])
    }

    /// The advisory lock keys a claim of (`scope`, `key`) with `fingerprint` takes (see
    /// [`IDEMPOTENCY_CLAIM`]).
    pub(crate) fn idempotency_locks(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
    ) -> IdempotencyLocks {
        IdempotencyLocks::from_hashes(
            lock::key(&[&self.schema, "idempotency", scope, key]),
            lock::key(&[&self.schema, "idempotency", scope, key, fingerprint]),
            lock::key(&[&self.schema, "idempotency owner", scope, key]),
            lock::key(&[&self.schema, "idempotency claimer"]),
        )
    }
}

/// The advisory lock keys of one claim: the parameters `$6` to `$10` of [`IDEMPOTENCY_CLAIM`].
/// Every lock a client's text names is a two-`int4` lock (see [`crate::lock`]).
#[derive(Debug)]
pub(crate) struct IdempotencyLocks {
    /// The key's lock, a two-`int4` lock held exclusively by the key's owner (and, for a
    /// moment, by a claim that replays or mismatches): `$6`, `$7`.
    pub(crate) key: (i32, i32),
    /// XORed with the backend's pid, a `bigint` lock no other session holds: `$8`. Named by
    /// the schema alone.
    pub(crate) claimer: i64,
    /// The (key, fingerprint) mark, a two-`int4` lock held shared: `$9`, `$10`.
    pub(crate) owner_key: i32,
    pub(crate) owner_fingerprint: i32,
}

impl IdempotencyLocks {
    /// From the hashes of the key, of the key and fingerprint, of the key's owner mark, and
    /// of the schema's claimer (the tests hand in a key hash of their choosing here).
    pub(crate) fn from_hashes(key: i64, fingerprint: i64, owner: i64, claimer: i64) -> Self {
        Self {
            key: lock::pair(key),
            claimer,
            // The high half of a third hash of the key, and the low half of the fingerprint
            // hash: 32 bits each.
            owner_key: lock::pair(owner).0,
            owner_fingerprint: lock::pair(fingerprint).1,
        }
    }
}

/// Claims an idempotency key in one statement (one round trip), through `idempotency_claim`
/// of migration 3. Before the function runs, the claim:
///
/// 1. marks itself: a two-`int4` lock (`$9`, `$10`: 32 bits of the key, 32 bits of the
///    fingerprint) held shared. Nothing takes it exclusively, so it never waits; it is held
///    before the key lock, until the end;
/// 2. tries the key's lock, a two-`int4` lock (`$6`, `$7`: the two halves of the key's hash).
///    Taken: the function reads the key and replays, mismatches or takes it. Taken by another
///    transaction: it reads `pg_locks` once (one snapshot of the lock table) for that
///    holder's marks. A mark of this key with another fingerprint is proof that the holder's
///    fingerprint differs: the statement answers `differs` without calling the function, and
///    the caller reads the key in a statement of its own (`idempotency_read`, whose snapshot
///    is newer than this look at the holder: a completed key with our fingerprint is a
///    replay, anything else a mismatch). No such mark: the holder has our fingerprint, or is
///    ending and has dropped its marks; the claim waits for the key lock here, then the
///    function reads the key and replays, mismatches or takes it.
///
/// The function takes its own locks in the `bigint` space, where the append lock and the
/// projection consumers' locks are: it is handed, as both its key lock and its fingerprint
/// lock, `$8` XOR the backend's pid, a lock only this session holds, so it never waits and
/// never finds its key taken. A key whose hash was aimed at the append lock therefore holds
/// `(high, low)` in the two-`int4` space, which no append ever asks for. (Before, the key lock
/// and a (key, fingerprint) lock were `bigint` locks, held for as long as the claim's
/// transaction, `idle_in_transaction_session_timeout` off: a crafted `Idempotency-Key` could
/// stop every append of the schema for as long as its request ran.)
///
/// Why proof of a difference, not the absence of a mark of our own fingerprint: an ending
/// transaction releases its locks one at a time, so for a moment its key lock can be held
/// while its marks are gone, and a claim reading that as "another fingerprint" would fail a
/// duplicate of the request that just completed or rolled back. Missing proof costs only a
/// wait on the key lock, after which the function reads the committed outcome. A hash
/// collision likewise only makes a claim wait: keys sharing a key lock differ in their marks'
/// key half, and fingerprints sharing 32 bits look alike.
///
/// `pg_locks` is read only when the key lock is taken (a duplicate or a conflicting request
/// while a claim is open, or a replay running at the same moment), and briefly holds every
/// lock-manager partition: fine for retries, not for a hot loop.
///
/// With `$11` (milliseconds; the database's claim wait), every lock wait of the claim is
/// bounded by `lock_timeout`, set first and set back on the way out, so statements after it
/// in the same transaction keep theirs. `NULL` leaves `lock_timeout` as it is (every claim
/// passes a wait now).
///
/// Instances of a build that took the key lock in the `bigint` space do not exclude claims of
/// this build (see "Rolling upgrades" in `docs/postgres.md`).
const IDEMPOTENCY_CLAIM: &str = "WITH saved AS MATERIALIZED (\
     SELECT current_setting('lock_timeout') AS lock_timeout), \
     pre AS MATERIALIZED (\
     SELECT $8::bigint # pg_backend_pid() AS claimer, \
       set_config('lock_timeout', coalesce($11::text, saved.lock_timeout), true) AS bounded, \
       pg_advisory_xact_lock_shared($9::int4, $10::int4) AS marked FROM saved), \
     decided AS MATERIALIZED (\
     SELECT pre.claimer, CASE \
     WHEN pg_try_advisory_xact_lock($6::int4, $7::int4) THEN 'own'::text \
     WHEN EXISTS (\
       WITH held AS MATERIALIZED (\
         SELECT l.pid, l.classid, l.objid, l.objsubid, l.mode FROM pg_catalog.pg_locks l \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.database = \
           (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())) \
       SELECT 1 FROM held k JOIN held m ON m.pid = k.pid \
       WHERE k.mode = 'ExclusiveLock' \
         AND k.classid = $6::int4::oid AND k.objid = $7::int4::oid \
         AND m.mode = 'ShareLock' AND m.classid = $9::int4::oid AND m.objid <> $10::int4::oid) \
     THEN 'differs'::text \
     ELSE (SELECT 'own'::text FROM (SELECT pg_advisory_xact_lock($6::int4, $7::int4) OFFSET 0) AS wait) \
     END AS took \
     FROM pre) \
     SELECT c.outcome, c.status, c.body, set_config('lock_timeout', s.lock_timeout, true) \
     FROM decided d \
     CROSS JOIN LATERAL {s}.idempotency_claim($1, $2, $3, $4, $5, d.claimer, d.claimer) c \
     CROSS JOIN saved s WHERE d.took = 'own' \
     UNION ALL \
     SELECT 'differs'::text, NULL::integer, NULL::jsonb, \
       set_config('lock_timeout', s.lock_timeout, true) \
     FROM decided d CROSS JOIN saved s WHERE d.took = 'differs'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        assert!(valid_schema("cqrs").is_ok());
        assert!(valid_schema("_t1_abc").is_ok());
        for bad in [
            "",
            "Cqrs",
            "1abc",
            "a-b",
            "a\"b",
            "pg_catalog",
            &"a".repeat(57),
            "order",
            "user",
            "end",
            "left",
        ] {
            assert!(valid_schema(bad).is_err(), "{bad:?} was accepted");
        }
        // Unreserved keywords qualify a table name unquoted.
        assert!(valid_schema("data").is_ok());
        assert!(valid_schema("orders").is_ok());
    }

    /// Every keyword that breaks unquoted SQL on the server at hand (`pg_get_keywords`) is
    /// refused. The list may hold more: keywords newer servers reserve (`system_user`, 16).
    #[tokio::test]
    async fn the_refused_keywords_are_the_servers_reserved_ones() {
        let Some(db) = crate::test_support::migrated_schema("keywords").await else {
            return;
        };
        let mut reserved: Vec<String> = sqlx::query_scalar(
            "SELECT word FROM pg_get_keywords() WHERE catcode IN ('R', 'T') ORDER BY word",
        )
        .fetch_all(db.pool())
        .await
        .expect("pg_get_keywords");
        db.drop_schema().await.expect("drop the test schema");
        reserved.sort();
        let ours: Vec<String> = KEYWORDS_NOT_A_SCHEMA
            .iter()
            .map(|k| (*k).to_owned())
            .collect();
        let missing: Vec<_> = reserved.iter().filter(|k| !ours.contains(k)).collect();
        assert!(missing.is_empty(), "not refused: {missing:?}");
        // The query did find the reserved words: an empty answer would pass the check above.
        assert!(reserved.iter().any(|k| k == "order"), "{reserved:?}");
    }

    #[test]
    fn migrations_are_rendered_for_the_schema() {
        let sql = Sql::new("tenant_a");
        let rendered = sql.render("CREATE TABLE \"__SCHEMA__\".x; SELECT pg_advisory_xact_lock(__APPEND_LOCK__); NOTIFY __CHANNEL__");
        assert!(rendered.contains("\"tenant_a\".x"));
        assert!(rendered.contains(&sql.append_lock.to_string()));
        assert!(rendered.contains("tenant_a_events"));
        assert!(!rendered.contains("__"));
    }
}
