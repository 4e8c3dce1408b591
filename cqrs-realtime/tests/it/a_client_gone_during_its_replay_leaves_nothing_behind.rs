//! A client that goes away while its resume is still replaying (it stopped reading, then
//! dropped its socket) leaves nothing behind: the replay stops part way, and its connection,
//! its subscription and the upstream channel are released.

use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::HubOptions;
use serde_json::json;
use std::time::Duration;

const STORED: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_during_its_replay_leaves_nothing_behind() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(
            HubOptions::new()
                .replay_batch(10)
                .send_queue(8)
                .upstream_linger(Duration::ZERO),
        )
        .await;
        for seq in 1..=STORED {
            t.store("t1", "u1", seq).await;
        }
        let mut client = t.connect_small_buffer("user-u1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        // Registered before the first read: the replay is under way, and with a client that
        // reads nothing it cannot get far (a 4 KiB socket buffer, an 8-frame queue).
        eventually(Duration::from_secs(10), "the replay to start", || {
            let stats = t.hub.stats();
            async move { (stats.subscriptions == 1).then_some(()) }
        })
        .await;
        drop(client);
        eventually(
            Duration::from_secs(10),
            "the connection and its subscription released",
            || {
                let stats = t.hub.stats();
                async move { (stats.connections == 0 && stats.subscriptions == 0).then_some(()) }
            },
        )
        .await;
        eventually(
            Duration::from_secs(10),
            "the upstream channel released",
            || {
                let hub = t.hub.clone();
                async move { (hub.upstream_channels().await == 0).then_some(()) }
            },
        )
        .await;
        let replayed = t.hub.stats().replayed_events;
        assert!(
            replayed < STORED,
            "the replay stopped part way ({replayed} sent)"
        );
    })
    .await;
}

/// A replay cut short from outside its connection (here the hub's shutdown) still counts the
/// events it sent in `replayed_events`: it counted them only when it ended by itself, and a
/// replay dropped at a wait counted none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cut_short_by_shutdown_counts_what_it_sent() {
    with_timeout(TEST_LIMIT, async {
        // The client answers no close handshake: the hub waits `close_timeout` for it.
        let t = TestHub::start(
            HubOptions::new()
                .replay_batch(10)
                .send_queue(8)
                .close_timeout(Duration::from_millis(200)),
        )
        .await;
        for seq in 1..=STORED {
            t.store("t1", "u1", seq).await;
        }
        let mut client = t.connect_small_buffer("user-u1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        client.expect_subscribed("tickets").await;
        for seq in 1..=3 {
            assert_eq!(client.event().await.seq, seq);
        }
        // The client reads no more: the replay waits for room, far from its end.
        t.hub.shutdown();
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("the hub closed");
        let replayed = t.hub.stats().replayed_events;
        assert!(
            (3..STORED).contains(&replayed),
            "{replayed} counted, at least the 3 read"
        );
    })
    .await;
}
