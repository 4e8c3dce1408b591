use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, close_code};
use std::time::Duration;

/// A client that stops reading fills its socket, then its bounded send queue: the hub closes
/// it with 1008 instead of buffering without end, and a fast client on the same topic gets
/// every event throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_and_the_fast_one_gets_everything() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(
            HubOptions::new()
                .send_queue(16)
                // Long enough for the slow client to drain its socket and see the close.
                .close_timeout(Duration::from_secs(30)),
        )
        .await;
        let mut slow = t.connect_small_buffer("agent-slow").await;
        slow.subscribe("tickets").await;
        let mut fast = t.connect("agent-fast").await;
        fast.subscribe("tickets").await;

        // Publish in lock step with the fast client until the hub gives up on the slow one.
        let mut seq = 0;
        while t.hub.stats().slow_client_closes == 0 {
            seq += 1;
            assert!(seq < 20_000, "the slow client was never closed");
            t.publish_padded("t1", "u1", seq, 4096).await;
            assert_eq!(fast.event().await.seq, seq);
        }
        for _ in 0..20 {
            seq += 1;
            t.publish_padded("t1", "u1", seq, 4096).await;
            assert_eq!(fast.event().await.seq, seq);
        }
        assert_eq!(t.hub.stats().slow_client_closes, 1);

        // Reading at last, the slow client finds what reached its socket, then the close.
        assert_eq!(
            slow.closed_with(100_000).await,
            close_code::POLICY_VIOLATION
        );
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the slow connection is released",
            || async { (t.hub.stats().connections == 1).then_some(()) },
        )
        .await;
        fast.ping_pong().await;
    })
    .await;
}

/// A burst (a relay catching up, a batch of events published at once) is no slow client: the
/// hub lets the writers drain between events, so a client that reads promptly gets every
/// frame of it, two per event with two matching subscriptions, through a send queue that
/// holds a few. (On one thread the fan-out pushed the whole burst before any writer ran, and
/// closed the client with 1008.)
#[tokio::test]
async fn a_burst_does_not_close_a_client_that_reads_promptly() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().send_queue(8)).await;
        let mut client = t.connect("agent-a").await;
        client.subscribe("tickets").await;
        client.subscribe("ticket:t1").await;
        let mut records = Vec::new();
        for seq in 1..=40 {
            records.push(t.store("t1", "u1", seq).await);
        }
        for record in &records {
            t.hub.publisher().publish(record).await.unwrap();
        }
        for seq in 1..=40 {
            for _ in 0..2 {
                assert_eq!(client.event().await.seq, seq);
            }
        }
        assert_eq!(t.hub.stats().slow_client_closes, 0);
        client.ping_pong().await;
    })
    .await;
}
