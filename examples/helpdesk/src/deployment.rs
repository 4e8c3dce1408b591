//! What keeps instances of different helpdesks, or of one helpdesk shipping its events to
//! different places, from mixing by mistake.
//!
//! Two mistakes lose or leak events without an error of their own:
//! - two helpdesks (two schemas, or two databases) on one Redis with the same key prefix read
//!   each other's events: each schema has an id, and its instances claim the prefix with it
//!   ([`RedisStreamTransport::claim_prefix`]), so the second helpdesk is refused at start;
//! - instances of one schema that ship events to different places (one without Redis among
//!   instances with it, a replica missing `REDIS_URL`; or another Redis server or prefix) run
//!   the relays of the same names, so the events one takes never reach the others'
//!   WebSockets. Each instance records where it ships in the schema and renews the record
//!   while it runs; one started with another destination while such a record is fresh is
//!   refused. A stop removes its record, so switching (stop them all, start them with the new
//!   setting) is not held up; after a crash, the record goes stale within [`STALE_AFTER`].

use anyhow::Context;
use async_trait::async_trait;
use cqrs_core::BoxError;
use cqrs_core::ports::TransportError;
use cqrs_core::runtime::{Health, Worker, WorkerContext};
use cqrs_postgres::PgDatabase;
use cqrs_postgres::sqlx::{self, AssertSqlSafe};
use cqrs_redis::RedisStreamTransport;
use helpdesk_api::Migration;
use std::time::Duration;
use uuid::Uuid;

/// How often a running instance renews its record.
const RENEW_EVERY: Duration = Duration::from_secs(30);

/// How long after its last renewal an instance's record counts as gone (a crash, a kill).
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(90);

/// What an instance without Redis records as where its events go.
const NO_TRANSPORT: &str = "nowhere (no REDIS_URL)";

/// The schema's id and the instances' records.
pub(crate) fn migration(schema: &str) -> Migration {
    Migration {
        name: "deployment",
        sql: format!(
            "CREATE TABLE IF NOT EXISTS {schema}.helpdesk_schema_id (
                 only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                 id uuid NOT NULL
             );
             CREATE TABLE IF NOT EXISTS {schema}.helpdesk_instances (
                 instance uuid PRIMARY KEY,
                 events_to text NOT NULL,
                 seen_at timestamptz NOT NULL DEFAULT now()
             );"
        ),
    }
}

/// Where this instance ships its events, to Redis: the server (its URL without credentials)
/// and the key prefix.
pub(crate) struct RedisTarget<'a> {
    pub(crate) transport: &'a RedisStreamTransport,
    /// The URL, without its credentials.
    pub(crate) url: String,
    pub(crate) prefix: &'a str,
}

/// This instance's record in the schema; [`Worker`] that renews it and removes it at a stop.
pub(crate) struct Instance {
    db: PgDatabase,
    id: Uuid,
    events_to: String,
}

/// Claims the Redis key prefix for this schema; then, unless `record` is false (an instance
/// that runs no relay, in tests), records this instance, refusing to start when instances
/// that ship elsewhere run on the schema. Run after the migrations, last before the workers
/// start: a start that fails later would leave its record behind.
pub(crate) async fn join(
    db: &PgDatabase,
    redis: Option<RedisTarget<'_>>,
    record: bool,
) -> anyhow::Result<Option<Instance>> {
    let schema = db.schema();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {schema}.helpdesk_schema_id (id) VALUES ($1) ON CONFLICT DO NOTHING"
    )))
    .bind(Uuid::now_v7())
    .execute(db.pool())
    .await
    .context("cannot record the schema's id")?;
    let (schema_id, database): (Uuid, String) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, current_database() FROM {schema}.helpdesk_schema_id"
    )))
    .fetch_one(db.pool())
    .await
    .context("cannot read the schema's id")?;
    let events_to = match &redis {
        Some(target) => {
            // The id alone: the same helpdesk under a renamed database is still itself.
            match target
                .transport
                .claim_prefix(&format!("helpdesk {schema_id}"))
                .await
            {
                Ok(()) => {}
                Err(error @ TransportError::Invalid(_)) => {
                    return Err(anyhow::Error::new(error).context(format!(
                        "another helpdesk uses the Redis key prefix `{}` (this one is schema \
                         `{schema}` of database `{database}`, id {schema_id}): give each \
                         helpdesk (each schema) its own HELPDESK_REDIS_PREFIX",
                        target.prefix
                    )));
                }
                Err(error) => {
                    return Err(anyhow::Error::new(error)
                        .context("cannot claim the Redis key prefix for this helpdesk"));
                }
            }
            format!("{} prefix `{}`", target.url, target.prefix)
        }
        None => NO_TRANSPORT.to_owned(),
    };
    if !record {
        return Ok(None);
    }
    let instance = Instance {
        db: db.clone(),
        id: Uuid::now_v7(),
        events_to,
    };
    // Checked and recorded under a lock: instances starting together see each other.
    let mut tx = db.begin().await.context("cannot record this instance")?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("helpdesk-instances:{schema}"))
        .execute(&mut *tx)
        .await
        .context("cannot record this instance")?;
    let stale = STALE_AFTER.as_secs();
    let others: Vec<(String, i64, f64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT events_to, count(*), extract(epoch FROM now() - max(seen_at))::float8
         FROM {schema}.helpdesk_instances
         WHERE events_to <> $1 AND seen_at > now() - make_interval(secs => $2)
         GROUP BY events_to ORDER BY events_to"
    )))
    .bind(&instance.events_to)
    .bind(stale as f64)
    .fetch_all(&mut *tx)
    .await
    .context("cannot read the instances running on this schema")?;
    if !others.is_empty() {
        let theirs: Vec<String> = others
            .iter()
            .map(|(to, count, ago)| {
                format!(
                    "{count} instance(s) ship to {to} (the last renewed its record {ago:.0} s ago)"
                )
            })
            .collect();
        anyhow::bail!(
            "{} on schema `{schema}`, and this one would ship to {}: instances of a schema run \
             relays of the same names, so the events one takes never reach the others' \
             WebSockets. Start every instance of a schema with the same REDIS_URL (set or \
             unset, spelled alike) and HELPDESK_REDIS_PREFIX; to change them, stop every \
             instance first (a record left by a crash counts for {stale} s after its last \
             renewal)",
            theirs.join("; "),
            instance.events_to
        );
    }
    instance
        .renew(&mut *tx)
        .await
        .context("cannot record this instance")?;
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {schema}.helpdesk_instances WHERE seen_at < now() - interval '1 day'"
    )))
    .execute(&mut *tx)
    .await
    .context("cannot delete old instance records")?;
    tx.commit().await.context("cannot record this instance")?;
    Ok(Some(instance))
}

impl Instance {
    async fn renew<'c, E>(&self, executor: E) -> Result<(), sqlx::Error>
    where
        E: sqlx::Executor<'c, Database = sqlx::Postgres>,
    {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.helpdesk_instances (instance, events_to) VALUES ($1, $2)
             ON CONFLICT (instance) DO UPDATE SET seen_at = now()",
            self.db.schema()
        )))
        .bind(self.id)
        .bind(&self.events_to)
        .execute(executor)
        .await
        .map(drop)
    }

    async fn remove(&self) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {}.helpdesk_instances WHERE instance = $1",
            self.db.schema()
        )))
        .bind(self.id)
        .execute(self.db.pool())
        .await
        .map(drop)
    }
}

#[async_trait]
impl Worker for Instance {
    fn name(&self) -> &str {
        "instance-record"
    }

    /// Renews the record every [`RENEW_EVERY`]: degraded while a renewal fails (the next one
    /// is well inside [`STALE_AFTER`]); removes it when asked to stop.
    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        ctx.health.set(Health::Healthy);
        loop {
            tokio::select! {
                _ = ctx.shutdown.requested() => break,
                _ = tokio::time::sleep(RENEW_EVERY) => {}
            }
            match self.renew(self.db.pool()).await {
                Ok(()) => ctx.health.set(Health::Healthy),
                Err(error) => {
                    tracing::warn!(%error, "could not renew this instance's record in the schema");
                    ctx.health.set(Health::Degraded(format!(
                        "could not renew this instance's record in the schema: {}",
                        self.db.store_error(error)
                    )));
                }
            }
        }
        if let Err(error) = self.remove().await {
            tracing::warn!(
                %error,
                "could not remove this instance's record: an instance shipping elsewhere \
                 starts once it is stale"
            );
        }
        Ok(())
    }
}
