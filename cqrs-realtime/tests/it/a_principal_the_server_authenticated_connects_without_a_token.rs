//! `Hub::handle_authenticated`: a server that authenticates by itself (a session cookie, an
//! auth middleware) hands the hub the principal, with no token. The connection works as a
//! token's does, and the hub's per-principal limit, credential expiry and revocation apply
//! to it alike.

use crate::support::{TEST_LIMIT, TestHub, TestTokens, User};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{Authenticator, HubOptions, Unauthenticated, close_code};
use std::time::Duration;

/// Refuses every token (the server authenticates by session), keys principals by id, and
/// says the credentials of `gone…` principals expired in 1970.
struct SessionsOnly;

#[async_trait]
impl Authenticator for SessionsOnly {
    type Principal = User;

    async fn authenticate(&self, _token: &str) -> Result<User, Unauthenticated> {
        Err(Unauthenticated::new(
            "this server takes sessions, not tokens",
        ))
    }

    fn connection_key(&self, user: &User) -> Option<String> {
        TestTokens.connection_key(user)
    }

    fn expires_at(&self, user: &User) -> Option<DateTime<Utc>> {
        user.id.starts_with("gone").then_some(DateTime::UNIX_EPOCH)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_the_server_authenticated_connects_without_a_token() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start_with_authenticator(
            SessionsOnly,
            HubOptions::new().max_connections_per_principal(1),
            |b| b,
        )
        .await;
        let Ok(mut agent) = t.connect_session("agent-a").await else {
            panic!("the session's handshake is accepted");
        };
        agent.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(agent.event().await.seq, 1);

        // The principal's limit counts it like a token's connection.
        let Err(refused) = t.connect_session("user-a").await else {
            panic!("a second connection of principal `a` is refused");
        };
        assert_eq!(refused.status().as_u16(), 429);
        // Credentials already expired are refused before the upgrade, as for a token.
        let Err(refused) = t.connect_session("user-gone").await else {
            panic!("an expired principal is refused");
        };
        assert_eq!(refused.status().as_u16(), 401);

        assert_eq!(t.hub.close_connections_of("a"), 1);
        assert_eq!(
            agent.close_frame(100).await,
            (
                close_code::POLICY_VIOLATION,
                "credentials revoked".to_owned()
            )
        );
        eventually(
            Duration::from_secs(10),
            "the connection is released",
            || async { (t.hub.stats().connections == 0).then_some(()) },
        )
        .await;
        assert!(
            t.connect_session("user-a").await.is_ok(),
            "its place is free again"
        );
    })
    .await;
}
