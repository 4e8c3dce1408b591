//! Two mistakes of a deployment that lost or leaked events without an error: two helpdesks
//! (two schemas) on one Redis key prefix read each other's events, and an instance without
//! Redis among instances with it ran relays of the same names, shipping the events it took to
//! its own process only. Both are refused at start.

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
            err.contains("another helpdesk uses this Redis key prefix")
                && err.contains(&format!("(schema `{prefix}` of database"))
                && err.contains(&format!("(schema `{other_schema}` of database"))
                && err.contains("HELPDESK_REDIS_PREFIX"),
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
async fn instances_of_a_schema_run_in_one_mode() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let with_redis = TestServer::start_on(backend.shared(), |_| {}).await;
        let mut config = test_config(&backend);
        config.redis_url = None;
        let err = Server::start(config.clone(), Hooks::default())
            .await
            .expect_err("an instance without Redis among instances with it");
        let err = format!("{err:#}");
        assert!(
            err.contains("1 instance(s) with Redis run on schema")
                && err.contains("this one would run without Redis")
                && err.contains("Start every instance of a schema with the same REDIS_URL"),
            "{err}"
        );
        // Once they stopped, the schema switches modes.
        with_redis.stop().await;
        let without = TestServer::start_on(backend.shared(), |c| c.redis_url = None).await;
        let err = Server::start(test_config(&backend), Hooks::default())
            .await
            .expect_err("and the other way round");
        let err = format!("{err:#}");
        assert!(
            err.contains("1 instance(s) without Redis run on schema")
                && err.contains("this one would run with Redis"),
            "{err}"
        );
        without.stop().await;
        backend.clean_up().await;
    })
    .await;
}
