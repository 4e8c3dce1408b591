//! The plugins' migrations run once per schema: an instance that starts while another one
//! serves does not lock the tables in use, and a migration that must change a table in use
//! gives up after a bounded wait instead of queueing every write behind it. Postgres only
//! (skipped when the services are down, a failure under `CQRS_REQUIRE_SERVICES=1`).

use crate::support::*;
use cqrs_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
use helpdesk::{Hooks, Server};
use std::time::Duration;

/// A transaction that holds the lock an `INSERT` into the ticket list takes, as a write in
/// flight on a running instance does.
async fn write_in_flight(database_url: &str, schema: &str) -> PgConnection {
    let mut conn = PgConnection::connect(database_url).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "BEGIN; LOCK TABLE {schema}.ticket_index IN ROW EXCLUSIVE MODE"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    conn
}

fn postgres_parts(backend: &Backend) -> (String, String) {
    match backend {
        Backend::Postgres {
            database_url,
            namespace,
            ..
        } => (database_url.clone(), namespace.clone()),
        Backend::Memory => unreachable!("a Postgres backend"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_starts_while_a_write_holds_the_ticket_list() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (database_url, schema) = postgres_parts(&backend);
        let a = TestServer::start_on(backend.shared(), |_| {}).await;
        let mut write = write_in_flight(&database_url, &schema).await;

        // Before, every start ran `CREATE INDEX IF NOT EXISTS` on the ticket list, which
        // waits for the write to end (and holds up every write after it meanwhile).
        let b = tokio::time::timeout(
            Duration::from_secs(15),
            TestServer::start_on(backend, |_| {}),
        )
        .await
        .expect("the second instance starts while a write is in flight");

        sqlx::raw_sql("ROLLBACK").execute(&mut write).await.unwrap();
        let (customer, _) = b.customer().await;
        b.ticket(&customer, "after the start").await;
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_migration_gives_up_on_a_table_in_use_and_runs_once_it_is_free() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (database_url, schema) = postgres_parts(&backend);
        let a = TestServer::start_on(backend.shared(), |_| {}).await;
        // As if a new version of the tickets plugin changed its DDL.
        let mut conn = PgConnection::connect(&database_url).await.unwrap();
        let changed = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {schema}.helpdesk_migrations \
             SET sql = 'an older text', sql_md5 = md5('an older text') \
             WHERE name = 'tickets/tickets.index_and_stats'"
        )))
        .execute(&mut conn)
        .await
        .unwrap()
        .rows_affected();
        assert_eq!(changed, 1, "the tickets plugin's migration is recorded");
        let mut write = write_in_flight(&database_url, &schema).await;

        let started = tokio::time::timeout(
            Duration::from_secs(20),
            Server::start(test_config(&backend.shared()), Hooks::default()),
        )
        .await
        .expect("the start gives up within the lock timeout");
        let error = format!("{:#}", started.expect_err("the start fails"));
        assert!(
            error.contains("waited 5s for a table lock"),
            "the error says why: {error}"
        );

        sqlx::raw_sql("ROLLBACK").execute(&mut write).await.unwrap();
        let b = TestServer::start_on(backend, |_| {}).await;
        let recorded: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT sql FROM {schema}.helpdesk_migrations WHERE name = 'tickets/tickets.index_and_stats' \
             ORDER BY applied_at"
        )))
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(recorded.len(), 2, "both texts are kept: {recorded:?}");
        assert!(
            recorded[1].contains("ticket_index"),
            "the migration ran again and was recorded: {recorded:?}"
        );
        a.stop().await;
        b.stop().await;
    })
    .await;
}
