//! Users and login throttling in Postgres, for the Postgres mode.

use crate::throttle::{Attempt, Counted, LoginThrottle};
use crate::users::{CreateUserError, UserRecord, UserStore};
use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use cqrs_core::CommandContext;
use cqrs_core::clock::Clock;
use cqrs_core::ports::StoreError;
use cqrs_postgres::sqlx::{self, AssertSqlSafe, Row};
use cqrs_postgres::{PgDatabase, PgUnitOfWork};
use helpdesk_api::postgres::store_error;
use helpdesk_api::{Migration, Role};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;

/// Sweeps asked for and not yet done, shared by the attempts that ask and the one task that
/// does them, one after another.
#[derive(Debug, Default)]
struct SweepsOwed(AtomicUsize);

impl SweepsOwed {
    /// Asks for one sweep; true when no task is sweeping, so the caller starts one.
    fn ask(&self) -> bool {
        self.0.fetch_add(1, Ordering::AcqRel) == 0
    }

    /// Called by the task before a sweep: how many are owed as it starts.
    fn starting(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// Called by the task after a sweep that started when `asked` were owed; true when none
    /// is owed any more and the task ends. A sweep that left nothing to sweep did what every
    /// ask before it wanted; a sweep cut short by its batch size did one ask's worth. Asks
    /// made while it ran wanted rows that may have left the window after it began (a later
    /// `since`), so they stay owed.
    fn swept(&self, asked: usize, more_left: bool) -> bool {
        let done = if more_left { 1 } else { asked };
        self.0.fetch_sub(done, Ordering::AcqRel) == done
    }

    /// The task ended without finishing (a panic, the runtime shutting down, also before it
    /// first ran): forget what was owed, so the next ask starts another.
    fn abandoned(&self) {
        self.0.store(0, Ordering::Release);
    }
}

/// The sweeping task's claim on [`SweepsOwed`]: abandons it when the task ends unfinished.
struct Sweeping {
    owed: Arc<SweepsOwed>,
    finished: bool,
}

impl Sweeping {
    /// The task did what was owed.
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Sweeping {
    fn drop(&mut self) {
        if !self.finished {
            self.owed.abandoned();
        }
    }
}

/// The auth plugin's tables in `schema`: users (email unique) and failed logins.
pub(crate) fn migration(schema: &str) -> Migration {
    Migration {
        name: "auth.users",
        sql: format!(
            "CREATE TABLE IF NOT EXISTS {schema}.users (
                id uuid PRIMARY KEY,
                email text NOT NULL UNIQUE,
                role text NOT NULL,
                display_name text,
                password_hash text NOT NULL,
                created_at timestamptz NOT NULL
            );
            CREATE TABLE IF NOT EXISTS {schema}.login_failures (
                key text NOT NULL,
                at timestamptz NOT NULL
            );
            CREATE INDEX IF NOT EXISTS login_failures_key_at ON {schema}.login_failures (key, at);
            CREATE INDEX IF NOT EXISTS login_failures_at ON {schema}.login_failures (at);"
        ),
    }
}

/// The users' count of logouts, added to a table made before it. A migration of its own: a
/// changed text runs again whole (the one above would retake its tables' locks), and this
/// one locks `users` once, at the first start of the release that brings it. Without a
/// `CHECK`: PostgreSQL before 13 adds a column's constraint again even when `ADD COLUMN IF
/// NOT EXISTS` finds the column (its bug 15180). A negative count set by hand reads as 0,
/// and the next logout starts from 0.
pub(crate) fn logouts_migration(schema: &str) -> Migration {
    Migration {
        name: "auth.users_logouts",
        sql: format!(
            "ALTER TABLE {schema}.users ADD COLUMN IF NOT EXISTS logouts bigint NOT NULL DEFAULT 0;"
        ),
    }
}

enum Key {
    Email(String),
    Id(Uuid),
}

/// Users in the `users` table; the email's uniqueness is the table's constraint.
#[derive(Clone, Debug)]
pub struct PgUserStore {
    db: PgDatabase,
    select: Arc<str>,
    insert: Arc<str>,
    log_out: Arc<str>,
}

impl PgUserStore {
    /// The users of `db`'s schema.
    pub fn new(db: PgDatabase) -> Self {
        let schema = db.schema().to_owned();
        Self {
            db,
            // Clamped to the years chrono holds: a row set to 'infinity' (by hand, a restore)
            // would panic in sqlx's decoding, on every request of that user.
            select: format!(
                "SELECT id, email, role, display_name, password_hash, \
                 {} AS created_at, logouts FROM {schema}.users",
                decodable("created_at")
            )
            .into(),
            insert: format!(
                "INSERT INTO {schema}.users (id, email, role, display_name, password_hash, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)"
            )
            .into(),
            log_out: format!(
                "UPDATE {schema}.users SET logouts = GREATEST(logouts, 0) + 1 WHERE id = $1 \
                 RETURNING logouts"
            )
            .into(),
        }
    }

    async fn one(&self, key: Key) -> Result<Option<UserRecord>, StoreError> {
        let mut conn = self.connection().await?;
        self.one_on(&mut *conn, key).await
    }

    /// A connection of the pool, given back within the database's `answer_timeout` when a
    /// request gives up on its statement (`PgDatabase::acquire`): run on `pool()`, such a
    /// statement on a network that drops packets kept its connection for minutes.
    async fn connection(&self) -> Result<cqrs_postgres::PgPooledConnection, StoreError> {
        self.db.acquire().await.map_err(|e| self.db.store_error(e))
    }

    async fn one_on<'e>(
        &self,
        executor: impl sqlx::PgExecutor<'e>,
        key: Key,
    ) -> Result<Option<UserRecord>, StoreError> {
        let query = match key {
            Key::Email(email) => {
                sqlx::query(AssertSqlSafe(format!("{} WHERE email = $1", self.select))).bind(email)
            }
            Key::Id(id) => {
                sqlx::query(AssertSqlSafe(format!("{} WHERE id = $1", self.select))).bind(id)
            }
        };
        let row = query
            .fetch_optional(executor)
            .await
            .map_err(|e| self.db.store_error(e))?;
        row.map(|row| {
            let role: String = row.try_get("role").map_err(store_error)?;
            Ok(UserRecord {
                id: row.try_get("id").map_err(store_error)?,
                email: row.try_get("email").map_err(store_error)?,
                role: if role == "agent" {
                    Role::Agent
                } else {
                    Role::Customer
                },
                display_name: row.try_get("display_name").map_err(store_error)?,
                password_hash: row.try_get("password_hash").map_err(store_error)?,
                created_at: row.try_get("created_at").map_err(store_error)?,
                logouts: logouts(row.try_get("logouts").map_err(store_error)?),
            })
        })
        .transpose()
    }
}

/// The `logouts` column: a negative one (set by hand) reads as 0.
fn logouts(stored: i64) -> u64 {
    u64::try_from(stored).unwrap_or(0)
}

/// `timestamptz` expression `column`, clamped to years 1 to 9999: Postgres also holds
/// `infinity` and years past chrono's, whose decoding panics.
fn decodable(column: &str) -> String {
    // GREATEST and LEAST skip NULLs: a NULL (`min` of no rows) would come out as year 1.
    format!(
        "CASE WHEN {column} IS NULL THEN NULL \
         ELSE LEAST(GREATEST({column}, '0001-01-01Z'), '9999-12-31Z') END"
    )
}

#[async_trait]
impl UserStore for PgUserStore {
    async fn create(&self, user: UserRecord) -> Result<(), CreateUserError> {
        let role = match user.role {
            Role::Agent => "agent",
            _ => "customer",
        };
        let done = sqlx::query(AssertSqlSafe(self.insert.to_string()))
            .bind(user.id)
            .bind(user.email.to_lowercase())
            .bind(role)
            .bind(&user.display_name)
            .bind(&user.password_hash)
            .bind(user.created_at)
            .execute(&mut *self.connection().await?)
            .await;
        match done {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_database_error()
                    .is_some_and(|d| d.is_unique_violation()) =>
            {
                Err(CreateUserError::EmailTaken)
            }
            Err(e) => Err(self.db.store_error(e).into()),
        }
    }

    async fn by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
        let email = email.to_lowercase();
        self.one(Key::Email(email)).await
    }

    async fn by_id(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError> {
        self.one(Key::Id(id)).await
    }

    async fn log_out(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
        let count: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.log_out.to_string()))
            .bind(id)
            .fetch_optional(&mut *self.connection().await?)
            .await
            .map_err(|e| self.db.store_error(e))?;
        Ok(count.map(logouts))
    }

    async fn by_id_in(
        &self,
        id: Uuid,
        ctx: &mut CommandContext,
    ) -> Result<Option<UserRecord>, StoreError> {
        // On the command's transaction when it runs on this database: one pool connection per
        // command, however many commands are in flight.
        match PgUnitOfWork::from_context(ctx) {
            Ok(uow) if uow.database().is_same_store(&self.db) => {
                let conn = uow.connection().await?;
                self.one_on(conn, Key::Id(id)).await
            }
            _ => self.by_id(id).await,
        }
    }
}

/// Login attempts in the `login_failures` table, so every instance counts them together.
#[derive(Clone)]
pub struct PgLoginThrottle {
    db: PgDatabase,
    clock: Arc<dyn Clock>,
    limit: u32,
    window: Duration,
    schema: Arc<str>,
    /// Sweeps asked for and not yet done. One task does them, one after another, so a burst
    /// of attempts does not queue a sweep each on the pool ahead of the next logins.
    sweeps_owed: Arc<SweepsOwed>,
}

impl std::fmt::Debug for PgLoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLoginThrottle")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl PgLoginThrottle {
    /// Blocks a key after `limit` failures within `window` (at most a century), on `clock`.
    pub fn new(db: PgDatabase, clock: Arc<dyn Clock>, limit: u32, window: Duration) -> Self {
        let window = window.min(crate::throttle::LONGEST_WINDOW);
        let schema = db.schema().into();
        Self {
            db,
            clock,
            limit,
            window,
            schema,
            sweeps_owed: Arc::default(),
        }
    }

    /// Deletes a few attempts of any key that left the window: keys of many different emails
    /// would otherwise stay forever. Each attempt adds one row and sweeps up to `SWEEP` (by the
    /// `at` index), so the table stays about as large as the attempts in the window. Returns
    /// whether it found as many as it may delete (so there may be more).
    async fn sweep(&self, since: DateTime<Utc>) -> bool {
        const SWEEP: i64 = 64;
        let sql = format!(
            "DELETE FROM {s}.login_failures WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM {s}.login_failures WHERE at <= $1 LIMIT $2
                FOR UPDATE SKIP LOCKED))",
            s = self.schema
        );
        let swept = sqlx::query(AssertSqlSafe(sql))
            .bind(since)
            .bind(SWEEP)
            .execute(self.db.pool())
            .await;
        match swept {
            Ok(done) => done.rows_affected() >= SWEEP as u64,
            // Only housekeeping: the next attempt sweeps again. A failure that will not pass
            // by itself (a role without DELETE, a statement timeout too short for the sweep)
            // is a warning: the table would grow without a word. Postgres out of reach is
            // not: the login itself reports that.
            Err(error) => {
                let error = self.db.store_error(error);
                if error.kind() == cqrs_core::ErrorKind::Unavailable {
                    tracing::debug!(%error, "could not sweep expired login failures");
                } else {
                    tracing::warn!(%error, "could not sweep expired login failures; the table grows until this is fixed");
                }
                false
            }
        }
    }

    fn since(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        // The window is at most a century (`new`): neither step can fail for a clock in years
        // chrono holds; if one did, nothing is forgotten.
        chrono::Duration::from_std(self.window)
            .ok()
            .and_then(|window| now.checked_sub_signed(window))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

/// The first key of the advisory lock a login attempt in `schema` takes (the second is the
/// attempt's key).
fn login_lock_space(schema: &str) -> String {
    format!("{schema}.login")
}

#[async_trait]
impl LoginThrottle for PgLoginThrottle {
    async fn attempt(&self, key: &str) -> Result<Attempt, StoreError> {
        // Microseconds, as Postgres keeps them (sqlx would cut them so too): the instant the
        // take-back finds the row by is the one stored.
        let now = self.clock.now().trunc_subsecs(6);
        let since = self.since(now);
        let mut tx = self.db.begin().await.map_err(|e| self.db.store_error(e))?;
        // One key's attempts are counted one at a time, across instances. The two-key lock
        // space does not overlap the `bigint` one cqrs-postgres uses; the schema in the first
        // key keeps two helpdesks sharing a database from waiting on each other's logins.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
            .bind(login_lock_space(&self.schema))
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        // Forget this key's attempts that left the window, so a key under attack stays small.
        let sql = format!(
            "DELETE FROM {}.login_failures WHERE key = $1 AND at <= $2",
            self.schema
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .bind(since)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        let sql = format!(
            "SELECT count(*), {} FROM {}.login_failures WHERE key = $1",
            decodable("min(at)"),
            self.schema
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(store_error)?;
        let count: i64 = row.try_get(0).map_err(store_error)?;
        let oldest: Option<DateTime<Utc>> = row.try_get(1).map_err(store_error)?;
        if count >= i64::from(self.limit) {
            tx.commit().await.map_err(store_error)?;
            // Blocked until the oldest attempt in the window leaves it.
            let until = oldest.map_or(now, |t| {
                t.checked_add_signed(now - since)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            });
            return Ok(Attempt::Blocked {
                retry_after: crate::throttle::retry_after(until - now),
            });
        }
        let sql = format!(
            "INSERT INTO {}.login_failures (key, at) VALUES ($1, $2)",
            self.schema
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        // In a task of its own: the attempt is counted, and a login given up from here on
        // must learn that (its guard takes the count back), not be dropped in the sweep. The
        // ask that finds none owed starts the task that does them all, one at a time.
        if self.sweeps_owed.ask() {
            let this = self.clone();
            // Made before the task: dropped with it, should it never run.
            let sweeping = Sweeping {
                owed: self.sweeps_owed.clone(),
                finished: false,
            };
            tokio::spawn(async move {
                loop {
                    let asked = sweeping.owed.starting();
                    let more_left = this.sweep(this.since(this.clock.now())).await;
                    if sweeping.owed.swept(asked, more_left) {
                        break;
                    }
                }
                sweeping.finish();
            });
        }
        Ok(Attempt::Counted(Counted::at(now)))
    }

    async fn take_back(&self, key: &str, counted: Counted) -> Result<(), StoreError> {
        // The attempt's own row (one of those alike, counted at the same instant), not the
        // key's latest: a failure counted meanwhile stays. `SKIP LOCKED`: two take-backs of
        // alike rows at once (a double-clicked login) would otherwise pick the same row, and
        // the second, finding it deleted, would delete none. A row the sweep holds has left
        // the window: skipped, as it is gone already.
        let sql = format!(
            "DELETE FROM {schema}.login_failures WHERE ctid = (
                 SELECT ctid FROM {schema}.login_failures WHERE key = $1 AND at = $2
                 LIMIT 1 FOR UPDATE SKIP LOCKED)",
            schema = self.schema
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .bind(counted.instant())
            .execute(
                &mut *self
                    .db
                    .acquire()
                    .await
                    .map_err(|e| self.db.store_error(e))?,
            )
            .await
            .map_err(|e| self.db.store_error(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_core::clock::ManualClock;
    use cqrs_postgres::PgOptions;

    /// A database in a schema of its own with the plugin's tables, or `None` (the test skips)
    /// when Postgres is not there and not required.
    async fn database(name: &str, connections: u32) -> Option<PgDatabase> {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let db = PgOptions::new(url.clone())
            .schema(cqrs_core::testing::test_id(name))
            .max_connections(connections)
            .connect()
            .await;
        let db = cqrs_core::testing::require_services("postgres", &url, db.is_ok())
            .then(|| db.ok())
            .flatten()?;
        db.migrate().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(migration(db.schema()).sql))
            .execute(db.pool())
            .await
            .unwrap();
        Some(db)
    }

    /// An ask made while a sweep runs stays owed when that sweep finds nothing more: it
    /// wants the rows that left the window after the sweep began.
    #[test]
    fn an_ask_made_during_a_sweep_is_owed_another() {
        let owed = SweepsOwed::default();
        assert!(owed.ask(), "the first ask starts the task");
        let asked = owed.starting();
        assert!(!owed.ask(), "the task is running");
        assert!(!owed.swept(asked, false), "the second ask is still owed");
        let asked = owed.starting();
        assert!(owed.swept(asked, false));
        assert!(owed.ask(), "the task ended: the next ask starts another");
    }

    /// A sweep that found nothing more settles every ask made before it; a full batch settles
    /// one ask (each attempt sweeps one batch at most).
    #[test]
    fn a_partial_sweep_settles_the_asks_before_it_and_a_full_one_settles_one() {
        let owed = SweepsOwed::default();
        assert!(owed.ask());
        assert!(!owed.ask());
        assert!(!owed.ask());
        let asked = owed.starting();
        assert!(!owed.swept(asked, true), "two asks left");
        let asked = owed.starting();
        assert!(
            owed.swept(asked, false),
            "nothing more to sweep: both settled"
        );
    }

    /// Attempts of keys nobody tries again are swept once they left the window.
    #[tokio::test]
    async fn expired_attempts_of_other_keys_are_swept() {
        let Some(db) = database("auth_sweep", 2).await else {
            return;
        };
        let clock = Arc::new(ManualClock::new());
        let window = Duration::from_secs(60);
        let throttle = PgLoginThrottle::new(db.clone(), clock.clone(), 10, window);
        for n in 0..100 {
            assert_eq!(
                throttle
                    .attempt(&format!("a{n}@x|ip"))
                    .await
                    .unwrap()
                    .retry_after(),
                None
            );
        }
        clock.advance(window + Duration::from_secs(1));
        throttle.attempt("someone-else@x|ip").await.unwrap();
        throttle.attempt("someone-else@x|ip").await.unwrap();
        // The sweeps run in tasks of their own, after each attempt.
        let count = format!("SELECT count(*) FROM {}.login_failures", db.schema());
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "only the attempts still in the window are left",
            || async {
                let rows: i64 = sqlx::query_scalar(AssertSqlSafe(count.clone()))
                    .fetch_one(db.pool())
                    .await
                    .unwrap();
                (rows == 2).then_some(())
            },
        )
        .await;
        db.drop_schema().await.unwrap();
    }

    /// A take-back deletes its own attempt's row, not the key's latest: a failure counted
    /// while it was in flight keeps its place in the window.
    #[tokio::test]
    async fn a_take_back_deletes_its_own_attempt_not_a_later_failure() {
        let Some(db) = database("auth_own_take_back", 2).await else {
            return;
        };
        let clock = Arc::new(ManualClock::new());
        // Below a microsecond too: the row keeps microseconds, and is found all the same.
        clock.advance(Duration::from_nanos(1_234_567));
        let throttle = PgLoginThrottle::new(db.clone(), clock.clone(), 2, Duration::from_secs(60));
        crate::throttle::a_take_back_keeps_a_later_failure(&throttle, &clock).await;
        db.drop_schema().await.unwrap();
    }

    /// Take-backs of one key at the same moment (a double-clicked login with the right
    /// password) each take back an attempt of their own: none is left as a failure.
    #[tokio::test]
    async fn concurrent_take_backs_each_remove_an_attempt() {
        let Some(db) = database("auth_take_back", 8).await else {
            return;
        };
        let throttle = PgLoginThrottle::new(
            db.clone(),
            Arc::new(ManualClock::new()),
            100,
            Duration::from_secs(60),
        );
        const KEY: &str = "someone@x|ip";
        for round in 0..5 {
            let mut counted = Vec::new();
            for _ in 0..16 {
                match throttle.attempt(KEY).await.unwrap() {
                    Attempt::Counted(c) => counted.push(c),
                    blocked => panic!("{blocked:?}"),
                }
            }
            let mut take_backs = tokio::task::JoinSet::new();
            for c in counted {
                let throttle = throttle.clone();
                take_backs.spawn(async move { throttle.take_back(KEY, c).await });
            }
            for result in take_backs.join_all().await {
                result.unwrap();
            }
            let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT count(*) FROM {}.login_failures WHERE key = $1",
                db.schema()
            )))
            .bind(KEY)
            .fetch_one(db.pool())
            .await
            .unwrap();
            assert_eq!(left, 0, "attempts left after round {round}'s take-backs");
        }
        db.drop_schema().await.unwrap();
    }

    /// Two helpdesks in one database (a schema each) count their logins apart: one's attempt
    /// for a key does not wait on the other's lock for the same key, while an attempt in the
    /// schema whose lock is held does.
    #[tokio::test]
    async fn logins_in_another_schema_do_not_wait_on_this_ones_lock() {
        let (Some(held_db), Some(other_db)) = (
            database("auth_lock_held", 4).await,
            database("auth_lock_other", 4).await,
        ) else {
            return;
        };
        const KEY: &str = "someone@x|ip";
        let throttle = |db: &PgDatabase| {
            PgLoginThrottle::new(
                db.clone(),
                Arc::new(ManualClock::new()),
                10,
                Duration::from_secs(60),
            )
        };
        let mut holder = held_db.pool().begin().await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
            .bind(login_lock_space(held_db.schema()))
            .bind(KEY)
            .execute(&mut *holder)
            .await
            .unwrap();

        let other = tokio::time::timeout(Duration::from_secs(10), throttle(&other_db).attempt(KEY))
            .await
            .expect("an attempt in another schema waited on this schema's lock");
        assert!(matches!(other.unwrap(), Attempt::Counted(_)));

        let held = throttle(&held_db);
        let waiting = tokio::spawn(async move { held.attempt(KEY).await });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waits: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND classid::int = hashtext($1) AND objid::int = hashtext($2)",
            )
            .bind(login_lock_space(held_db.schema()))
            .bind(KEY)
            .fetch_one(other_db.pool())
            .await
            .unwrap();
            if waits > 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "an attempt in the schema whose lock is held never waited for it"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        holder.rollback().await.unwrap();
        let held = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the attempt still waits after the lock was released")
            .unwrap();
        assert!(matches!(held.unwrap(), Attempt::Counted(_)));
        held_db.drop_schema().await.unwrap();
        other_db.drop_schema().await.unwrap();
    }
}
