//! One event in a lane is appended by a script of its own, a batch by the batch script: the
//! entries carry the same fields either way, and each lane's `prev` chain runs through both.

use crate::support::{Env, event, within};
use cqrs_core::ports::EventTransport;
use fred::types::Value;
use std::collections::HashMap;

type Entry = (String, Vec<(String, String)>);

const FIELDS: [&str; 7] = ["id", "type", "v", "key", "lane", "prev", "record"];

/// The stream's entries with their fields, in stream order.
async fn entries(env: &Env, stream: &str) -> Vec<Entry> {
    env.command("XRANGE", vec![stream.into(), "-".into(), "+".into()])
        .await
        .into_array()
        .into_iter()
        .map(|entry| {
            let mut parts = entry.into_array().into_iter();
            let id = parts.next().and_then(Value::into_string).unwrap();
            let flat = parts.next().unwrap_or(Value::Null).into_array();
            let mut fields = Vec::new();
            let mut flat = flat.into_iter();
            while let (Some(n), Some(v)) = (flat.next(), flat.next()) {
                fields.push((n.into_string().unwrap(), v.into_string().unwrap()));
            }
            (id, fields)
        })
        .collect()
}

fn field(fields: &[(String, String)], name: &str) -> String {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no `{name}` field in {fields:?}"))
}

fn names(fields: &[(String, String)]) -> Vec<String> {
    fields.iter().map(|(n, _)| n.clone()).collect()
}

/// Checks that each entry's `prev` is the entry before it in its lane (empty for the first);
/// returns each lane's last entry.
fn check_chains(entries: &[Entry]) -> HashMap<String, String> {
    let mut last_in_lane: HashMap<String, String> = HashMap::new();
    for (id, fields) in entries {
        let lane = field(fields, "lane");
        assert_eq!(
            field(fields, "prev"),
            last_in_lane.get(&lane).cloned().unwrap_or_default(),
            "prev of {id} (key {})",
            field(fields, "key")
        );
        last_in_lane.insert(lane, id.clone());
    }
    last_in_lane
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_event_in_a_lane_is_chained_like_a_batch() {
    let Some(env) = Env::new("single-lane").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            let t = &env.transport;
            t.publish(&topic, &[event(Some("a"), 1)]).await.unwrap();
            t.publish(&topic, &[event(Some("a"), 2), event(Some("b"), 3)])
                .await
                .unwrap();
            t.publish(&topic, &[event(Some("b"), 4)]).await.unwrap();
            t.publish(&topic, &[event(Some("a"), 5)]).await.unwrap();

            let entries = entries(&env, &stream).await;
            assert_eq!(entries.len(), 5);
            for (id, fields) in &entries {
                assert_eq!(names(fields), FIELDS, "fields of {id}");
            }
            let last_in_lane = check_chains(&entries);
            assert_eq!(last_in_lane.len(), 2, "keys a and b in two lanes");
        }),
    )
    .await;
    env.cleanup().await;
}

/// A batch larger than one publish script (256 events) goes out as several scripts, run in
/// the order sent: the entries are in publish order and each lane's chain runs through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_several_scripts_is_appended_in_order() {
    let Some(env) = Env::new("big-batch").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            let keys = ["a", "b", "c"];
            let events: Vec<_> = (1..=600)
                .map(|n| event(Some(keys[n as usize % 3]), n))
                .collect();
            env.transport.publish(&topic, &events).await.unwrap();
            let entries = entries(&env, &stream).await;
            let ids: Vec<String> = entries.iter().map(|(_, f)| field(f, "id")).collect();
            let expected: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
            assert!(ids == expected, "the entries are not in publish order");
            check_chains(&entries);
        }),
    )
    .await;
    env.cleanup().await;
}
