//! A principal's connections are closed on request (`Hub::close_connections_of`), with 1008
//! `credentials revoked`: a user who logged out or was locked out keeps nothing open.

use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{HubOptions, close_code};
use std::sync::Arc;
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

/// Tokens as the tests' (`agent-<id>`, `user-<id>`), and `slow:<token>`, whose check waits
/// until the test lets it finish: a credentials check still running when a revocation comes.
#[derive(Clone)]
struct SlowTokens {
    checking: Arc<tokio::sync::Semaphore>,
    finish: Arc<tokio::sync::Semaphore>,
}

impl Default for SlowTokens {
    fn default() -> Self {
        Self {
            checking: Arc::new(tokio::sync::Semaphore::new(0)),
            finish: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

#[async_trait::async_trait]
impl cqrs_realtime::Authenticator for SlowTokens {
    type Principal = crate::support::User;

    async fn authenticate(
        &self,
        token: &str,
    ) -> Result<crate::support::User, cqrs_realtime::Unauthenticated> {
        let token = match token.strip_prefix("slow:") {
            Some(token) => {
                self.checking.add_permits(1);
                self.finish.acquire().await.unwrap().forget();
                token
            }
            None => token,
        };
        crate::support::authenticator().authenticate(token).await
    }

    fn connection_key(&self, user: &crate::support::User) -> Option<String> {
        Some(user.id.clone())
    }
}

/// The status of the handshake with `token`: 101, or the refusal's.
async fn handshake_status(url: String) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("handshake failed: {other}"),
    }
}

/// A handshake whose credentials were read before a revocation of its principal, and whose
/// check ends after it, is refused (401), whether the revocation was made here or by another
/// instance: a connection admitted then would outlive the revocation that had already closed
/// the others. Another principal's handshake in flight then is admitted, and so is a new one
/// of the revoked principal (refusing revoked credentials is the authenticator's part).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_checked_across_a_revocation_of_its_principal_is_refused() {
    with_timeout(TEST_LIMIT, async {
        let tokens = SlowTokens::default();
        let pubsub = Arc::new(cqrs_core::memory::InMemoryPubSub::new());
        let store = Arc::new(cqrs_core::memory::InMemoryEventStore::new());
        let t = TestHub::start_authenticated(
            tokens.clone(),
            pubsub.clone(),
            HubOptions::new(),
            store,
            None,
            |b| b,
        )
        .await;
        // Another instance's hub on the same pub/sub: its revocations reach `t`.
        let elsewhere = TestHub::start_on(pubsub, HubOptions::new(), |b| b).await;
        let _listening = t.connect("agent-z").await;
        let _listening_elsewhere = elsewhere.connect("agent-y").await;

        for revoke_elsewhere in [false, true] {
            // The principal's connection open before: closed by the revocation.
            let mut open = t.connect("user-a").await;
            let revoked = tokio::spawn(handshake_status(t.url("slow:agent-a")));
            let other = tokio::spawn(handshake_status(t.url("slow:agent-b")));
            for _ in 0..2 {
                tokens.checking.acquire().await.unwrap().forget();
            }
            if revoke_elsewhere {
                elsewhere
                    .hub
                    .close_connections_everywhere("a")
                    .await
                    .unwrap();
            } else {
                assert_eq!(t.hub.close_connections_of("a"), 1, "the open one");
            }
            // Once it is closed, the revocation has reached `t`.
            assert_eq!(
                open.close_frame(100).await,
                (
                    close_code::POLICY_VIOLATION,
                    "credentials revoked".to_owned()
                )
            );
            tokens.finish.add_permits(2);
            assert_eq!(revoked.await.unwrap(), 401, "elsewhere: {revoke_elsewhere}");
            assert_eq!(other.await.unwrap(), 101, "elsewhere: {revoke_elsewhere}");
        }
        let mut again = t.connect("agent-a").await;
        again.subscribe("tickets").await;
    })
    .await;
}
