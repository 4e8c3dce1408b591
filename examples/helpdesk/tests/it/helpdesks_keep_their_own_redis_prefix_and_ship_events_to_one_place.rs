//! Two mistakes of a deployment that lost or leaked events without an error: two helpdesks
//! (two schemas) on one Redis key prefix read each other's events, and instances of one schema
//! shipping events to different places (one without Redis among instances with it, or another
//! prefix) ran relays of the same names, so the events one took never reached the others'
//! WebSockets. Both are refused at start. A Redis that lost its data forgot the prefix's
//! claim, and nothing claimed it again: another helpdesk then started on the prefix and
//! counted this one's events in its own stats, without a word from either. Running instances
//! now claim it again, and report another helpdesk's claim.

use crate::support::*;
use helpdesk::{Hooks, Server};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_helpdesk_on_a_redis_prefix_is_refused() {
    within(async {
        let (Some(backend), Some(other)) = (Backend::postgres().await, Backend::postgres().await)
        else {
            return;
        };
        let a = TestServer::start_on(backend.clone(), |_| {}).await;
        let (_, prefix) = backend.database().expect("a Postgres backend");
        let (_, other_schema) = other.database().expect("a Postgres backend");
        let mut config = test_config(&other);
        config.redis_prefix = prefix.clone();
        let err = Server::start(config, Hooks::default())
            .await
            .expect_err("another schema on the same prefix");
        let err = format!("{err:#}");
        assert!(
            err.contains(&format!(
                "another helpdesk uses the Redis key prefix `{prefix}`"
            )) && err.contains(&format!("(schema `{other_schema}` of database"))
                && err.contains(&format!("(schema `{prefix}` of database"))
                && err.contains("HELPDESK_REDIS_PREFIX")
                && err.contains("belongs to `helpdesk "),
            "{err}"
        );
        // Its own instances share it.
        let b = TestServer::start_on(backend.shared(), |_| {}).await;
        b.stop().await;
        a.stop().await;
        other.clean_up().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_schema_ship_events_to_one_place() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (_, prefix) = backend.database().expect("a Postgres backend");
        let with_redis = TestServer::start_on(backend.shared(), |_| {}).await;
        let mut config = test_config(&backend);
        config.redis_url = None;
        let err = Server::start(config, Hooks::default())
            .await
            .expect_err("an instance without Redis among instances with it");
        let err = format!("{err:#}");
        assert!(
            err.contains("1 instance(s) ship to redis://")
                && err.contains(&format!("prefix `{prefix}`"))
                && err.contains("this one would ship to nowhere (no REDIS_URL)")
                && err.contains("(pid ")
                && err.contains(&format!(
                    "listening on {}",
                    with_redis.url("").trim_start_matches("http://")
                ))
                && err.contains("Start every instance of a schema with the same Redis server"),
            "{err}"
        );
        // Another prefix of the same Redis (under this test's keys, which clean-up deletes).
        let mut config = test_config(&backend);
        config.redis_prefix = format!("{prefix}:other");
        let err = Server::start(config, Hooks::default())
            .await
            .expect_err("an instance shipping under another prefix");
        let err = format!("{err:#}");
        assert!(
            err.contains("this one would ship to redis://")
                && err.contains(&format!("prefix `{prefix}:other`")),
            "{err}"
        );
        // The refused start left the prefix unclaimed: another helpdesk takes it.
        let Some(elsewhere) = Backend::postgres().await else {
            return;
        };
        let taker =
            TestServer::start_on(elsewhere, |c| c.redis_prefix = format!("{prefix}:other")).await;
        taker.stop().await;
        // A start that runs no relay ships nothing: not refused, not recorded.
        let quiet =
            TestServer::start_without_relay_with(backend.shared(), |c| c.redis_url = None).await;
        quiet.stop().await;
        // Once they stopped, the schema switches.
        with_redis.stop().await;
        let without = TestServer::start_on(backend.shared(), |c| c.redis_url = None).await;
        let err = Server::start(test_config(&backend), Hooks::default())
            .await
            .expect_err("and the other way round");
        let err = format!("{err:#}");
        assert!(
            err.contains("1 instance(s) ship to nowhere (no REDIS_URL)")
                && err.contains("this one would ship to redis://"),
            "{err}"
        );
        without.stop().await;
        backend.clean_up().await;
    })
    .await;
}

/// Deployment checks every 50 ms, so a test sees their findings at once.
fn fast_checks() -> Hooks {
    Hooks {
        deployment_checks_every: Some(Duration::from_millis(50)),
        ..Hooks::default()
    }
}

/// The claim's component in `/ready`, once it says `status`; panics after 10 s.
async fn claim_status(s: &TestServer, status: &str) -> Value {
    component_status(s, "redis-prefix-claim", status).await
}

/// `name`'s component in `/ready`, once it says `status`; panics after 10 s.
async fn component_status(s: &TestServer, name: &str, status: &str) -> Value {
    let what = format!("{name} {status} in /ready");
    cqrs_core::testing::eventually(Duration::from_secs(10), &what, || async {
        let ready = s.send(Method::GET, "/ready", None, None).await;
        assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
        let component = ready.body["components"][name].clone();
        (component["status"] == status).then_some(component)
    })
    .await
}

/// Waits until `key` holds a value containing `needle`; panics after 10 s.
async fn key_holds(url: &str, key: &str, needle: &str) {
    let what = format!("`{key}` holding `{needle}`");
    cqrs_core::testing::eventually(Duration::from_secs(10), &what, || async {
        let reply = redis_command(url, &["GET", key]).await.unwrap_or_default();
        reply.contains(needle).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_instances_hold_their_claim_on_the_redis_prefix() {
    within(async {
        let (Some(backend), Some(other)) = (Backend::postgres().await, Backend::postgres().await)
        else {
            return;
        };
        let hooks = fast_checks();
        let a = TestServer::start_with_hooks(backend.clone(), hooks, |config| {
            config.ready_details = true;
        })
        .await;
        let (_, prefix) = backend.database().expect("a Postgres backend");
        let url = test_config(&backend).redis_url.expect("a Redis backend");
        let key = format!("{prefix}:owner");
        assert_eq!(claim_status(&a, "healthy").await["critical"], false);

        // Redis forgets the claim (restarted without persistence, say): the instance makes it
        // again, so another helpdesk starting on the prefix is still refused.
        let deleted = redis_command(&url, &["DEL", &key]).await;
        assert_eq!(deleted.as_deref(), Some(":1\r\n"), "the claim deleted");
        key_holds(&url, &key, &format!("(schema `{prefix}` of database")).await;
        let mut config = test_config(&other);
        config.redis_prefix = prefix.clone();
        let err = Server::start(config, Hooks::default())
            .await
            .expect_err("another schema on the same prefix");
        assert!(
            format!("{err:#}").contains("another helpdesk uses the Redis key prefix"),
            "{err:#}"
        );

        // Another helpdesk claimed it before the instance could: reported, naming it, and still
        // ready (the instance serves; the operator stops the other helpdesk).
        let theirs = "helpdesk 0190f3e2-7c1d-7c4e-9a57-2bd4d2f1a0c3 (schema `elsewhere` of database `other`)";
        redis_command(&url, &["DEL", &key]).await;
        let set = redis_command(&url, &["SET", &key, theirs]).await;
        assert_eq!(set.as_deref(), Some("+OK\r\n"), "another claim set");
        let degraded = claim_status(&a, "degraded").await;
        let reason = degraded["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with(&format!(
                "the Redis key prefix `{prefix}` is claimed by `{theirs}`, which reads this helpdesk's events"
            )) && reason.contains(&format!("then delete the key `{prefix}:owner`")),
            "{degraded}"
        );
        // Given back (the other helpdesk stopped and its key deleted): claimed again, healthy.
        redis_command(&url, &["DEL", &key]).await;
        claim_status(&a, "healthy").await;
        key_holds(&url, &key, &format!("(schema `{prefix}` of database")).await;
        a.stop().await;
        other.clean_up().await;
    })
    .await;
}

/// Instances of one schema with different `HELPDESK_JWT_SECRET`s refuse each other's tokens
/// and cursors behind one address: they started without a word. Each now reports the others
/// in `/ready` (degraded, naming them), until they share the secret (a rolling change of the
/// secret shows so while it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_signing_tokens_with_another_secret_are_reported() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let hooks = fast_checks;
        let a = TestServer::start_with_hooks(backend.shared(), hooks(), |config| {
            config.ready_details = true;
        })
        .await;
        // The same secret: nothing to report, by either, after a round of each that began
        // with both recorded.
        let same = TestServer::start_with_hooks(backend.shared(), hooks(), |_| {}).await;
        rounds_with_both_recorded(&backend).await;
        for s in [&a, &same] {
            let ready = s.send(Method::GET, "/ready", None, None).await;
            assert_eq!(
                ready.body["components"]["instance-record"]["status"], "healthy",
                "{ready:?}"
            );
        }
        same.stop().await;
        let b = TestServer::start_with_hooks(backend.shared(), hooks(), |config| {
            config.jwt_secret = Some("another-secret-that-is-32-bytes-long!!".into());
            config.ready_details = true;
        })
        .await;
        each_reports_the_other(
            &a,
            &b,
            "1 other instance(s) of this schema sign tokens with another HELPDESK_JWT_SECRET",
            "give every instance the same secret",
        )
        .await;
        // The other one gone, the report goes with it.
        b.stop().await;
        component_status(&a, "instance-record", "healthy").await;
        a.stop().await;
        backend.clean_up().await;
    })
    .await;
}

/// Instances of one schema with other agent or login settings (here the login attempts) make
/// a user's role, and whether a login is refused, depend on the instance a request reaches:
/// each reports the other in `/ready`, until it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_other_agent_or_login_settings_are_reported() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let a = TestServer::start_with_hooks(backend.shared(), fast_checks(), |config| {
            config.login_attempts = 5;
            config.ready_details = true;
        })
        .await;
        let b = TestServer::start_with_hooks(backend.shared(), fast_checks(), |config| {
            config.login_attempts = 6;
            config.ready_details = true;
        })
        .await;
        each_reports_the_other(
            &a,
            &b,
            "1 other instance(s) of this schema run with other agent or login settings",
            "give every instance the same HELPDESK_AGENT_EMAILS, HELPDESK_AGENT_CODE, \
             HELPDESK_LOGIN_ATTEMPTS and HELPDESK_LOGIN_WINDOW",
        )
        .await;
        b.stop().await;
        component_status(&a, "instance-record", "healthy").await;
        a.stop().await;
        backend.clean_up().await;
    })
    .await;
}

/// Waits until `a` and `b` each report the other in `/ready` (`instance-record` degraded, a
/// reason that starts with `starts`, names the other's address, and says `advice`).
async fn each_reports_the_other(a: &TestServer, b: &TestServer, starts: &str, advice: &str) {
    let address = |s: &TestServer| {
        s.url("")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned()
    };
    for (s, other) in [(a, address(b)), (b, address(a))] {
        let degraded = component_status(s, "instance-record", "degraded").await;
        let reason = degraded["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with(starts)
                && reason.contains(&format!("listening on {other}"))
                && reason.contains(advice),
            "{degraded}"
        );
    }
}

/// Instances of one schema on Postgres without Redis each push only the events of their own
/// relay's batches to their WebSocket clients: nothing refuses the second (a restart after a
/// crash must not wait for the first one's record to go stale), and they ran side by side
/// without a word. Each now reports the others in `/ready` (degraded, naming them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_without_redis_on_one_schema_are_reported() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let hooks = fast_checks;
        let without_redis = |config: &mut helpdesk::Config| {
            config.redis_url = None;
            config.ready_details = true;
        };
        let a = TestServer::start_with_hooks(backend.shared(), hooks(), without_redis).await;
        component_status(&a, "instance-record", "healthy").await;
        let b = TestServer::start_with_hooks(backend.shared(), hooks(), without_redis).await;
        each_reports_the_other(
            &a,
            &b,
            "1 other instance(s) of this schema run on Postgres without Redis",
            "give every instance the same REDIS_URL",
        )
        .await;
        // The other one gone, the report goes with it.
        b.stop().await;
        component_status(&a, "instance-record", "healthy").await;
        a.stop().await;
        backend.clean_up().await;
    })
    .await;
}

/// How often the deployment checks run is bounded: zero would spin, and more than 30 s would
/// let a running instance's record go stale between renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_check_interval_out_of_bounds_fails_the_start() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        for every in [Duration::ZERO, Duration::from_secs(31)] {
            let hooks = Hooks {
                deployment_checks_every: Some(every),
                ..Hooks::default()
            };
            let err = Server::start(test_config(&backend), hooks)
                .await
                .expect_err("out of bounds");
            assert!(
                format!("{err:#}").contains(&format!(
                    "Hooks::deployment_checks_every is {every:?}: give more than zero and at most 30 s"
                )),
                "{err:#}"
            );
        }
        backend.clean_up().await;
    })
    .await;
}

/// Returns once every instance recorded in `backend`'s schema (two) has renewed its record
/// twice since this was called: a round's check of the other instances runs before its
/// renewal, so the second renewal ends a round that began after the first, with both
/// recorded.
async fn rounds_with_both_recorded(backend: &Backend) {
    use cqrs_postgres::sqlx::{self, Connection};
    let (database_url, schema) = backend.database().expect("a Postgres backend");
    let mut conn = sqlx::PgConnection::connect(&database_url)
        .await
        .expect("connect");
    for renewal in ["first", "second"] {
        let since: String = sqlx::query_scalar("SELECT clock_timestamp()::text")
            .fetch_one(&mut conn)
            .await
            .expect("the server's time");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let renewed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {schema}.helpdesk_instances WHERE seen_at > $1::timestamptz"
            )))
            .bind(&since)
            .fetch_one(&mut conn)
            .await
            .expect("count renewed records");
            if renewed == 2 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the {renewal} renewal of both instances' records: {renewed} of 2 renewed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
