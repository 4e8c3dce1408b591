//! A principal's connections are closed on request (`Hub::close_connections_of`), with 1008
//! `credentials revoked`: a user who logged out or was locked out keeps nothing open.

use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{HubOptions, close_code};
use std::time::Duration;

/// `Hub::close_connections_of` closes every connection of one principal with 1008
/// `credentials revoked`, at once (no keepalive tick needed), and leaves the others open and
/// receiving; a second call finds nothing left to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principals_connections_are_closed_when_its_credentials_are_revoked() {
    with_timeout(TEST_LIMIT, async {
        // The default keepalive (a tick every 30 s, no expiry): the close comes from the call.
        let t = TestHub::start(HubOptions::new()).await;
        let mut first = t.connect("agent-a").await;
        let mut second = t.connect("user-a").await;
        let mut other = t.connect("agent-b").await;
        // No wait for the connections to start: a connection is listed once its handshake is
        // accepted, before the client has its answer, so a revocation right after finds it,
        // even one whose upgrade has not completed yet.
        assert_eq!(t.hub.close_connections_of("a"), 2);
        for client in [&mut first, &mut second] {
            assert_eq!(
                client.close_frame(100).await,
                (
                    close_code::POLICY_VIOLATION,
                    "credentials revoked".to_owned()
                )
            );
        }
        assert_eq!(t.hub.close_connections_of("a"), 0, "none left to close");
        assert_eq!(t.hub.close_connections_of("nobody"), 0);
        other.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(
            other.event().await.seq,
            1,
            "the other principal still receives"
        );
        eventually(Duration::from_secs(10), "the two are released", || async {
            let stats = t.hub.stats();
            (stats.connections == 1 && stats.subscriptions == 1).then_some(())
        })
        .await;
    })
    .await;
}

/// A client that sends its handshake and goes away without reading the answer leaves nothing
/// listed: its connection ends, its entry and its place go with it, and the hub closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_its_client_abandons_leaves_nothing_listed() {
    use tokio::io::AsyncWriteExt;
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        for _ in 0..5 {
            let mut tcp = tokio::net::TcpStream::connect(t.addr).await.unwrap();
            let request = format!(
                "GET /ws?token=agent-a HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\n\
                 Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                t.addr
            );
            tcp.write_all(request.as_bytes()).await.unwrap();
            drop(tcp);
        }
        eventually(
            Duration::from_secs(10),
            "every abandoned handshake ends",
            || async { (t.hub.stats().connections == 0).then_some(()) },
        )
        .await;
        assert_eq!(t.hub.close_connections_of("a"), 0, "none left listed");
        // A connection of the same principal opens and is listed as usual.
        let mut client = t.connect("agent-a").await;
        assert_eq!(t.hub.close_connections_of("a"), 1);
        assert_eq!(
            client.close_frame(100).await.0,
            close_code::POLICY_VIOLATION
        );
        t.hub.shutdown();
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("the hub closes: no connection is left behind");
    })
    .await;
}
