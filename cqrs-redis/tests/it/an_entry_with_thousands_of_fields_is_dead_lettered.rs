//! An entry with thousands of fields (a hand-written `XADD`) is dead-lettered like any other,
//! undecodable or over its deliveries, keeping the transport's own fields only: a script
//! cannot pass that many values to one command (Lua's C stack holds about 8,000), and the
//! consumer failed on the entry at every fetch. The entries after it are handled.

use crate::support::{Env, consumer_options, event, n_of, within};
use cqrs_core::ports::{Consumer, EventTransport};
use fred::types::Value;
use std::time::Duration;

/// Field pairs of the bulky entries: 10,000 values, past what `unpack` takes.
const EXTRA_FIELDS: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_with_thousands_of_fields_is_dead_lettered() {
    let Some(env) = Env::new("many-fields").await else {
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
                    consumer_options(&format!("{}-c", env.id))
                        .redelivery_delay(Duration::from_millis(200))
                        .max_deliveries(1),
                )
                .await
                .unwrap();

            // 1, an undecodable entry of 5,000 fields, a decodable one (event 2's fields and
            // 5,000 more) whose handler fails, then 3.
            env.transport
                .publish(&topic, &[event(None, 1), event(None, 2)])
                .await
                .unwrap();
            let entries = env
                .command(
                    "XRANGE",
                    vec![stream.as_str().into(), "-".into(), "+".into()],
                )
                .await
                .into_array();
            let two = entries.into_iter().nth(1).unwrap().into_array();
            let two_id = two[0].as_string().unwrap();
            let two_fields = two[1].clone().into_array();
            env.command("XDEL", vec![stream.as_str().into(), two_id.into()])
                .await;
            let bulky = |mut fields: Vec<Value>| {
                for i in 0..EXTRA_FIELDS {
                    fields.push(format!("extra{i}").into());
                    fields.push("x".into());
                }
                let mut args = vec![stream.as_str().into(), "*".into()];
                args.extend(fields);
                args
            };
            let undecodable = env
                .command("XADD", bulky(vec!["type".into(), "bulky".into()]))
                .await
                .as_string()
                .unwrap();
            let poison = env
                .command("XADD", bulky(two_fields))
                .await
                .as_string()
                .unwrap();
            env.transport
                .publish(&topic, &[event(None, 3)])
                .await
                .unwrap();

            let mut handled = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
                if handled.len() == 2 && dead.len() == 2 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "within 20 s: handled {handled:?}, dead-lettered {dead:?}"
                );
                let batch = consumer
                    .fetch(10)
                    .await
                    .expect("the fetch does not fail on the bulky entries");
                for d in batch {
                    if n_of(&d) == 2 {
                        consumer.nack_with_error(&d.id, "too bulky").await.unwrap();
                    } else {
                        handled.push(n_of(&d));
                        consumer.ack(&[d.id]).await.unwrap();
                    }
                }
            }
            assert_eq!(handled, [1, 3]);

            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            let of = |id: &str| {
                dead.iter()
                    .find(|d| d.entry_id == id)
                    .unwrap_or_else(|| panic!("{id} not dead-lettered: {dead:?}"))
            };
            let undecodable = of(&undecodable);
            assert!(
                undecodable.error.starts_with("undecodable entry"),
                "{}",
                undecodable.error
            );
            assert_eq!(undecodable.fields, [("type".into(), "bulky".into())]);
            assert_eq!(undecodable.dropped_fields, EXTRA_FIELDS as u64);
            let poison = of(&poison);
            assert_eq!(poison.error, "too bulky");
            assert_eq!(poison.dropped_fields, EXTRA_FIELDS as u64);
            assert_eq!(
                poison.record.as_ref().map(|r| r.payload["n"].as_u64()),
                Some(Some(2)),
                "the event's own fields are kept"
            );

            // Replayed, it is the event again, and handled.
            env.transport
                .replay_dead_letters(&topic, std::slice::from_ref(&poison.id))
                .await
                .unwrap();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let replayed = loop {
                let batch = consumer.fetch(10).await.unwrap();
                if !batch.is_empty() {
                    break batch;
                }
                assert!(tokio::time::Instant::now() < until, "replay not handed out");
            };
            assert_eq!(replayed.iter().map(n_of).collect::<Vec<_>>(), [2]);
        }),
    )
    .await;
    env.cleanup().await;
}
