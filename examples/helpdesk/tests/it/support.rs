//! A server per test, and a small client.

use cqrs_core::clock::ManualClock;
use helpdesk::{Config, Hooks, Server};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const PASSWORD: &str = "correct horse battery";

pub struct TestServer {
    pub server: Option<Server>,
    pub base: String,
    pub clock: ManualClock,
    pub http: reqwest::Client,
    pub emails: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A unique email per call, so tests never share users.
pub fn email(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}@example.com",
        NEXT.fetch_add(1, Ordering::SeqCst),
        std::process::id()
    )
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            bind: "127.0.0.1:0".parse().unwrap(),
            jwt_secret: Some("a-test-secret-that-is-at-least-32-bytes-long".into()),
            agent_emails: vec!["agent@example.com".into(), "agent2@example.com".into()],
            poll_ms: 10,
            shutdown_grace_ms: 2_000,
            ..Config::default()
        };
        configure(&mut config);
        let clock = ManualClock::new();
        let server = Server::start(
            config,
            Hooks {
                clock: Some(Arc::new(clock.clone())),
            },
        )
        .await
        .expect("the server starts");
        let base = format!("http://{}", server.addr());
        Self {
            server: Some(server),
            base,
            clock,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            emails: Default::default(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request; returns the status, the headers and the JSON body (`Null` when empty
    /// or not JSON).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        Response::from(request.send().await.expect("the request is answered")).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.send(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.send(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn register(&self, email: &str) -> Response {
        self.send(
            Method::POST,
            "/auth/register",
            None,
            Some(json!({ "email": email, "password": PASSWORD })),
        )
        .await
    }

    /// Registers and logs in; returns (token, user id).
    pub async fn user(&self, email: &str) -> (String, String) {
        let registered = self.register(email).await;
        assert_eq!(registered.status, StatusCode::CREATED, "{registered:?}");
        let login = self
            .send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": email, "password": PASSWORD })),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        let id = login.body["user_id"].as_str().unwrap().to_owned();
        self.emails
            .lock()
            .unwrap()
            .insert(id.clone(), email.to_owned());
        (login.body["token"].as_str().unwrap().to_owned(), id)
    }

    /// Logs a known user in again (after the clock moved past their token's expiry).
    pub async fn token_of(&self, user_id: &str) -> String {
        let email = self
            .emails
            .lock()
            .unwrap()
            .get(user_id)
            .cloned()
            .expect("a user this server registered");
        let login = self
            .send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": email, "password": PASSWORD })),
            )
            .await;
        login.body["token"].as_str().unwrap().to_owned()
    }

    /// A fresh customer.
    pub async fn customer(&self) -> (String, String) {
        self.user(&email("customer")).await
    }

    /// The agent (registered on first use).
    pub async fn agent(&self) -> (String, String) {
        self.agent_named("agent@example.com").await
    }

    pub async fn agent_named(&self, email: &str) -> (String, String) {
        let _ = self.register(email).await;
        let login = self
            .send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": email, "password": PASSWORD })),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        assert_eq!(login.body["role"], "agent");
        (
            login.body["token"].as_str().unwrap().to_owned(),
            login.body["user_id"].as_str().unwrap().to_owned(),
        )
    }

    /// Opens a ticket; returns its JSON.
    pub async fn ticket(&self, token: &str, title: &str) -> Value {
        let r = self
            .post("/tickets", token, json!({ "title": title }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        r.body
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("a clean shutdown");
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Response {
    pub async fn from(r: reqwest::Response) -> Self {
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            body,
        }
    }

    /// Asserts the status and the error code, and that the body has the contract's shape.
    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["error"]["code"], code, "{self:?}");
        assert!(self.body["error"]["message"].is_string(), "{self:?}");
        let content_type = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
    }
}

/// Runs a test body under a deadline.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    cqrs_core::testing::with_timeout(Duration::from_secs(60), f).await
}
