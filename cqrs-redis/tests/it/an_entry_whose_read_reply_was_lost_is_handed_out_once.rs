//! An entry read by an `XREADGROUP` whose reply the consumer never got (Redis served the read,
//! and the test's proxy lost the reply: the read timed out) is taken over by the consumer's
//! next step: handed out once, as its first delivery, instead of waiting out the redelivery
//! delay and being dead-lettered, unhandled, by the reclaim that counts a second delivery
//! (`max_deliveries(1)`).

use crate::proxy::Proxy;
use crate::support::{Env, blocked_connections, event, n_of, plain_redis_host, raw, within};
use cqrs_core::ports::{Consumer, EventTransport, TransportError};
use cqrs_redis::ConnectionOptions;
use fred::types::Value;
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_read_reply_was_lost_is_handed_out_once() {
    let Some(host) = plain_redis_host() else {
        return;
    };
    let proxy = Proxy::start(&host).await;
    let Some(env) = Env::with("lost-read", |o| {
        o.connection(
            // Not short: a publish or step through the proxy on a loaded machine must not
            // time out; the lost read times out after its block and this.
            ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_secs(2))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200)),
        )
    })
    .await
    else {
        return;
    };
    within(
        90,
        Box::pin(async {
            let delay = Duration::from_secs(4);
            let events = [event(Some("k"), 1)];
            // Each read blocks for a claim interval at most (1 s): one may end before the
            // publish reaches it, on a machine stalled that long, and is served nothing. Then
            // again, on a new topic (the entry it missed would be read by the next step).
            let mut attempt = 0;
            let (topic, mut consumer) = loop {
                attempt += 1;
                let topic = env.topic(&format!("events-{attempt}"));
                let mut consumer = env
                    .transport
                    .redis_consumer(
                        &topic,
                        "g",
                        crate::support::consumer_options(&format!("{}-c{attempt}", env.id))
                            .max_deliveries(1)
                            // Reading for up to 10 s, each blocking read up to a second (the
                            // claim interval's cap): a slow step does not use up the fetch
                            // before it reads.
                            .block(Duration::from_secs(10))
                            .redelivery_delay(delay),
                    )
                    .await
                    .unwrap();
                let ids = consumer.client_ids().await.unwrap();
                // The blocking read on the consumer's own connection (`BLOCK`), not the step's.
                proxy.lose_reply_to("BLOCK");
                // The consumer's blocking read reaches Redis, which serves it the event
                // published meanwhile; the reply is lost, so the read times out.
                let (read, ()) = tokio::join!(consumer.fetch(10), async {
                    blocked_connections(&env.admin, &ids).await;
                    env.transport.publish(&topic, &events).await.unwrap();
                });
                assert!(proxy.reply_lost(), "the read went through the proxy");
                let error = read.expect_err("the read whose reply was lost times out");
                assert!(retryable(&error), "retryable, got {error:?}");
                let stream = env.transport.stream_key(&topic).unwrap();
                let pending = raw(
                    &env.admin,
                    "XPENDING",
                    vec![stream.as_str().into(), "g".into()],
                )
                .await;
                // Redis served the lost read.
                if pending.into_array().first().and_then(Value::as_u64) == Some(1) {
                    break (topic, consumer);
                }
                assert!(
                    attempt < 5,
                    "in {attempt} tries, no blocking read waited until the publish reached it"
                );
            };

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
