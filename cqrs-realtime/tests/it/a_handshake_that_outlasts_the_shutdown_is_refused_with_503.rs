use crate::support::{TEST_LIMIT, TestHub, TestTokens, User};
use async_trait::async_trait;
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{Authenticator, HubOptions, Unauthenticated};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite;

/// The test tokens, each check held until the test lets it through.
struct Gate {
    entered: Arc<Notify>,
    release: Arc<Semaphore>,
}

#[async_trait]
impl Authenticator for Gate {
    type Principal = User;

    async fn authenticate(&self, token: &str) -> Result<User, Unauthenticated> {
        self.entered.notify_one();
        self.release.acquire().await.unwrap().forget();
        TestTokens.authenticate(token).await
    }

    fn connection_key(&self, user: &User) -> Option<String> {
        Some(user.id.clone())
    }
}

/// A handshake that passed the stopping check and waits on its authenticator while the hub
/// shuts down, and `closed()` completes: once let through it gets 503 `shutting_down`, not an
/// upgrade to a connection that outlives `closed()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_authenticated_after_the_shutdown_gets_503() {
    with_timeout(TEST_LIMIT, async {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Semaphore::new(0));
        let gate = Gate {
            entered: entered.clone(),
            release: release.clone(),
        };
        let t = TestHub::start_with_authenticator(gate, HubOptions::new(), |b| b).await;
        let url = t.url("user-u1");
        let handshake = tokio::spawn(async move { tokio_tungstenite::connect_async(url).await });
        tokio::time::timeout(Duration::from_secs(10), entered.notified())
            .await
            .expect("the handshake reached the authenticator");

        t.hub.shutdown();
        tokio::time::timeout(Duration::from_secs(5), t.hub.closed())
            .await
            .expect("no connection is open");
        release.add_permits(1);

        match handshake.await.unwrap() {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503);
                let body: serde_json::Value =
                    serde_json::from_slice(&response.body().clone().unwrap_or_default()).unwrap();
                assert_eq!(body["error"]["code"], "shutting_down", "{body}");
            }
            Ok((_, response)) => panic!(
                "a handshake was upgraded after the shutdown: {}",
                response.status()
            ),
            Err(other) => panic!("handshake failed: {other}"),
        }
        assert_eq!(t.hub.stats().connections, 0, "the place was given back");
        tokio::time::timeout(Duration::from_secs(5), t.hub.closed())
            .await
            .expect("still no connection is open");
    })
    .await;
}
