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
