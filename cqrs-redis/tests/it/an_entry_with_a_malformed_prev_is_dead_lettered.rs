//! An entry whose `prev` field is no stream id (written by hand, or by a broken publisher)
//! cannot be gated: it is dead-lettered as malformed, and the consumer, and the entries after
//! it, carry on.

use crate::support::{Env, event, n_of, within};
use cqrs_redis::KeyOrdering;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_with_a_malformed_prev_is_dead_lettered() {
    let Some(env) = Env::with("bad-prev", |o| o.key_ordering(KeyOrdering::Exact)).await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            let stream = env.transport.stream_key(&topic).unwrap();
            let lanes = format!("{}:{{{topic}}}:lanes", crate::support::key_prefix(&env.id));
            env.publish_one(&topic, "k", 1).await;
            let record = serde_json::to_string(&event(Some("k"), 2)).unwrap();
            let bad = env
                .command(
                    "XADD",
                    vec![
                        stream.as_str().into(),
                        "*".into(),
                        "key".into(),
                        "k".into(),
                        "lane".into(),
                        "k:k".into(),
                        "prev".into(),
                        "abc".into(),
                        "record".into(),
                        record.into(),
                    ],
                )
                .await
                .into_string()
                .unwrap();
            env.command(
                "HSET",
                vec![lanes.as_str().into(), "k:k".into(), bad.as_str().into()],
            )
            .await;
            env.publish_one(&topic, "k", 3).await;
            env.publish_one(&topic, "q", 4).await;

            let mut consumer = env.join(&topic, "c", |o| o).await;
            let mut got = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while got.len() < 3 && tokio::time::Instant::now() < until {
                let batch = consumer.fetch(10).await.expect("fetch keeps working");
                got.extend(batch.iter().map(n_of));
                let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
                consumer.ack(&ids).await.unwrap();
            }
            got.sort_unstable();
            assert_eq!(got, [1, 3, 4], "everything but the malformed entry");

            // Later entries keep flowing.
            env.publish_one(&topic, "k", 5).await;
            let mut later = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while later.is_empty() && tokio::time::Instant::now() < until {
                later = consumer.fetch(10).await.expect("fetch keeps working");
            }
            assert_eq!(later.iter().map(n_of).collect::<Vec<_>>(), [5]);

            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert_eq!(dead.len(), 1, "{dead:?}");
            assert_eq!(dead[0].entry_id, bad);
            assert!(
                dead[0].error.starts_with("malformed entry"),
                "{}",
                dead[0].error
            );
            assert_eq!(
                dead[0].record.as_ref().map(|r| r.payload["n"].clone()),
                Some(2.into())
            );
        }),
    )
    .await;
    env.cleanup().await;
}
