use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{HubOptions, close_code};
use futures_util::StreamExt;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Long enough that a client on a loaded machine, stalled for seconds between two reads,
/// still answers in time; many pings fit in it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const PING_INTERVAL: Duration = Duration::from_millis(250);

fn options() -> HubOptions {
    HubOptions::new()
        .ping_interval(PING_INTERVAL)
        .idle_timeout(IDLE_TIMEOUT)
}

/// A client that reads answers the hub's pings (tungstenite does it while reading), so it
/// stays open well past the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_answers_pings_stays_open() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(options()).await;
        let mut client = t.connect("user-u1").await;
        // Only pings, for half as long again as the idle timeout: the hub did not give up on
        // the client.
        let start = tokio::time::Instant::now();
        let mut pings = 0;
        while start.elapsed() < IDLE_TIMEOUT * 3 / 2 {
            match client.ws.next().await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("expected a ping after {pings}, got {other:?}"),
            }
        }
        assert!(pings >= 2, "pinged: {pings}");
        client.ping_pong().await;
        assert_eq!(t.hub.stats().connections, 1);
        assert_eq!(t.hub.stats().idle_closes, 0);
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
        let connected = tokio::time::Instant::now();
        eventually(
            IDLE_TIMEOUT + Duration::from_secs(10),
            "the hub gives up on the idle connection",
            || async { (t.hub.stats().idle_closes == 1).then_some(()) },
        )
        .await;
        // Not at the first unanswered ping: after the idle timeout (less one ping interval, as
        // the hub checks on its ticks).
        let waited = connected.elapsed();
        assert!(
            waited >= IDLE_TIMEOUT - PING_INTERVAL,
            "closed after {waited:?}, idle timeout {IDLE_TIMEOUT:?}"
        );
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
