//! Deleting the stream while a consumer waits in a blocking read (`DEL`; `FLUSHDB` too) makes
//! Redis answer the read with `UNBLOCKED the stream key no longer exists`: the fetch returns
//! normally, the group is created again, and what is published afterwards is consumed.

use crate::support::{Env, blocked_connections, n_of, within};
use cqrs_core::ports::TransportError;
use cqrs_redis::RedisConsumer;
use std::time::Duration;
use tokio::time::Instant;

/// Fetches with `consumer` until the fetch returns, doing `meanwhile` once one of its
/// connections waits in a blocking read.
async fn while_blocked<F: std::future::Future<Output = ()>>(
    env: &Env,
    consumer: &mut RedisConsumer,
    meanwhile: F,
) -> Result<Vec<cqrs_core::ports::Delivery>, TransportError> {
    use cqrs_core::ports::Consumer;
    let ids = consumer.client_ids().await.unwrap();
    let fetch = consumer.fetch(10);
    tokio::pin!(fetch);
    tokio::select! {
        result = &mut fetch => panic!("the fetch returned before it blocked: {result:?}"),
        _ = blocked_connections(&env.admin, &ids) => {}
    }
    meanwhile.await;
    fetch.await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_during_a_blocking_read_is_recreated() {
    let Some(env) = Env::new("unblocked").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("events");
            let mut consumer = env
                .transport
                .redis_consumer(
                    &topic,
                    "g",
                    crate::support::consumer_options(&format!("{}-c", env.id))
                        // Blocking reads of up to a second (the claim interval's cap).
                        .block(Duration::from_secs(10))
                        .redelivery_delay(Duration::from_secs(60)),
                )
                .await
                .unwrap();
            let stream = env.transport.stream_key(&topic).unwrap();
            let result = while_blocked(&env, &mut consumer, async {
                env.command("DEL", vec![stream.as_str().into()]).await;
            })
            .await;
            match result {
                Ok(batch) => assert!(batch.is_empty(), "nothing was published"),
                Err(e) => assert!(
                    matches!(
                        e,
                        TransportError::Timeout { .. } | TransportError::Unavailable { .. }
                    ),
                    "a deleted stream is no backend failure, got {e:?}"
                ),
            }
            env.publish_one(&topic, "k", 1).await;
            let until = Instant::now() + Duration::from_secs(10);
            let batch = loop {
                let batch = cqrs_core::ports::Consumer::fetch(&mut consumer, 10)
                    .await
                    .expect("fetch after the stream was deleted");
                if !batch.is_empty() {
                    break batch;
                }
                assert!(Instant::now() < until, "not consumed within 10 s");
            };
            assert_eq!(batch.iter().map(n_of).collect::<Vec<_>>(), [1]);
            assert_eq!(batch[0].attempt, 1);
        }),
    )
    .await;
    env.cleanup().await;
}
