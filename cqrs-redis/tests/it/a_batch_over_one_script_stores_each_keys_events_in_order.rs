//! A batch of more events than one publish script carries (256) is sent as several scripts,
//! each once the one before succeeded: a key whose events span the chunks is stored, and
//! chained in its lane, in publish order, and a consumer gets them in that order.

use crate::support::{Env, event, n_of, within};
use cqrs_core::ports::EventTransport;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_one_script_stores_each_keys_events_in_order() {
    let Some(env) = Env::new("big-batch").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("orders");
            // Key `k` at every other index, so indexes 254 and 256 (chunks one and two) and 510
            // and 512 (two and three) are `k`'s; other keys in between.
            let events: Vec<_> = (0..600u64)
                .map(|n| {
                    let key = if n % 2 == 0 {
                        "k".to_owned()
                    } else {
                        format!("o{}", n % 7)
                    };
                    event(Some(&key), n)
                })
                .collect();
            env.transport.publish(&topic, &events).await.unwrap();

            let stream = env.transport.stream_key(&topic).unwrap();
            let entries = env
                .command(
                    "XRANGE",
                    vec![stream.as_str().into(), "-".into(), "+".into()],
                )
                .await
                .into_array();
            assert_eq!(entries.len(), 600);
            let mut stored = Vec::new();
            let mut last_of_k: Option<String> = None;
            for entry in entries {
                let mut parts = entry.into_array().into_iter();
                let id = parts.next().and_then(Value::into_string).unwrap();
                let fields: Vec<String> = parts
                    .next()
                    .unwrap()
                    .into_array()
                    .into_iter()
                    .filter_map(Value::into_string)
                    .collect();
                let field = |name: &str| {
                    fields
                        .chunks(2)
                        .find(|pair| pair[0] == name)
                        .map(|pair| pair[1].clone())
                };
                if field("key").as_deref() != Some("k") {
                    continue;
                }
                let record: serde_json::Value =
                    serde_json::from_str(&field("record").unwrap()).unwrap();
                stored.push(record["payload"]["n"].as_u64().unwrap());
                assert_eq!(
                    field("prev").unwrap_or_default(),
                    last_of_k.clone().unwrap_or_default(),
                    "each of k's entries is chained to the one before it"
                );
                last_of_k = Some(id);
            }
            let expected: Vec<u64> = (0..600).step_by(2).collect();
            assert_eq!(stored, expected, "k's events stored in publish order");

            let mut consumer = env.join(&topic, "c", |o| o).await;
            let mut got = Vec::new();
            let until = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            while got.len() < 600 && tokio::time::Instant::now() < until {
                let batch = consumer.fetch(100).await.unwrap();
                got.extend(
                    batch
                        .iter()
                        .map(|d| (d.record.partition_key.clone(), n_of(d))),
                );
                let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
                consumer.ack(&ids).await.unwrap();
            }
            let of_k: Vec<u64> = got
                .iter()
                .filter(|(key, _)| key.as_deref() == Some("k"))
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(of_k, expected, "k's events handed out in publish order");
        }),
    )
    .await;
    env.cleanup().await;
}

/// A batch of large events is cut into chunks of at most 8 MiB, each with the command timeout
/// plus time to send its bytes: with one 48 MiB script on a fixed timeout shorter than its
/// sending, the publish failed (`Timeout`) and landed all the same, and every retry would
/// have appended it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_large_events_has_time_to_go_and_lands_once() {
    let Some(env) = Env::with("large-batch", |o| {
        // 200 ms: far below what one 48 MiB script takes here (the chunks take about 1.1 s
        // together), so a fixed timeout still fails it, while the connect's own commands,
        // which get this timeout too, have room on a loaded machine (at 20 ms they might
        // not). The connection check keeps its usual patience: it is not what this test is
        // about, and at twice the command timeout it would replace a connection busy with an
        // 8 MiB script.
        o.connection(
            crate::support::connection()
                .command_timeout(Duration::from_millis(200))
                .unresponsive_timeout(Duration::from_secs(10)),
        )
    })
    .await
    else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("documents");
            let page = "x".repeat(1024 * 1024);
            let events: Vec<_> = (0..48u64)
                .map(|n| {
                    let mut e = event(Some(&format!("doc-{}", n % 4)), n);
                    e.payload["page"] = serde_json::Value::from(page.as_str());
                    e
                })
                .collect();
            env.transport.publish(&topic, &events).await.unwrap();
            let stream = env.transport.stream_key(&topic).unwrap();
            let stored = env.command("XLEN", vec![stream.as_str().into()]).await;
            assert_eq!(stored.as_u64(), Some(48), "each event once");
        }),
    )
    .await;
    env.cleanup().await;
}
