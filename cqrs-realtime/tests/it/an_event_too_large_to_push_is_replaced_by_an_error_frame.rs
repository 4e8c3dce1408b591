use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, ServerFrame};
use serde_json::json;

/// The event frame that takes the place of one too large to push.
fn too_large(frame: ServerFrame) -> (String, String) {
    match frame {
        ServerFrame::Error {
            code,
            message,
            topic,
            ..
        } => {
            assert_eq!(code, "event_too_large", "{message}");
            (topic.expect("the error names its topic"), message)
        }
        other => panic!("expected event_too_large, got {other:?}"),
    }
}

/// An event whose frame would not fit the write buffer is not pushed: an `event_too_large`
/// error naming its topic and position takes its place, live and in a replay, and the
/// connection stays open and receives what follows (a frame the buffer refused used to drop
/// every connection that could see the event, with no close code, and a resume from before
/// it dropped it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_event_becomes_an_error_frame_live_and_in_a_replay() {
    with_timeout(TEST_LIMIT, async {
        let options = HubOptions::new().max_write_buffer_size(16 * 1024);
        let t = TestHub::start(options).await;
        let mut client = t.connect("user-u1").await;
        client.subscribe("tickets").await;
        let first = t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1);
        let big = t.publish_padded("t1", "u1", 2, 32 * 1024).await;
        let (topic, message) = too_large(client.frame().await);
        assert_eq!(topic, "tickets");
        let big_position = big.position.expect("stored").to_string();
        assert!(message.contains(&big_position), "{message}");
        t.publish("t1", "u1", 3).await;
        assert_eq!(client.event().await.seq, 3, "the connection goes on");

        // A client resuming from before the big event gets the same, and the rest.
        let mut resumed = t.connect("user-u1").await;
        let since = first.position.expect("stored").to_string();
        resumed
            .send(json!({"type": "subscribe", "topic": "tickets", "since": since}))
            .await;
        resumed.expect_subscribed("tickets").await;
        too_large(resumed.frame().await);
        assert_eq!(resumed.event().await.seq, 3);
        resumed.ping_pong().await;
    })
    .await;
}

/// `"since": null` is refused as malformed instead of read as "no since": a client that lost
/// its last position by a bug would otherwise subscribe without its replay and miss the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_null_is_a_malformed_frame() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let mut client = t.connect("user-u1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": null}))
            .await;
        assert_eq!(client.error_code().await, "malformed_frame");
        client.subscribe("tickets").await;
    })
    .await;
}
