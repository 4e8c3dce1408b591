//! Client frames that arrive in one burst are each answered, however small the send queue:
//! the hub waits for room for its answers instead of closing a client that reads everything
//! as slow.

use crate::support::{Client, TEST_LIMIT, TestHub};
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, ServerFrame};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

/// Sends `n` pings, queued on the client and written together, so they reach the hub in few
/// reads.
async fn send_pings(client: &mut Client, n: usize) {
    for _ in 0..n {
        client
            .ws
            .feed(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .unwrap();
    }
    client.ws.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_pings_gets_every_pong() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().send_queue(4)).await;
        let mut client = t.connect("agent-burst").await;
        const BURST: usize = 500;
        send_pings(&mut client, BURST).await;
        for n in 0..BURST {
            match client.frame().await {
                ServerFrame::Pong => {}
                other => panic!("answer {n}: expected pong, got {other:?}"),
            }
        }
        assert_eq!(t.hub.stats().slow_client_closes, 0);
        client.ping_pong().await;
    })
    .await;
}

/// The answers to a burst leave a slot free for events: a client that reads everything,
/// sending a burst of frames while events come (one at a time), is not closed as slow. Taking
/// the last slot, the answers kept the queue full, and an event found no room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answers_to_a_burst_leave_room_for_events() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().send_queue(4)).await;
        let mut client = t.connect("agent-burst").await;
        client.subscribe("tickets").await;
        const BURST: usize = 50;
        const EVENTS: u64 = 50;
        let mut pongs = 0;
        for seq in 1..=EVENTS {
            send_pings(&mut client, BURST).await;
            // The next event only once the last one arrived: at most one is queued at a time,
            // among the answers to the burst.
            t.publish("t1", "u1", seq).await;
            loop {
                match client.frame().await {
                    ServerFrame::Pong => pongs += 1,
                    ServerFrame::Event { event, .. } => {
                        assert_eq!(event["data"]["seq"], seq);
                        break;
                    }
                    other => panic!("expected a pong or event {seq}, got {other:?}"),
                }
            }
        }
        while pongs < BURST * EVENTS as usize {
            assert_eq!(client.frame().await, ServerFrame::Pong);
            pongs += 1;
        }
        assert_eq!(t.hub.stats().slow_client_closes, 0);
    })
    .await;
}

/// The default read buffer (512 bytes) is far smaller than the largest client message
/// (4 KiB): a message as large as the limit, sent between small ones in one write, is read
/// whole and answered in order, and the connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_as_large_as_the_limit_is_read_through_the_small_default_buffer() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let mut client = t.connect("user-u1").await;
        // JSON allows whitespace: pad a subscribe to exactly the default `max_message_size`.
        let head = r#"{"type":"subscribe","topic":"tickets""#;
        let large = format!("{head}{}}}", " ".repeat(4 * 1024 - head.len() - 1));
        assert_eq!(large.len(), 4 * 1024);
        let ping = || Message::Text(r#"{"type":"ping"}"#.into());
        client.ws.feed(ping()).await.unwrap();
        client.ws.feed(Message::Text(large.into())).await.unwrap();
        client.ws.feed(ping()).await.unwrap();
        client.ws.flush().await.unwrap();
        assert_eq!(client.frame().await, ServerFrame::Pong);
        client.expect_subscribed("tickets").await;
        assert_eq!(client.frame().await, ServerFrame::Pong);
        t.publish("t1", "u1", 1).await;
        let event = client.event().await;
        assert_eq!(event.topic, "tickets");
    })
    .await;
}
