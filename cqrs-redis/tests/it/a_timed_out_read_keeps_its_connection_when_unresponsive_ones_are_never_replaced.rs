//! `unresponsive_timeout(Duration::MAX)` means connections are never replaced for not
//! answering: a consumer's blocking read that times out (the test's proxy lost its reply)
//! leaves the consumer's connection in place, as fred's own check and the watchdog do.

use crate::proxy::Proxy;
use crate::support::{Env, consumer_options, plain_redis_host, within};
use cqrs_core::ports::{Consumer, TransportError};
use cqrs_redis::ConnectionOptions;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_read_keeps_its_connection_when_unresponsive_ones_are_never_replaced() {
    let Some(host) = plain_redis_host() else {
        return;
    };
    let proxy = Proxy::start(&host).await;
    let Some(env) = Env::with("never-replaced", |o| {
        o.connection(
            ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_millis(200))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
                .unresponsive_timeout(Duration::MAX),
        )
    })
    .await
    else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("events");
            let mut consumer = env
                .transport
                .redis_consumer(&topic, "g", consumer_options(&format!("{}-c", env.id)))
                .await
                .unwrap();
            let accepted = proxy.accepted();
            // The blocking read on the consumer's own connection (`BLOCK`), not the step's.
            proxy.lose_reply_to("BLOCK");
            let error = consumer.fetch(10).await.expect_err("the read times out");
            assert!(matches!(error, TransportError::Timeout { .. }), "{error:?}");
            assert!(proxy.reply_lost(), "the read went through the proxy");
            // A reconnect forced by the timeout would be done long before this fetch is: it
            // first waits up to the command timeout for a PING on the consumer's connection.
            let _ = consumer.fetch(10).await;
            assert_eq!(proxy.accepted(), accepted, "no connection replaced");
            drop(consumer);
        }),
    )
    .await;
    env.cleanup().await;
}
