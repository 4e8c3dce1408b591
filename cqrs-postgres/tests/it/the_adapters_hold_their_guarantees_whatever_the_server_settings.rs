//! Server settings the adapters do not leave to chance. The event store's guarantees (an
//! `Any` append never conflicts; a reader never skips an event that commits late) rest on READ
//! COMMITTED: each statement, and each statement in the append functions after their lock,
//! sees what committed before it, so a database or role whose `default_transaction_isolation`
//! is stricter must not change that. And a session left idle in a transaction must not hold
//! the append lock until TCP notices.

use crate::support::{database_url, pg_test, record};
use cqrs_core::ExpectedVersion;
use cqrs_core::ports::EventStore;
use cqrs_postgres::sqlx::postgres::PgPoolOptions;
use cqrs_postgres::{PgDatabase, PgError, PgOptions, PgUnitOfWork};
use std::time::Duration;

/// `database_url()` with `setting` (`name%3Dvalue`, URL-encoded) for every session, as
/// `ALTER DATABASE ... SET` would.
fn url_setting(setting: &str) -> String {
    let url = database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20{setting}")
}

/// `database_url()` with `default_transaction_isolation` set to `serializable`.
fn serializable_url() -> String {
    url_setting("default_transaction_isolation%3Dserializable")
}

pg_test! {
    /// A command that read something, then appends at `Any` to a stream another writer
    /// appended to meanwhile, commits: under a transaction-wide snapshot it would miss the
    /// other append and fail as a conflict.
    async fn an_any_append_after_a_concurrent_one_commits_under_a_serializable_default(db: PgDatabase) {
        let strict = PgOptions::new(serializable_url())
            .schema(db.schema())
            .max_connections(4)
            .connect()
            .await
            .unwrap();
        let mut unit = PgUnitOfWork::new(strict.clone());
        // A statement that takes a snapshot (`SHOW` does not).
        cqrs_postgres::sqlx::query("SELECT 1")
            .execute(unit.connection().await.unwrap())
            .await
            .unwrap();
        let isolation: String = cqrs_postgres::sqlx::query_scalar("SHOW transaction_isolation")
            .fetch_one(unit.connection().await.unwrap())
            .await
            .unwrap();
        assert_eq!(isolation, "read committed");

        db.event_store()
            .append("s", ExpectedVersion::Any, vec![record(1)])
            .await
            .unwrap();
        unit.append("s", ExpectedVersion::Any, vec![record(2)]);
        unit.commit().await.expect("an `Any` append never conflicts");
        let stored = db.event_store().load("s", 0).await.unwrap();
        assert_eq!(stored.len(), 2);
    }
}

pg_test! {
    /// A pool made elsewhere, whose sessions run at a stricter level, is refused at start-up
    /// with what to change, instead of failing later with conflicts that are not.
    async fn a_pool_that_is_not_read_committed_is_refused_by_migrate(db: PgDatabase) {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&serializable_url())
            .await
            .unwrap();
        let strict = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let error = strict.migrate().await.expect_err("refused");
        assert!(matches!(error, PgError::InvalidOptions(_)), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("default_transaction_isolation"), "{message}");
        assert!(message.contains("read committed"), "{message}");
        // Also for a pool behind a pooler that refuses session settings.
        assert!(message.contains("ALTER ROLE"), "{message}");
        // A pool made by `PgOptions` is fine with the same server default.
        PgOptions::new(serializable_url())
            .schema(db.schema())
            .connect()
            .await
            .unwrap()
            .migrate()
            .await
            .unwrap();
    }
}

pg_test! {
    /// An instance that stalls or dies between an append and its commit holds the schema's
    /// append lock; the server ends its session after `idle_in_transaction_timeout`, and the
    /// other appends go on instead of waiting for TCP to notice.
    async fn a_transaction_left_idle_after_an_append_is_ended_by_the_server(db: PgDatabase) {
        let stalled = crate::support::options(db.schema())
            .idle_in_transaction_timeout(Some(Duration::from_millis(500)))
            .connect()
            .await
            .unwrap();
        let mut tx = stalled.pool().begin().await.unwrap();
        stalled
            .event_store()
            .append_in(&mut tx, "a", ExpectedVersion::Any, vec![record(1)])
            .await
            .unwrap();
        // `tx` stays open and idle, its lock held, like a client that went away.
        let store = db.event_store();
        let append = store.append("b", ExpectedVersion::Any, vec![record(2)]);
        tokio::time::timeout(Duration::from_secs(15), append)
            .await
            .expect("the stalled session was ended and its lock released")
            .unwrap();
        assert!(tx.commit().await.is_err(), "the stalled transaction is gone");
        assert!(db.event_store().load("a", 0).await.unwrap().is_empty());
    }
}

pg_test! {
    /// A database in another encoding than UTF8 is refused at start-up, naming the encoding
    /// and how to make one: it would refuse ordinary text (an emoji in a title) as invalid
    /// input, a 422 for a server problem.
    async fn a_database_that_is_not_utf8_is_refused_by_migrate(db: PgDatabase) {
        // A database of its own, named after the test's schema, made and dropped here.
        let name = format!("{}_latin1", db.schema());
        let create = format!(
            "CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' \
             TEMPLATE template0"
        );
        cqrs_postgres::sqlx::raw_sql(cqrs_postgres::sqlx::AssertSqlSafe(create))
            .execute(db.pool())
            .await
            .unwrap();
        let url = database_url();
        let (base, query) = url.split_once('?').map_or((url.as_str(), None), |(b, q)| (b, Some(q)));
        let (server, _) = base.rsplit_once('/').expect("a URL with a database");
        let latin1_url = match query {
            Some(query) => format!("{server}/{name}?{query}"),
            None => format!("{server}/{name}"),
        };
        // Nothing unwrapped before the database is dropped again: a failure leaves none behind.
        let migrated = match PgOptions::new(latin1_url)
            .schema("app")
            .max_connections(1)
            .connect()
            .await
        {
            Ok(latin1) => {
                let migrated = latin1.migrate().await;
                latin1.pool().close().await;
                Ok(migrated)
            }
            Err(e) => Err(e),
        };
        let drop = format!("DROP DATABASE \"{name}\" WITH (FORCE)");
        cqrs_postgres::sqlx::raw_sql(cqrs_postgres::sqlx::AssertSqlSafe(drop))
            .execute(db.pool())
            .await
            .unwrap();
        let error = migrated.expect("connects").expect_err("refused");
        assert!(matches!(error, PgError::InvalidOptions(_)), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("encoding is `LATIN1`"), "{message}");
        assert!(message.contains("ENCODING 'UTF8'"), "{message}");
    }
}

pg_test! {
    /// A pool whose server takes no writes (a failover that left the connections on the old
    /// primary, now a replica; here `default_transaction_read_only`) is reported unhealthy,
    /// saying so, instead of healthy while every command fails with 25006.
    async fn a_server_that_takes_no_writes_is_unhealthy(db: PgDatabase) {
        use cqrs_core::runtime::{Health, HealthCheck};
        assert_eq!(db.check().await, Health::Healthy);
        let read_only = PgOptions::new(url_setting("default_transaction_read_only%3Don"))
        .schema(db.schema())
        .max_connections(1)
        .connect()
        .await
        .unwrap();
        let health = read_only.check().await;
        assert!(
            matches!(&health, Health::Unhealthy(why) if why.contains("the server takes no writes")),
            "{health:?}"
        );
        read_only.pool().close().await;
    }
}

/// A pool of three on `db`'s schema whose three connections, idle in it, are sessions that
/// take no writes (`default_transaction_read_only` set in each), on a server that takes them
/// from new sessions: a failover or cutover that left the pool on the old primary, the URL
/// already reaching the new one.
async fn pool_left_on_a_server_that_takes_no_writes(db: &PgDatabase) -> PgDatabase {
    let small = crate::support::options(db.schema())
        .max_connections(3)
        .connect()
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = small.pool().acquire().await.unwrap();
        sqlx::query("SET default_transaction_read_only = on")
            .execute(&mut *conn)
            .await
            .unwrap();
        held.push(conn);
    }
    drop(held);
    // Idle in the pool before the scenario goes on.
    until_three_idle(&small).await;
    small
}

/// `query`'s text answer on each of three connections held at once, given back after.
async fn on_three_at_once(small: &PgDatabase, query: &'static str) -> Vec<String> {
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(small.pool().acquire().await.unwrap());
    }
    let mut answers = Vec::new();
    for conn in &mut conns {
        let answer: String = sqlx::query_scalar(query)
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        answers.push(answer);
    }
    answers
}

/// Returns once the pool's three connections are idle in it (given back on tasks of sqlx's
/// own).
async fn until_three_idle(small: &PgDatabase) {
    cqrs_core::testing::eventually(Duration::from_secs(10), "three idle", || async {
        (small.pool().num_idle() == 3).then_some(())
    })
    .await;
}

/// Whether each of three connections held at once takes writes.
async fn three_at_once_take_writes(small: &PgDatabase) -> Vec<bool> {
    let read_only = on_three_at_once(small, "SHOW transaction_read_only").await;
    read_only.iter().map(|r| r == "off").collect()
}

/// The backend pids of three connections held at once, sorted, once they are idle in the
/// pool again.
async fn three_at_once_pids(small: &PgDatabase) -> Vec<String> {
    let mut pids = on_three_at_once(small, "SELECT pg_backend_pid()::text").await;
    until_three_idle(small).await;
    pids.sort_unstable();
    pids
}

pg_test! {
    /// Once the health check finds the server takes no writes, every connection the pool
    /// opened before it is replaced at its next use, not only the one the check used (the
    /// others failed every command until their `max_lifetime`, 30 minutes by default).
    async fn a_health_check_that_finds_no_writes_retires_every_older_connection(db: PgDatabase) {
        use cqrs_core::runtime::{Health, HealthCheck};
        let small = pool_left_on_a_server_that_takes_no_writes(&db).await;
        let health = small.check().await;
        assert!(
            matches!(&health, Health::Unhealthy(why) if why.contains("the server takes no writes")),
            "{health:?}"
        );
        assert_eq!(three_at_once_take_writes(&small).await, [true, true, true]);
        assert_eq!(small.check().await, Health::Healthy);
        // The connections opened since are kept: the pool is not thrown away at every use.
        let pids = three_at_once_pids(&small).await;
        assert_eq!(three_at_once_pids(&small).await, pids, "the same sessions again");
        small.pool().close().await;
    }
}

pg_test! {
    /// So does a write refused for it (SQLSTATE 25006) that `PgDatabase::store_error` maps,
    /// as a retryable `Unavailable`.
    async fn a_write_refused_for_no_writes_retires_every_older_connection(db: PgDatabase) {
        let small = pool_left_on_a_server_that_takes_no_writes(&db).await;
        let mut conn = small.pool().acquire().await.unwrap();
        let refused = sqlx::query("CREATE TABLE refused_here (id int)")
            .execute(&mut *conn)
            .await
            .expect_err("a write on a session that takes none");
        drop(conn);
        let error = small.store_error(refused);
        assert_eq!(error.kind(), cqrs_core::ErrorKind::Unavailable, "{error}");
        assert_eq!(three_at_once_take_writes(&small).await, [true, true, true]);
        small.pool().close().await;
    }
}

pg_test! {
    /// So does an outbox relay's batch refused for it (its `SELECT .. FOR UPDATE` of the
    /// checkpoint row): the relay retried on the same connections until it gave up, a stop of
    /// shipping for its ten attempts and the runtime's restart.
    async fn a_relay_batch_refused_for_no_writes_retires_every_older_connection(db: PgDatabase) {
        use cqrs_postgres::PgOutboxRelay;
        db.event_store()
            .append("s", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        let transport = std::sync::Arc::new(cqrs_core::memory::InMemoryTransport::new());
        // Its checkpoint row made while the server took writes.
        PgOutboxRelay::new(db.clone(), transport.clone())
            .ensure_checkpoint()
            .await
            .unwrap();
        let small = pool_left_on_a_server_that_takes_no_writes(&db).await;
        let relay = PgOutboxRelay::new(small.clone(), transport);
        let refused = relay.relay_once().await.expect_err("no writes");
        assert_eq!(refused.kind(), cqrs_core::ErrorKind::Unavailable, "{refused}");
        assert_eq!(three_at_once_take_writes(&small).await, [true, true, true]);
        relay.relay_once().await.expect("on new connections");
        small.pool().close().await;
    }
}

pg_test! {
    /// So does an append of the event store's own (as `AggregateRepository::execute` makes
    /// outside a command's transaction), refused for it.
    async fn an_append_refused_for_no_writes_retires_every_older_connection(db: PgDatabase) {
        let small = pool_left_on_a_server_that_takes_no_writes(&db).await;
        let refused = small
            .event_store()
            .append("s", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .expect_err("no writes");
        assert_eq!(refused.kind(), cqrs_core::ErrorKind::Unavailable, "{refused}");
        assert_eq!(three_at_once_take_writes(&small).await, [true, true, true]);
        small
            .event_store()
            .append("s", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .expect("on new connections");
        small.pool().close().await;
    }
}

/// Records one event (appended at the commit) and, with `write`, inserts a row of its own
/// first, its error mapped as handlers commonly do (`HandlerError::internal`).
struct Jot {
    write: bool,
}

impl cqrs_core::Message for Jot {
    const NAME: &'static str = "test.jot";
}

impl cqrs_core::Command for Jot {
    type Output = ();
}

struct JotHandler;

#[cqrs_core::async_trait]
impl cqrs_core::CommandHandler<Jot> for JotHandler {
    async fn handle(
        &self,
        cmd: Jot,
        ctx: &mut cqrs_core::CommandContext,
    ) -> Result<(), cqrs_core::HandlerError> {
        if cmd.write {
            let uow = PgUnitOfWork::from_context(ctx)?;
            let insert = format!(
                "INSERT INTO \"{}\".tickets (id, title) VALUES ('t', 'noted')",
                uow.database().schema()
            );
            sqlx::query(sqlx::AssertSqlSafe(insert))
                .execute(uow.connection().await?)
                .await
                .map_err(cqrs_core::HandlerError::internal)?;
        }
        ctx.record(crate::support::tickets::TicketOpened {
            id: "t".into(),
            title: "noted".into(),
        });
        Ok(())
    }
}

pg_test! {
    /// So does a command refused for it, through the `PgCommandLayer`: its events' append at
    /// the commit, or a write of the handler's own, whatever error the handler made of it.
    async fn a_command_refused_for_no_writes_retires_every_older_connection(db: PgDatabase) {
        crate::support::tickets::create_table(&db).await;
        for write in [false, true] {
            let small = pool_left_on_a_server_that_takes_no_writes(&db).await;
            let bus = cqrs_core::CommandBus::builder()
                .handler(JotHandler)
                .layer(small.command_layer())
                .build()
                .unwrap();
            let refused = bus.dispatch(Jot { write }).await.expect_err("no writes");
            // The append's refusal is retryable; the handler's own write fails as the handler
            // mapped it (`HandlerError::internal`).
            let expected = if write {
                cqrs_core::ErrorKind::Internal
            } else {
                cqrs_core::ErrorKind::Unavailable
            };
            assert_eq!(refused.kind(), expected, "{refused}");
            assert_eq!(
                three_at_once_take_writes(&small).await,
                [true, true, true],
                "after a refused {}",
                if write { "write of the handler" } else { "append" }
            );
            bus.dispatch(Jot { write }).await.expect("on new connections");
            small.pool().close().await;
        }
    }
}
