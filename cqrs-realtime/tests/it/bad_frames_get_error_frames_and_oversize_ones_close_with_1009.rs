use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, ServerFrame, close_code};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Each bad frame gets an `error` frame with the right code, and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_binary_frames_get_errors_and_the_connection_stays_open() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let mut client = t.connect("user-u1").await;
        let cases: Vec<(Message, &str)> = vec![
            (Message::Text("not json".into()), "malformed_frame"),
            (Message::Text("[1, 2]".into()), "malformed_frame"),
            (
                Message::Text(r#"{"topic": "tickets"}"#.into()),
                "malformed_frame",
            ),
            (Message::Text(r#"{"type": 7}"#.into()), "malformed_frame"),
            (
                Message::Text(r#"{"type": "subscribe"}"#.into()),
                "malformed_frame",
            ),
            (
                Message::Text(r#"{"type": "subscribe", "topic": 5}"#.into()),
                "malformed_frame",
            ),
            (
                Message::Text(r#"{"type": "subscribe", "topic": "tickets", "since": 5}"#.into()),
                "malformed_frame",
            ),
            (Message::Text(r#"{"type": "dance"}"#.into()), "unknown_type"),
            (Message::Binary(vec![1, 2, 3].into()), "binary_frame"),
            (
                Message::Text(r#"{"type": "subscribe", "topic": "tickets now"}"#.into()),
                "invalid_topic",
            ),
            (
                Message::Text(r#"{"type": "subscribe", "topic": ""}"#.into()),
                "invalid_topic",
            ),
            (
                Message::Text(r#"{"type": "subscribe", "topic": "weather"}"#.into()),
                "unknown_topic",
            ),
            (
                Message::Text(r#"{"type": "unsubscribe", "topic": "tickets"}"#.into()),
                "not_subscribed",
            ),
            (
                Message::Text(r#"{"type": "unsubscribe", "topic": "tickets now"}"#.into()),
                "invalid_topic",
            ),
            (
                Message::Text(r#"{"type": "subscribe", "topic": "tickets", "since": "x"}"#.into()),
                "invalid_position",
            ),
        ];
        for (message, code) in cases {
            let shown = format!("{message:?}");
            client.send_raw(message).await;
            assert_eq!(client.error_code().await, code, "for {shown}");
        }
        client.ping_pong().await;
        // Still fully working.
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1);
    })
    .await;
}

/// A second subscribe to the same topic and one beyond the per-connection limit are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_subscriptions_and_subscriptions_beyond_the_limit_are_refused() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().max_subscriptions(2)).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets"}))
            .await;
        assert_eq!(client.error_code().await, "already_subscribed");
        client.subscribe("ticket:t1").await;
        client
            .send(json!({"type": "subscribe", "topic": "ticket:t2"}))
            .await;
        match client.frame().await {
            ServerFrame::Error { code, topic, .. } => {
                assert_eq!(code, "too_many_subscriptions");
                assert_eq!(topic.as_deref(), Some("ticket:t2"));
            }
            other => panic!("{other:?}"),
        }
        // Unsubscribing frees a place.
        client
            .send(json!({"type": "unsubscribe", "topic": "tickets"}))
            .await;
        assert!(matches!(
            client.frame().await,
            ServerFrame::Unsubscribed { .. }
        ));
        client.subscribe("ticket:t2").await;
    })
    .await;
}

/// A message larger than `max_message_size` closes the connection with 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_closes_the_connection_with_1009() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(
            HubOptions::new()
                .max_message_size(1024)
                .max_frame_size(1024),
        )
        .await;
        let mut client = t.connect("user-u1").await;
        client.ping_pong().await;
        let big = json!({"type": "subscribe", "topic": "x".repeat(2000)}).to_string();
        client.send_raw(Message::Text(big.into())).await;
        assert_eq!(client.closed_with(10).await, close_code::MESSAGE_TOO_BIG);
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(10),
            "the connection is released",
            || async { (t.hub.stats().connections == 0).then_some(()) },
        )
        .await;
    })
    .await;
}

/// A message split into frames is limited as a whole, not frame by frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_fragmented_message_closes_the_connection_with_1009() {
    with_timeout(TEST_LIMIT, async {
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        let t = TestHub::start(
            HubOptions::new()
                .max_message_size(1024)
                .max_frame_size(1024),
        )
        .await;
        let mut client = t.connect("user-u1").await;
        let chunk = vec![b'x'; 800];
        let first = Frame::message(chunk.clone(), OpCode::Data(Data::Text), false);
        let second = Frame::message(chunk, OpCode::Data(Data::Continue), true);
        client.send_raw(Message::Frame(first)).await;
        client.send_raw(Message::Frame(second)).await;
        assert_eq!(client.closed_with(10).await, close_code::MESSAGE_TOO_BIG);
    })
    .await;
}

/// An invalid topic as long as a client message may be is echoed back cut to the longest a
/// topic can be, so the error frame fits a small write buffer and the connection stays open.
/// (It was echoed in full: with a write buffer smaller than the message limit, the write
/// failed and the connection dropped without a close frame.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_invalid_topic_is_echoed_cut_and_the_connection_stays_open() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(
            HubOptions::new()
                .max_message_size(16 * 1024)
                .max_frame_size(16 * 1024)
                .write_buffer_size(0)
                .max_write_buffer_size(1024),
        )
        .await;
        let mut client = t.connect("user-u1").await;
        // 4,000 bytes, and 200 falls inside no character; then characters JSON escapes, six
        // bytes each (`\u0001`) or two (`\"`): cut as sent, 200 of them would be 1,200 bytes
        // in the frame, past the write buffer's room.
        let longs = ["é".repeat(2000), "\u{1}".repeat(1000), "\"".repeat(1000)];
        for (long, kind) in longs
            .iter()
            .flat_map(|long| [(long, "subscribe"), (long, "unsubscribe")])
        {
            let sent = format!("x{long}");
            client.send(json!({"type": kind, "topic": sent})).await;
            match client.frame().await {
                ServerFrame::Error { code, topic, .. } => {
                    assert_eq!(code, "invalid_topic", "for {kind}");
                    let topic = topic.expect("the topic is echoed");
                    assert!(
                        topic.len() <= cqrs_realtime::MAX_TOPIC_LEN,
                        "{}",
                        topic.len()
                    );
                    assert!(topic.len() > 1 && sent.starts_with(&topic), "{topic:?}");
                }
                other => panic!("expected an error frame, got {other:?}"),
            }
        }
        client.subscribe("tickets").await;
        client.ping_pong().await;
    })
    .await;
}
