//! The `tickets.list_order` migration on a schema written by a build from before it: the
//! tickets already listed get their place in the list from their first event (not from their
//! creation time), the creation-time indexes go, and the tickets opened after the upgrade go
//! on top. Postgres only (skipped when the services are down, a failure under
//! `CQRS_REQUIRE_SERVICES=1`).

use crate::support::*;
use cqrs_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
use reqwest::StatusCode;
use serde_json::Value;

/// Turns the schema back into what the build before `tickets.list_order` left: no `listed`
/// column, no trigger, the indexes by creation time, and no record of the migration.
async fn downgrade(conn: &mut PgConnection, schema: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP TRIGGER ticket_listed ON {schema}.events;
         DROP FUNCTION {schema}.ticket_listed();
         ALTER TABLE {schema}.ticket_index DROP COLUMN listed;
         CREATE INDEX ticket_index_newest ON {schema}.ticket_index (created_at DESC, id DESC);
         CREATE INDEX ticket_index_reporter ON {schema}.ticket_index (reporter_id, created_at DESC, id DESC);
         CREATE INDEX ticket_index_status ON {schema}.ticket_index (status, created_at DESC, id DESC);
         CREATE INDEX ticket_index_assignee ON {schema}.ticket_index (assignee_id, created_at DESC, id DESC)
             WHERE assignee_id IS NOT NULL;"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    let forgotten = sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {schema}.helpdesk_migrations WHERE name = 'tickets/tickets.list_order'"
    )))
    .execute(&mut *conn)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(forgotten, 1, "the migration was recorded");
}

fn id(ticket: &Value) -> String {
    ticket["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tickets_listed_before_the_upgrade_keep_their_order_of_entry() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (database_url, schema) = backend.database().unwrap();
        let customer = email("upgrade");

        let old = TestServer::start_on(backend.shared(), |_| {}).await;
        assert_eq!(old.register(&customer).await.status, StatusCode::CREATED);
        let token = old.login(&customer).await.body["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let first = id(&old.ticket(&token, "first").await);
        let second = id(&old.ticket(&token, "second").await);
        let third = id(&old.ticket(&token, "third").await);
        old.stop().await;

        let mut conn = PgConnection::connect(&database_url).await.unwrap();
        downgrade(&mut conn, &schema).await;
        // Stamped last but entered first: ordered by creation time, it would be on top.
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {schema}.ticket_index SET created_at = now() + interval '1 day' WHERE id = $1::uuid"
        )))
        .bind(&first)
        .execute(&mut conn)
        .await
        .unwrap();

        let new = TestServer::start_on(backend, |_| {}).await;
        let token = new.login(&customer).await.body["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let page = new.get("/tickets", &token).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        assert_eq!(
            ids(&page.body),
            [third.as_str(), &second, &first],
            "newest entry first"
        );

        let fourth = id(&new.ticket(&token, "fourth").await);
        let top = new.get("/tickets?limit=2", &token).await;
        assert_eq!(ids(&top.body), [fourth.as_str(), &third]);
        let cursor = top.body["next_cursor"].as_str().unwrap();
        let rest = new.get(&format!("/tickets?cursor={cursor}"), &token).await;
        assert_eq!(ids(&rest.body), [second.as_str(), &first]);

        let unplaced: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {schema}.ticket_index WHERE listed IS NULL"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(unplaced, 0, "every ticket has its place, the new one too");
        let by_creation: Vec<String> = sqlx::query_scalar(
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 \
             AND indexname IN ('ticket_index_newest', 'ticket_index_reporter', \
                               'ticket_index_status', 'ticket_index_assignee')",
        )
        .bind(&schema)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert!(
            by_creation.is_empty(),
            "the creation-time indexes are gone: {by_creation:?}"
        );
        new.stop().await;
    })
    .await;
}
