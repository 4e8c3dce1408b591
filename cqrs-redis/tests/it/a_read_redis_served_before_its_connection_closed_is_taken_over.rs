//! A blocking read that Redis served, whose connection then closed before the reply reached the
//! consumer (a reset, a failover, a connection replaced), is not sent again on the new
//! connection: sent again, it would wait for new entries while what the first one was served
//! sat pending to the consumer, in none of its lists, until a reclaim counted a second
//! delivery (dead-lettering it, unhandled, under `max_deliveries(1)`). Failed instead, it
//! leaves the consumer unsure, and its next step takes the entry over: handed out once, as
//! its first delivery.

use crate::proxy::Proxy;
use crate::support::{n_of, within};
use cqrs_core::ports::{Consumer, TransportError};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_redis_served_before_its_connection_closed_is_taken_over() {
    let Some((proxy, env)) = crate::proxy::env_behind_a_proxy("cut-read").await else {
        return;
    };
    within(
        90,
        Box::pin(async {
            let delay = Duration::from_secs(4);
            let (topic, mut consumer, read) = crate::proxy::a_served_blocking_read(
                &env,
                &proxy,
                Duration::from_secs(3),
                delay,
                // The blocking read on the consumer's own connection (`BLOCK`).
                |proxy| proxy.close_after_reply_to("BLOCK"),
                Proxy::cut_sprung,
            )
            .await;
            let mut handed: Vec<(u64, u32)> = match read {
                Ok(batch) => batch.iter().map(|d| (n_of(d), d.attempt)).collect(),
                Err(e) => {
                    assert!(retryable(&e), "retryable, got {e:?}");
                    Vec::new()
                }
            };

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
