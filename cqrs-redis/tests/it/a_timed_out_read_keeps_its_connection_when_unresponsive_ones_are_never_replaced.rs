//! `unresponsive_timeout(Duration::MAX)` means connections are never replaced for not
//! answering: a consumer's blocking read that times out (the test's proxy lost its reply)
//! leaves the consumer's connection in place, as fred's own check and the watchdog do.

use crate::proxy::Proxy;
use crate::support::{Env, consumer_options, plain_redis_host, within};
use cqrs_core::ports::{Consumer, TransportError};
use cqrs_redis::ConnectionOptions;
use std::time::Duration;

/// How long the never-replaced test watches for a replacement: several times what the
/// control needs (its reconnect waits up to 120 ms, after a 300 ms unresponsive timeout).
const WATCH: Duration = Duration::from_secs(2);

/// Loses the reply to one blocking read of a consumer whose connection has `unresponsive`
/// as its unresponsive timeout, then fetches once more. Returns the second fetch's result and
/// the connections the proxy accepted since the loss: once one more is seen, within
/// 10 s, when `expect_replacement`; otherwise after watching for [`WATCH`].
async fn lose_one_read(
    name: &str,
    unresponsive: Duration,
    expect_replacement: bool,
) -> Option<(usize, Result<usize, TransportError>)> {
    let host = plain_redis_host()?;
    let proxy = Proxy::start(&host).await;
    let env = Env::with(name, |o| {
        o.connection(
            // Not short: a step's command through the proxy on a loaded machine must not
            // time out (the second fetch must work); the lost read times out after its block
            // and this.
            ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_secs(2))
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
            // On a loaded machine a fetch may spend its block on the step and not read at
            // all (an empty batch), or a step's command may fail (the control's 300 ms
            // unresponsive timeout can replace a slow connection): fetched again until the
            // read is the one that went.
            proxy.lose_reply_to("BLOCK");
            let error = loop {
                match consumer.fetch(10).await {
                    Err(error) if proxy.reply_lost() => break error,
                    Err(error) => assert!(
                        matches!(
                            error,
                            TransportError::Timeout { .. } | TransportError::Unavailable { .. }
                        ),
                        "before the read: {error:?}"
                    ),
                    Ok(batch) if batch.is_empty() && !proxy.reply_lost() => continue,
                    Ok(batch) => panic!("the read was answered: {} entries", batch.len()),
                }
            };
            assert!(matches!(error, TransportError::Timeout { .. }), "{error:?}");
            assert!(proxy.reply_lost(), "the read went through the proxy");
            let second = consumer.fetch(10).await.map(|batch| batch.len());
            if expect_replacement {
                cqrs_core::testing::eventually(
                    Duration::from_secs(10),
                    "the unanswered connection is replaced",
                    || async { (proxy.accepted() > accepted).then_some(()) },
                )
                .await;
            } else {
                // Nothing to wait for: the control below shows what would happen meanwhile.
                tokio::time::sleep(WATCH).await;
            }
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
    let Some((replaced, second)) = lose_one_read("never-replaced", Duration::MAX, false).await
    else {
        return;
    };
    assert_eq!(replaced, 0, "no connection replaced within {WATCH:?}");
    assert!(
        second.is_ok(),
        "the next read works on the same connection: {second:?}"
    );
}

/// The control: with a finite unresponsive timeout the same lost reply gets the connection
/// replaced, in a small part of the [`WATCH`] the test above waits: that one would see a
/// replacement if `Duration::MAX` did not turn it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_read_replaces_its_connection_with_a_finite_unresponsive_timeout() {
    let Some((replaced, _)) = lose_one_read("replaced", Duration::from_millis(300), true).await
    else {
        return;
    };
    assert!(replaced > 0, "the unanswered connection was replaced");
}
