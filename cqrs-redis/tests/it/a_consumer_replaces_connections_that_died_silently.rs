//! The stream transport's shared connection and a consumer's own connection that die silently
//! (the test's proxy turns into a black hole: no FIN, no RST, nothing forwarded) are replaced:
//! the shared one after its watchdog `PING` goes unanswered, the consumer's own after a
//! blocking read without a reply. The consumer then hands out what was published meanwhile,
//! and its blocking reads are answered again.

use crate::proxy::Proxy;
use crate::support::{
    Env, blocked_now, consumer_options, n_of, plain_redis_host, stream_options, within,
};
use cqrs_core::ports::{Consumer, TransportError};
use cqrs_redis::ConnectionOptions;
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_replaces_connections_that_died_silently() {
    let Some(env) = Env::new("black-hole-stream").await else {
        return;
    };
    let Some(host) = plain_redis_host() else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let proxy = Proxy::start(&host).await;
            let connection = ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_secs(2))
                .connect_timeout(Duration::from_secs(2))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
                // Past a loaded machine's stalls: a watchdog ping taken for unanswered before
                // the black hole would replace the connection early (and lose a message).
                .unresponsive_timeout(Duration::from_secs(3))
                .ping_interval(Duration::from_millis(100));
            let proxied = stream_options(&env.id)
                .connection(connection)
                .connect()
                .await
                .expect("connect through the proxy");
            let topic = env.topic("events");
            let mut consumer = proxied
                .redis_consumer(
                    &topic,
                    "g",
                    consumer_options(&format!("{}-c", env.id))
                        // Blocking reads of up to a second (the claim interval's cap).
                        .block(Duration::from_secs(1))
                        .redelivery_delay(Duration::from_secs(4)),
                )
                .await
                .unwrap();
            // `env.transport` publishes straight to Redis, past the proxy.
            env.publish_one(&topic, "k", 1).await;
            let until = Instant::now() + Duration::from_secs(5);
            let first = loop {
                let batch = consumer
                    .fetch(10)
                    .await
                    .expect("fetch before the black hole");
                if !batch.is_empty() {
                    break batch;
                }
                assert!(Instant::now() < until, "event 1 not fetched within 5 s");
            };
            assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [1]);
            consumer.ack(&[first[0].id.clone()]).await.unwrap();

            proxy.black_hole();
            env.publish_one(&topic, "k", 2).await;
            let error = consumer
                .fetch(10)
                .await
                .expect_err("a fetch through the black hole fails");
            assert!(retryable(&error), "retryable, got {error:?}");

            proxy.forward();
            let until = Instant::now() + Duration::from_secs(10);
            let second = loop {
                match consumer.fetch(10).await {
                    Ok(batch) if !batch.is_empty() => break batch,
                    Ok(_) => {}
                    Err(e) => assert!(retryable(&e), "retryable, got {e:?}"),
                }
                assert!(
                    Instant::now() < until,
                    "event 2 not fetched within 10 s of the proxy forwarding again"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(second.iter().map(n_of).collect::<Vec<_>>(), [2]);
            assert_eq!(
                second[0].attempt, 1,
                "nothing read it through the black hole"
            );
            consumer.ack(&[second[0].id.clone()]).await.unwrap();

            // With nothing to read, a fetch waits in a blocking read on the consumer's own
            // connection: it reaches Redis again.
            let until = Instant::now() + Duration::from_secs(10);
            'replaced: loop {
                let ids = consumer.client_ids().await.unwrap();
                let fetch = consumer.fetch(10);
                tokio::pin!(fetch);
                loop {
                    tokio::select! {
                        result = &mut fetch => {
                            match result {
                                Ok(batch) => assert!(batch.is_empty(), "nothing more was published"),
                                Err(e) => assert!(retryable(&e), "retryable, got {e:?}"),
                            }
                            break;
                        }
                        () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                    if !blocked_now(&env.admin, &ids).await.is_empty() {
                        break 'replaced;
                    }
                }
                assert!(
                    Instant::now() < until,
                    "no blocking read of the consumer reached Redis within 10 s of the proxy \
                     forwarding again"
                );
            }
            drop(consumer);
            drop(proxied);
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
