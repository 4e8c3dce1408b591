use crate::support::{REVOCATION_LISTENER, TEST_LIMIT, TestHub};
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, ServerFrame};
use serde_json::json;

/// `subscribed`, then the events published on the topic (with their position), `pong` for
/// `ping`, and nothing more on the topic after `unsubscribed`, while another subscription
/// on the same channel still receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_receive_ping_unsubscribe() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let mut client = t.connect("user-u1").await;
        client.subscribe("tickets").await;

        let stored = t.publish("t1", "u1", 1).await;
        let event = client.event().await;
        assert_eq!((event.topic.as_str(), event.seq), ("tickets", 1));
        assert_eq!(event.position, stored.position.map(|p| p.to_string()));
        assert_eq!(event.event["type"], "TicketChanged");
        assert_eq!(event.event["event_id"], json!(stored.event_id));

        client.ping_pong().await;
        // A second subscription on the same upstream channel (u1 reports t1), which stays.
        client.subscribe("ticket:t1").await;

        client
            .send(json!({"type": "unsubscribe", "topic": "tickets"}))
            .await;
        let frame = client.frame().await;
        assert!(
            matches!(&frame, ServerFrame::Unsubscribed { topic, .. } if topic == "tickets"),
            "{frame:?}"
        );
        // An event after `unsubscribed` is delivered on the subscription that stayed, and not
        // on the one that went: the next frame is its event on `ticket:t1`, then the pong.
        t.publish("t1", "u1", 2).await;
        let event = client.event().await;
        assert_eq!((event.topic.as_str(), event.seq), ("ticket:t1", 2));
        client.ping_pong().await;

        let stats = t.hub.stats();
        assert_eq!((stats.connections, stats.subscriptions), (1, 1));
        // Counted once written, which may be just after the client read them.
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(10),
            "7 frames counted as sent",
            || async { (t.hub.stats().messages_sent >= 7).then_some(()) },
        )
        .await;
    })
    .await;
}

/// A connection subscribed to `tickets` and `ticket:t1` gets one frame per subscription, and
/// both topics share one upstream subscription to the coarse channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_frame_per_matching_subscription_on_one_channel() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = std::sync::Arc::new(cqrs_core::memory::InMemoryPubSub::new());
        let t = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| b).await;
        t.store("t1", "u1", 0).await; // makes u1 the reporter of t1
        let mut client = t.connect("user-u1").await;
        client.subscribe("tickets").await;
        client.subscribe("ticket:t1").await;
        let mut other = t.connect("agent-a1").await;
        other.subscribe("ticket:t9").await;

        t.publish("t1", "u1", 1).await;
        let mut topics = vec![client.event().await.topic, client.event().await.topic];
        topics.sort();
        assert_eq!(topics, ["ticket:t1", "tickets"]);

        assert_eq!(t.hub.upstream_channels().await, 1);
        assert_eq!(pubsub.upstream_subscriptions(), 1 + REVOCATION_LISTENER);
        assert_eq!(t.hub.stats().subscriptions, 3);
    })
    .await;
}

/// Events of one ticket reach the client in the order they were published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_aggregate_arrive_in_publish_order() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().send_queue(512)).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("ticket:t1").await;
        for seq in 1..=200 {
            t.publish("t1", "u1", seq).await;
        }
        for seq in 1..=200 {
            assert_eq!(client.event().await.seq, seq);
        }
    })
    .await;
}

/// Closing the last subscription of a channel drops the upstream subscription (at once with
/// no linger); a new one subscribes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_subscription_follows_the_subscriptions() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().upstream_linger(std::time::Duration::ZERO)).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        assert_eq!(t.hub.upstream_channels().await, 1);
        drop(client);
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(10),
            "the upstream subscription is dropped",
            || async { (t.hub.upstream_channels().await == 0).then_some(()) },
        )
        .await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1);
    })
    .await;
}
