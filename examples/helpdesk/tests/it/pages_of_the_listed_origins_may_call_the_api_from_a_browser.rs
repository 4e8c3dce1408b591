//! CORS: with `--cors-origins`, a browser lets pages of those origins call the API (its
//! preflight is answered, and every answer, an error's too, says which origin may read it and
//! which headers it may see); without, nothing changes.

use crate::support::*;
use reqwest::{Method, StatusCode};

const PAGE: &str = "https://app.example.com";

/// A browser's preflight of a `POST /tickets` with a bearer token and an idempotency key.
async fn preflight(s: &TestServer, origin: &str) -> reqwest::Response {
    s.http
        .request(Method::OPTIONS, s.url("/tickets"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,idempotency-key",
        )
        .send()
        .await
        .unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_origins_preflight_is_answered_and_its_answers_readable() {
    within(async {
        let s = TestServer::start_with(|c| {
            c.cors_origins = vec![PAGE.into(), "http://localhost:3000".into()];
        })
        .await;
        let allowed = preflight(&s, PAGE).await;
        assert!(allowed.status().is_success(), "{allowed:?}");
        assert_eq!(header(&allowed, "access-control-allow-origin"), Some(PAGE));
        let headers = header(&allowed, "access-control-allow-headers").unwrap_or_default();
        for needed in [
            "authorization",
            "content-type",
            "idempotency-key",
            "if-match",
            // A page's tracing propagates trace context, which the API reads.
            "traceparent",
            "tracestate",
        ] {
            assert!(headers.contains(needed), "{needed} in {headers}");
        }
        let methods = header(&allowed, "access-control-allow-methods").unwrap_or_default();
        assert!(methods.contains("POST"), "{methods}");

        // A real request of the page: created, its Location readable by the page's script.
        let (token, _) = s.customer().await;
        let created = s
            .http
            .post(s.url("/tickets"))
            .header("origin", PAGE)
            .bearer_auth(&token)
            .json(&serde_json::json!({ "title": "from a page" }))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), StatusCode::CREATED);
        assert_eq!(header(&created, "access-control-allow-origin"), Some(PAGE));
        let exposed = header(&created, "access-control-expose-headers").unwrap_or_default();
        for readable in [
            "location",
            "etag",
            "www-authenticate",
            "x-request-id",
            "retry-after",
            "idempotency-replayed",
        ] {
            assert!(exposed.contains(readable), "{readable} in {exposed}");
        }
        // An error is readable too: the page can tell a 401 from a network failure.
        let refused = s
            .http
            .get(s.url("/tickets"))
            .header("origin", PAGE)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(header(&refused, "access-control-allow-origin"), Some(PAGE));

        // Another site's page gets no permission.
        let other = preflight(&s, "https://evil.example").await;
        assert_eq!(
            header(&other, "access-control-allow-origin"),
            None,
            "{other:?}"
        );
        // Nor does a listed page on the operations routes, which only the network guards.
        for path in ["/metrics", "/ready", "/health", "/openapi.json", "/"] {
            let read = s
                .http
                .get(s.url(path))
                .header("origin", PAGE)
                .send()
                .await
                .unwrap();
            assert_eq!(header(&read, "access-control-allow-origin"), None, "{path}");
        }
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_origin_with_a_star_and_none_without_the_setting() {
    within(async {
        let any = TestServer::start_with(|c| c.cors_origins = vec!["*".into()]).await;
        let allowed = preflight(&any, "https://anywhere.example").await;
        assert!(allowed.status().is_success(), "{allowed:?}");
        assert_eq!(header(&allowed, "access-control-allow-origin"), Some("*"));
        let metrics = any
            .http
            .get(any.url("/metrics"))
            .header("origin", "https://anywhere.example")
            .send()
            .await
            .unwrap();
        assert_eq!(header(&metrics, "access-control-allow-origin"), None);
        any.stop().await;

        let none = TestServer::start().await;
        let refused = preflight(&none, PAGE).await;
        assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(header(&refused, "access-control-allow-origin"), None);
        none.stop().await;
    })
    .await;
}
