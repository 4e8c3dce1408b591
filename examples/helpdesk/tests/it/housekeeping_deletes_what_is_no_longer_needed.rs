//! Housekeeping: expired idempotency records are deleted, and on Redis the event stream is
//! trimmed of what every group acknowledged, by the server's own background jobs: neither the
//! table nor the stream grows with everything ever sent.

use crate::support::*;
use cqrs_postgres::sqlx;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

/// The rows of the server's idempotency table with a key `matching` (a `LIKE` pattern),
/// counted from outside the server.
async fn stored_matching(backend: &Backend, matching: &str) -> i64 {
    let (database_url, namespace) = backend.database().expect("a Postgres backend");
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {namespace}.idempotency WHERE key LIKE $1"
    )))
    .bind(matching)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    count
}

/// The rows of the server's idempotency table, counted from outside the server.
async fn stored(backend: &Backend) -> i64 {
    stored_matching(backend, "%").await
}

/// Stores, from outside the server, a completed record that expired in 1970: gone once a
/// purge ran.
async fn store_expired_sentinel(backend: &Backend) {
    let (database_url, namespace) = backend.database().expect("a Postgres backend");
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {namespace}.idempotency (scope, key, fingerprint, status, body, expires_at) \
         VALUES ('test', 'sentinel', 'none', 201, '{{}}', '1970-01-02Z')"
    )))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_idempotency_records_are_purged() {
    // On Postgres in either test mode: the table is what this test can count.
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    within(async {
        let s = TestServer::start_on(backend.clone(), |c| c.purge_interval_ms = 20).await;
        let (first_token, user_id) = s.customer().await;
        let create = |key: &'static str, token: String| {
            let s = &s;
            async move {
                let created = s
                    .http
                    .post(s.url("/tickets"))
                    .bearer_auth(&token)
                    .header("idempotency-key", key)
                    .json(&json!({ "title": key }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(created.status(), StatusCode::CREATED);
            }
        };
        create("k-old", first_token).await;
        s.clock.advance(Duration::from_secs(23 * 3600));
        // The first token has expired by now; the same user logs in again.
        let token = s.token_of(&user_id).await;
        create("k-1", token.clone()).await;
        create("k-2", token).await;
        assert_eq!(stored(&backend).await, 3);
        // Past a day for the first key only: a purge takes it, and the same purge keeps the
        // two that have not expired (`k-old` gone shows a purge ran).
        s.clock.advance(Duration::from_secs(2 * 3600));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stored(&backend).await != 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the expired record still stored after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A later purge (it takes the expired sentinel) still keeps them.
        store_expired_sentinel(&backend).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stored_matching(&backend, "sentinel").await != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the expired sentinel still stored after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(stored(&backend).await, 2, "the unexpired records are kept");
        s.clock.advance(Duration::from_secs(25 * 3600));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stored(&backend).await > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "expired records still stored after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.stop().await;
    })
    .await;
}

/// On Redis, the event stream is trimmed of what every consumer group acknowledged, so it does
/// not keep every event ever published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_is_trimmed_of_what_every_group_acknowledged() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let Backend::Postgres {
        redis_url,
        namespace,
        ..
    } = &backend
    else {
        unreachable!("a Postgres backend")
    };
    let transport = cqrs_redis::RedisStreamOptions::new(redis_url.clone())
        .key_prefix(namespace.clone())
        .connect()
        .await
        .unwrap();
    within(async {
        let s = TestServer::start_on(backend.clone(), |c| c.purge_interval_ms = 20).await;
        let (customer, _) = s.customer().await;
        let (agent, _) = s.agent().await;
        // Trimming is approximate (`MINID ~`): Redis drops whole nodes of its stream, 100
        // entries each by default, so there must be more than one node's worth.
        const TICKETS: usize = 210;
        // Ten at a time: one by one, a loaded machine's 210 requests take much of the
        // test's minute.
        let titles: Vec<String> = (0..TICKETS).map(|i| format!("t{i}")).collect();
        for batch in titles.chunks(10) {
            futures_util::future::join_all(batch.iter().map(|title| s.ticket(&customer, title)))
                .await;
        }
        // The stats consumer counted them all: their events went through the stream.
        cqrs_core::testing::eventually(Duration::from_secs(20), "the stats count them", || async {
            let r = s.get("/tickets/stats", &agent).await;
            (r.body["open"] == TICKETS).then_some(())
        })
        .await;
        let stats = cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the stream is trimmed",
            || async {
                let stats = transport.topic_stats(helpdesk::EVENTS_TOPIC).await.unwrap();
                (stats.length <= 110).then_some(stats)
            },
        )
        .await;
        assert!(
            !stats.groups.is_empty(),
            "the stream had consumer groups, so it had entries to trim"
        );
        s.stop().await;
    })
    .await;
}

/// In memory, the in-process transport is trimmed by a worker of its own: once every
/// consumer group took a ticket's event, it is dropped (counted in
/// `cqrs_transport_trimmed_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_the_transport_is_trimmed_by_a_worker() {
    let backend = Backend::from_env().await;
    if !matches!(backend, Backend::Memory) {
        return;
    }
    within(async {
        let s = TestServer::start_on(backend, |c| c.purge_interval_ms = 20).await;
        let (customer, _) = s.customer().await;
        s.ticket(&customer, "trimmed later").await;
        cqrs_core::testing::eventually(Duration::from_secs(10), "the event trimmed", || async {
            let metrics = s.metrics().await;
            metrics
                .lines()
                .any(|l| {
                    l.starts_with("cqrs_transport_trimmed_total{")
                        && l.contains("topic=\"helpdesk.events\"")
                        && l.contains("transport=\"memory\"")
                        && !l.ends_with(" 0")
                })
                .then_some(())
        })
        .await;
        s.stop().await;
    })
    .await;
}
