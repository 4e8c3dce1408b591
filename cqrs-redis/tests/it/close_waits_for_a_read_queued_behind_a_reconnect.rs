//! A read of a dropped fetch that is still queued in fred for the consumer's own connection
//! (the connection was killed and fred waits to reconnect) reaches Redis only after
//! `close()`'s `CLIENT UNBLOCK` found nothing to unblock. `close` waits for it (a `PING` on
//! that connection is answered after it) and releases what it was served, so another consumer
//! takes that over at once instead of after the redelivery delay.

use crate::support::{Env, blocked_connections, connection, consumer_options, n_of, raw, within};
use cqrs_core::ports::Consumer;
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_a_read_queued_behind_a_reconnect() {
    let Some(env) = Env::with("close-queued", |o| {
        o.connection(
            connection()
                .command_timeout(Duration::from_secs(5))
                // The killed connection comes back only after the close below has looked
                // for what is pending.
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
                // Dropped here, like a fetch at shutdown: fred keeps the read to send it again
                // once it has reconnected.
            }
            env.publish_one(&topic, "k", 1).await;
            Consumer::close(&mut a).await.expect("close");

            // The read was served before `close` looked: its entry is pending to `a`, and
            // released (idle for the redelivery delay, its delivery taken back).
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
            assert_eq!(pending.len(), 1, "the entry the queued read was served: {pending:?}");
            let entry = pending[0].clone().into_array();
            let idle = entry[2].as_u64().unwrap_or(0);
            assert!(
                idle >= delay.as_millis() as u64,
                "released: idle {idle} ms, {entry:?}"
            );

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
            assert_eq!(batch[0].attempt, 1, "the queued read's delivery was taken back");
            drop(a);
        }),
    )
    .await;
    env.cleanup().await;
}
