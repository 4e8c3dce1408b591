//! Redis ends a blocking read with an `UNBLOCKED` error for other reasons than a deleted
//! stream (`CLIENT UNBLOCK <id> ERROR`, a master turned replica), and the group is still
//! there then. The consumer keeps the entry it holds back: handed out once its predecessor is
//! done, on its first delivery, not left pending until the redelivery delay and then
//! dead-lettered (`max_deliveries(1)`) with no handler run.

use crate::support::{Env, blocked_now, n_of, within};
use cqrs_core::ports::Consumer;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_ended_by_client_unblock_error_keeps_what_the_consumer_holds() {
    // A long gate poll: the read waiting behind a held entry blocks up to the claim interval
    // (1 s here), long enough to be found and unblocked.
    let Some(env) = Env::with("unblock-error", |o| o.gate_poll(Duration::from_secs(30))).await
    else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            let mut consumer = env
                .transport
                .redis_consumer(
                    &topic,
                    "g",
                    crate::support::consumer_options(&format!("{}-c", env.id))
                        .block(Duration::from_secs(10))
                        // No redelivery within the test: an entry the consumer lost track of
                        // would stay pending to it.
                        .redelivery_delay(Duration::from_secs(60))
                        .max_deliveries(1),
                )
                .await
                .unwrap();
            // Event 1 handed out and left pending; event 2 of the same key published behind it.
            let one = env.one_pending_and_its_successor(&topic, &mut consumer).await;
            let ids = consumer.client_ids().await.unwrap();

            // The fetch reads event 2, holds it back behind 1, and waits in a blocking read,
            // which `CLIENT UNBLOCK … ERROR` ends (Redis answers `UNBLOCKED client unblocked
            // via CLIENT UNBLOCK`).
            let batch = {
            let fetch = consumer.fetch(10);
            tokio::pin!(fetch);
            let unblock = async {
                loop {
                    for id in blocked_now(&env.admin, &ids).await {
                        let unblocked = env
                            .command(
                                "CLIENT",
                                vec!["UNBLOCK".into(), Value::from(id), "ERROR".into()],
                            )
                            .await;
                        // 0: the read ended by itself just before; wait for the next one.
                        if unblocked.as_u64() == Some(1) {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            tokio::select! {
                result = &mut fetch => panic!("the fetch returned before its read was unblocked: {result:?}"),
                () = unblock => {}
            }

            // Event 1 done (acknowledged by another hand): event 2 is ready, and the same fetch
            // hands it out (within its 10 s block; it would otherwise wait 60 s).
            env.command(
                "XACK",
                vec![stream.as_str().into(), "g".into(), one.id.0.as_str().into()],
            )
            .await;
            fetch.await.expect("the fetch goes on after the unblocked read")
            };
            assert_eq!(
                batch.iter().map(n_of).collect::<Vec<_>>(),
                [2],
                "the held entry is handed out in the same fetch"
            );
            assert_eq!(batch[0].attempt, 1, "on its first delivery");
            consumer.ack(&[batch[0].id.clone()]).await.unwrap();
            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(dead.is_empty(), "dead-lettered: {dead:?}");
            let pending = env
                .command("XPENDING", vec![stream.as_str().into(), "g".into()])
                .await
                .into_array();
            assert_eq!(pending.first().and_then(Value::as_u64), Some(0), "nothing left pending");
        }),
    )
    .await;
    env.cleanup().await;
}
