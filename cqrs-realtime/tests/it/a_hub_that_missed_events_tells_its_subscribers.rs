//! A hub whose pub/sub subscription reports missed messages tells every subscription of a
//! topic on that channel (an `events_missed` error frame naming the topic), keeps the
//! subscriptions open and goes on pushing; a resume with `since` closes the gap.

use crate::support::{FRAME_DEADLINE, TEST_LIMIT, TestHub};
use async_trait::async_trait;
use cqrs_core::ports::{Fanout, PubSub, Subscription, TransportError};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{ErrorCode, HubOptions, ServerFrame};
use serde_json::json;
use std::sync::Arc;

/// A process-local pub/sub on the core's `Fanout`, whose losses the test records with
/// `Fanout::lost`, as an adapter does when its connection dropped messages.
struct Lossy {
    fanout: Fanout,
}

#[async_trait]
impl PubSub for Lossy {
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
        self.fanout.deliver(channel, payload);
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
        self.fanout.subscribe(channel, async { Ok(()) }).await
    }
}

/// The next frame must be `events_missed` for `topic`.
async fn expect_missed(client: &mut crate::support::Client, topic: &str) {
    match client.frame().await {
        ServerFrame::Error {
            code,
            message,
            topic: Some(t),
            ..
        } if code == ErrorCode::EventsMissed.as_str() && t == topic => {
            assert!(message.contains("since"), "{message}");
        }
        other => panic!("expected events_missed for {topic}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_missed_events_tells_its_subscribers() {
    with_timeout(TEST_LIMIT, async {
        let (fanout, _idle) = Fanout::new(64);
        let pubsub = Arc::new(Lossy {
            fanout: fanout.clone(),
        });
        let t = TestHub::start_on(pubsub, HubOptions::new(), |b| b).await;
        let mut all = t.connect("agent-a1").await;
        all.subscribe("tickets").await;
        let mut one = t.connect("agent-a2").await;
        one.subscribe("tickets").await;
        one.subscribe("ticket:t1").await;
        let first = t.publish("t1", "u1", 1).await;
        assert_eq!(all.event().await.seq, 1);
        for _ in 0..2 {
            assert_eq!(one.event().await.seq, 1);
        }

        // A loss on a quiet channel: told without waiting for the channel's next message.
        // Event 2 is stored but its live push is lost.
        t.store("t1", "u1", 2).await;
        fanout.lost(1);
        expect_missed(&mut all, "tickets").await;
        let mut told = [one.frame().await, one.frame().await];
        told.sort_by_key(|f| format!("{f:?}"));
        for (frame, topic) in told.iter().zip(["ticket:t1", "tickets"]) {
            assert!(
                matches!(frame, ServerFrame::Error { code, topic: Some(t), .. }
                    if code == "events_missed" && t == topic),
                "{frame:?}"
            );
        }

        // The subscriptions stay open: the next event is pushed.
        t.publish("t1", "u1", 3).await;
        assert_eq!(all.event().await.seq, 3);
        for _ in 0..2 {
            assert_eq!(one.event().await.seq, 3);
        }

        // What the frame says to do closes the gap: resume from the last position before it.
        all.send(json!({"type": "unsubscribe", "topic": "tickets"}))
            .await;
        assert!(matches!(all.frame().await, ServerFrame::Unsubscribed { .. }));
        all.send(json!({"type": "subscribe", "topic": "tickets", "since": first.position.unwrap().to_string()}))
            .await;
        all.expect_subscribed("tickets").await;
        for seq in 2..=3 {
            assert_eq!(all.event().await.seq, seq, "the replay closes the gap");
        }
        all.ping_pong().await;

        // A loss seen when the next message arrives is told before that message, to the
        // resumed subscription; those told before and not resumed since are not told again.
        fanout.lost(2);
        t.publish("t1", "u1", 4).await;
        expect_missed(&mut all, "tickets").await;
        assert_eq!(all.event().await.seq, 4);
        for _ in 0..2 {
            assert_eq!(one.event().await.seq, 4, "no second notice before it");
        }

        assert_eq!(t.hub.stats().upstream_missed, 3);
        // Counted once the frames are queued: 3 subscriptions told of the first loss, 1 of
        // the second.
        eventually(FRAME_DEADLINE, "four events_missed frames counted", || async {
            (t.hub.stats().missed_notices == 4).then_some(())
        })
        .await;
    })
    .await;
}

/// A channel message the hub cannot read (a publisher on another wire version, a damaged
/// message) is a loss the hub sees: the topic's subscriptions are told, and stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_hub_cannot_read_is_told_as_missed() {
    with_timeout(TEST_LIMIT, async {
        let (fanout, _idle) = Fanout::new(64);
        let pubsub = Arc::new(Lossy {
            fanout: fanout.clone(),
        });
        let t = TestHub::start_on(pubsub, HubOptions::new(), |b| b).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        let channel = format!("{}tickets", HubOptions::new().get_channel_prefix());
        fanout.deliver(
            &channel,
            Arc::from(r#"{"v": 99, "what": "a newer wire version"}"#),
        );
        expect_missed(&mut client, "tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1, "the subscription stays open");
        assert_eq!(t.hub.stats().upstream_missed, 1);
    })
    .await;
}
