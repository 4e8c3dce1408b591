//! A consumer whose read failed takes over what that read may have left pending before its
//! next step; if the group is gone meanwhile (the stream deleted, a server restarted without
//! persistence), nothing is pending, and the step creates the group again, as it does after
//! a successful read.

use crate::support::{event, n_of, publish_until_ok, within};
use cqrs_core::ports::{EventTransport, TransportError};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_gone_after_a_failed_read_is_created_again() {
    let Some((proxy, env)) = crate::proxy::env_behind_a_proxy("gone-after-lost-read").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("events");
            let mut consumer = env.join(&topic, "c", |o| o).await;
            // The consumer's read reaches Redis; its reply is lost, and it times out.
            // The blocking read on the consumer's own connection (`BLOCK`), not the step's.
            proxy.lose_reply_to("BLOCK");
            // On a loaded machine a fetch may spend its block on the step and not read at
            // all (an empty batch): fetched again until the read is the one that went.
            let error = loop {
                match consumer.fetch(10).await {
                    Err(error) if proxy.reply_lost() => break error,
                    Err(error) => assert!(retryable(&error), "before the read: {error:?}"),
                    Ok(batch) if batch.is_empty() && !proxy.reply_lost() => {}
                    Ok(batch) => panic!("the read was answered: {} entries", batch.len()),
                }
            };
            assert!(matches!(error, TransportError::Timeout { .. }), "{error:?}");
            assert!(proxy.reply_lost(), "the read went through the proxy");
            let stream = env.transport.stream_key(&topic).unwrap();
            env.command("DEL", vec![stream.as_str().into()]).await;
            let events = [event(Some("k"), 1)];
            publish_until_ok(|| env.transport.publish(&topic, &events)).await;
            let until = Instant::now() + Duration::from_secs(15);
            let batch = loop {
                match consumer.fetch(10).await {
                    Ok(batch) if !batch.is_empty() => break batch,
                    Ok(_) => {}
                    Err(e) => {
                        assert!(
                            retryable(&e),
                            "a vanished group is created again, got {e:?}"
                        )
                    }
                }
                assert!(Instant::now() < until, "not consumed within 15 s");
            };
            assert_eq!(batch.iter().map(n_of).collect::<Vec<_>>(), [1]);
        }),
    )
    .await;
    env.cleanup().await;
}

fn retryable(error: &TransportError) -> bool {
    matches!(
        error,
        TransportError::Timeout { .. } | TransportError::Unavailable { .. }
    )
}
