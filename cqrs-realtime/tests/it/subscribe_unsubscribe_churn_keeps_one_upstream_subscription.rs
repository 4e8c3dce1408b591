use crate::support::{Client, REVOCATION_LISTENER, TEST_LIMIT, TestHub};
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
        ServerFrame::Unsubscribed { topic: t, .. } if t == topic => {}
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
            HubOptions::new()
                // Long enough that no stall of a loaded machine between two rounds outlasts it.
                .upstream_linger(Duration::from_secs(4))
                // Far above the default: this client churns on purpose.
                .subscription_changes_per_second(100_000),
            |b| b,
        )
        .await;
        let mut client = t.connect("agent-a1").await;
        for _ in 0..200 {
            client.subscribe("tickets").await;
            unsubscribe(&mut client, "tickets").await;
        }
        assert_eq!(
            pubsub.upstream_subscribes(),
            1 + REVOCATION_LISTENER,
            "one upstream subscribe"
        );
        // Reused within the linger: live, and events flow.
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1);
        unsubscribe(&mut client, "tickets").await;
        assert_eq!(pubsub.upstream_subscribes(), 1 + REVOCATION_LISTENER);

        eventually(
            Duration::from_secs(20),
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
        assert_eq!(pubsub.upstream_subscribes(), 2 + REVOCATION_LISTENER);
        t.publish("t1", "u1", 2).await;
        assert_eq!(client.event().await.seq, 2);
    })
    .await;
}

/// A hub with a channel lingering (subscribed, then unsubscribed, by its one client, with an
/// hour's linger), and nobody else on it.
async fn hub_with_a_lingering_channel(pubsub: &Arc<InMemoryPubSub>) -> (TestHub, Client) {
    let t = TestHub::start_on(
        pubsub.clone(),
        HubOptions::new()
            .upstream_linger(Duration::from_secs(3600))
            .close_timeout(Duration::from_millis(500)),
        |b| b,
    )
    .await;
    let mut client = t.connect("agent-a1").await;
    client.subscribe("tickets").await;
    unsubscribe(&mut client, "tickets").await;
    assert_eq!(pubsub.upstream_subscriptions_to(CHANNEL), 1, "lingering");
    assert_eq!(t.hub.upstream_channels().await, 1);
    (t, client)
}

/// A lingering upstream subscription does not outlive the hub's shutdown: it goes at once,
/// not at the end of its linger (nobody waits on `closed()` here: the shutdown alone ends it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_subscription_ends_at_shutdown() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let (t, client) = hub_with_a_lingering_channel(&pubsub).await;
        t.hub.shutdown();
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
        drop(client);
    })
    .await;
}

/// Once `closed()` completes after a shutdown, no lingering channel is subscribed upstream
/// any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_completes_after_the_lingering_subscriptions_ended() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let (t, mut client) = hub_with_a_lingering_channel(&pubsub).await;
        client.ws.close(None).await.unwrap();
        eventually(Duration::from_secs(10), "the connection closes", || async {
            (t.hub.stats().connections == 0).then_some(())
        })
        .await;

        t.hub.shutdown();
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("the linger does not delay the shutdown");
        assert_eq!(t.hub.upstream_channels().await, 0, "none left by closed()");
        // `closed()` waited for the channel's task, and with it the subscription, to go.
        assert_eq!(pubsub.upstream_subscriptions_to(CHANNEL), 0);
    })
    .await;
}

/// The same for channels whose clients were still subscribed at the shutdown: their last
/// subscriptions are released as the connections close, unsubscribing at once, and
/// `closed()` waits until those subscriptions are gone upstream too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_completes_after_the_subscriptions_of_closed_connections_ended() {
    with_timeout(TEST_LIMIT, async {
        for round in 0..5 {
            let pubsub = Arc::new(InMemoryPubSub::new());
            let t = TestHub::start_on(
                pubsub.clone(),
                HubOptions::new()
                    .upstream_linger(Duration::from_secs(3600))
                    .close_timeout(Duration::from_millis(500)),
                |b| b,
            )
            .await;
            let mut client = t.connect("agent-a1").await;
            client.subscribe("tickets").await;
            t.hub.shutdown();
            tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
                .await
                .expect("closed() completes");
            assert_eq!(
                pubsub.upstream_subscriptions_to(CHANNEL),
                0,
                "still subscribed upstream after closed(), round {round}"
            );
            drop(client);
        }
    })
    .await;
}

/// A hub dropped without a shutdown does not leave its lingering channels subscribed upstream
/// for the rest of their linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_hub_ends_its_lingering_subscriptions() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let (t, mut client) = hub_with_a_lingering_channel(&pubsub).await;
        client.ws.close(None).await.unwrap();
        eventually(Duration::from_secs(10), "the connection closes", || async {
            (t.hub.stats().connections == 0).then_some(())
        })
        .await;

        drop(t);
        eventually(
            Duration::from_secs(10),
            "the upstream subscription ends with the hub",
            || async { (pubsub.upstream_subscriptions_to(CHANNEL) == 0).then_some(()) },
        )
        .await;
    })
    .await;
}

/// A client past `subscription_changes_per_second` has its `subscribe` or `unsubscribe`
/// ignored and answered `too_many_subscription_changes`, naming the topic; the connection and
/// its subscriptions stay as they were, and once the budget refills its changes work again.
/// (The bucket's own arithmetic is unit-tested on a paused clock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_changes_past_the_rate_are_refused_and_ignored() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().subscription_changes_per_second(1)).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        // The budget of one is spent. Three unsubscribes at once: one token comes back a
        // second, so at least two are refused unless the hub stalls for seconds.
        for _ in 0..3 {
            client
                .send(json!({"type": "unsubscribe", "topic": "tickets"}))
                .await;
        }
        let mut refused = 0;
        let mut unsubscribed = false;
        for _ in 0..3 {
            match client.frame().await {
                ServerFrame::Error { code, topic, .. }
                    if code == "too_many_subscription_changes" =>
                {
                    assert_eq!(topic.as_deref(), Some("tickets"));
                    refused += 1;
                }
                ServerFrame::Unsubscribed { .. } => unsubscribed = true,
                ServerFrame::Error { code, .. } if code == "not_subscribed" => {}
                other => panic!("expected a refusal or an unsubscribe, got {other:?}"),
            }
        }
        assert!(refused >= 1, "no change was refused past the rate");
        if !unsubscribed {
            // All refused, so ignored: still subscribed.
            t.publish("t1", "u1", 1).await;
            assert_eq!(client.event().await.seq, 1);
            // Refilled: the same unsubscribe goes through.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                client
                    .send(json!({"type": "unsubscribe", "topic": "tickets"}))
                    .await;
                match client.frame().await {
                    ServerFrame::Unsubscribed { topic, .. } if topic == "tickets" => break,
                    ServerFrame::Error { code, .. } if code == "too_many_subscription_changes" => {
                        assert!(
                            tokio::time::Instant::now() < until,
                            "the budget never refilled"
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    other => panic!("expected unsubscribed or a refusal, got {other:?}"),
                }
            }
        }
    })
    .await;
}

/// Each ticket on a channel of its own: what `max_lingering_channels` is for.
struct ChannelPerTicket;

impl cqrs_realtime::EventRouting for ChannelPerTicket {
    fn channel(&self, topic: &cqrs_realtime::Topic) -> Option<String> {
        topic.key().map(|key| format!("ticket-{key}"))
    }

    fn route(&self, record: &cqrs_core::EventRecord) -> Option<cqrs_realtime::Routed> {
        crate::support::TicketRouting.route(record)
    }
}

/// A client looping over many topics, each on a channel of its own, leaves at most
/// `max_lingering_channels` of them subscribed upstream for the linger; the others are
/// unsubscribed as their last subscription goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_max_lingering_channels_linger() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let t = TestHub::start_on(
            pubsub.clone(),
            HubOptions::new()
                .upstream_linger(Duration::from_secs(3600))
                .max_lingering_channels(2),
            |b| b.routing(ChannelPerTicket),
        )
        .await;
        let mut client = t.connect("agent-a1").await;
        for i in 1..=5 {
            let topic = format!("ticket:{i}");
            client.subscribe(&topic).await;
            unsubscribe(&mut client, &topic).await;
        }
        assert_eq!(
            pubsub.upstream_subscribes(),
            5 + REVOCATION_LISTENER,
            "one upstream subscribe per channel"
        );
        eventually(
            Duration::from_secs(10),
            "two channels linger, no more",
            || async { (t.hub.upstream_channels().await == 2).then_some(()) },
        )
        .await;
        // A lingering one is reused; its place is free again once it is taken.
        client.subscribe("ticket:1").await;
        assert_eq!(
            pubsub.upstream_subscribes(),
            5 + REVOCATION_LISTENER,
            "ticket:1 lingered and is reused"
        );
        client.subscribe("ticket:9").await;
        unsubscribe(&mut client, "ticket:9").await;
        eventually(
            Duration::from_secs(10),
            "ticket:9 lingers in ticket:1's place",
            || async {
                // ticket:1 in use, ticket:2 and ticket:9 lingering.
                (t.hub.upstream_channels().await == 3).then_some(())
            },
        )
        .await;
    })
    .await;
}
