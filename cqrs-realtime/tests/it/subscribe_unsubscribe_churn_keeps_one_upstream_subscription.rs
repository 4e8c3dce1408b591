use crate::support::{Client, TEST_LIMIT, TestHub};
use cqrs_core::memory::InMemoryPubSub;
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{HubOptions, ServerFrame};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const CHANNEL: &str = "realtime:tickets";

async fn unsubscribe(client: &mut Client, topic: &str) {
    client
        .send(json!({"type": "unsubscribe", "topic": topic}))
        .await;
    match client.frame().await {
        ServerFrame::Unsubscribed { topic: t } if t == topic => {}
        other => panic!("expected unsubscribed from {topic}, got {other:?}"),
    }
}

/// A client alone on a channel, looping over `subscribe` and `unsubscribe`, does not make
/// the hub subscribe and unsubscribe upstream each round: the channel's upstream subscription
/// lingers after its last release, and the next subscribe within the linger reuses it. Once
/// the linger has passed with no subscriber, the upstream subscription goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_on_a_channel_subscribes_upstream_once() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let t = TestHub::start_on(
            pubsub.clone(),
            HubOptions::new().upstream_linger(Duration::from_secs(2)),
            |b| b,
        )
        .await;
        let mut client = t.connect("agent-a1").await;
        for _ in 0..200 {
            client.subscribe("tickets").await;
            unsubscribe(&mut client, "tickets").await;
        }
        assert_eq!(pubsub.upstream_subscribes(), 1, "one upstream subscribe");
        // Reused within the linger: live, and events flow.
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1);
        unsubscribe(&mut client, "tickets").await;
        assert_eq!(pubsub.upstream_subscribes(), 1);

        eventually(
            Duration::from_secs(10),
            "the upstream subscription goes after the linger",
            || async {
                (pubsub.upstream_subscriptions_to(CHANNEL) == 0
                    && t.hub.upstream_channels().await == 0)
                    .then_some(())
            },
        )
        .await;
        // A later subscribe subscribes upstream again.
        client.subscribe("tickets").await;
        assert_eq!(pubsub.upstream_subscribes(), 2);
        t.publish("t1", "u1", 2).await;
        assert_eq!(client.event().await.seq, 2);
    })
    .await;
}

/// A lingering upstream subscription does not outlive the hub's shutdown: it goes at once,
/// not at the end of its linger, and the shutdown waits for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_subscription_ends_at_shutdown() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let t = TestHub::start_on(
            pubsub.clone(),
            HubOptions::new()
                .upstream_linger(Duration::from_secs(3600))
                .close_timeout(Duration::from_millis(500)),
            |b| b,
        )
        .await;
        let mut lingering = t.connect("agent-a1").await;
        lingering.subscribe("tickets").await;
        unsubscribe(&mut lingering, "tickets").await;
        // Another connection still holds the channel when the shutdown comes: its release,
        // during the shutdown, does not linger either.
        let mut holding = t.connect("agent-a2").await;
        holding.subscribe("ticket:t1").await;
        assert_eq!(pubsub.upstream_subscriptions_to(CHANNEL), 1);

        t.hub.shutdown();
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("the linger does not delay the shutdown");
        eventually(
            Duration::from_secs(10),
            "the upstream subscription ends with the hub",
            || async {
                (pubsub.upstream_subscriptions_to(CHANNEL) == 0
                    && t.hub.upstream_channels().await == 0)
                    .then_some(())
            },
        )
        .await;
        drop((lingering, holding));
    })
    .await;
}
