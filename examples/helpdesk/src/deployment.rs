//! What keeps instances of different helpdesks, or of one helpdesk in different modes, from
//! mixing by mistake.
//!
//! Two mistakes lose or leak events without an error of their own:
//! - two helpdesks (two schemas, or two databases) on one Redis with the same key prefix read
//!   each other's events: each schema has an id, and its instances claim the prefix with it
//!   ([`RedisStreamTransport::claim_prefix`]), so the second helpdesk is refused at start;
//! - an instance without Redis among instances with it (a replica missing `REDIS_URL`) runs
//!   the relays of the same names, which ship to its own process instead of Redis: the events
//!   it takes never reach the others' WebSockets. Each instance records its mode in the schema
//!   and renews it while it runs; one started in the other mode while such a record is fresh
//!   is refused. A stop removes its record, so switching modes (stop them all, start them in
//!   the other) is not held up; after a crash, the record goes stale within
//!   [`STALE_AFTER`].

use anyhow::Context;
use async_trait::async_trait;
use cqrs_core::BoxError;
use cqrs_core::runtime::{Worker, WorkerContext};
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
                 with_redis boolean NOT NULL,
                 seen_at timestamptz NOT NULL DEFAULT now()
             );"
        ),
    }
}

/// This instance's record in the schema; [`Worker`] that renews it and removes it at a stop.
pub(crate) struct Instance {
    db: PgDatabase,
    id: Uuid,
    with_redis: bool,
}

/// Claims `redis`'s key prefix for this schema, then records this instance, refusing to start
/// when instances of the other mode run on the schema. Run after the migrations.
pub(crate) async fn join(
    db: &PgDatabase,
    redis: Option<&RedisStreamTransport>,
) -> anyhow::Result<Instance> {
    let schema = db.schema();
    let run = |sql: String| sqlx::query(AssertSqlSafe(sql));
    run(format!(
        "INSERT INTO {schema}.helpdesk_schema_id (id) VALUES ($1) ON CONFLICT DO NOTHING"
    ))
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
    if let Some(redis) = redis {
        let owner = format!("helpdesk {schema_id} (schema `{schema}` of database `{database}`)");
        redis.claim_prefix(&owner).await.context(
            "another helpdesk uses this Redis key prefix: give each helpdesk (each schema) its \
             own HELPDESK_REDIS_PREFIX",
        )?;
    }
    let with_redis = redis.is_some();
    let stale = STALE_AFTER.as_secs();
    let others: (i64, Option<f64>) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*), extract(epoch FROM now() - max(seen_at))::float8
         FROM {schema}.helpdesk_instances
         WHERE with_redis <> $1 AND seen_at > now() - make_interval(secs => $2)"
    )))
    .bind(with_redis)
    .bind(stale as f64)
    .fetch_one(db.pool())
    .await
    .context("cannot read the instances running on this schema")?;
    if let (count @ 1.., Some(ago)) = others {
        let (theirs, mine) = if with_redis {
            ("without Redis", "with Redis")
        } else {
            ("with Redis", "without Redis")
        };
        anyhow::bail!(
            "{count} instance(s) {theirs} run on schema `{schema}` (the last renewed its \
             record {ago:.0} s ago), and this one would run {mine}: the two modes ship events \
             with relays of the same names, so the events one takes never reach the others' \
             WebSockets. Start every instance of a schema with the same REDIS_URL (set or \
             unset); to switch modes, stop them all first (a record left by a crash counts for \
             {stale} s after its last renewal)"
        );
    }
    let instance = Instance {
        db: db.clone(),
        id: Uuid::now_v7(),
        with_redis,
    };
    instance
        .renew()
        .await
        .context("cannot record this instance")?;
    run(format!(
        "DELETE FROM {schema}.helpdesk_instances WHERE seen_at < now() - interval '1 day'"
    ))
    .execute(db.pool())
    .await
    .context("cannot delete old instance records")?;
    Ok(instance)
}

impl Instance {
    async fn renew(&self) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.helpdesk_instances (instance, with_redis) VALUES ($1, $2)
             ON CONFLICT (instance) DO UPDATE SET seen_at = now()",
            self.db.schema()
        )))
        .bind(self.id)
        .bind(self.with_redis)
        .execute(self.db.pool())
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

    /// Renews the record every [`RENEW_EVERY`] (a failure is logged: the next renewal is well
    /// inside [`STALE_AFTER`]), and removes it when asked to stop.
    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        loop {
            tokio::select! {
                _ = ctx.shutdown.requested() => break,
                _ = tokio::time::sleep(RENEW_EVERY) => {}
            }
            if let Err(error) = self.renew().await {
                tracing::warn!(%error, "could not renew this instance's record in the schema");
            }
        }
        if let Err(error) = self.remove().await {
            tracing::warn!(
                %error,
                "could not remove this instance's record: an instance of the other mode starts \
                 once it is stale"
            );
        }
        Ok(())
    }
}
