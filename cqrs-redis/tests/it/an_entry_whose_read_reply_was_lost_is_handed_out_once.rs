//! An entry read by an `XREADGROUP` whose reply the consumer never got (the read timed out
//! while Redis, its writes paused, ran it later) is taken over by the consumer's next step:
//! handed out once, as its first delivery, instead of waiting out the redelivery delay and
//! being dead-lettered, unhandled, by the reclaim that counts a second delivery
//! (`max_deliveries(1)`).

use crate::support::{Env, connection, event, n_of, publish_until_ok, within};
use cqrs_core::ports::{EventTransport, TransportError};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_read_reply_was_lost_is_handed_out_once() {
    let Some(env) = Env::with("lost-read", |o| {
        o.connection(
            connection()
                .command_timeout(Duration::from_millis(200))
                // No reconnect while Redis is paused: the read must stay on its connection.
                .unresponsive_timeout(Duration::from_secs(30)),
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
            let delay = Duration::from_secs(1);
            let mut consumer = env
                .join(&topic, "c", |o| o.max_deliveries(1).redelivery_delay(delay))
                .await;
            let events = [event(Some("k"), 1)];
            publish_until_ok(|| env.transport.publish(&topic, &events)).await;
            // `XREADGROUP` is a write: the consumer's read waits in Redis for the pause, its
            // reply comes after the command timeout, and Redis runs it when the pause ends.
            env.command("CLIENT", vec!["PAUSE".into(), 500.into(), "WRITE".into()])
                .await;
            let mut handed = Vec::new();
            let mut failures = 0;
            // Four redelivery delays: enough for a reclaim to dead-letter it.
            let until = Instant::now() + 4 * delay;
            while handed.is_empty() && Instant::now() < until {
                match consumer.fetch(10).await {
                    Ok(batch) => handed.extend(batch.iter().map(|d| (n_of(d), d.attempt))),
                    Err(e) => {
                        assert!(
                            matches!(
                                e,
                                TransportError::Timeout { .. } | TransportError::Unavailable { .. }
                            ),
                            "retryable, got {e:?}"
                        );
                        failures += 1;
                    }
                }
            }
            assert!(failures >= 1, "the read during the pause timed out");
            assert_eq!(handed, [(1, 1)], "handed out once, as its first delivery");
            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
        }),
    )
    .await;
    env.cleanup().await;
}
