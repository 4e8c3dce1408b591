//! A topic's publishers must share one key ordering: an event chained in a lane of another
//! setting would not wait for its key's events in flight, and the key's order would break
//! without an error. The first publisher records its setting; a transport with another is
//! refused with an error that names both, until the setting is deleted (after draining).

use crate::support::{Env, event, stream_options, within};
use cqrs_core::ports::{EventTransport, TransportError};
use cqrs_core::runtime::{Health, HealthCheck};
use cqrs_redis::KeyOrdering;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_with_another_key_ordering_is_refused() {
    let Some(env) = Env::with("ordering", |o| o.key_ordering(KeyOrdering::Lanes(8))).await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("orders");
            env.transport
                .publish(&topic, &[event(Some("k"), 1)])
                .await
                .expect("the first publisher records its ordering");

            let other = stream_options(&env.id)
                .key_ordering(KeyOrdering::Lanes(16))
                .connect()
                .await
                .unwrap();
            for batch in [
                vec![event(Some("k"), 2)],
                vec![event(None, 3), event(None, 4)],
            ] {
                match other.publish(&topic, &batch).await {
                    Err(TransportError::Invalid(why)) => {
                        assert!(
                            why.contains("lanes/8") && why.contains("lanes/16"),
                            "names both: {why}"
                        );
                    }
                    other => panic!("refused, not {other:?}"),
                }
            }
            // Every publish of this one fails until the deployment agrees: its health says so
            // (its outbox backs up meanwhile), naming the topic and why.
            match other.check().await {
                Health::Degraded(why) => assert!(
                    why.contains(&format!("`{topic}`")) && why.contains("key ordering"),
                    "{why}"
                ),
                health => panic!("degraded, not {health:?}"),
            }
            assert_eq!(env.transport.check().await, Health::Healthy);
            let unordered = stream_options(&env.id)
                .key_ordering(KeyOrdering::Unordered)
                .connect()
                .await
                .unwrap();
            assert!(matches!(
                unordered.publish(&topic, &[event(None, 5)]).await,
                Err(TransportError::Invalid(_))
            ));

            // The same setting in another process is fine; the first keeps publishing.
            let same = stream_options(&env.id)
                .key_ordering(KeyOrdering::Lanes(8))
                .connect()
                .await
                .unwrap();
            same.publish(&topic, &[event(Some("k"), 6)]).await.unwrap();
            env.transport
                .publish(&topic, &[event(Some("k"), 7)])
                .await
                .unwrap();

            // The documented change: drain, delete the recorded setting and the lanes hash.
            let ordering = format!(
                "{}:{{{topic}}}:ordering",
                crate::support::key_prefix(&env.id)
            );
            let lanes = format!("{}:{{{topic}}}:lanes", crate::support::key_prefix(&env.id));
            env.command("DEL", vec![ordering.into(), lanes.into()])
                .await;
            let changed = stream_options(&env.id)
                .key_ordering(KeyOrdering::Lanes(16))
                .connect()
                .await
                .unwrap();
            changed
                .publish(&topic, &[event(Some("k"), 8)])
                .await
                .expect("a new setting once the old one is deleted");
            // The refused publisher's setting is the topic's now: it publishes, and is healthy.
            other.publish(&topic, &[event(Some("k"), 9)]).await.unwrap();
            assert_eq!(other.check().await, Health::Healthy);
        }),
    )
    .await;
    env.cleanup().await;
}
