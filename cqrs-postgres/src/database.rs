//! The handle every adapter shares: a pool and a schema.

use crate::error::{PgError, sqlstate, store_error};
use crate::sql::Sql;
use crate::{PgCommandLayer, PgEventStore, PgIdempotencyStore, PgProjectionStore, PgSnapshotStore};
use async_trait::async_trait;
use cqrs_core::clock::{Clock, SystemClock};
use cqrs_core::ports::StoreError;
use cqrs_core::runtime::{Health, HealthCheck};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{AssertSqlSafe, SqlSafeStr};
use std::sync::Arc;
use std::time::Duration;

/// The migrations, in order: `(version, description, SQL with placeholders)`.
const MIGRATIONS: [(i64, &str, &str); 7] = [
    (
        1,
        "event store",
        include_str!("../migrations/0001_event_store.sql"),
    ),
    (
        2,
        "outbox relay",
        include_str!("../migrations/0002_outbox_relay.sql"),
    ),
    (
        3,
        "idempotency",
        include_str!("../migrations/0003_idempotency.sql"),
    ),
    (
        4,
        "inbox and checkpoints",
        include_str!("../migrations/0004_inbox_checkpoints.sql"),
    ),
    (
        5,
        "append one event",
        include_str!("../migrations/0005_append_event.sql"),
    ),
    (
        6,
        "inbox purge index",
        include_str!("../migrations/0006_inbox_purge_index.sql"),
    ),
    (
        7,
        "snapshot last event",
        include_str!("../migrations/0007_snapshot_last_event.sql"),
    ),
];

/// A connection pool and the schema that holds this crate's tables: the handle every adapter
/// is made from. Cheap to clone.
///
/// ```no_run
/// use cqrs_postgres::PgOptions;
///
/// # async fn run() -> Result<(), cqrs_postgres::PgError> {
/// let db = PgOptions::from_env().schema("cqrs").connect().await?;
/// db.migrate().await?;
/// let events = db.event_store();
/// let idempotency = db.idempotency_store();
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PgDatabase {
    pub(crate) pool: PgPool,
    pub(crate) sql: Arc<Sql>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Where the pool connects (host, port, database), for errors.
    target: Arc<str>,
    /// How long the health check waits for a connection and its query.
    health_wait: Duration,
    /// How long an idempotency claim waits for a duplicate's holder.
    pub(crate) claim_wait: Duration,
    /// How long work that goes on without its caller (a commit) waits for the server's
    /// answer: [`PgOptions::answer_timeout`](crate::PgOptions::answer_timeout).
    pub(crate) answer_timeout: Duration,
    /// The connections to retire once the server is found to take no writes; `None` for a
    /// pool made elsewhere ([`from_pool`](Self::from_pool)), which has no hook to retire them.
    pub(crate) retirement: Option<Arc<Retirement>>,
}

/// The pool's connections opened before the last sign that the server takes no writes (a
/// failover, or a cutover made with `default_transaction_read_only`, that left them on a
/// server no longer the primary): the pool made by [`PgOptions`](crate::PgOptions) closes
/// each at its next acquire (its `before_acquire`), and opens a new one, which reaches the
/// primary once the URL does. Without it every command failed on them until their
/// `max_lifetime` (30 minutes by default), the health check replacing one a time.
#[derive(Debug)]
pub(crate) struct Retirement {
    // (Retired at most every `RETIRE_AT_MOST_EVERY`.)
    start: std::time::Instant,
    /// Connections opened before this many nanoseconds after `start` are retired; 0: none.
    before: std::sync::atomic::AtomicU64,
}

impl Retirement {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: std::time::Instant::now(),
            before: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Retires every connection opened until now, unless the last retirement is less than
    /// [`RETIRE_AT_MOST_EVERY`] old; whether it did. While the server stays read-only (the URL
    /// still on a standby, DNS not flipped yet), each failing command and each health check
    /// would otherwise throw the whole pool away again, a reconnection storm against a
    /// database in trouble that cannot help: the new connections reach the same server.
    pub(crate) fn retire_all(&self) -> bool {
        let now = u64::try_from(self.start.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let gap = u64::try_from(RETIRE_AT_MOST_EVERY.as_nanos()).unwrap_or(u64::MAX);
        self.before
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |last| (last == 0 || now.saturating_sub(last) >= gap).then_some(now),
            )
            .is_ok()
    }

    /// Whether a connection `age` old was opened before the last [`retire_all`](Self::retire_all).
    /// One atomic load while nothing was ever retired.
    pub(crate) fn retired(&self, age: Duration) -> bool {
        let before = self.before.load(std::sync::atomic::Ordering::Relaxed);
        if before == 0 {
            return false;
        }
        // `None`: opened before `start`, so before any retirement too.
        self.start
            .elapsed()
            .checked_sub(age)
            .is_none_or(|opened| u64::try_from(opened.as_nanos()).unwrap_or(u64::MAX) < before)
    }
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDatabase")
            .field("schema", &self.sql.schema)
            .field("connections", &self.pool.size())
            .finish()
    }
}

impl PgDatabase {
    pub(crate) fn new(
        pool: PgPool,
        schema: &str,
        target: String,
        retirement: Option<Arc<Retirement>>,
    ) -> Self {
        Self {
            retirement,
            pool,
            sql: Arc::new(Sql::new(schema)),
            clock: Arc::new(SystemClock),
            target: target.into(),
            health_wait: DEFAULT_HEALTH_WAIT,
            claim_wait: DEFAULT_CLAIM_WAIT,
            answer_timeout: crate::options::DEFAULT_ANSWER_TIMEOUT,
        }
    }

    /// A handle over a pool you made yourself. Fails when the schema name is invalid.
    ///
    /// The pool's sessions must default to READ COMMITTED (the server's own default; set
    /// `default_transaction_isolation` in its connect options if the database or role says
    /// otherwise): [`migrate`](Self::migrate) refuses a pool that does not.
    pub fn from_pool(pool: PgPool, schema: &str) -> Result<Self, PgError> {
        crate::sql::valid_schema(schema).map_err(|p| PgError::InvalidOptions(vec![p]))?;
        let target = crate::options::target_of(&pool.connect_options());
        // Its pool has no hook of this crate's: nothing is retired.
        Ok(Self::new(pool, schema, target, None))
    }

    /// The same pool over the tables of another schema, with this handle's settings (clock,
    /// waits, answer timeout): for a server that keeps each tenant in a schema of its own,
    /// one pool for them all. Fails when the schema name is invalid.
    ///
    /// Each schema is a store of its own: [`migrate`](Self::migrate) it, and run its own
    /// outbox relay ([`PgOutboxRelay`](crate::PgOutboxRelay)), whose `LISTEN` holds a
    /// connection of the pool per schema. Positions, checkpoints and idempotency keys are the
    /// schema's own.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), cqrs_postgres::PgError> {
    /// let db = cqrs_postgres::PgOptions::from_env().connect().await?;
    /// let acme = db.with_schema("tenant_acme")?;
    /// acme.migrate().await?;
    /// let events = acme.event_store();
    /// # Ok(()) }
    /// ```
    pub fn with_schema(&self, schema: &str) -> Result<Self, PgError> {
        crate::sql::valid_schema(schema).map_err(|p| PgError::InvalidOptions(vec![p]))?;
        Ok(Self {
            sql: Arc::new(Sql::new(schema)),
            ..self.clone()
        })
    }

    /// Uses `clock` for idempotency expiry (tests pass a
    /// [`ManualClock`](cqrs_core::clock::ManualClock)). Default: the system clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How long the [health check](#impl-HealthCheck-for-PgDatabase) waits for a pooled
    /// connection and its query (default 2 s): past it, a pool whose every connection is
    /// busy is degraded, and anything else unhealthy. Give it less than whatever bounds the
    /// check from outside (a readiness endpoint's own time limit), or a loaded instance is
    /// cut off as if Postgres were down. Zero counts as a millisecond.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), cqrs_postgres::PgError> {
    /// use std::time::Duration;
    ///
    /// // A readiness probe that gives up after one second.
    /// let db = cqrs_postgres::PgOptions::from_env()
    ///     .connect()
    ///     .await?
    ///     .with_health_wait(Duration::from_millis(800));
    /// # Ok(()) }
    /// ```
    pub fn with_health_wait(mut self, wait: Duration) -> Self {
        self.health_wait = wait.max(Duration::from_millis(1));
        self
    }

    /// How long work that goes on whether or not its caller still waits (a command's or a
    /// projection unit's commit, an idempotency key's claim and completion,
    /// [`PgTransaction`](crate::PgTransaction)'s commit and rollback) waits for the
    /// server's answer before it is given up, and how long a `BEGIN`'s caller waits for it:
    /// [`PgOptions::answer_timeout`](crate::PgOptions::answer_timeout),
    /// which sets it for a database it connects. Default 30 s; zero counts as a millisecond,
    /// and more than `i32::MAX` milliseconds (about 24.8 days, the most `PgOptions` takes) as
    /// that.
    /// It also bounds how long a connection this crate holds (a transaction, a read) may
    /// take, given back with an answer still owed, to get it before it is closed. For a
    /// database made [`from_pool`](Self::from_pool), whose pool has no hook of this crate's,
    /// statements run straight on the pool and given up in flight stay unbounded: give that
    /// pool an `after_release` of your own, or connect with [`PgOptions`](crate::PgOptions).
    pub fn with_answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout.clamp(Duration::from_millis(1), crate::options::MAX_TIMEOUT);
        self
    }

    /// How long a claim of an idempotency key waits while another request with the same key
    /// and fingerprint holds it (default 5 s), before it fails as
    /// [`Unavailable`](StoreError::Unavailable) with a
    /// [`ClaimWaitElapsed`](crate::ClaimWaitElapsed) source: "still running, retry once it has
    /// finished" (the retry then replays its response). It bounds the claims of
    /// [`PgIdempotencyStore::claim`](crate::PgIdempotencyStore) and of
    /// [`PgCommandExecutor::execute_idempotent`](crate::PgCommandExecutor::execute_idempotent)
    /// alike. Zero counts as a millisecond.
    ///
    /// A `statement_timeout` shorter than the claim wait ([`PgOptions::statement_timeout`](crate::PgOptions::statement_timeout))
    /// ends the wait at it, with the same error.
    ///
    /// The wait is on the server (the key's lock). A caller that gives up cannot stop it, so
    /// the claim runs in a task of its own, which holds a pooled connection until the wait
    /// ends: unbounded, clients retrying a slow request could take every connection of the
    /// pool.
    pub fn with_claim_wait(mut self, wait: Duration) -> Self {
        self.claim_wait = wait.max(Duration::from_millis(1));
        self
    }

    /// The pool. For the application's own statements, prefer [`acquire`](Self::acquire) or
    /// [`begin`](Self::begin): on a network that drops packets, a statement run straight on
    /// the pool whose caller gave up can keep its connection from the pool for minutes.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Maps an error of an operation on this handle's pool to the core's [`StoreError`], as
    /// [`store_error`](crate::store_error) does, except that a pool that gave no connection
    /// within its `acquire_timeout` (sqlx's bare "pool timed out") says where it connects,
    /// what the pool looked like, and what to do: whether the server was unreachable or every
    /// connection was in use. A write refused because the server takes none (SQLSTATE 25006:
    /// a failover or cutover left the pool on a server that is no longer the primary) also
    /// retires every connection the pool opened until then: a pool made by
    /// [`PgOptions`](crate::PgOptions) closes each at its next acquire and opens a new one.
    ///
    /// ```no_run
    /// # async fn demo(db: cqrs_postgres::PgDatabase) -> Result<(), cqrs_core::ports::StoreError> {
    /// let mut conn = db.acquire().await.map_err(|e| db.store_error(e))?;
    /// let open: i64 = cqrs_postgres::sqlx::query_scalar("SELECT count(*) FROM app.tickets")
    ///     .fetch_one(&mut *conn)
    ///     .await
    ///     .map_err(|e| db.store_error(e))?;
    /// # Ok(()) }
    /// ```
    pub fn store_error(&self, error: sqlx::Error) -> StoreError {
        self.retire_if_refused_as_read_only(&error);
        crate::error::pool_error(error, &self.pool, &self.target)
    }

    /// Retires the pool's connections (see [`retire_connections`](Self::retire_connections))
    /// when `error` is, or was caused by, a write the server refused because it takes none: a
    /// command's, whatever wrapped it.
    pub(crate) fn retire_if_refused_as_read_only(&self, error: &(dyn std::error::Error + 'static)) {
        if crate::error::refused_as_read_only(error) {
            self.retire_connections();
        }
    }

    /// The server takes no writes: the pool's connections opened until now are closed at their
    /// next acquire, so that new ones may reach the primary.
    fn retire_connections(&self) {
        // Without a retirement (a pool made elsewhere), the health check says what to do.
        if let Some(retirement) = &self.retirement
            && retirement.retire_all()
        {
            tracing::warn!(
                server = %self.target,
                "the server takes no writes: retiring the pool's connections opened until now, \
                 to connect again (a failover or cutover may have left them on a server that is \
                 no longer the primary; at most every {:?})",
                RETIRE_AT_MOST_EVERY
            );
        }
    }

    /// A connection of the pool for statements of your own, given back within
    /// [`answer_timeout`](crate::PgOptions::answer_timeout) when dropped, or closed: use it
    /// instead of `pool()` (or `pool().acquire()`) where the network may drop packets
    /// ([`PgPooledConnection`](crate::PgPooledConnection) says why). Waits at most the pool's
    /// [`acquire_timeout`](crate::PgOptions::acquire_timeout) for a free connection.
    ///
    /// ```no_run
    /// # async fn demo(db: cqrs_postgres::PgDatabase) -> Result<(), sqlx::Error> {
    /// let mut conn = db.acquire().await?;
    /// sqlx::query("SELECT 1").execute(&mut *conn).await?;
    /// # Ok(()) }
    /// ```
    pub async fn acquire(&self) -> Result<crate::PgPooledConnection, sqlx::Error> {
        let conn = self.pool.acquire().await?;
        Ok(crate::PgPooledConnection::new(conn, self.answer_timeout))
    }

    /// [`acquire`](Self::acquire), its failure mapped by [`store_error`](Self::store_error).
    pub(crate) async fn acquire_for_store(&self) -> Result<crate::PgPooledConnection, StoreError> {
        self.acquire().await.map_err(|e| self.store_error(e))
    }

    /// Begins a transaction of your own on the pool, at READ COMMITTED (what
    /// [`PgEventStore::append_in`](crate::PgEventStore::append_in) needs), as this crate begins
    /// its own: use it instead of `pool().begin()`.
    ///
    /// A caller that gives up while sqlx's `pool.begin()` waits for the server to confirm the
    /// `BEGIN` (a timeout, a client gone) leaves the connection inside a transaction that sqlx
    /// does not know of (sqlx 0.9 counts it only once confirmed): the pool hands it out again,
    /// and the next user's writes stay uncommitted while reported as stored. This one rolls
    /// such a transaction back once answered, waits at most
    /// [`answer_timeout`](crate::PgOptions::answer_timeout) for the `BEGIN`, and gives its
    /// connection back to the pool within that bound or closes it
    /// ([`PgTransaction`](crate::PgTransaction)).
    ///
    /// ```no_run
    /// # async fn demo(db: cqrs_postgres::PgDatabase) -> Result<(), sqlx::Error> {
    /// let mut tx = db.begin().await?;
    /// sqlx::query("SELECT 1").execute(&mut *tx).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin(&self) -> Result<crate::PgTransaction, sqlx::Error> {
        crate::sql::begin(self).await
    }

    /// Begins a transaction as [`begin`](Self::begin) does, for one that stays open, idle,
    /// while work runs elsewhere (holding a lock or a row until that work is done): the
    /// server's timeouts that end a transaction left idle are turned off for it,
    /// `idle_in_transaction_session_timeout` (which [`PgOptions`](crate::PgOptions) sets) and,
    /// on Postgres 17 and later, `transaction_timeout`. A vanished client still ends it (TCP
    /// keepalives); bounding it otherwise is the caller's.
    ///
    /// Append no events in it ([`PgEventStore::append_in`](crate::PgEventStore::append_in)):
    /// an append takes the schema's append lock until its transaction ends, so every other
    /// append of the schema would wait for as long as this one is held open.
    ///
    /// ```no_run
    /// # async fn demo(db: cqrs_postgres::PgDatabase) -> Result<(), sqlx::Error> {
    /// let mut tx = db.begin_held_open().await?;
    /// sqlx::query("SELECT pg_advisory_xact_lock(42)").execute(&mut *tx).await?;
    /// // .. long work on other connections ..
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin_held_open(&self) -> Result<crate::PgTransaction, sqlx::Error> {
        Self::held_open(self.begin().await?).await
    }

    /// Lifts `tx`'s idle timeouts, as [`begin_held_open`](Self::begin_held_open) does.
    pub(crate) async fn held_open(
        mut tx: crate::PgTransaction,
    ) -> Result<crate::PgTransaction, sqlx::Error> {
        // Older servers refuse the name `transaction_timeout`.
        let lift = if tx.server_version_num().is_some_and(|v| v >= 170_000) {
            "SELECT set_config('idle_in_transaction_session_timeout', '0', true), \
             set_config('transaction_timeout', '0', true)"
        } else {
            "SELECT set_config('idle_in_transaction_session_timeout', '0', true)"
        };
        sqlx::query(lift).execute(&mut *tx).await?;
        Ok(tx)
    }

    /// The schema that holds this crate's tables.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// Whether `other` holds its tables in the same place: the same schema of the same
    /// database on the same server, as the connect options name them (host, port, database).
    /// Clones of one `PgDatabase` always are; two handles made apart are when their URLs name
    /// the server alike (`localhost` and `127.0.0.1` do not). A unit of work of one store must
    /// not run a command meant for the other: its events would land where the other's relay
    /// never ships them.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), cqrs_postgres::PgError> {
    /// use cqrs_postgres::PgOptions;
    ///
    /// let a = PgOptions::new("postgres://postgres@db-a/app").connect().await?;
    /// let b = PgOptions::new("postgres://postgres@db-b/app").connect().await?;
    /// assert!(a.is_same_store(&a.clone()));
    /// assert!(!a.is_same_store(&b)); // both in schema `cqrs`, on two servers
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_same_store(&self, other: &PgDatabase) -> bool {
        self.sql.schema == other.sql.schema && self.target == other.target
    }

    /// The schema and where it is, for messages: ``schema `cqrs` of postgres at host:5432,
    /// database `app` ``.
    pub(crate) fn place(&self) -> String {
        format!("schema `{}` of {}", self.sql.schema, self.target)
    }

    /// The LISTEN/NOTIFY channel that every append notifies at commit: `{schema}_events`.
    pub fn channel(&self) -> &str {
        &self.sql.channel
    }

    /// Creates the schema if needed and applies the migrations it lacks. Safe to call from
    /// every instance at start-up: concurrent calls wait for each other (sqlx holds an
    /// advisory lock while migrating), and applied migrations are skipped. The migration
    /// history is the table `_sqlx_migrations` in the schema.
    ///
    /// Migrations applied by a newer build that this build does not know are ignored, so in
    /// a rolling upgrade (or a rollback) an instance of the previous build still starts on a
    /// schema the new one migrated: every migration keeps what earlier builds use working
    /// (new columns have defaults, nothing they read is dropped).
    ///
    /// On a schema that is current it creates and changes nothing: a role without the right
    /// to create schemas or tables (migrations run by another, a DBA) calls it at start-up
    /// too. It needs `USAGE` on the schema and `SELECT` on its `_sqlx_migrations`.
    pub async fn migrate(&self) -> Result<(), PgError> {
        self.migrate_with(&MIGRATIONS).await
    }

    /// [`migrate`](Self::migrate) with `migrations` (a prefix of [`MIGRATIONS`] in tests, as
    /// a previous build has).
    async fn migrate_with(
        &self,
        migrations: &[(i64, &'static str, &'static str)],
    ) -> Result<(), PgError> {
        let migrations = migrations
            .iter()
            .map(|(version, description, text)| {
                Migration::new(
                    *version,
                    (*description).into(),
                    MigrationType::Simple,
                    AssertSqlSafe(self.sql.render(text)).into_sql_str(),
                    false,
                )
            })
            .collect();
        let mut migrator = Migrator::with_migrations(migrations);
        migrator.set_ignore_missing(true);
        migrator.create_schema(format!("\"{}\"", self.sql.schema));
        migrator.dangerous_set_table_name(format!("\"{}\"._sqlx_migrations", self.sql.schema));
        let failed = |source| PgError::Migrate {
            schema: self.sql.schema.clone(),
            source,
        };
        // sqlx holds a session-level advisory lock while it migrates and returns early on an
        // error (or is cancelled) without releasing it; a pooled connection would keep it and
        // leave every other instance's `migrate` waiting. A connection that is closed after
        // the run takes the lock with it.
        let mut conn = self.acquire_for_store().await?;
        conn.close_on_drop();
        // Statements outside an explicit transaction (a single append, a read) take the
        // session's default level; a pool made elsewhere must make it READ COMMITTED, as one
        // made by `PgOptions` does. Checked here, the one call every server makes at start.
        // And a server that takes no writes (a standby, `default_transaction_read_only`) is
        // told as such here, not by the migration failing as if the server were away.
        let (isolation, read_only, encoding): (String, String, String) = sqlx::query_as(
            "SELECT current_setting('default_transaction_isolation'), \
                    current_setting('transaction_read_only'), \
                    current_setting('server_encoding')",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(store_error)?;
        if read_only == "on" {
            // Retryable, as a write refused for it is (SQLSTATE 25006): during a failover the
            // next start finds a primary. The text says what to do when it is the setting.
            return Err(PgError::Store(StoreError::Unavailable {
                backend: "postgres",
                source: "the server takes no writes (`transaction_read_only` is on: a standby, \
                         or `default_transaction_read_only` set for the role, the database or \
                         in the URL): point the URL at the primary, or turn the setting off \
                         (during a failover, start again once a primary is promoted)"
                    .into(),
            }));
        }
        // Event payloads, stream ids and keys are text from anyone: a database in another
        // encoding refuses what it cannot hold (22P05) as if the input were invalid (a 422 for
        // an emoji in a title), or, as SQL_ASCII, stores bytes unchecked.
        if encoding != "UTF8" {
            return Err(PgError::InvalidOptions(vec![format!(
                "the database's encoding is `{encoding}`, but this crate needs `UTF8` (events and \
                 keys may hold any Unicode character, which a `{encoding}` database refuses or \
                 stores unchecked): use a database created with `ENCODING 'UTF8'` (`CREATE \
                 DATABASE ... ENCODING 'UTF8' TEMPLATE template0`)"
            )]));
        }
        if isolation != "read committed" {
            return Err(PgError::InvalidOptions(vec![format!(
                "the pool's sessions run at `{isolation}`, but this crate needs `read committed` \
                 (a reader could skip events, and appends at `Any` could conflict): set \
                 `default_transaction_isolation` to `read committed` in the pool's connect \
                 options (`PgConnectOptions::options`), or build the pool with `PgOptions` \
                 and its session settings on; behind a pooler that refuses them, on the role \
                 or the database (`ALTER ROLE ... SET default_transaction_isolation = 'read \
                 committed'`)"
            )]));
        }
        // The pool's `statement_timeout` bounds commands, not a migration: the wait for another
        // instance's (sqlx's lock) or an index built on a large table may take longer, and
        // would fail every start. So would a `lock_timeout` or (Postgres 17) a
        // `transaction_timeout` the sessions get from the role, the database or the URL.
        // This session is closed after the run.
        sqlx::query(
            "SELECT set_config('statement_timeout', '0', false), \
                    set_config('lock_timeout', '0', false), \
                    CASE WHEN current_setting('transaction_timeout', true) IS NOT NULL \
                         THEN set_config('transaction_timeout', '0', false) END",
        )
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
        // Nothing left to do: sqlx's run would still create the schema and its history table
        // (`IF NOT EXISTS`), for which Postgres checks the CREATE privilege before it looks
        // whether they exist, and a role without it (migrations run by another, a DBA) could
        // not start on a schema that is current.
        if self.applied_already(&mut conn, &migrator).await {
            return Ok(());
        }
        // Not current: another instance may be migrating it right now. Look again once
        // sqlx's lock is ours, since a run after that other instance's would still issue
        // the `CREATE .. IF NOT EXISTS` a role without the right fails.
        use sqlx::migrate::Migrate;
        // sqlx's lock is one per database, and its wait has no bound: say why a start waits
        // (another schema's instance, another application migrating, or a session a failed
        // run left holding it), or it would look hung.
        {
            let mut lock = conn.lock();
            match tokio::time::timeout(MIGRATION_LOCK_PATIENCE, &mut lock).await {
                Ok(taken) => taken.map_err(failed)?,
                Err(_) => {
                    tracing::info!(
                        schema = %self.sql.schema,
                        "waiting for the migration lock: another migration in this database holds \
                         it (sqlx's lock is one per database: an instance of this or another schema, \
                         another application, or a session a failed run left holding it); the \
                         migration goes on once it is released"
                    );
                    lock.await.map_err(failed)?;
                }
            }
        }
        if !self.applied_already(&mut conn, &migrator).await {
            migrator.set_locking(false);
            // What `run` calls after its `acquire`, without the `Acquire` bound that made
            // this future fail to be `Send` (a `tokio::spawn(db.migrate())` did not compile).
            migrator
                .run_direct(None, &mut *conn, false)
                .await
                .map_err(failed)?;
        }
        // The closed connection releases it too, a moment later: a failed unlock is no
        // reason to fail a migration that went through.
        if let Err(e) = conn.unlock().await {
            tracing::debug!(error = %e, "could not release the migration lock; closing its connection does");
        }
        Ok(())
    }

    /// Whether every migration of `migrator` is recorded in the schema's history, whole and
    /// with its checksum. Anything else (no history, a dirty or changed migration, an error
    /// reading it) is `false`: the migrator runs, and says what is wrong.
    async fn applied_already(&self, conn: &mut PgConnection, migrator: &Migrator) -> bool {
        let table = format!("\"{}\"._sqlx_migrations", self.sql.schema);
        let exists: Result<bool, _> = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .fetch_one(&mut *conn)
            .await;
        if !matches!(exists, Ok(true)) {
            return false;
        }
        let applied: Result<Vec<(i64, Vec<u8>, bool)>, _> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT version, checksum, success FROM {table}"
        )))
        .fetch_all(&mut *conn)
        .await;
        let Ok(applied) = applied else {
            return false;
        };
        let applied: std::collections::HashMap<i64, (Vec<u8>, bool)> = applied
            .into_iter()
            .map(|(version, checksum, success)| (version, (checksum, success)))
            .collect();
        // A dirty row of any version, one of a newer build's too, is the migrator's to report.
        applied.values().all(|(_, success)| *success)
            && migrator.iter().all(|migration| {
                applied
                    .get(&migration.version)
                    .is_some_and(|(checksum, _)| checksum.as_slice() == migration.checksum.as_ref())
            })
    }

    /// Drops the schema and everything in it. For tests and tear-down scripts only: the
    /// events are gone. It waits for every transaction that holds a lock in the schema, for
    /// as long as they last: drop live idempotency guards and units of work first (a claim's
    /// transaction has the server's idle timeouts turned off, so it never ends by itself).
    pub async fn drop_schema(&self) -> Result<(), PgError> {
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.sql.schema
        )))
        .execute(&self.pool)
        .await
        .map_err(|e| self.store_error(e))?;
        Ok(())
    }

    /// The event store.
    pub fn event_store(&self) -> PgEventStore {
        PgEventStore::new(self.clone())
    }

    /// The snapshot store.
    pub fn snapshot_store(&self) -> PgSnapshotStore {
        PgSnapshotStore::new(self.clone())
    }

    /// The idempotency store, on this handle's clock.
    pub fn idempotency_store(&self) -> PgIdempotencyStore {
        PgIdempotencyStore::new(self.clone())
    }

    /// The projection store (inbox and checkpoints).
    pub fn projection_store(&self) -> PgProjectionStore {
        PgProjectionStore::new(self.clone())
    }

    /// The tower layer that runs each command in one transaction.
    pub fn command_layer(&self) -> PgCommandLayer {
        PgCommandLayer::new(self.clone())
    }
}

/// How the second half of the health check's wait ended.
enum Outside {
    /// The pool handed out a connection (or failed).
    Pooled(Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error>),
    /// The server answered a connection outside the pool: with the error it refused it with,
    /// if it did.
    Answers(Option<String>),
}

impl PgDatabase {
    /// Connects outside the pool, with the pool's options, and runs `SELECT 1`.
    async fn answers_outside_the_pool(&self) -> Result<(), sqlx::Error> {
        use sqlx::{ConnectOptions, Connection};
        let mut conn = self.pool.connect_options().connect().await?;
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut conn)
            .await?;
        conn.close().await
    }
}

/// The version of the last of [`MIGRATIONS`]: a schema migrated to less than this is not
/// ready for this build.
const LATEST_MIGRATION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The health check's wait when none is set with [`PgDatabase::with_health_wait`].
const DEFAULT_HEALTH_WAIT: Duration = Duration::from_secs(2);
/// How long `migrate` waits for sqlx's migration lock before it says it is waiting.
const MIGRATION_LOCK_PATIENCE: Duration = Duration::from_millis(500);

/// The shortest time between two retirements of the pool's connections (see [`Retirement`]).
const RETIRE_AT_MOST_EVERY: Duration = Duration::from_secs(5);

/// [`PgDatabase::with_claim_wait`]'s default.
const DEFAULT_CLAIM_WAIT: Duration = Duration::from_secs(5);

/// One query within the health wait (2 seconds unless set with
/// [`with_health_wait`](PgDatabase::with_health_wait)): healthy, or unhealthy with the reason.
/// Register it as a critical check of the runtime.
///
/// The query reads the schema's migration history: a schema never migrated, or migrated by an
/// older build than this one, is unhealthy and says to run [`migrate`](PgDatabase::migrate)
/// (every statement of this build would fail on it); one a newer build migrated is healthy,
/// as [`migrate`](PgDatabase::migrate) allows in a rolling upgrade. The role needs `SELECT`
/// on the schema's `_sqlx_migrations` table.
///
/// A pool whose every connection stays busy for the whole wait is degraded, not unhealthy: the
/// server answers, the instance is just loaded, and a load balancer that took every busy
/// instance out of rotation at once would turn a peak into an outage. Whether the server
/// answers is asked on a connection of the check's own, outside the pool, once the pool has
/// given none for half the wait (its other half, racing the pool; a refusal, such as too many
/// clients, is an answer too): sqlx counts a connection
/// in the pool from the start of its connect, so a pool whose places are all taken by
/// connects to a server that is down (requests retrying until their acquire timeout) looks as
/// full as one under load.
///
/// A pooled connection whose session the server ended (its backend terminated, a proxy that
/// dropped it idle) fails the check's query, which says nothing of the server: the check then asks
/// on a connection of its own, degraded when that one answers.
#[async_trait]
impl HealthCheck for PgDatabase {
    async fn check(&self) -> Health {
        let wait = self.health_wait;
        let now = tokio::time::Instant::now();
        // Saturating: a wait too long for the clock waits as long as it can.
        let far = now + Duration::from_secs(86_400 * 365);
        let deadline = now.checked_add(wait).unwrap_or(far);
        let half = wait / 2;
        let halfway = now.checked_add(half).unwrap_or(far);
        let acquired = match tokio::time::timeout_at(halfway, self.pool.acquire()).await {
            Ok(acquired) if !matches!(acquired, Err(sqlx::Error::PoolTimedOut)) => acquired,
            // Waiting at halfway; or given up by a pool whose acquire_timeout is shorter than
            // that, as busy.
            _ => {
                // Said in the report: the wait set, not the one measured, so the reason stays
                // the same from one readiness check to the next (a server logs each new one).
                let busy_for = if now.elapsed() >= half {
                    half
                } else {
                    // Given up by the pool: its own acquire_timeout, shorter.
                    self.pool.options().get_acquire_timeout().min(half)
                };
                // What the check's own connection found when it got no answer (refused,
                // unreachable): the pool may still hand out a connection meanwhile.
                let mut unanswered: Option<sqlx::Error> = None;
                let outside = async {
                    let acquire = self.pool.acquire();
                    let answers = self.answers_outside_the_pool();
                    tokio::pin!(acquire, answers);
                    loop {
                        tokio::select! {
                            acquired = &mut acquire => match acquired {
                                // The pool's own acquire_timeout, shorter than the wait:
                                // asked again until the server answers or the wait ends.
                                Err(sqlx::Error::PoolTimedOut) => acquire.set(self.pool.acquire()),
                                acquired => return Outside::Pooled(acquired),
                            },
                            answered = &mut answers, if unanswered.is_none() => match answered {
                                Ok(()) => return Outside::Answers(None),
                                // An answer all the same (too many clients, a role's
                                // connection limit): the server is up, and loaded.
                                Err(sqlx::Error::Database(e)) if refused_for_load(&*e) => {
                                    return Outside::Answers(Some(
                                        crate::error::ServerSaid(&*e).to_string(),
                                    ));
                                }
                                // Shutting down, in recovery, a login refused: no use to
                                // this instance, however full its pool.
                                Err(e) => unanswered = Some(e),
                            },
                        }
                    }
                };
                let outcome = tokio::time::timeout_at(deadline, outside).await;
                match (outcome, unanswered) {
                    (Ok(Outside::Pooled(acquired)), _) => acquired,
                    (Ok(Outside::Answers(refused)), _) => {
                        let max = self.pool.options().get_max_connections();
                        let refused = refused
                            .map(|e| format!(", and the server refused one more: {e}"))
                            .unwrap_or_default();
                        return Health::Degraded(format!(
                            "{}: all {max} pooled connections stayed busy for {busy_for:?}{refused}",
                            self.target
                        ));
                    }
                    (Err(_), Some(e)) => {
                        return Health::Unhealthy(format!(
                            "{}: no connection within {wait:?}, from the pool or of the check's \
                             own: {}",
                            self.target,
                            crate::error::Described(&e)
                        ));
                    }
                    (Err(_), None) => {
                        return Health::Unhealthy(format!(
                            "{}: no connection within {wait:?} (is the server up and reachable?)",
                            self.target
                        ));
                    }
                }
            }
        };
        // Closed unless its query returns: cut off by the wait or by a caller that dropped the
        // check (a probe's own timeout), it would go back through sqlx's ping, which has no
        // deadline, and a server that stopped answering would keep its place in the pool.
        let mut held = match acquired {
            Ok(conn) => {
                ClosedUnlessReturned::new(crate::PgPooledConnection::new(conn, self.answer_timeout))
            }
            // The error names the server ("postgres is unavailable: no connection to ...").
            Err(e) => return Health::Unhealthy(self.store_error(e).to_string()),
        };
        // With whether the server takes writes: after a failover that keeps connections (a
        // managed Postgres moving its name to the new primary), a pool can go on
        // reaching the old one, now a replica, where every write fails (25006).
        let ping = sqlx::query_as::<_, (i64, bool)>(AssertSqlSafe(
            self.sql.migrated_version_and_writable.clone(),
        ))
        .fetch_one(&mut *held.connection);
        let Ok(pinged) = tokio::time::timeout_at(deadline, ping).await else {
            drop(held);
            return Health::Unhealthy(format!("postgres did not answer within {wait:?}"));
        };
        // A pooled connection whose session is gone is closed, and the pool replaces it; so is
        // one on a server that takes no writes, so that a new one may reach the primary.
        if matches!(&pinged, Err(e) if session_lost(e)) || matches!(pinged, Ok((_, false))) {
            held.connection.close_on_drop();
        }
        if matches!(pinged, Ok((_, false))) {
            self.retire_connections();
        }
        held.give_back();
        match pinged {
            Ok((_, false)) => Health::Unhealthy(format!(
                "{}: the server takes no writes (`transaction_read_only` is on: a standby, a \
                 primary demoted by a failover, or `default_transaction_read_only` set): every \
                 command fails until the URL reaches the primary again; {}",
                self.target,
                if self.retirement.is_some() {
                    "the pool's connections opened until this check are replaced at their next \
                     use"
                } else {
                    "this pool was made elsewhere (`PgDatabase::from_pool`), so its connections \
                     are replaced only at their `max_lifetime`: restart the instance once the URL \
                     reaches the primary"
                }
            )),
            Ok((version, true)) if version >= LATEST_MIGRATION => Health::Healthy,
            // Every statement of this build would fail on tables it has not made or changed.
            Ok((version, true)) => Health::Unhealthy(format!(
                "{}: migrated up to version {version}, and this build needs version \
                 {LATEST_MIGRATION}: run `PgDatabase::migrate()` at start-up",
                self.place()
            )),
            // Never migrated (no schema, or no history in it).
            Err(e) if matches!(sqlstate(&e).as_deref(), Some("42P01" | "3F000")) => {
                Health::Unhealthy(format!(
                    "{}: not migrated: run `PgDatabase::migrate()` at start-up",
                    self.place()
                ))
            }
            // A pooled connection whose session is gone (its backend was terminated, or a
            // proxy dropped it while it sat idle) says nothing of the server: ask it on a
            // connection of the check's own, and leave the pool to replace the lost one.
            Err(e) if session_lost(&e) => {
                match tokio::time::timeout_at(deadline, self.answers_outside_the_pool()).await {
                    Ok(Ok(())) => Health::Degraded(format!(
                        "{}: a pooled connection was lost ({}); the server answers a new one, \
                         and the pool replaces lost connections as they fail",
                        self.target,
                        crate::error::Described(&e)
                    )),
                    // Full (the lost connection's place taken meanwhile): up, and loaded.
                    Ok(Err(sqlx::Error::Database(again))) if refused_for_load(&*again) => {
                        Health::Degraded(format!(
                            "{}: a pooled connection was lost ({}), and the server refused a \
                             new one: {}",
                            self.target,
                            crate::error::Described(&e),
                            crate::error::ServerSaid(&*again)
                        ))
                    }
                    Ok(Err(again)) => Health::Unhealthy(format!(
                        "{}: a pooled connection was lost ({}), and a new one failed: {}",
                        self.target,
                        crate::error::Described(&e),
                        store_error(again)
                    )),
                    Err(_) => Health::Unhealthy(format!(
                        "{}: a pooled connection was lost ({}), and a new one got no answer \
                         by the end of the check's {wait:?}",
                        self.target,
                        crate::error::Described(&e)
                    )),
                }
            }
            Err(e) => Health::Unhealthy(store_error(e).to_string()),
        }
    }
}

/// A pooled connection for work that may be given up mid-statement (a relay's batch, see
/// `PgOutboxRelay::watched_batch`; a backlog measurement; a health check's query). Given back
/// ([`give_back`](Self::give_back)) once the work returned, it goes back to the pool within
/// `answer_timeout`, as every connection this crate holds (`PgPooledConnection`); dropped before,
/// it is closed instead, within sqlx's 5 s: handed back, it would wait for the answer to the
/// statement given up, on a server that may have stopped answering.
pub(crate) struct ClosedUnlessReturned {
    pub(crate) connection: crate::PgPooledConnection,
    returned: bool,
}

impl ClosedUnlessReturned {
    pub(crate) async fn acquire(db: &PgDatabase) -> Result<Self, sqlx::Error> {
        Ok(Self::new(db.acquire().await?))
    }

    pub(crate) fn new(connection: crate::PgPooledConnection) -> Self {
        Self {
            connection,
            returned: false,
        }
    }

    /// The work returned: the connection goes back to the pool.
    pub(crate) fn give_back(mut self) {
        self.returned = true;
    }
}

impl Drop for ClosedUnlessReturned {
    fn drop(&mut self) {
        if !self.returned {
            self.connection.close_on_drop();
        }
    }
}

/// Whether a server that refused a connection did so for load (too many connections, the
/// server's or a role's; a configuration limit): it is up, and full. Any other refusal
/// (shutting down, in recovery, a login refused) leaves an instance without the database.
fn refused_for_load(error: &dyn sqlx::error::DatabaseError) -> bool {
    error.code().is_some_and(|code| code.starts_with("53"))
}

/// Whether `error` ended the connection's session rather than failing one statement: the
/// stream broke, or the server ended the session (a connection exception, an administrator's
/// or a crash shutdown, a session ended for idling).
fn session_lost(error: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match error {
        E::Io(_) | E::Tls(_) | E::Protocol(_) | E::WorkerCrashed => true,
        E::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" | "25P03" | "57P05"
                )
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;
    use crate::test_support::migrated_schema;

    /// `with_schema` keeps the handle's settings, which a handle made `from_pool` would reset.
    #[tokio::test]
    async fn with_schema_keeps_the_handles_settings() {
        use std::sync::Arc;
        use std::time::Duration;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://postgres@127.0.0.1:5432/test")
            .unwrap();
        let clock: Arc<dyn cqrs_core::clock::Clock> =
            Arc::new(cqrs_core::clock::ManualClock::new());
        let first = super::PgDatabase::from_pool(pool, "tenant_a")
            .unwrap()
            .with_clock(clock.clone())
            .with_health_wait(Duration::from_millis(123))
            .with_answer_timeout(Duration::from_millis(4_567))
            .with_claim_wait(Duration::from_millis(890));
        let second = first.with_schema("tenant_b").unwrap();
        assert_eq!(second.schema(), "tenant_b");
        assert_eq!(first.schema(), "tenant_a");
        assert!(Arc::ptr_eq(&second.clock, &clock));
        assert_eq!(
            (second.health_wait, second.answer_timeout, second.claim_wait),
            (first.health_wait, first.answer_timeout, first.claim_wait)
        );
        assert_ne!(first.answer_timeout, crate::options::DEFAULT_ANSWER_TIMEOUT);
    }

    /// In a rolling upgrade an instance of the previous build starts on a schema the new build
    /// migrated: the migrations it does not know are ignored, not an error that stops it.
    #[tokio::test]
    async fn a_previous_build_starts_on_a_schema_a_newer_build_migrated() {
        let Some(db) = migrated_schema("previous_build").await else {
            return;
        };
        let previous = &MIGRATIONS[..MIGRATIONS.len() - 1];
        db.migrate_with(previous)
            .await
            .expect("the previous build's migrate succeeds");
        db.migrate()
            .await
            .expect("and the current build's still does");
        db.drop_schema().await.expect("drop the test schema");
    }
}
