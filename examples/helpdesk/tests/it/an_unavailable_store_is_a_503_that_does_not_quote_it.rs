//! When the user store fails, clients get 503 `unavailable` with `Retry-After`, over HTTP and
//! on the WebSocket, and never the store's own error text (a driver's message naming hosts,
//! pools or relations): that goes to the log.

use crate::support::*;
use crate::websocket_clients_get_the_ticket_events_they_may_see::{connect, next, send};
use async_trait::async_trait;
use cqrs_core::ports::StoreError;
use helpdesk::Hooks;
use helpdesk_auth::{CreateUserError, InMemoryUserStore, UserRecord, UserStore};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

const SECRET: &str = "pool timed out on db-7.internal: relation auth_secret_users";

/// Users in memory, or, once `down`, a store that fails as Postgres would, quoting `SECRET`;
/// once `hung`, one that never answers (a database that stopped responding); once
/// `logouts_lost`, one that counts a logout and then fails as if its answer was lost.
#[derive(Clone, Default)]
pub struct FailingUsers {
    pub users: InMemoryUserStore,
    pub down: Arc<AtomicBool>,
    pub hung: Arc<AtomicBool>,
    pub logouts_lost: Arc<AtomicBool>,
}

impl FailingUsers {
    async fn check(&self) -> Result<(), StoreError> {
        if self.hung.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable {
                backend: "postgres",
                source: SECRET.into(),
            })
        } else {
            Ok(())
        }
    }

    /// The hooks that make a server use these users.
    pub fn hooks(&self) -> Hooks {
        let provided: Arc<dyn UserStore> = Arc::new(self.clone());
        Hooks {
            provide: vec![Arc::new(move |registrar| {
                registrar.provide(provided.clone());
            })],
            ..Hooks::default()
        }
    }
}

#[async_trait]
impl UserStore for FailingUsers {
    async fn create(&self, user: UserRecord) -> Result<(), CreateUserError> {
        self.check().await?;
        self.users.create(user).await
    }

    async fn by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
        self.check().await?;
        self.users.by_email(email).await
    }

    async fn by_id(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError> {
        self.check().await?;
        self.users.by_id(id).await
    }

    async fn log_out(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
        self.check().await?;
        let counted = self.users.log_out(id).await;
        if self.logouts_lost.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                backend: "postgres",
                source: SECRET.into(),
            });
        }
        counted
    }
}

#[track_caller]
fn assert_unavailable_without_the_secret(r: &Response) {
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert_eq!(r.headers["retry-after"], "1", "{r:?}");
    let body = r.body.to_string();
    assert!(!body.contains("auth_secret_users"), "{body}");
    assert!(!body.contains("db-7.internal"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_503s_of_a_failing_user_store_do_not_quote_it() {
    within(async {
        let users = FailingUsers::default();
        let s =
            TestServer::start_with_hooks(Backend::from_env().await, users.hooks(), |_| {}).await;
        let (token, _) = s.customer().await;
        let mut ws = connect(&s, &token).await;

        users.down.store(true, Ordering::SeqCst);
        let body = json!({ "email": email("down"), "password": PASSWORD });
        for path in ["/auth/register", "/auth/login"] {
            let r = s.send(Method::POST, path, None, Some(body.clone())).await;
            assert_unavailable_without_the_secret(&r);
        }
        assert_unavailable_without_the_secret(&s.get("/auth/me", &token).await);
        let logout = s
            .send(Method::POST, "/auth/logout", Some(&token), None)
            .await;
        assert_unavailable_without_the_secret(&logout);

        // A subscription checks the user's role again, in the store.
        send(&mut ws, json!({ "type": "subscribe", "topic": "tickets" })).await;
        let refused = next(&mut ws).await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["code"], "unavailable", "{refused}");
        let text = refused.to_string();
        assert!(!text.contains("auth_secret_users"), "{text}");
        assert!(!text.contains("db-7.internal"), "{text}");

        users.down.store(false, Ordering::SeqCst);
        let r = s
            .send(Method::POST, "/auth/register", None, Some(body))
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "back once the store is: {r:?}"
        );
        s.stop().await;
    })
    .await;
}
