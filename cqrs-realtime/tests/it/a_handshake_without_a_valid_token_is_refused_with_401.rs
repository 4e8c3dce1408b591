use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::with_timeout;
use cqrs_realtime::HubOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, http};

/// The handshake's answer: its status and JSON body, or 101.
async fn handshake(
    t: &TestHub,
    query: &str,
    authorization: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut request = format!("ws://{}/ws{query}", t.addr)
        .into_client_request()
        .unwrap();
    if let Some(value) = authorization {
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => (response.status().as_u16(), serde_json::Value::Null),
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&body)));
            (response.status().as_u16(), json)
        }
        Err(other) => panic!("handshake failed: {other}"),
    }
}

/// Asserts that `response` is a 401 whose `WWW-Authenticate: Bearer` challenge names `error`
/// (RFC 6750).
fn assert_challenged(response: &str, error: &str) {
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains(&format!("www-authenticate: bearer error=\"{error}\"")),
        "{response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_and_invalid_tokens_get_401_with_a_json_error() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        for (query, header) in [
            ("", None),
            ("?token=", None),
            ("?token=nobody", None),
            ("", Some("Bearer nobody")),
            ("", Some("Bearer ")),
            ("", Some("Basic dXNlcjpwYXNz")),
            ("", Some("user-u1")),
            // A bad header is not rescued by a good query token.
            ("?token=user-u1", Some("Bearer nobody")),
        ] {
            let (status, body) = handshake(&t, query, header).await;
            assert_eq!(status, 401, "query {query:?}, header {header:?}");
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        assert_eq!(t.hub.stats().connections, 0);
        assert_eq!(t.hub.stats().handshakes_refused, 8);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_in_the_header_or_the_query_upgrades() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        assert_eq!(handshake(&t, "?token=user-u1", None).await.0, 101);
        assert_eq!(handshake(&t, "", Some("Bearer user-u1")).await.0, 101);
        assert_eq!(handshake(&t, "", Some("bearer agent-a1")).await.0, 101);
    })
    .await;
}

/// Plain HTTP: a refusal is `application/json`, and a request with a good token that is not a
/// WebSocket handshake gets a JSON 4xx, never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_json_over_plain_http() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        // The whole answer to `head` (a request line and headers, each ending in CRLF).
        let exchange = |head: String| async move {
            let request = format!("{head}Host: localhost\r\nConnection: close\r\n\r\n");
            let mut stream = tokio::net::TcpStream::connect(t.addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        let get = |path: &str| exchange(format!("GET {path} HTTP/1.1\r\n"));
        let response = get("/ws").await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("content-type: application/json")
        );
        // No token: the bare challenge (RFC 6750).
        assert!(
            response
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer\r\n"),
            "{response}"
        );
        assert!(response.contains(r#""code":"unauthorized""#), "{response}");
        // A token in the wrong shape: the request is named.
        let response = get("/ws?token=").await;
        assert_challenged(&response, "invalid_request");
        // Two tokens are a request in the wrong shape too, not a missing token.
        let response = get("/ws?token=user-u1&token=user-u1").await;
        assert_challenged(&response, "invalid_request");
        assert!(
            response.contains("send one `token` query parameter"),
            "{response}"
        );
        // A token refused: the challenge names it.
        let response = get("/ws?token=nobody").await;
        assert_challenged(&response, "invalid_token");

        // Two Authorization headers: refused, not the first taken (a proxy in front that
        // reads the other would take the connection for another user's).
        let response = exchange(
            "GET /ws HTTP/1.1\r\nAuthorization: Bearer user-u1\r\nAuthorization: Bearer user-u2\r\n"
                .to_owned(),
        )
        .await;
        assert_challenged(&response, "invalid_request");
        assert!(response.contains("not several"), "{response}");

        // A header and a query parameter: refused, whichever a proxy would read (it was the
        // header's, silently), an empty parameter or two included.
        for query in ["token=user-u2", "token=", "token=user-u2&token=user-u1"] {
            let response = exchange(format!(
                "GET /ws?{query} HTTP/1.1\r\nAuthorization: Bearer user-u1\r\n"
            ))
            .await;
            assert_challenged(&response, "invalid_request");
            assert!(
                response.contains(
                    "in the Authorization header or the `token` query parameter, not both"
                ),
                "{query}: {response}"
            );
        }
        // Other query parameters beside the header are no token.
        let response =
            exchange("GET /ws?since=1 HTTP/1.1\r\nAuthorization: Bearer nobody\r\n".to_owned())
                .await;
        assert_challenged(&response, "invalid_token");

        // A HEAD is answered as a GET that is no handshake: 401 without a token, 400 with
        // one. (It was a 405 with a good token, without the `Allow` a 405 must carry, which
        // would have had to contradict the route's `Allow: GET,HEAD`.)
        for (path, status) in [("/ws", "401"), ("/ws?token=user-u1", "400")] {
            let response = exchange(format!("HEAD {path} HTTP/1.1\r\n")).await;
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status}")),
                "{response}"
            );
        }

        let response = get("/ws?token=user-u1").await;
        let status: u16 = response[9..12].parse().unwrap();
        assert!((400..500).contains(&status), "{response}");
        assert!(
            response.contains(r#""code":"websocket_upgrade_required""#),
            "{response}"
        );
    })
    .await;
}

/// One user cannot take the hub's connections: past `max_connections_per_principal`, its
/// handshakes get 429 while other users still connect, and a closed connection gives its
/// place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_holds_at_most_its_share_of_connections() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(
            HubOptions::new()
                .max_connections(3)
                .max_connections_per_principal(2),
        )
        .await;
        let _a = t.connect("user-u1").await;
        let mut b = t.connect("user-u1").await;
        let (status, body) = handshake(&t, "?token=user-u1", None).await;
        assert_eq!(status, 429);
        assert_eq!(body["error"]["code"], "too_many_connections");
        // The refused one took no place in the hub: another user gets the last one.
        let _c = t.connect("user-u2").await;
        b.ws.close(None).await.unwrap();
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(10),
            "the closed connection is released",
            || async { (t.hub.stats().connections == 2).then_some(()) },
        )
        .await;
        assert_eq!(handshake(&t, "?token=user-u1", None).await.0, 101);
    })
    .await;
}

/// One client address cannot take the hub's connections with many principals (accounts are
/// cheap where anyone may register): past `max_connections_per_client`, its handshakes get
/// 429 while other clients still connect, and a closed connection gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holds_at_most_its_share_of_connections() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().max_connections_per_client(2)).await;
        let from = |client: &str, user: &str| {
            let mut request = t.url(user).into_client_request().unwrap();
            request
                .headers_mut()
                .insert("x-test-client", client.parse().unwrap());
            request
        };
        let _a = tokio_tungstenite::connect_async(from("10.0.0.1", "user-u1"))
            .await
            .unwrap();
        let (mut b, _) = tokio_tungstenite::connect_async(from("10.0.0.1", "user-u2"))
            .await
            .unwrap();
        match tokio_tungstenite::connect_async(from("10.0.0.1", "user-u3")).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 429);
                let body: serde_json::Value =
                    serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], "too_many_connections");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains("client address"), "{message}");
            }
            other => panic!("a third connection from one client: {other:?}"),
        }
        // Another client, and a handshake naming none, are not held back.
        let _c = tokio_tungstenite::connect_async(from("10.0.0.2", "user-u3"))
            .await
            .unwrap();
        let _d = t.connect("user-u4").await;
        b.close(None).await.unwrap();
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(10),
            "the closed connection is released",
            || async { (t.hub.stats().connections == 3).then_some(()) },
        )
        .await;
        tokio_tungstenite::connect_async(from("10.0.0.1", "user-u5"))
            .await
            .expect("the client's place was given back");
    })
    .await;
}

/// Handshakes beyond `max_connections` get 503 `too_many_connections`, with a `Retry-After`
/// that keeps the refused clients from coming back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_connection_limit_get_503() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new().max_connections(2)).await;
        let _a = t.connect("user-u1").await;
        let mut b = t.connect("user-u2").await;
        match tokio_tungstenite::connect_async(t.url("user-u3")).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503);
                let retry_after = response.headers().get(http::header::RETRY_AFTER);
                assert_eq!(retry_after.map(|v| v.to_str().unwrap()), Some("5"));
                let body: serde_json::Value =
                    serde_json::from_slice(&response.body().clone().unwrap_or_default()).unwrap();
                assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
            }
            other => panic!("expected 503, got {other:?}"),
        }
        // A closed connection frees its place.
        b.ws.close(None).await.unwrap();
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(10),
            "the closed connection is released",
            || async { (t.hub.stats().connections == 1).then_some(()) },
        )
        .await;
        assert_eq!(handshake(&t, "?token=user-u3", None).await.0, 101);
    })
    .await;
}

/// Credentials that could not be checked (the authenticator's store is down) are 503
/// `unavailable` with `Retry-After`, not 401: the client tries again instead of dropping a
/// token that may well be good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_that_cannot_be_checked_now_get_503() {
    struct StoreDown;

    #[async_trait::async_trait]
    impl cqrs_realtime::Authenticator for StoreDown {
        type Principal = crate::support::User;

        async fn authenticate(
            &self,
            _token: &str,
        ) -> Result<crate::support::User, cqrs_realtime::Unauthenticated> {
            Err(cqrs_realtime::Unauthenticated::unavailable(
                "the user store is unavailable; try again shortly",
            ))
        }
    }

    /// The store hangs: the check is cut off at the operation timeout.
    struct StoreHangs;

    #[async_trait::async_trait]
    impl cqrs_realtime::Authenticator for StoreHangs {
        type Principal = crate::support::User;

        async fn authenticate(
            &self,
            _token: &str,
        ) -> Result<crate::support::User, cqrs_realtime::Unauthenticated> {
            std::future::pending().await
        }
    }

    async fn expect_503(t: &TestHub) {
        match tokio_tungstenite::connect_async(t.url("user-u1")).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503);
                assert_eq!(
                    response
                        .headers()
                        .get(http::header::RETRY_AFTER)
                        .map(|v| v.to_str().unwrap()),
                    Some("1")
                );
                let body: serde_json::Value =
                    serde_json::from_slice(&response.body().clone().unwrap_or_default()).unwrap();
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
            }
            other => panic!("expected 503, got {other:?}"),
        }
        assert_eq!(t.hub.stats().connections, 0);
    }

    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start_with_authenticator(StoreDown, HubOptions::new(), |b| b).await;
        expect_503(&t).await;
        let options = HubOptions::new().operation_timeout(std::time::Duration::from_millis(100));
        let t = TestHub::start_with_authenticator(StoreHangs, options, |b| b).await;
        expect_503(&t).await;
    })
    .await;
}
