//! Every 401 carries `WWW-Authenticate: Bearer` (RFC 7235 requires a challenge), naming
//! `error="invalid_token"` when the token sent was refused (RFC 6750), as the WebSocket
//! handshake's 401 does.

use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[track_caller]
fn assert_challenge(r: &Response, challenge: &str) {
    r.assert_error(
        StatusCode::UNAUTHORIZED,
        r.body["error"]["code"].as_str().unwrap_or(""),
    );
    let header = r
        .headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap());
    assert_eq!(header, Some(challenge), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_401_challenges_with_www_authenticate_bearer() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;

        let missing = s.send(Method::GET, "/auth/me", None, None).await;
        assert_challenge(&missing, "Bearer");
        assert_eq!(missing.body["error"]["code"], "unauthorized");

        // The right header and payload, signed with another key.
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0], parts[1], "c2lnbmVkLWJ5LXNvbWVvbmUtZWxzZQ"
        );
        let refused = s.get("/auth/me", &forged).await;
        assert_challenge(&refused, "Bearer error=\"invalid_token\"");

        let tickets = s.send(Method::GET, "/tickets", Some("garbage"), None).await;
        assert_challenge(&tickets, "Bearer error=\"invalid_token\"");

        let not_bearer = s
            .http
            .get(s.url("/auth/me"))
            .header("authorization", format!("Basic {token}"))
            .send()
            .await
            .unwrap();
        let not_bearer = Response::from(not_bearer).await;
        assert_challenge(&not_bearer, "Bearer error=\"invalid_request\"");
        // The WebSocket handshake challenges the same way.
        let ws_not_bearer = s
            .http
            .get(s.url("/ws"))
            .header("authorization", format!("Basic {token}"))
            .send()
            .await
            .unwrap();
        let ws_not_bearer = Response::from(ws_not_bearer).await;
        assert_challenge(&ws_not_bearer, "Bearer error=\"invalid_request\"");
        // Two Authorization headers are refused, not the first taken: a proxy in front that
        // reads the other would take the request for another user's.
        let (other, _) = s.customer().await;
        for path in ["/auth/me", "/ws"] {
            let two = s
                .http
                .get(s.url(path))
                .header("authorization", format!("Bearer {token}"))
                .header("authorization", format!("Bearer {other}"))
                .send()
                .await
                .unwrap();
            let two = Response::from(two).await;
            assert_challenge(&two, "Bearer error=\"invalid_request\"");
            let message = two.body["error"]["message"].as_str().unwrap();
            assert!(message.contains("not several"), "{path}: {message}");
        }
        let ws_refused = s.send(Method::GET, "/ws", Some("garbage"), None).await;
        assert_challenge(&ws_refused, "Bearer error=\"invalid_token\"");
        let ws_missing = s.send(Method::GET, "/ws", None, None).await;
        assert_challenge(&ws_missing, "Bearer");

        let wrong_password = s
            .send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": email("nobody"), "password": "a guess" })),
            )
            .await;
        assert_challenge(&wrong_password, "Bearer");
        assert_eq!(wrong_password.body["error"]["code"], "invalid_credentials");
        s.stop().await;
    })
    .await;
}
