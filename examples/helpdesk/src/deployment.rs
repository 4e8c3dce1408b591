//! What keeps instances of different helpdesks, or of one helpdesk shipping its events to
//! different places, from mixing by mistake.
//!
//! Two mistakes lose or leak events without an error of their own:
//! - two helpdesks (two schemas, or two databases) on one Redis with the same key prefix read
//!   each other's events: each schema has an id, and its instances claim the prefix with it
//!   ([`RedisStreamTransport::claim_prefix`]), so the second helpdesk is refused at start; the
//!   instances claim it again while they run ([`PrefixClaim`]), since a Redis that lost its
//!   data forgets the claim;
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

/// How often a running instance renews its record and its claim on the Redis key prefix,
/// unless [`Hooks::deployment_checks_every`](crate::Hooks::deployment_checks_every) says.
pub(crate) const RENEW_EVERY: Duration = Duration::from_secs(30);

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
                 seen_as text NOT NULL,
                 seen_at timestamptz NOT NULL DEFAULT now()
             );
             ALTER TABLE {schema}.helpdesk_instances ADD COLUMN IF NOT EXISTS token_key text;
             ALTER TABLE {schema}.helpdesk_instances ADD COLUMN IF NOT EXISTS settings_key text;"
        ),
    }
}

/// Where this instance ships its events, to Redis: the server and the key prefix.
pub(crate) struct RedisTarget<'a> {
    pub(crate) transport: &'a RedisStreamTransport,
    /// `REDIS_URL`.
    pub(crate) url: &'a str,
    pub(crate) prefix: &'a str,
}

/// A Redis server as instances compare it: scheme, host (lower case), port and database
/// number, each with its default filled in; no credentials, no options. Two spellings of one
/// server (`redis://Cache`, `redis://cache:6379/0/`) compare equal; a host name and its
/// address (`localhost`, `127.0.0.1`) do not. For a sentinel or cluster URL this is its first
/// node, and the service name and other nodes are not compared.
pub(crate) fn redis_server(url: &str) -> String {
    let Ok(parsed) = url::Url::parse(url.trim()) else {
        return crate::config::redacted_redis_url(url);
    };
    let port = parsed.port().unwrap_or(6379);
    let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
    let database = parsed.path().trim_matches('/');
    let database = if database.is_empty() { "0" } else { database };
    format!("{}://{host}:{port}/{database}", parsed.scheme())
}

/// An id of the token secret (`HELPDESK_JWT_SECRET`): an HMAC of a constant under it, so
/// instances can tell whether they share it without the secret leaving the process.
pub(crate) fn token_key(secret: &[u8]) -> anyhow::Result<String> {
    id_under(secret, b"helpdesk: the id of the token secret")
}

/// What instances record of `message` to compare it: the first 16 characters (96 bits) of
/// its HMAC-SHA256 under `secret`.
fn id_under(secret: &[u8], message: &[u8]) -> anyhow::Result<String> {
    let key = jsonwebtoken::EncodingKey::from_secret(secret)?;
    let mac = jsonwebtoken::crypto::sign(message, &key, jsonwebtoken::Algorithm::HS256)?;
    Ok(mac.chars().take(16).collect())
}

/// The settings every instance of a schema must share besides the secret, as instances compare
/// them: the agent list, the agent code, and the login attempts and window (the instances share
/// one table of failed logins, which each prunes by its own window and counts against its own
/// limit).
pub(crate) struct SharedSettings<'a> {
    /// `HELPDESK_AGENT_EMAILS`, as the configuration gives them (trimmed, empty ones dropped).
    pub(crate) agent_emails: &'a std::collections::HashSet<String>,
    /// `HELPDESK_AGENT_CODE`.
    pub(crate) agent_code: Option<&'a str>,
    pub(crate) login_attempts: u32,
    pub(crate) login_window_seconds: u64,
}

/// An id of the [`SharedSettings`]: an HMAC of them under the token secret, so instances can
/// tell whether they share them without the agent code (or the list) leaving the process, and
/// without a key that could be tried against guesses of the code offline.
pub(crate) fn settings_key(secret: &[u8], settings: &SharedSettings<'_>) -> anyhow::Result<String> {
    // Emails as the auth plugin keys accounts by them, so two spellings of one list compare
    // equal.
    let mut agents: Vec<String> = settings
        .agent_emails
        .iter()
        .map(|email| helpdesk_auth::canonical_email(email))
        .collect();
    agents.sort();
    agents.dedup();
    let text = serde_json::json!({
        "agent_emails": agents,
        "agent_code": settings.agent_code,
        "login_attempts": settings.login_attempts,
        "login_window_seconds": settings.login_window_seconds,
    })
    .to_string();
    id_under(secret, text.as_bytes())
}

/// This instance's record in the schema; [`Worker`] that renews it and removes it at a stop,
/// and reports instances that sign tokens with another secret.
pub(crate) struct Instance {
    db: PgDatabase,
    id: Uuid,
    events_to: String,
    /// Where to find it: host name, process id, listening address.
    seen_as: String,
    /// The id of its token secret ([`token_key`]).
    token_key: String,
    /// The id of its shared settings ([`settings_key`]).
    settings_key: String,
    /// How often the record is renewed.
    every: Duration,
}

/// What keeps a running instance's place in its deployment: its record in the schema (none
/// for an instance that is not recorded) and its claim on the Redis key prefix (none without
/// Redis), each a [`Worker`] that renews it every [`RENEW_EVERY`] or as the hooks say.
pub(crate) struct Joined {
    pub(crate) instance: Option<Instance>,
    pub(crate) claim: Option<PrefixClaim>,
}

/// Refuses to start when instances that ship elsewhere run on the schema, then claims the
/// Redis key prefix for this helpdesk, then records this instance, all in one transaction
/// under a lock. With `record` false (an instance that runs no relay, in tests), the instance
/// is neither checked nor recorded; the prefix is still claimed. Run after
/// the migrations, last before the workers start: a start that failed later would leave its
/// record behind. `bind` is the listening address, for the record; `every`, how often the
/// workers returned renew the record and the claim.
pub(crate) async fn join(
    db: &PgDatabase,
    redis: Option<RedisTarget<'_>>,
    record: bool,
    bind: std::net::SocketAddr,
    token_key: String,
    settings_key: String,
    every: Duration,
) -> anyhow::Result<Joined> {
    let schema = db.schema();
    let failed = "cannot record this instance in the schema";
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {schema}.helpdesk_schema_id (id) VALUES ($1) ON CONFLICT DO NOTHING"
    )))
    .bind(Uuid::now_v7())
    .execute(db.pool())
    .await
    .context("cannot record the schema's id")?;
    let events_to = match &redis {
        Some(target) => format!("{} prefix `{}`", redis_server(target.url), target.prefix),
        None => NO_TRANSPORT.to_owned(),
    };
    // Checked, claimed and recorded under a lock: instances starting together see each other.
    let mut tx = db.begin().await.context(failed)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("helpdesk-instances:{schema}"))
        .execute(&mut *tx)
        .await
        .context(failed)?;
    let (schema_id, database): (Uuid, String) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, current_database() FROM {schema}.helpdesk_schema_id"
    )))
    .fetch_one(&mut *tx)
    .await
    .context("cannot read the schema's id")?;
    if record {
        let stale = STALE_AFTER.as_secs();
        let others: Vec<(String, i64, f64, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT events_to, count(*), extract(epoch FROM now() - max(seen_at))::float8,
                    string_agg(seen_as, ', ' ORDER BY seen_as)
             FROM {schema}.helpdesk_instances
             WHERE events_to <> $1 AND seen_at > now() - make_interval(secs => $2)
             GROUP BY events_to ORDER BY events_to"
        )))
        .bind(&events_to)
        .bind(stale as f64)
        .fetch_all(&mut *tx)
        .await
        .context("cannot read the instances running on this schema")?;
        if !others.is_empty() {
            let theirs: Vec<String> = others
                .iter()
                .map(|(to, count, ago, seen_as)| {
                    format!(
                        "{count} instance(s) ship to {to} ({seen_as}; the last renewed its \
                         record {ago:.0} s ago)"
                    )
                })
                .collect();
            anyhow::bail!(
                "{} on schema `{schema}`, and this one would ship to {events_to}: instances of \
                 a schema run relays of the same names, so each takes batches of events to \
                 where it ships, and WebSocket clients of the others may never get them. \
                 Start every instance of a schema with the same Redis server (REDIS_URL, set \
                 or unset) and HELPDESK_REDIS_PREFIX; to change them, stop every instance \
                 first (a record left by a crash counts for {stale} s after its last renewal)",
                theirs.join("; ")
            );
        }
    }
    let mut claim = None;
    if let Some(target) = &redis {
        // Named by its id and where it lives: a copy of the database restored under another
        // name is another helpdesk, which must not share the prefix. (One restored under the
        // same names has the same id, and passes: helpdesk.md says to give it a prefix.)
        // Compared whole by the prefix's claim, and kept in Redis: changing this text (as
        // `events_to` above, compared with what running instances recorded) makes every
        // instance of the new build refuse to start beside the old ones during a rolling
        // upgrade. Change it only with a migration that accepts the old form.
        let owner = format!("helpdesk {schema_id} (schema `{schema}` of database `{database}`)");
        match target.transport.claim_prefix(&owner).await {
            Ok(()) => {
                claim = Some(PrefixClaim {
                    transport: target.transport.clone(),
                    owner,
                    prefix: target.prefix.to_owned(),
                    every,
                    taken_by_another: false,
                });
            }
            Err(error @ TransportError::Invalid(_)) => {
                return Err(anyhow::Error::new(error).context(format!(
                    "another helpdesk uses the Redis key prefix `{}`: give each helpdesk (each \
                     schema, and each copy of a database) its own HELPDESK_REDIS_PREFIX",
                    target.prefix
                )));
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context("cannot claim the Redis key prefix for this helpdesk"));
            }
        }
    }
    if !record {
        tx.commit().await.context(failed)?;
        return Ok(Joined {
            instance: None,
            claim,
        });
    }
    let instance = Instance {
        db: db.clone(),
        id: Uuid::now_v7(),
        events_to,
        seen_as: seen_as(bind),
        token_key,
        settings_key,
        every,
    };
    instance.renew(&mut *tx).await.context(failed)?;
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {schema}.helpdesk_instances WHERE seen_at < now() - interval '1 day'"
    )))
    .execute(&mut *tx)
    .await
    .context("cannot delete old instance records")?;
    tx.commit().await.context(failed)?;
    Ok(Joined {
        instance: Some(instance),
        claim,
    })
}

/// How an operator finds this instance: `pid 123 on host-a, listening on 10.0.0.5:8080`.
fn seen_as(bind: std::net::SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "an unknown host".to_owned());
    format!("pid {} on {host}, listening on {bind}", std::process::id())
}

impl Instance {
    async fn renew<'c, E>(&self, executor: E) -> Result<(), sqlx::Error>
    where
        E: sqlx::Executor<'c, Database = sqlx::Postgres>,
    {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.helpdesk_instances
                 (instance, events_to, seen_as, token_key, settings_key)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (instance) DO UPDATE SET seen_at = now()",
            self.db.schema()
        )))
        .bind(self.id)
        .bind(&self.events_to)
        .bind(&self.seen_as)
        .bind(&self.token_key)
        .bind(&self.settings_key)
        .execute(executor)
        .await
        .map(drop)
    }

    /// Why this instance's tokens do not work everywhere: the running instances of the schema
    /// that sign tokens with another secret, or `None` when there are none. Instances of a
    /// release before this one record no key, and are not counted.
    async fn other_token_keys(&self) -> Result<Option<String>, sqlx::Error> {
        // Cut off by the round's timeout, it gives its connection back within `answer_timeout`.
        let mut conn = self.db.acquire().await?;
        let (count, seen_as): (i64, Option<String>) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), string_agg(seen_as, '; ' ORDER BY seen_as)
             FROM {}.helpdesk_instances
             WHERE token_key <> $1 AND seen_at > now() - make_interval(secs => $2)",
            self.db.schema()
        )))
        .bind(&self.token_key)
        .bind(STALE_AFTER.as_secs() as f64)
        .fetch_one(&mut *conn)
        .await?;
        Ok((count > 0).then(|| {
            format!(
                "{count} other instance(s) of this schema sign tokens with another \
                 HELPDESK_JWT_SECRET ({}): the tokens and list cursors each one issues are \
                 refused by the others (401, 400) behind a shared address; give every \
                 instance the same secret",
                seen_as.unwrap_or_default()
            )
        }))
    }

    /// Why logins and roles depend on the instance a request reaches: the running instances of
    /// the schema that share its token secret (those that do not are reported by
    /// [`other_token_keys`](Self::other_token_keys)) but not its [`SharedSettings`], or `None`
    /// when there are none. Instances of a release before this one record none, and are not
    /// counted.
    async fn other_settings(&self) -> Result<Option<String>, sqlx::Error> {
        // Cut off by the round's timeout, it gives its connection back within `answer_timeout`.
        let mut conn = self.db.acquire().await?;
        let (count, seen_as): (i64, Option<String>) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), string_agg(seen_as, '; ' ORDER BY seen_as)
             FROM {}.helpdesk_instances
             WHERE token_key = $1 AND settings_key <> $2
               AND seen_at > now() - make_interval(secs => $3)",
            self.db.schema()
        )))
        .bind(&self.token_key)
        .bind(&self.settings_key)
        .bind(STALE_AFTER.as_secs() as f64)
        .fetch_one(&mut *conn)
        .await?;
        Ok((count > 0).then(|| {
            format!(
                "{count} other instance(s) of this schema run with other agent or login \
                 settings ({}): a user is an agent on one request and a customer on the next, \
                 and whether a login is refused depends on the instance it reaches; give every \
                 instance the same HELPDESK_AGENT_EMAILS, HELPDESK_AGENT_CODE, \
                 HELPDESK_LOGIN_ATTEMPTS and HELPDESK_LOGIN_WINDOW",
                seen_as.unwrap_or_default()
            )
        }))
    }

    /// Why realtime pushes miss clients: other running instances of the schema that, as this
    /// one, run on Postgres without Redis, or `None` when this one has Redis or runs alone. A
    /// second instance is not refused (a restart after a crash must not wait for the first
    /// one's record to go stale), so it is reported.
    async fn other_instances_without_redis(&self) -> Result<Option<String>, sqlx::Error> {
        if self.events_to != NO_TRANSPORT {
            return Ok(None);
        }
        // Cut off by the round's timeout, it gives its connection back within `answer_timeout`.
        let mut conn = self.db.acquire().await?;
        let (count, seen_as): (i64, Option<String>) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), string_agg(seen_as, '; ' ORDER BY seen_as)
             FROM {}.helpdesk_instances
             WHERE instance <> $1 AND events_to = $2
               AND seen_at > now() - make_interval(secs => $3)",
            self.db.schema()
        )))
        .bind(self.id)
        .bind(NO_TRANSPORT)
        .bind(STALE_AFTER.as_secs() as f64)
        .fetch_one(&mut *conn)
        .await?;
        Ok((count > 0).then(|| {
            format!(
                "{count} other instance(s) of this schema run on Postgres without Redis, as this \
                 one does ({}): each pushes the realtime events of the batches its own relay \
                 ships to its own WebSocket clients only, so clients miss events without being \
                 told; give every instance the same REDIS_URL (a record left by a crash counts \
                 for {} s after its last renewal)",
                seen_as.unwrap_or_default(),
                STALE_AFTER.as_secs()
            )
        }))
    }

    /// What the deployment checks find, joined: [`other_token_keys`](Self::other_token_keys),
    /// [`other_settings`](Self::other_settings) and
    /// [`other_instances_without_redis`](Self::other_instances_without_redis).
    async fn deployment_findings(&self) -> Result<Option<String>, sqlx::Error> {
        let found: Vec<String> = [
            self.other_token_keys().await?,
            self.other_settings().await?,
            self.other_instances_without_redis().await?,
        ]
        .into_iter()
        .flatten()
        .collect();
        Ok((!found.is_empty()).then(|| found.join("; ")))
    }

    /// Reports [`deployment_findings`](Self::deployment_findings) as degraded, logging a change.
    async fn check_deployment(&self, ctx: &WorkerContext, last: &mut Option<String>) {
        let found = match self.deployment_findings().await {
            Ok(found) => found,
            // The `postgres` check reports the outage; the next round looks again.
            Err(error) => {
                let error = cqrs_postgres::SqlxError::from(error);
                tracing::warn!(%error, "could not compare the settings of the instances");
                return;
            }
        };
        if found != *last {
            match &found {
                Some(reason) => {
                    tracing::warn!(%reason, "the running instances of this schema do not go together")
                }
                None if last.is_some() => {
                    tracing::info!("the running instances of this schema go together again")
                }
                None => {}
            }
        }
        ctx.health.set(match &found {
            Some(reason) => Health::Degraded(reason.clone()),
            None => Health::Healthy,
        });
        *last = found;
    }

    async fn remove(&self) -> Result<(), sqlx::Error> {
        // Cut off when the shutdown's grace ends, it gives its connection back within
        // `answer_timeout`.
        let mut conn = self.db.acquire().await?;
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {}.helpdesk_instances WHERE instance = $1",
            self.db.schema()
        )))
        .bind(self.id)
        .execute(&mut *conn)
        .await
        .map(drop)
    }
}

#[async_trait]
impl Worker for Instance {
    fn name(&self) -> &str {
        "instance-record"
    }

    /// Renews the record every [`RENEW_EVERY`] (or as the hooks say); a failed renewal is
    /// logged (the next one is well inside [`STALE_AFTER`]), not reported as its health: the
    /// `postgres` check reports the outage that fails it, and a stale reason here would
    /// outlive that outage until the next renewal. Meanwhile, reports running instances that
    /// sign tokens with another secret, or that run without Redis beside this one, as degraded
    /// (a rolling change of the secret shows so until it is done); a check that fails keeps the last finding, which is about the other
    /// instances, not this one's connection. Removes the record when asked to stop.
    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        ctx.health.set(Health::Healthy);
        let mut findings = None;
        loop {
            // The check runs while the wait for the renewal does, and is bounded by it: it
            // never delays a renewal (records must stay well inside `STALE_AFTER`).
            let wait = async {
                let check = self.check_deployment(&ctx, &mut findings);
                let (_, checked) = tokio::join!(
                    tokio::time::sleep(self.every),
                    tokio::time::timeout(self.every, check)
                );
                if checked.is_err() {
                    tracing::warn!("comparing the settings of the instances got no answer");
                }
            };
            tokio::select! {
                _ = ctx.shutdown.requested() => break,
                () = wait => {}
            }
            // Bounded and raced with the stop: a hung Postgres must not keep the worker from
            // removing its record when asked to stop (aborted at the grace's end, it would
            // leave the record to go stale instead).
            tokio::select! {
                _ = ctx.shutdown.requested() => break,
                renewed = tokio::time::timeout(self.every, async {
                    // Given back within `answer_timeout` when the timeout cuts it off (on
                    // `pool()`, on a network that drops packets, it was kept for minutes).
                    let mut conn = self.db.acquire().await?;
                    self.renew(&mut *conn).await
                }) => {
                    match renewed {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            let error = cqrs_postgres::SqlxError::from(error);
                            tracing::warn!(%error, "could not renew this instance's record in the schema")
                        }
                        Err(_) => tracing::warn!("renewing this instance's record in the schema got no answer"),
                    }
                }
            }
        }
        if let Err(error) = self.remove().await {
            let error = cqrs_postgres::SqlxError::from(error);
            tracing::warn!(
                %error,
                "could not remove this instance's record: an instance shipping elsewhere \
                 starts once it is stale"
            );
        }
        Ok(())
    }
}

/// Holds this helpdesk's claim on the Redis key prefix while the instance runs: a Redis that
/// lost its data (restarted without persistence, flushed, failed over to a replica that never
/// had the key) forgets the claim, and another helpdesk could then start on the prefix, read
/// this one's events and count them in its own stats. Each round claims the prefix again; one
/// another helpdesk made meanwhile is reported (degraded, naming it, and logged at `error`),
/// since nothing this instance can do undoes it: the operator stops the other helpdesk.
pub(crate) struct PrefixClaim {
    transport: RedisStreamTransport,
    /// What the claim says: this helpdesk's schema id, schema and database.
    owner: String,
    prefix: String,
    every: Duration,
    /// Whether the last round found the prefix claimed by another helpdesk.
    taken_by_another: bool,
}

#[async_trait]
impl Worker for PrefixClaim {
    fn name(&self) -> &str {
        "redis-prefix-claim"
    }

    /// A round that cannot reach Redis is logged, not reported as its health: the `redis`
    /// check reports the outage, and the next round claims the prefix again once Redis is
    /// back (before another helpdesk's start could, unless it starts within `every`).
    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        ctx.health.set(Health::Healthy);
        loop {
            tokio::select! {
                _ = ctx.shutdown.requested() => break,
                _ = tokio::time::sleep(self.every) => {}
            }
            let claimed = tokio::select! {
                _ = ctx.shutdown.requested() => break,
                claimed = tokio::time::timeout(self.every, self.transport.claim_prefix(&self.owner)) => claimed,
            };
            match claimed {
                Ok(Ok(())) => {
                    if std::mem::take(&mut self.taken_by_another) {
                        tracing::info!(
                            prefix = %self.prefix,
                            "the Redis key prefix is this helpdesk's again"
                        );
                    }
                    ctx.health.set(Health::Healthy);
                }
                Ok(Err(TransportError::Invalid(refusal))) => {
                    // The refusal is worded for a helpdesk refused at start ("give this one a
                    // prefix of its own"); this one owns the prefix: name the other one.
                    let owner = tokio::select! {
                        _ = ctx.shutdown.requested() => break,
                        owner = tokio::time::timeout(self.every, self.transport.prefix_owner()) => owner,
                    };
                    let theirs = match owner {
                        Ok(Ok(Some(theirs))) => format!("`{theirs}`"),
                        _ => format!("another helpdesk ({refusal})"),
                    };
                    let reason = format!(
                        "the Redis key prefix `{prefix}` is claimed by {theirs}, which reads this \
                         helpdesk's events (Redis lost this helpdesk's claim: restarted without \
                         persistence, flushed or failed over): stop that helpdesk and give it a \
                         prefix of its own, then delete the key `{prefix}:owner`; this helpdesk \
                         claims it again",
                        prefix = self.prefix
                    );
                    if !std::mem::replace(&mut self.taken_by_another, true) {
                        tracing::error!(
                            %reason,
                            "another helpdesk took this helpdesk's Redis key prefix: the events it read are missing from this helpdesk's stats (see \"Rebuilding the stats\" in docs/helpdesk.md)"
                        );
                    }
                    ctx.health.set(Health::Degraded(reason));
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "could not renew the claim on the Redis key prefix")
                }
                Err(_) => {
                    tracing::warn!("renewing the claim on the Redis key prefix got no answer")
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{SharedSettings, redis_server, settings_key};
    use std::collections::HashSet;

    /// The settings' id ignores how the agent list is written (order, case) and changes with
    /// each setting, and with the secret it is keyed by.
    #[test]
    fn the_settings_id_follows_what_the_instances_must_share() {
        let secret = b"a-secret-that-is-at-least-32-bytes-long";
        let emails = |list: &[&str]| list.iter().map(|e| e.to_string()).collect::<HashSet<_>>();
        let key = |emails: &HashSet<String>, code: Option<&str>, attempts, window| {
            settings_key(
                secret,
                &SharedSettings {
                    agent_emails: emails,
                    agent_code: code,
                    login_attempts: attempts,
                    login_window_seconds: window,
                },
            )
            .unwrap()
        };
        let agents = emails(&["ann@example.com", "bob@example.com"]);
        let base = key(&agents, Some("code"), 5, 900);
        assert_eq!(base.len(), 16);
        let respelled = emails(&["Bob@Example.com", "ann@example.com"]);
        assert_eq!(key(&respelled, Some("code"), 5, 900), base);
        // One address, composed and decomposed: one account.
        let composed = key(&emails(&["ren\u{e9}@example.com"]), Some("code"), 5, 900);
        let decomposed = key(&emails(&["rene\u{301}@example.com"]), Some("code"), 5, 900);
        assert_eq!(composed, decomposed);
        for other in [
            key(&emails(&["ann@example.com"]), Some("code"), 5, 900),
            key(&agents, Some("another code"), 5, 900),
            key(&agents, None, 5, 900),
            key(&agents, Some("code"), 6, 900),
            key(&agents, Some("code"), 5, 901),
        ] {
            assert_ne!(other, base);
        }
        let under_another_secret = settings_key(
            b"another-secret-that-is-32-bytes-long!!",
            &SharedSettings {
                agent_emails: &agents,
                agent_code: Some("code"),
                login_attempts: 5,
                login_window_seconds: 900,
            },
        )
        .unwrap();
        assert_ne!(under_another_secret, base);
    }

    /// Spellings of one server compare equal: defaults filled in, credentials and options
    /// dropped, the host in lower case.
    #[test]
    fn a_redis_server_is_compared_without_its_spelling() {
        for url in [
            "redis://Cache",
            "redis://cache:6379",
            "redis://cache/0",
            "redis://cache:6379/0/",
            "redis://default:secret@cache:6379/0?protocol=resp3",
            " redis://cache ",
        ] {
            assert_eq!(redis_server(url), "redis://cache:6379/0", "{url}");
        }
        assert_eq!(redis_server("redis://cache/2"), "redis://cache:6379/2");
        assert_eq!(redis_server("rediss://cache:6380"), "rediss://cache:6380/0");
        assert!(!redis_server("redis://:secret@cache").contains("secret"));
    }
}
