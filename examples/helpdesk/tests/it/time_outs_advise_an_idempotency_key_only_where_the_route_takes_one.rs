//! A request that runs past its time budget gets 503 `timeout`, whose message says what is
//! safe next: on a route that takes an `Idempotency-Key` (the POSTs under `/tickets`), to retry
//! with the key the request sent, or, when it sent none, to check before sending it again (and
//! then with no `Retry-After`); `/auth/*` and reads only to try again.

use crate::an_unavailable_store_is_a_503_that_does_not_quote_it::FailingUsers;
use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::sync::atomic::Ordering;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_outs_advise_an_idempotency_key_only_where_the_route_takes_one() {
    within(async {
        let users = FailingUsers::default();
        // The customer registers on an instance with the default budget, sharing the users
        // and the token key: a loaded machine's password hashing alone may take most of a
        // second.
        let other =
            TestServer::start_with_hooks(Backend::from_env().await, users.hooks(), |_| {}).await;
        let (token, _) = other.customer().await;
        other.stop().await;
        let s = TestServer::start_with_hooks(Backend::from_env().await, users.hooks(), |c| {
            c.request_timeout_ms = 1_000;
        })
        .await;
        let credentials = json!({ "email": email("late"), "password": PASSWORD });

        // Every request looks its user up: a store that never answers holds each to the end.
        users.hung.store(true, Ordering::SeqCst);
        // (method, path, body, Idempotency-Key sent, advice expected)
        let requests = [
            (
                Method::POST,
                "/tickets",
                Some(json!({ "title": "late" })),
                Some("late-1"),
                "retry with the same Idempotency-Key",
            ),
            (
                Method::POST,
                "/tickets",
                Some(json!({ "title": "late" })),
                None,
                "check before sending it again",
            ),
            (
                Method::POST,
                "/auth/register",
                Some(credentials.clone()),
                None,
                "try again shortly",
            ),
            (
                Method::POST,
                "/auth/login",
                Some(credentials),
                None,
                "try again shortly",
            ),
            (Method::GET, "/auth/me", None, None, "try again shortly"),
            (Method::GET, "/tickets", None, None, "try again shortly"),
        ];
        for (method, path, body, key, advice) in requests {
            let mut request = s
                .http
                .request(method.clone(), s.url(path))
                .bearer_auth(&token);
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            if let Some(body) = body {
                request = request.json(&body);
            }
            let r = Response::from(request.send().await.unwrap()).await;
            r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "timeout");
            // No `Retry-After` where a retry might apply a change twice: a generic client
            // retries any 503 that carries one.
            let check_first = advice == "check before sending it again";
            assert_eq!(
                r.headers.get("retry-after").map(|v| v.to_str().unwrap()),
                (!check_first).then_some("1"),
                "{method} {path}: {r:?}"
            );
            let message = r.body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(advice),
                "{method} {path} (key {key:?}): {message}"
            );
            assert_eq!(
                message.contains("retry with the same Idempotency-Key"),
                key.is_some(),
                "{method} {path} (key {key:?}): {message}"
            );
        }
        users.hung.store(false, Ordering::SeqCst);
        s.stop().await;
    })
    .await;
}
