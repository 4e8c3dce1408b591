use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{HubOptions, close_code};
use futures_util::StreamExt;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

fn options() -> HubOptions {
    HubOptions::new()
        .ping_interval(Duration::from_millis(100))
        .idle_timeout(Duration::from_millis(400))
}

/// A client that reads answers the hub's pings (tungstenite does it while reading), so it
/// stays open well past the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_answers_pings_stays_open() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(options()).await;
        let mut client = t.connect("user-u1").await;
        let mut pings = 0;
        while pings < 10 {
            match client.ws.next().await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("expected a ping, got {other:?}"),
            }
        }
        client.ping_pong().await;
        assert_eq!(t.hub.stats().connections, 1);
    })
    .await;
}

/// A client that sends nothing (not even pongs) is closed with 1000 after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_after_the_idle_timeout() {
    with_timeout(TEST_LIMIT, async {
        // The hub waits long enough for the close handshake that the client, reading late,
        // still finds the socket open.
        let t = TestHub::start(options().close_timeout(Duration::from_secs(10))).await;
        let mut client = t.connect("user-u1").await;
        eventually(
            Duration::from_secs(10),
            "the hub gives up on the idle connection",
            || async { (t.hub.stats().idle_closes == 1).then_some(()) },
        )
        .await;
        assert_eq!(client.closed_with(100).await, close_code::NORMAL);
        eventually(
            Duration::from_secs(10),
            "the connection is released",
            || async { (t.hub.stats().connections == 0).then_some(()) },
        )
        .await;
    })
    .await;
}
