//! A subscription outlives its connection: after `CLIENT KILL ID` of this test's own pub/sub
//! connections, the channel is subscribed again by itself (still once per process) and
//! messages flow. Twenty local subscribers hold one Redis subscription.

use crate::support::{connect_admin, raw, reachable, within};
use crate::the_pubsub_passes_the_conformance_suite::options;
use cqrs_core::ports::PubSub;
use cqrs_core::testing::{eventually, test_id};
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_resubscribes_after_its_connection_is_killed() {
    if !reachable().await {
        return;
    }
    let id = test_id("resubscribe");
    within(
        60,
        Box::pin(async {
            let pubsub = options(&id).connect().await.expect("connect");
            let admin = connect_admin().await.unwrap();
            let channel = format!("{id}-news");
            let full = format!("cqrs-test:{id}:{channel}");
            let mut subs = Vec::new();
            for _ in 0..20 {
                subs.push(pubsub.subscribe(&channel).await.unwrap());
            }
            let numsub = |admin: fred::clients::Client, full: String| async move {
                let reply = raw(&admin, "PUBSUB", vec!["NUMSUB".into(), full.into()]).await;
                reply.into_array().get(1).and_then(Value::as_u64)
            };
            assert_eq!(
                numsub(admin.clone(), full.clone()).await,
                Some(1),
                "one redis subscription"
            );

            let ids = pubsub.client_ids().await.unwrap();
            assert_eq!(ids.len(), 2);
            // One CLIENT KILL per id: its filters combine with AND.
            for id in &ids {
                let reply = raw(
                    &admin,
                    "CLIENT",
                    vec!["KILL".into(), "ID".into(), (*id).into()],
                )
                .await;
                assert_eq!(reply.as_u64(), Some(1), "killed connection {id}");
            }

            eventually(
                Duration::from_secs(10),
                "the channel subscribed again",
                || {
                    let (admin, full) = (admin.clone(), full.clone());
                    async move { (numsub(admin, full).await == Some(1)).then_some(()) }
                },
            )
            .await;
            // fred may still be reconnecting the publishing connection: retry while it fails.
            eventually(
                Duration::from_secs(10),
                "a publish after the reconnect",
                || {
                    let (pubsub, channel) = (pubsub.clone(), channel.clone());
                    async move { pubsub.publish(&channel, "after".into()).await.ok() }
                },
            )
            .await;
            for sub in &mut subs {
                let message = tokio::time::timeout(Duration::from_secs(5), sub.recv())
                    .await
                    .expect("a message after the reconnect")
                    .expect("open");
                assert_eq!(&*message.payload, "after");
            }
            assert_eq!(pubsub.upstream_subscriptions(&channel), 1);
            drop(subs);
            eventually(
                Duration::from_secs(10),
                "the last subscriber gone, unsubscribed",
                || {
                    let (admin, full) = (admin.clone(), full.clone());
                    async move { (numsub(admin, full).await == Some(0)).then_some(()) }
                },
            )
            .await;
        }),
    )
    .await;
}
