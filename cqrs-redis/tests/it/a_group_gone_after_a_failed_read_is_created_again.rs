//! A consumer whose read failed takes over what that read may have left pending before its
//! next step; if the group is gone meanwhile (the stream deleted, a server restarted without
//! persistence), nothing is pending, and the step creates the group again, as it does after
//! a successful read.

use crate::support::{Env, connection, event, n_of, publish_until_ok, within};
use cqrs_core::ports::{EventTransport, TransportError};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_gone_after_a_failed_read_is_created_again() {
    let Some(env) = Env::with("gone-after-lost-read", |o| {
        o.connection(
            connection()
                .command_timeout(Duration::from_millis(200))
                // No reconnect while Redis is paused.
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
            let mut consumer = env.join(&topic, "c", |o| o).await;
            // The consumer's read waits in Redis for the pause and times out.
            env.command("CLIENT", vec!["PAUSE".into(), 400.into(), "WRITE".into()])
                .await;
            let error = consumer.fetch(10).await.expect_err("the read times out");
            assert!(matches!(error, TransportError::Timeout { .. }), "{error:?}");
            // Runs once the pause is over.
            let stream = env.transport.stream_key(&topic).unwrap();
            env.command("DEL", vec![stream.as_str().into()]).await;
            let events = [event(Some("k"), 1)];
            publish_until_ok(|| env.transport.publish(&topic, &events)).await;
            let until = Instant::now() + Duration::from_secs(10);
            let batch = loop {
                match consumer.fetch(10).await {
                    Ok(batch) if !batch.is_empty() => break batch,
                    Ok(_) => {}
                    Err(e) => assert!(
                        matches!(
                            e,
                            TransportError::Timeout { .. } | TransportError::Unavailable { .. }
                        ),
                        "a vanished group is created again, got {e:?}"
                    ),
                }
                assert!(Instant::now() < until, "not consumed within 10 s");
            };
            assert_eq!(batch.iter().map(n_of).collect::<Vec<_>>(), [1]);
        }),
    )
    .await;
    env.cleanup().await;
}
