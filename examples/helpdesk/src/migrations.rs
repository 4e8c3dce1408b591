//! The plugins' DDL, run once per schema for each text of it.
//!
//! A plugin's [`Migration`] is idempotent (`CREATE ... IF NOT EXISTS`), but running it again is
//! not free: `CREATE INDEX IF NOT EXISTS` takes a `SHARE` lock on its table *before* it finds
//! the index there, and that lock waits behind any open write on the table while every later
//! write waits behind it. Run on every start, a restarting instance would stall the writes of
//! the instances still serving. So each migration is recorded in `helpdesk_migrations` with its
//! SQL and skipped when that SQL was applied already (every text applied is kept, so the old and
//! the new build of a rolling upgrade do not run each other's in turn); one that must run waits
//! at most
//! [`LOCK_TIMEOUT`] for a table lock and then fails the start with an error that says so,
//! instead of queueing every writer behind it.

use anyhow::Context;
use cqrs_postgres::PgDatabase;
use cqrs_postgres::sqlx::{self, AssertSqlSafe};
use helpdesk_api::Migration;

/// How long a migration that must run waits for a lock on a table in use.
pub(crate) const LOCK_TIMEOUT: &str = "5s";

/// Runs the plugins' DDL in order, each in a transaction holding an advisory lock (instances
/// starting at once do not race), skipping what this schema already ran with the same SQL.
pub(crate) async fn run(
    db: &PgDatabase,
    migrations: &[(&'static str, Migration)],
) -> anyhow::Result<()> {
    let schema = db.schema();
    let lock_key = format!("helpdesk-migrations:{schema}");
    // Said once per start, not once per migration.
    let mut told = false;
    // Once, under the lock, so two instances do not both create it.
    let mut tx = locked(db, &lock_key, &mut told).await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {schema}.helpdesk_migrations (
             name text NOT NULL,
             sql_md5 text NOT NULL,
             sql text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (name, sql_md5)
         )"
    )))
    .execute(&mut *tx)
    .await
    .context("cannot create the table of applied migrations")?;
    tx.commit().await.context("cannot commit a migration")?;
    for &(plugin, ref migration) in migrations {
        let key = format!("{plugin}/{}", migration.name);
        let mut tx = locked(db, &lock_key, &mut told).await?;
        let applied: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.helpdesk_migrations
                 WHERE name = $1 AND sql_md5 = md5($2) AND sql = $2)"
        )))
        .bind(&key)
        .bind(&migration.sql)
        .fetch_one(&mut *tx)
        .await
        .context("cannot read the applied migrations")?;
        if applied {
            tx.commit().await.context("cannot commit a migration")?;
            continue;
        }
        sqlx::raw_sql(AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"
        )))
        .execute(&mut *tx)
        .await
        .context("cannot set the migration's lock timeout")?;
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(migration.sql.clone()))
            .execute(&mut *tx)
            .await
        {
            return Err(failed(plugin, migration.name, e));
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {schema}.helpdesk_migrations (name, sql_md5, sql) VALUES ($1, md5($2), $2)
             ON CONFLICT (name, sql_md5) DO UPDATE SET applied_at = now()"
        )))
        .bind(&key)
        .bind(&migration.sql)
        .execute(&mut *tx)
        .await
        .context("cannot record an applied migration")?;
        tx.commit().await.context("cannot commit a migration")?;
    }
    Ok(())
}

/// A transaction holding the migrations' advisory lock of the schema.
async fn locked(
    db: &PgDatabase,
    lock_key: &str,
    told: &mut bool,
) -> anyhow::Result<cqrs_postgres::PgTransaction> {
    // Waiting behind another instance's migration, or running a long one, is no statement to
    // cut short: the session's timeouts from the role, the database or the URL
    // (`statement_timeout`, `lock_timeout`, Postgres 17's `transaction_timeout`) would fail the
    // start instead. Lifted for this transaction only; a migration that must run then sets
    // its own lock timeout.
    let mut tx = db
        .begin_held_open()
        .await
        .context("cannot begin a migration")?;
    sqlx::query(
        "SELECT set_config('statement_timeout', '0', true), set_config('lock_timeout', '0', true)",
    )
    .execute(&mut *tx)
    .await
    .context("cannot lift the session's timeouts for a migration")?;
    // Tried first, so that an instance waiting behind another's migration (a backfill of a
    // large table may take minutes) says why it does not start yet.
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1))")
        .bind(lock_key)
        .fetch_one(&mut *tx)
        .await
        .context("cannot take the migration lock")?;
    if !taken {
        if !*told {
            tracing::info!(
                lock = lock_key,
                "waiting for the migration lock: another instance is migrating this schema"
            );
        }
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(lock_key)
            .execute(&mut *tx)
            .await
            .context("cannot take the migration lock")?;
        if !*told {
            tracing::info!(lock = lock_key, "took the migration lock");
            *told = true;
        }
    }
    Ok(tx)
}

/// Why a plugin's migration failed; when it gave up waiting for a lock, what to do.
fn failed(plugin: &str, name: &str, e: sqlx::Error) -> anyhow::Error {
    let waited = e
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "55P03");
    // Through the adapter's wrapper: sqlx's text ends in " at line N", the server's source
    // line, which would read as a line of the migration; the wrapper says where in the
    // migration's statement the error points instead.
    let failed = anyhow::Error::new(cqrs_postgres::SqlxError::from(e))
        .context(format!("the {plugin} plugin's migration {name} failed"));
    if !waited {
        return failed;
    }
    failed.context(format!(
        "the {plugin} plugin's migration {name} waited {LOCK_TIMEOUT} for a table lock that \
         another transaction holds, and gave up rather than hold up the writes queued behind \
         it; start again (when the long transaction has ended: see pg_stat_activity)"
    ))
}
