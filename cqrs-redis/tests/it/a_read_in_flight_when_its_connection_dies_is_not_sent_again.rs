//! A blocking read in flight when its connection is killed is not sent again once fred has
//! reconnected: sent again, it would reach Redis after the consumer moved on (here: after
//! `close()`'s `CLIENT UNBLOCK` found nothing to unblock), and what it was served would sit
//! pending to the consumer until the redelivery delay. So after the kill and a publish, `close`
//! finds nothing pending to the consumer, and another consumer takes the entry at once, as its
//! first delivery.

use crate::support::{Env, blocked_connections, connection, consumer_options, n_of, raw, within};
use cqrs_core::ports::Consumer;
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_in_flight_when_its_connection_dies_is_not_sent_again() {
    let Some(env) = Env::with("close-queued", |o| {
        o.connection(
            connection()
                .command_timeout(Duration::from_secs(5))
                // The killed connection comes back only after the close below has looked
                // for what is pending: a read sent again would reach Redis after it.
                .reconnect_delays(Duration::from_millis(1500), Duration::from_secs(2)),
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
            let delay = Duration::from_secs(60);
            let mut a = env
                .transport
                .redis_consumer(
                    &topic,
                    "g",
                    consumer_options(&format!("{}-a", env.id))
                        .block(Duration::from_secs(10))
                        .redelivery_delay(delay),
                )
                .await
                .unwrap();
            let ids = a.client_ids().await.unwrap();
            {
                let fetch = a.fetch(10);
                tokio::pin!(fetch);
                let reader = tokio::select! {
                    result = &mut fetch => panic!("the fetch returned before it blocked: {result:?}"),
                    blocked = blocked_connections(&env.admin, &ids) => blocked,
                };
                assert_eq!(reader.len(), 1, "the consumer's own connection");
                let killed = raw(
                    &env.admin,
                    "CLIENT",
                    vec!["KILL".into(), "ID".into(), reader[0].into()],
                )
                .await;
                assert_eq!(killed.as_u64(), Some(1));
                // Dropped here, like a fetch at shutdown. fred used to keep the read and send it
                // again once it had reconnected.
            }
            env.publish_one(&topic, "k", 1).await;
            Consumer::close(&mut a).await.expect("close");

            // No read reached Redis after the kill: nothing is pending to `a`, so nothing waits
            // for the redelivery delay.
            let stream = env.transport.stream_key(&topic).unwrap();
            let pending = env
                .command(
                    "XPENDING",
                    vec![
                        stream.as_str().into(),
                        "g".into(),
                        "-".into(),
                        "+".into(),
                        10.into(),
                    ],
                )
                .await
                .into_array();
            assert!(pending.is_empty(), "the killed read was sent again: {pending:?}");

            let mut b = env
                .join(&topic, "b", |o| o.redelivery_delay(delay))
                .await;
            let until = Instant::now() + Duration::from_secs(10);
            let batch = loop {
                let batch = b.fetch(10).await.expect("fetch");
                if !batch.is_empty() {
                    break batch;
                }
                assert!(Instant::now() < until, "not taken over within 10 s");
            };
            assert_eq!(batch.iter().map(n_of).collect::<Vec<_>>(), [1]);
            assert_eq!(batch[0].attempt, 1, "its first delivery");
            drop(a);
        }),
    )
    .await;
    env.cleanup().await;
}
