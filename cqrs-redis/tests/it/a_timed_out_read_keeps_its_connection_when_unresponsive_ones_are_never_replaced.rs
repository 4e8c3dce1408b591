//! `unresponsive_timeout(Duration::MAX)` means connections are never replaced for not
//! answering: a consumer's blocking read that times out (the test's proxy lost its reply)
//! leaves the consumer's connection in place, as fred's own check and the watchdog do.

use crate::proxy::Proxy;
use crate::support::{Env, consumer_options, plain_redis_host, within};
use cqrs_core::ports::{Consumer, TransportError};
use cqrs_redis::ConnectionOptions;
use std::time::Duration;

/// Loses the reply to one blocking read of a consumer whose connection has `unresponsive`
/// as its unresponsive timeout, then fetches once more (the window a replacement would fall
/// in). Returns the connections the proxy accepted during it, and the second fetch's result.
async fn lose_one_read(
    name: &str,
    unresponsive: Duration,
) -> Option<(usize, Result<usize, TransportError>)> {
    let host = plain_redis_host()?;
    let proxy = Proxy::start(&host).await;
    let env = Env::with(name, |o| {
        o.connection(
            ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_millis(200))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
                .unresponsive_timeout(unresponsive),
        )
    })
    .await?;
    let outcome = within(
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
            let second = consumer.fetch(10).await.map(|batch| batch.len());
            let replaced = proxy.accepted() - accepted;
            drop(consumer);
            (replaced, second)
        }),
    )
    .await;
    env.cleanup().await;
    Some(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_read_keeps_its_connection_when_unresponsive_ones_are_never_replaced() {
    let Some((replaced, second)) = lose_one_read("never-replaced", Duration::MAX).await else {
        return;
    };
    assert_eq!(replaced, 0, "no connection replaced");
    assert_eq!(
        second.expect("the next read works on the same connection"),
        0
    );
}

/// The control: with a finite unresponsive timeout the same lost reply does get the
/// connection replaced within the same window, so the test above, which sees none, would see
/// one if `Duration::MAX` did not turn the replacement off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_read_replaces_its_connection_with_a_finite_unresponsive_timeout() {
    let Some((replaced, _)) = lose_one_read("replaced", Duration::from_millis(300)).await else {
        return;
    };
    assert!(replaced > 0, "the unanswered connection was replaced");
}
