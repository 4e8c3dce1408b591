//! Migrating is one call, safe to repeat and to run from several instances at once, and two
//! schemas are two independent stores.

use crate::support::{options, postgres_available, record};
use cqrs_core::Position;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once_and_schemas_do_not_mix() {
    if !postgres_available().await {
        return;
    }
    cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
        let a = cqrs_core::testing::test_id("migrate_a");
        let b = cqrs_core::testing::test_id("migrate_b");
        let first = options(&a).connect().await.unwrap();
        let second = options(&a).connect().await.unwrap();
        let (x, y) = tokio::join!(first.migrate(), second.migrate());
        x.unwrap();
        y.unwrap();
        first.migrate().await.expect("a second run applies nothing");
        let applied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{a}\"._sqlx_migrations"
        )))
        .fetch_one(first.pool())
        .await
        .unwrap();
        assert_eq!(applied, 7);

        let other = options(&b).connect().await.unwrap();
        other.migrate().await.unwrap();
        the_stores_stay_apart(&first, &other).await;

        first.drop_schema().await.unwrap();
        other.drop_schema().await.unwrap();
    })
    .await;
}

/// A migration that fails (a table in its way) gives the migration lock back: another
/// instance migrating another schema of the same database is not left waiting, and neither is
/// a retry. (The lock is database-wide: the waits below also cover other tests' migrations,
/// which take it as they start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_does_not_keep_the_migration_lock() {
    if !postgres_available().await {
        return;
    }
    // Room for both waits below.
    cqrs_core::testing::with_timeout(Duration::from_secs(150), async {
        let broken_id = cqrs_core::testing::test_id("migrate_broken");
        let broken = options(&broken_id)
            .max_connections(2)
            .connect()
            .await
            .unwrap();
        for statement in [
            format!("CREATE SCHEMA \"{broken_id}\""),
            format!("CREATE TABLE \"{broken_id}\".events (in_the_way int)"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(broken.pool())
                .await
                .unwrap();
        }
        let err = broken.migrate().await.unwrap_err();
        assert!(err.to_string().contains(&broken_id), "{err}");

        let other_id = cqrs_core::testing::test_id("migrate_after_broken");
        let other = options(&other_id).connect().await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), other.migrate())
            .await
            .expect("another instance's migration was left waiting for the lock")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), broken.migrate())
            .await
            .expect("a retry was left waiting")
            .unwrap_err();
        other.drop_schema().await.unwrap();
        broken.drop_schema().await.unwrap();
    })
    .await;
}

/// sqlx's migration lock: a database-wide advisory lock keyed by the CRC-32 of the database's
/// name (`sqlx-postgres`'s `generate_lock_id`).
fn migration_lock_id(database: &str) -> i64 {
    let mut crc = !0u32;
    for byte in database.bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    0x3d32_ad9e * i64::from(!crc)
}

/// The pool's `statement_timeout` bounds commands, not a migration: an instance that starts
/// while another migrates waits for it, and then migrates, where it failed with a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_does_not_bound_the_wait_for_another_migration() {
    if !postgres_available().await {
        return;
    }
    let id = cqrs_core::testing::test_id("migrate_waits");
    let db = options(&id)
        .statement_timeout(Some(Duration::from_millis(300)))
        .connect()
        .await
        .unwrap();
    migrates_once_another_instance_is_done(db).await;
}

/// Nor does a `lock_timeout` the sessions get elsewhere (the role, the database, the URL's
/// `options`): sqlx's wait for the migration lock is a lock wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_does_not_bound_the_wait_for_another_migration() {
    if !postgres_available().await {
        return;
    }
    let id = cqrs_core::testing::test_id("migrate_waits_lock");
    let url = crate::support::database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let db =
        cqrs_postgres::PgOptions::new(format!("{url}{separator}options=-c%20lock_timeout%3D300"))
            .schema(&id)
            .application_name(format!("cqrs-test {id}"))
            .connect()
            .await
            .unwrap();
    let lock_timeout: String = sqlx::query_scalar("SHOW lock_timeout")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(lock_timeout, "300ms", "the URL's options reach the session");
    migrates_once_another_instance_is_done(db).await;
}

/// `db` migrates once another instance's migration, holding sqlx's lock, is done: its
/// `migrate` is seen waiting for that lock, and still waiting twice its 300 ms timeout later,
/// before the lock is let go, and it logs that it waits (the wait has no bound: a start
/// behind another application's migration, or a lock a failed run left held, would look
/// hung). Its schema is then dropped on that other session, which has no statement or lock
/// timeout: `db`'s short ones would bound the drop on a loaded server.
async fn migrates_once_another_instance_is_done(db: cqrs_postgres::PgDatabase) {
    cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
        // Another instance's migration, as far as the lock goes: held for a second.
        let mut other = db.pool().acquire().await.unwrap().detach();
        let database: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut other)
            .await
            .unwrap();
        for unbounded in ["SET statement_timeout = 0", "SET lock_timeout = 0"] {
            sqlx::query(unbounded).execute(&mut other).await.unwrap();
        }
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(migration_lock_id(&database))
            .execute(&mut other)
            .await
            .unwrap();
        let lock = migration_lock_id(&database);
        let (migrated, ()) = tokio::join!(db.migrate(), async {
            // Waiting for the lock, past the timeouts that must not bound the wait. Only
            // `db`'s sessions count: other tests' migrations wait for this lock too.
            let application = format!("cqrs-test {}", db.schema());
            let waits_for_the_lock = async |other: &mut sqlx::PgConnection| -> bool {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $1 \
                     AND pg_backend_pid() = ANY(pg_blocking_pids(pid)))",
                )
                .bind(&application)
                .fetch_one(other)
                .await
                .expect("ask whether a session waits for the lock")
            };
            let until = tokio::time::Instant::now() + Duration::from_secs(30);
            while !waits_for_the_lock(&mut other).await {
                assert!(
                    tokio::time::Instant::now() < until,
                    "migrate never waited for the migration lock another instance held"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(
                waits_for_the_lock(&mut other).await,
                "migrate stopped waiting for the lock before it was let go"
            );
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(lock)
                .execute(&mut other)
                .await
                .unwrap();
        });
        migrated.expect("migrated once the other instance was done");
        let logged = crate::support::logs::kept().iter().any(|line| {
            line.fields.contains("waiting for the migration lock")
                && line.fields.contains(&format!("schema={}", db.schema()))
        });
        assert!(logged, "the wait was not logged");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            db.schema()
        )))
        .execute(&mut other)
        .await
        .expect("drop the test schema");
    })
    .await;
}

/// A server that takes no writes (a standby; here `default_transaction_read_only`) is told as
/// such when the schema is migrated, with what to do: the migration failed as if the server
/// could not be reached ("migrate again once it is back"). Retryable, as a write it refuses
/// is: during a failover the next start finds a primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_on_a_read_only_server_says_so() {
    use std::str::FromStr;
    if !postgres_available().await {
        return;
    }
    cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
        let id = cqrs_core::testing::test_id("migrate_read_only");
        let read_only = sqlx::postgres::PgConnectOptions::from_str(&crate::support::database_url())
            .expect("DATABASE_URL parses")
            .options([("default_transaction_read_only", "on")]);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(read_only)
            .await
            .expect("connect");
        let error = cqrs_postgres::PgDatabase::from_pool(pool, &id)
            .unwrap()
            .migrate()
            .await
            .unwrap_err();
        assert_eq!(error.kind(), cqrs_core::ErrorKind::Unavailable, "{error}");
        assert!(
            error.to_string().contains("point the URL at the primary"),
            "{error}"
        );
    })
    .await;
}

/// A schema that already holds a table of one of the crate's names, made by someone else,
/// fails the migration saying to give the crate a schema of its own (the advice was to look
/// into `_sqlx_migrations`, which held nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_holding_a_foreign_events_table_says_to_use_another() {
    if !postgres_available().await {
        return;
    }
    cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
        let id = cqrs_core::testing::test_id("foreign_events");
        let db = options(&id).connect().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA \"{id}\"; CREATE TABLE \"{id}\".events (id bigint)"
        )))
        .execute(db.pool())
        .await
        .unwrap();
        let migrated = db.migrate().await;
        db.drop_schema().await.unwrap();
        let error = migrated.unwrap_err().to_string();
        assert!(
            error.contains("relation \"events\" already exists (SQLSTATE 42P07")
                && !error.contains(" at line ")
                && error.contains(&format!(
                    "the schema `{id}` already holds a table of that name that this migration did not make"
                ))
                && error.contains("give cqrs-postgres a schema of its own"),
            "{error}"
        );
    })
    .await;
}

/// The health check reads the schema's migration history: a server that answers is not
/// enough when every statement of this build would fail on the schema. Never migrated, or
/// migrated by an older build, it is unhealthy and says to migrate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_unhealthy_until_the_schema_is_migrated_for_this_build() {
    use cqrs_core::runtime::{Health, HealthCheck};
    if !postgres_available().await {
        return;
    }
    cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
        let schema = cqrs_core::testing::test_id("health_migrated");
        let db = options(&schema).connect().await.unwrap();
        let health = db.check().await;
        assert!(
            matches!(&health, Health::Unhealthy(why) if why.contains(&format!("schema `{schema}`"))
                && why.contains("not migrated: run `PgDatabase::migrate()`")),
            "a schema that does not exist: {health:?}"
        );
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
            .execute(db.pool())
            .await
            .unwrap();
        let health = db.check().await;
        assert!(
            matches!(&health, Health::Unhealthy(why) if why.contains("not migrated")),
            "a schema without the migration history: {health:?}"
        );

        db.migrate().await.unwrap();
        assert_eq!(db.check().await, Health::Healthy);

        // As an older build leaves it: its last migration not applied.
        let history = format!("\"{schema}\"._sqlx_migrations");
        let latest: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {history} WHERE version = (SELECT max(version) FROM {history}) \
             RETURNING version"
        )))
        .fetch_one(db.pool())
        .await
        .unwrap();
        let health = db.check().await;
        assert!(
            matches!(&health, Health::Unhealthy(why) if why.contains(&format!(
                "migrated up to version {}, and this build needs version {latest}", latest - 1
            )) && why.contains("run `PgDatabase::migrate()`")),
            "{health:?}"
        );
        // A failed migration counts for nothing.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {history} (version, description, success, checksum, execution_time) \
             VALUES ($1, 'failed', false, '\\x00', 0)"
        )))
        .bind(latest)
        .execute(db.pool())
        .await
        .unwrap();
        assert!(matches!(db.check().await, Health::Unhealthy(_)));

        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {history} SET success = true WHERE version = $1"
        )))
        .bind(latest)
        .execute(db.pool())
        .await
        .unwrap();
        assert_eq!(db.check().await, Health::Healthy, "applied after all");

        // A newer build's migration, unknown to this one, is fine (a rolling upgrade).
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {history} (version, description, success, checksum, execution_time) \
             VALUES ($1 + 1, 'newer', true, '\\x00', 0)"
        )))
        .bind(latest)
        .execute(db.pool())
        .await
        .unwrap();
        assert_eq!(db.check().await, Health::Healthy);
        db.drop_schema().await.unwrap();
    })
    .await;
}

crate::support::pg_test! {
    /// A role that may not create schemas or tables (migrations run by another, a DBA) starts
    /// on a schema that is current: `migrate` has nothing to do and creates nothing. It failed
    /// with "permission denied", Postgres checking the right to create the schema and its
    /// history table before whether they exist. On a schema that is not current it still
    /// fails, saying why.
    async fn a_role_without_create_rights_migrates_a_current_schema(db: PgDatabase) {
        let schema = db.schema().to_owned();
        let (role, as_role) = role_that_may_only_read(&db).await;
        // Everything as the role first, the role dropped whatever came of it: roles outlive
        // the test's schema.
        let outcome = async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_with(as_role)
                .await?;
            let current = cqrs_postgres::PgDatabase::from_pool(pool.clone(), &schema).unwrap();
            let migrated = current.migrate().await;
            let fresh = cqrs_core::testing::test_id("dml_role_fresh");
            let refused = cqrs_postgres::PgDatabase::from_pool(pool.clone(), &fresh)
                .unwrap()
                .migrate()
                .await;
            pool.close().await;
            Ok::<_, sqlx::Error>((migrated, refused))
        }
        .await;
        drop_role(&db, &role).await;
        let (migrated, refused) = outcome.expect("connect as the role");
        migrated.expect("a current schema, nothing to do");
        let error = refused.expect_err("no right to create the schema");
        assert!(error.to_string().contains("permission denied"), "{error}");
    }
}

/// A login role that may read `db`'s schema and create nothing (migrations run by another, a
/// DBA), and how to connect as it. Roles outlive the test's schema: drop it with [`drop_role`].
async fn role_that_may_only_read(
    db: &cqrs_postgres::PgDatabase,
) -> (String, sqlx::postgres::PgConnectOptions) {
    use std::str::FromStr;
    let role = format!("cqrs_dml_{}", uuid::Uuid::new_v4().simple());
    // A password of its own: a server that asks for one over TCP (Debian's default, which
    // scripts/test.sh keeps) refuses a role without.
    let password = uuid::Uuid::new_v4().simple().to_string();
    let schema = db.schema();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{password}'; \
         GRANT USAGE ON SCHEMA \"{schema}\" TO {role}; \
         GRANT SELECT ON ALL TABLES IN SCHEMA \"{schema}\" TO {role}"
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let as_role = sqlx::postgres::PgConnectOptions::from_str(&crate::support::database_url())
        .expect("DATABASE_URL parses")
        .username(&role)
        .password(&password);
    (role, as_role)
}

async fn drop_role(db: &cqrs_postgres::PgDatabase, role: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE {role}"
    )))
    .execute(db.pool())
    .await
    .unwrap();
}

crate::support::pg_test! {
    /// Such a role starting while another session migrates the schema waits for it, and then
    /// finds it current: `migrate` looks again once sqlx's migration lock is its own. It
    /// looked only before the wait, and failed with "permission denied" after it.
    async fn a_role_without_create_rights_waits_for_a_migration_in_progress(db: PgDatabase) {
        use sqlx::migrate::Migrate;
        let schema = db.schema().to_owned();
        let (role, as_role) = role_that_may_only_read(&db).await;
        let mut migrating = db.pool().acquire().await.unwrap().detach();
        // Another session migrating: it holds the lock, and the history lacks the latest
        // migration until it is done (its row set aside under a negative version).
        migrating.lock().await.unwrap();
        let history = format!("\"{schema}\"._sqlx_migrations");
        let set_aside = format!(
            "UPDATE {history} SET version = -version \
             WHERE version = (SELECT max(version) FROM {history})"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(set_aside))
            .execute(&mut migrating)
            .await
            .unwrap();

        let outcome = async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_with(as_role)
                .await?;
            let current = cqrs_postgres::PgDatabase::from_pool(pool.clone(), &schema).unwrap();
            let starting = tokio::spawn(async move { current.migrate().await });
            // Until the role's session waits for the lock, then the migration ends.
            let waiting = format!(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE a.usename = '{role}' AND l.locktype = 'advisory' AND NOT l.granted"
            );
            cqrs_core::testing::eventually(
                Duration::from_secs(10),
                "the role's session waits for the migration lock",
                || {
                    let db = db.clone();
                    let waiting = waiting.clone();
                    async move {
                        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(waiting))
                            .fetch_one(db.pool())
                            .await
                            .unwrap();
                        (count == 1).then_some(())
                    }
                },
            )
            .await;
            let restore = format!("UPDATE {history} SET version = -version WHERE version < 0");
            sqlx::raw_sql(sqlx::AssertSqlSafe(restore))
                .execute(&mut migrating)
                .await
                .unwrap();
            migrating.unlock().await.unwrap();
            let migrated = starting.await.expect("migrate does not panic");
            pool.close().await;
            Ok::<_, sqlx::Error>(migrated)
        }
        .await;
        drop_role(&db, &role).await;
        outcome
            .expect("connect as the role")
            .expect("the schema is current once the other session is done");
    }
}

/// `with_schema` makes a handle over the same pool and another schema: the schema's own
/// store, and an invalid name refused as `from_pool` refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_schema_shares_the_pool_and_keeps_the_stores_apart() {
    if !postgres_available().await {
        return;
    }
    cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
        let first = options(&cqrs_core::testing::test_id("tenant_a"))
            .max_connections(3)
            .connect()
            .await
            .unwrap();
        let b = cqrs_core::testing::test_id("tenant_b");
        let second = first.with_schema(&b).unwrap();
        assert_eq!(second.schema(), b);
        first.migrate().await.unwrap();
        second.migrate().await.unwrap();
        the_stores_stay_apart(&first, &second).await;
        let refused = first.with_schema("no\"quotes").unwrap_err();
        assert!(refused.to_string().contains("schema"), "{refused}");

        first.drop_schema().await.unwrap();
        second.drop_schema().await.unwrap();
        // One pool: closed through the first handle, the second has no connection left.
        first.pool().close().await;
        assert!(second.pool().is_closed());
    })
    .await;
}

/// An event appended in `first`'s schema is not in `other`'s store, and the same stream in
/// `other`'s schema is another stream.
async fn the_stores_stay_apart(
    first: &cqrs_postgres::PgDatabase,
    other: &cqrs_postgres::PgDatabase,
) {
    first
        .event_store()
        .append("s", ExpectedVersion::NO_STREAM, vec![record(1)])
        .await
        .unwrap();
    assert!(
        other
            .event_store()
            .read_all(Position::START, 10)
            .await
            .unwrap()
            .is_empty(),
        "the other schema's store holds none of it"
    );
    other
        .event_store()
        .append("s", ExpectedVersion::NO_STREAM, vec![record(2)])
        .await
        .expect("the same stream in another schema is another stream");
}
