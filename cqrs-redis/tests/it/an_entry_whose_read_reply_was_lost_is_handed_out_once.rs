//! An entry read by an `XREADGROUP` whose reply the consumer never got (Redis served the read,
//! and the test's proxy lost the reply: the read timed out) is taken over by the consumer's
//! next step: handed out once, as its first delivery, instead of waiting out the redelivery
//! delay and being dead-lettered, unhandled, by the reclaim that counts a second delivery
//! (`max_deliveries(1)`).

use crate::proxy::Proxy;
use crate::support::{n_of, within};
use cqrs_core::ports::{Consumer, TransportError};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_read_reply_was_lost_is_handed_out_once() {
    let Some((proxy, env)) = crate::proxy::env_behind_a_proxy("lost-read").await else {
        return;
    };
    within(
        90,
        Box::pin(async {
            let delay = Duration::from_secs(4);
            // Reading for up to 10 s, each blocking read up to a second (the claim interval's
            // cap): a slow step does not use up the fetch before it reads.
            let (topic, mut consumer, read) = crate::proxy::a_served_blocking_read(
                &env,
                &proxy,
                Duration::from_secs(10),
                delay,
                // The blocking read on the consumer's own connection (`BLOCK`), not the
                // step's: Redis serves it the event published meanwhile; the reply is lost, so
                // the read times out.
                |proxy| proxy.lose_reply_to("BLOCK"),
                Proxy::reply_lost,
            )
            .await;
            let error = read.expect_err("the read whose reply was lost times out");
            assert!(retryable(&error), "retryable, got {error:?}");

            let mut handed = Vec::new();
            // Two redelivery delays: enough for a reclaim to dead-letter it.
            let until = Instant::now() + 2 * delay;
            while handed.is_empty() && Instant::now() < until {
                match consumer.fetch(10).await {
                    Ok(batch) => handed.extend(batch.iter().map(|d| (n_of(d), d.attempt))),
                    Err(e) => assert!(retryable(&e), "retryable, got {e:?}"),
                }
            }
            assert_eq!(handed, [(1, 1)], "handed out once, as its first delivery");
            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
            drop(consumer);
        }),
    )
    .await;
    env.cleanup().await;
}

fn retryable(error: &TransportError) -> bool {
    matches!(
        error,
        TransportError::Unavailable { .. } | TransportError::Timeout { .. }
    )
}
