//! Client frames that arrive in one burst are each answered, however small the send queue:
//! the hub waits for room for its answers instead of closing a client that reads everything
//! as slow.

use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, ServerFrame};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_pings_gets_every_pong() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().send_queue(4)).await;
        let mut client = t.connect("agent-burst").await;
        const BURST: usize = 500;
        // Queued on the client and written together, so they reach the hub in few reads.
        for _ in 0..BURST {
            client
                .ws
                .feed(Message::Text(r#"{"type":"ping"}"#.into()))
                .await
                .unwrap();
        }
        client.ws.flush().await.unwrap();
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
