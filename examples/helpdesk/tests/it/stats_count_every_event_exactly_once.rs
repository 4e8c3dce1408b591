use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_catch_up_and_count_each_ticket_in_its_current_status() {
    within_for(Duration::from_secs(150), async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        s.get("/tickets/stats", &customer)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                s.ticket(&customer, &format!("s{i}")).await["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        for id in &ids[..3] {
            s.post(
                &format!("/tickets/{id}/assign"),
                &agent,
                json!({ "assignee_id": agent_id }),
            )
            .await;
        }
        s.post(&format!("/tickets/{}/close", ids[0]), &agent, json!({}))
            .await;
        s.post(&format!("/tickets/{}/close", ids[4]), &agent, json!({}))
            .await;
        // Comments and a reassignment do not change the counts.
        s.post(
            &format!("/tickets/{}/comments", ids[1]),
            &customer,
            json!({ "body": "?" }),
        )
        .await;
        s.post(
            &format!("/tickets/{}/assign", ids[1]),
            &agent,
            json!({ "assignee_id": agent_id }),
        )
        .await;

        let expected = json!({ "open": 1, "assigned": 2, "closed": 2 });
        let stats = cqrs_core::testing::eventually(
            Duration::from_secs(30),
            "the stats catch up",
            || async {
                let r = s.get("/tickets/stats", &agent).await;
                (r.body == expected).then_some(r.body)
            },
        )
        .await;
        assert_eq!(stats, expected);
        // A duplicate of an earlier event could still be on its way: a marker ticket opened
        // now is counted after every earlier event, and then the counts must be exact.
        s.ticket(&customer, "marker").await;
        let after_marker = cqrs_core::testing::eventually(
            Duration::from_secs(30),
            "the stats count the marker ticket",
            || async {
                let r = s.get("/tickets/stats", &agent).await;
                (r.body["open"].as_u64() >= Some(2)).then_some(r.body)
            },
        )
        .await;
        assert_eq!(
            after_marker,
            json!({ "open": 2, "assigned": 2, "closed": 2 }),
            "the earlier events counted once each, and the marker once"
        );
        s.stop().await;
    })
    .await;
}

/// On Postgres without Redis the transport is in process memory, and whatever it held at a
/// stop was lost to the stats (the relay had moved its checkpoint past it). The stats then
/// read the event store itself, committing their checkpoint with their counts: they count
/// every ticket even with no relay shipping anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_without_redis_the_stats_read_the_event_store() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    within_for(Duration::from_secs(150), async {
        let s = TestServer::start_without_relay_with(backend, |c| c.redis_url = None).await;
        let (customer, _) = s.customer().await;
        let (agent, _) = s.agent().await;
        s.ticket(&customer, "counted without the relay").await;
        cqrs_core::testing::eventually(Duration::from_secs(30), "the stats count it", || async {
            let r = s.get("/tickets/stats", &agent).await;
            (r.body["open"] == 1).then_some(())
        })
        .await;
        s.stop().await;
    })
    .await;
}

/// On Postgres the counts per status are a table a trigger keeps. A database written before
/// it existed (or by an instance of such a build meanwhile) is recounted when the migration
/// runs, and from then on every write to the statuses, a delete included, moves the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_counts_of_a_database_from_before_them_are_recounted_at_start() {
    use cqrs_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
    use std::sync::Arc;
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let (database_url, schema) = backend.database().expect("a Postgres backend");
    within_for(Duration::from_secs(150), async {
        let a = TestServer::start_on(backend.shared(), |_| {}).await;
        let (customer, _) = a.customer().await;
        let (agent, agent_id) = a.agent().await;
        let ids = ticket_ids(&a, &customer, &["assigned", "closed", "open"]).await;
        a.post(
            &format!("/tickets/{}/assign", ids[0]),
            &agent,
            json!({ "assignee_id": agent_id }),
        )
        .await;
        a.post(&format!("/tickets/{}/close", ids[1]), &agent, json!({}))
            .await;
        let counted = json!({ "open": 1, "assigned": 1, "closed": 1 });
        stats_become(&a, &agent, &counted, "the stats catch up").await;
        a.stop().await;

        // As the database of an older build: no counts, no trigger, no record of their
        // migration, and a status written without the trigger (a ticket closed meanwhile by
        // an instance of that build).
        let mut conn = PgConnection::connect(&database_url).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP TRIGGER ticket_stats_counted ON {schema}.ticket_stats;
             DROP FUNCTION {schema}.ticket_stats_counted();
             DROP TABLE {schema}.ticket_status_counts;
             DELETE FROM {schema}.helpdesk_migrations WHERE name = 'tickets/tickets.status_counts';
             INSERT INTO {schema}.ticket_stats (ticket_id, status, version)
                 VALUES ('00000000-0000-7000-8000-000000000001', 'closed', 2)"
        )))
        .execute(&mut conn)
        .await
        .unwrap();

        let b = TestServer::start_on(backend, |_| {}).await;
        assert_eq!(
            b.get("/tickets/stats", &agent).await.body,
            json!({ "open": 1, "assigned": 1, "closed": 2 }),
            "the start recounted every status, the one written without the trigger too"
        );
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DELETE FROM {schema}.ticket_stats
                 WHERE ticket_id = '00000000-0000-7000-8000-000000000001'"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            b.get("/tickets/stats", &agent).await.body,
            counted,
            "a deleted status leaves its count"
        );
        b.post(&format!("/tickets/{}/close", ids[2]), &agent, json!({}))
            .await;
        let moved = json!({ "open": 0, "assigned": 1, "closed": 2 });
        stats_become(&b, &agent, &moved, "the close is counted").await;

        // A rebuild replays every event in one transaction with the trigger standing aside,
        // and counts once at its end: the same counts.
        let db = cqrs_postgres::PgOptions::new(database_url.clone())
            .schema(schema.clone())
            .connect()
            .await
            .expect("the test connects to the server's schema");
        let rebuilder = cqrs_core::projection::ProjectionRunner::from_store(
            Arc::new(db.projection_store()),
            Arc::new(helpdesk_tickets::PgStats::new(db.clone())),
            Arc::new(db.event_store()),
            Arc::new(helpdesk_tickets::event_types()),
        );
        assert!(
            rebuilder.rebuild().await.unwrap() >= 5,
            "every status event replayed"
        );
        assert_eq!(b.get("/tickets/stats", &agent).await.body, moved);
        let counts: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT status, tickets FROM {schema}.ticket_status_counts ORDER BY status"
        )))
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            counts,
            [("assigned".to_owned(), 1), ("closed".to_owned(), 2)],
            "one row per status that has tickets"
        );
        // After the rebuild's commit the trigger counts again.
        b.post(&format!("/tickets/{}/close", ids[0]), &agent, json!({}))
            .await;
        let closed = json!({ "open": 0, "assigned": 0, "closed": 3 });
        stats_become(&b, &agent, &closed, "the next close is counted").await;
        b.stop().await;
    })
    .await;
}

/// A start fed from another source than the last one (Postgres alone after Postgres and Redis,
/// and back) rebuilds the stats from the event store: what the previous source had not
/// delivered is counted. The stats' row of a ticket is deleted while no server runs, as an
/// event the stream had not delivered yet would have left them (the stream-fed checkpoint is
/// past it, so the store-fed stats, going on from it, would never see it); a start with the
/// same source does not rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_fed_from_another_source_rebuilds_the_stats() {
    use cqrs_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let (database_url, schema) = backend.database().expect("a Postgres backend");
    within_for(Duration::from_secs(150), async {
        let a = TestServer::start_on(backend.shared(), |_| {}).await;
        let (customer, _) = a.customer().await;
        let (agent, agent_id) = a.agent().await;
        let ids = ticket_ids(&a, &customer, &["assigned", "open"]).await;
        a.post(
            &format!("/tickets/{}/assign", ids[0]),
            &agent,
            json!({ "assignee_id": agent_id }),
        )
        .await;
        let counted = json!({ "open": 1, "assigned": 1, "closed": 0 });
        stats_become(&a, &agent, &counted, "the stats catch up").await;
        a.stop().await;

        let mut conn = PgConnection::connect(&database_url).await.unwrap();
        let forget = |id: String| {
            AssertSqlSafe(format!(
                "DELETE FROM {schema}.ticket_stats WHERE ticket_id = '{id}'"
            ))
        };
        async fn fed_by(conn: &mut PgConnection, schema: &str) -> String {
            let feed = format!("SELECT feed FROM {schema}.ticket_stats_feed");
            sqlx::query_scalar(AssertSqlSafe(feed))
                .fetch_one(conn)
                .await
                .unwrap()
        }
        assert_eq!(fed_by(&mut conn, &schema).await, "stream");
        sqlx::raw_sql(forget(ids[0].clone()))
            .execute(&mut conn)
            .await
            .unwrap();

        // Postgres alone: fed by the store, rebuilt first.
        let b = TestServer::start_on(backend.shared(), |c| c.redis_url = None).await;
        stats_become(&b, &agent, &counted, "the stats rebuilt").await;
        b.stop().await;
        assert_eq!(fed_by(&mut conn, &schema).await, "store");

        // The same source again: no rebuild, so what is missing stays missing.
        sqlx::raw_sql(forget(ids[1].clone()))
            .execute(&mut conn)
            .await
            .unwrap();
        let c = TestServer::start_on(backend.shared(), |c| c.redis_url = None).await;
        // A ticket opened now is counted once the stats run, past the feed's check: a rebuild
        // would have brought the forgotten one back by then.
        let later = c.ticket(&customer, "later").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let one_open = json!({ "open": 1, "assigned": 1, "closed": 0 });
        stats_become(&c, &agent, &one_open, "the new ticket counted").await;
        c.stop().await;
        // The same counts would come of a rebuild that read the store before the new ticket
        // committed: the rows tell the two apart.
        async fn has_row(conn: &mut PgConnection, schema: &str, id: &str) -> bool {
            let row = format!(
                "SELECT EXISTS (SELECT 1 FROM {schema}.ticket_stats WHERE ticket_id = '{id}')"
            );
            sqlx::query_scalar(AssertSqlSafe(row))
                .fetch_one(conn)
                .await
                .unwrap()
        }
        assert!(
            !has_row(&mut conn, &schema, &ids[1]).await,
            "the forgotten ticket came back: the stats were rebuilt"
        );
        assert!(
            has_row(&mut conn, &schema, &later).await,
            "the new ticket is counted"
        );

        // And back to Redis: rebuilt again.
        let d = TestServer::start_on(backend.shared(), |_| {}).await;
        let all = json!({ "open": 2, "assigned": 1, "closed": 0 });
        stats_become(&d, &agent, &all, "the stats rebuilt").await;
        // Stopped first: its worker has recorded the source by then.
        d.stop().await;
        assert_eq!(fed_by(&mut conn, &schema).await, "stream");
        backend.clean_up().await;
    })
    .await;
}

/// Waits (30 s at most) until `s`'s stats, as `agent` reads them, are `expected`.
async fn stats_become(s: &TestServer, agent: &str, expected: &serde_json::Value, what: &str) {
    cqrs_core::testing::eventually_ok(Duration::from_secs(30), what, || async {
        let stats = s.get("/tickets/stats", agent).await.body;
        if stats == *expected {
            Ok(())
        } else {
            Err(stats)
        }
    })
    .await;
}

/// Opens a ticket of each title as `customer`: their ids, in order.
async fn ticket_ids(s: &TestServer, customer: &str, titles: &[&str]) -> Vec<String> {
    let mut ids = Vec::new();
    for title in titles {
        ids.push(
            s.ticket(customer, title).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    ids
}
