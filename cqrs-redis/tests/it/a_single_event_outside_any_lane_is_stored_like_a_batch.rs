//! One event in no lane is appended with a plain `XADD`, a batch by the publish script: the
//! entries carry the same fields either way and reach a consumer alike.

use crate::support::{Env, consumer_options, event, n_of, within};
use cqrs_core::ports::EventTransport;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_event_outside_any_lane_is_stored_like_a_batch() {
    let Some(env) = Env::new("single").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("audit");
            let stream = env.transport.stream_key(&topic).unwrap();
            // Alone, then in a batch of two: no partition key, so no lane.
            env.transport
                .publish(&topic, &[event(None, 1)])
                .await
                .unwrap();
            env.transport
                .publish(&topic, &[event(None, 2), event(None, 3)])
                .await
                .unwrap();

            let entries = stored_fields(&env, &stream).await;
            assert_eq!(entries.len(), 3);
            let names: Vec<Vec<String>> = entries.iter().map(|f| names_of(f)).collect();
            assert_eq!(names[0], ["id", "type", "v", "record"]);
            assert_eq!(names[0], names[1], "a single event's fields are a batch's");

            let mut consumer = env
                .transport
                .consumer(&topic, "g", consumer_options(&format!("{}-c", env.id)))
                .await
                .unwrap();
            let mut got = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while got.len() < 3 && tokio::time::Instant::now() < until {
                let batch = consumer.fetch(10).await.unwrap();
                let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
                consumer.ack(&ids).await.unwrap();
                got.extend(batch.iter().map(|d| (n_of(d), d.order_key.clone())));
            }
            assert_eq!(got, [(1, None), (2, None), (3, None)]);
        }),
    )
    .await;
    env.cleanup().await;
}

/// Without lanes, a keyed event in a batch keeps its `key` field and gets no `lane` or `prev`;
/// an unkeyed one beside it gets neither: the batch script writes each shape of entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_without_lanes_stores_each_event_as_it_is_keyed() {
    let Some(env) = Env::with("unordered-batch", |o| {
        o.key_ordering(cqrs_redis::KeyOrdering::Unordered)
    })
    .await
    else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("audit");
            let stream = env.transport.stream_key(&topic).unwrap();
            env.transport
                .publish(&topic, &[event(Some("a"), 1), event(None, 2)])
                .await
                .unwrap();
            let fields = stored_fields(&env, &stream).await;
            assert_eq!(fields.len(), 2);
            assert_eq!(names_of(&fields[0]), ["id", "type", "v", "key", "record"]);
            assert_eq!(fields[0][7], "a", "the key's value");
            assert_eq!(names_of(&fields[1]), ["id", "type", "v", "record"]);
        }),
    )
    .await;
    env.cleanup().await;
}

/// An empty partition key is no key: alone (a plain `XADD`) or in a batch (the script), the
/// entry has no `key` field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_key_is_stored_alike_alone_and_in_a_batch() {
    let Some(env) = Env::with("empty-key", |o| {
        o.key_ordering(cqrs_redis::KeyOrdering::Unordered)
    })
    .await
    else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("audit");
            let stream = env.transport.stream_key(&topic).unwrap();
            env.transport
                .publish(&topic, &[event(Some(""), 1)])
                .await
                .unwrap();
            env.transport
                .publish(&topic, &[event(Some(""), 2), event(None, 3)])
                .await
                .unwrap();
            let fields = stored_fields(&env, &stream).await;
            let names: Vec<Vec<String>> = fields.iter().map(|f| names_of(f)).collect();
            assert_eq!(names, vec![vec!["id", "type", "v", "record"]; 3]);
        }),
    )
    .await;
    env.cleanup().await;
}

/// Each entry of `stream`, in order, as its flat list of field names and values.
async fn stored_fields(env: &Env, stream: &str) -> Vec<Vec<String>> {
    env.command("XRANGE", vec![stream.into(), "-".into(), "+".into()])
        .await
        .into_array()
        .into_iter()
        .map(|entry| {
            let mut parts = entry.into_array().into_iter();
            let _id = parts.next();
            let flat = parts.next().unwrap_or(Value::Null).into_array();
            flat.into_iter().filter_map(Value::into_string).collect()
        })
        .collect()
}

/// The field names of a flat field list.
fn names_of(fields: &[String]) -> Vec<String> {
    fields.iter().step_by(2).cloned().collect()
}
