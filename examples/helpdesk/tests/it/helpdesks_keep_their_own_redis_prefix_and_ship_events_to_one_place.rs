//! Two mistakes of a deployment that lost or leaked events without an error: two helpdesks
//! (two schemas) on one Redis key prefix read each other's events, and instances of one schema
//! shipping events to different places (one without Redis among instances with it, or another
//! prefix) ran relays of the same names, so the events one took never reached the others'
//! WebSockets. Both are refused at start.

use crate::support::*;
use helpdesk::{Hooks, Server};

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
