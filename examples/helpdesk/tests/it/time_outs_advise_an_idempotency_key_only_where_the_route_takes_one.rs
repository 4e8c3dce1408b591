//! A request that runs past its time budget gets 503 `timeout` with `Retry-After`, whose
//! message tells the client to retry with the same `Idempotency-Key` only on a route that
//! takes one (the POSTs under `/tickets`); `/auth/*` and reads take none.

use crate::an_unavailable_store_is_a_503_that_does_not_quote_it::FailingUsers;
use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::sync::atomic::Ordering;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_outs_advise_an_idempotency_key_only_where_the_route_takes_one() {
    within(async {
        let users = FailingUsers::default();
        let s = TestServer::start_with_hooks(Backend::from_env().await, users.hooks(), |c| {
            c.request_timeout_ms = 1_000;
        })
        .await;
        let (token, _) = s.customer().await;
        let credentials = json!({ "email": email("late"), "password": PASSWORD });

        // Every request looks its user up: a store that never answers holds each to the end.
        users.hung.store(true, Ordering::SeqCst);
        let requests = [
            (
                Method::POST,
                "/tickets",
                Some(json!({ "title": "late" })),
                true,
            ),
            (
                Method::POST,
                "/auth/register",
                Some(credentials.clone()),
                false,
            ),
            (Method::POST, "/auth/login", Some(credentials), false),
            (Method::GET, "/auth/me", None, false),
            (Method::GET, "/tickets", None, false),
        ];
        for (method, path, body, takes_a_key) in requests {
            let r = s.send(method.clone(), path, Some(&token), body).await;
            r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "timeout");
            assert_eq!(r.headers["retry-after"], "1", "{method} {path}: {r:?}");
            let message = r.body["error"]["message"].as_str().unwrap();
            assert_eq!(
                message.contains("Idempotency-Key"),
                takes_a_key,
                "{method} {path}: {message}"
            );
        }
        users.hung.store(false, Ordering::SeqCst);
        s.stop().await;
    })
    .await;
}
