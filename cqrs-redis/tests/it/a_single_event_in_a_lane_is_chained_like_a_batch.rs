//! One event in a lane is appended by a script of its own, a batch by the batch script: the
//! entries carry the same fields either way, and each lane's `prev` chain runs through both.

use crate::support::{Env, event, within};
use cqrs_core::ports::EventTransport;
use fred::types::Value;
use std::collections::HashMap;

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

            let entries = env
                .command(
                    "XRANGE",
                    vec![stream.as_str().into(), "-".into(), "+".into()],
                )
                .await
                .into_array();
            let entries: Vec<(String, Vec<(String, String)>)> = entries
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
                .collect();
            assert_eq!(entries.len(), 5);
            let field = |fields: &[(String, String)], name: &str| {
                fields
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| panic!("no `{name}` field in {fields:?}"))
            };
            let names = |fields: &[(String, String)]| -> Vec<String> {
                fields.iter().map(|(n, _)| n.clone()).collect()
            };
            let expected = ["id", "type", "v", "key", "lane", "prev", "record"];
            for (id, fields) in &entries {
                assert_eq!(names(fields), expected, "fields of {id}");
            }
            // Each entry's `prev` is the entry before it in its lane, or empty for the first.
            let mut last_in_lane: HashMap<String, String> = HashMap::new();
            for (id, fields) in &entries {
                let lane = field(fields, "lane");
                let prev = field(fields, "prev");
                assert_eq!(
                    prev,
                    last_in_lane.get(&lane).cloned().unwrap_or_default(),
                    "prev of {id} (key {})",
                    field(fields, "key")
                );
                last_in_lane.insert(lane, id.clone());
            }
            assert_eq!(last_in_lane.len(), 2, "keys a and b in two lanes");
        }),
    )
    .await;
    env.cleanup().await;
}
