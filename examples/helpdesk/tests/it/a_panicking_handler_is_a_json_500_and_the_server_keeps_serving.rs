//! A handler (or an extractor, or a plugin's middleware) that panics gets its client the
//! contract's JSON 500 `internal`, without the panic's text, through the usual layers: the
//! answer carries its `x-request-id` and is counted in `/metrics`. The connection is not cut,
//! and the server goes on serving.

use crate::support::*;
use axum::routing::get;
use helpdesk::Hooks;
use helpdesk_api::{Authenticated, HttpApi, Operation};
use reqwest::{Method, StatusCode};
use std::sync::Arc;

pub(crate) const PANIC_TEXT: &str = "the secret panic text of db-9.internal";

/// A plugin route that panics, and one that panics after authenticating the caller.
pub(crate) fn panicking_routes() -> Hooks {
    Hooks {
        provide: vec![Arc::new(|registrar| {
            registrar.contribute::<HttpApi>(
                HttpApi::new()
                    .route(
                        "/test-panics/plain",
                        get(|| async {
                            if !PANIC_TEXT.is_empty() {
                                panic!("{PANIC_TEXT}");
                            }
                            "unreachable"
                        }),
                        [Operation::new("get", "Panics")],
                    )
                    .route(
                        "/test-panics/authenticated",
                        get(|user: Authenticated| async move {
                            if !user.0.id.is_nil() {
                                panic!("{PANIC_TEXT}");
                            }
                            "unreachable"
                        }),
                        [Operation::new("get", "Panics for a signed-in user")],
                    ),
            );
        })],
        ..Hooks::default()
    }
}

#[track_caller]
fn assert_internal_without_the_panic(r: &Response) {
    r.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    let body = r.body.to_string();
    assert!(!body.contains("secret panic"), "{body}");
    assert!(r.headers.get("x-request-id").is_some(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_json_500_and_the_server_keeps_serving() {
    within(async {
        let s = TestServer::start_with_hooks(Backend::from_env().await, panicking_routes(), |_| {})
            .await;
        let (token, _) = s.customer().await;
        for _ in 0..2 {
            let r = s.send(Method::GET, "/test-panics/plain", None, None).await;
            assert_internal_without_the_panic(&r);
            let r = s.get("/test-panics/authenticated", &token).await;
            assert_internal_without_the_panic(&r);
        }
        // Still serving, on the same client's connections.
        let health = s.send(Method::GET, "/health", None, None).await;
        assert_eq!(health.status, StatusCode::OK, "{health:?}");
        assert_eq!(s.get("/auth/me", &token).await.status, StatusCode::OK);
        // Counted like any answer, by its route template.
        let metrics = s.metrics().await;
        for route in ["/test-panics/plain", "/test-panics/authenticated"] {
            let line =
                format!("http_requests_total{{method=\"GET\",route=\"{route}\",status=\"500\"}}");
            assert!(metrics.contains(&line), "{line} not in\n{metrics}");
        }
        s.stop().await;
    })
    .await;
}
