use crate::support::*;
use reqwest::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_metrics_openapi_and_the_home_page_answer() {
    within(async {
        let s = TestServer::start().await;
        let health = s.send(Method::GET, "/health", None, None).await;
        assert_eq!(
            (health.status, health.body["status"].as_str()),
            (StatusCode::OK, Some("ok"))
        );
        let ready = s.send(Method::GET, "/ready", None, None).await;
        assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
        assert_eq!(ready.body["status"], "ready");
        assert_eq!(
            ready.body["components"][s.backend.critical_component()]["status"],
            "healthy"
        );

        let (token, _) = s.customer().await;
        let id = s.ticket(&token, "metrics").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        s.get(&format!("/tickets/{id}"), &token).await;
        // Refused by the body limit before any handler: counted all the same.
        let oversize = s
            .http
            .post(s.url("/auth/register"))
            .header("content-type", "application/json")
            // The server answers before reading the body, then drops the connection: keep it
            // out of the client's pool, or the next request may go out on it and fail.
            .header("connection", "close")
            .body(vec![b' '; helpdesk::BODY_LIMIT + 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(oversize.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let metrics = s.metrics().await;
        assert!(metrics.contains("http_requests_total"), "{metrics}");
        assert!(
            metrics.contains("route=\"/tickets/{id}\""),
            "route templates, not raw paths"
        );
        assert!(!metrics.contains(&id), "no ids in labels");
        assert!(
            metrics.lines().any(|l| l.starts_with("http_requests_total")
                && l.contains("route=\"/auth/register\"")
                && l.contains("status=\"413\"")),
            "answers of the outer layers are counted: {metrics}"
        );
        assert!(
            metrics.contains("cqrs_dispatch_total"),
            "command and query dispatches are counted"
        );
        assert!(metrics.contains("message=\"tickets.open\""));
        assert!(metrics.contains("cqrs_dispatch_duration_seconds"));
        // Events published (by the relay) and handled (by the stats projection), by type.
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(5),
            "event metrics",
            || async {
                let text = s
                    .http
                    .get(s.url("/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                (text.contains("cqrs_events_published_total")
                    && text.contains("event_type=\"TicketOpened\"")
                    && text.contains("cqrs_events_handled_total"))
                .then_some(())
            },
        )
        .await;

        let api = s.send(Method::GET, "/openapi.json", None, None).await;
        assert_eq!(api.status, StatusCode::OK);
        assert!(api.body["openapi"].as_str().unwrap().starts_with("3."));
        for (path, method) in [
            ("/auth/register", "post"),
            ("/auth/login", "post"),
            ("/auth/me", "get"),
            ("/tickets", "post"),
            ("/tickets", "get"),
            ("/tickets/{id}", "get"),
            ("/tickets/{id}/assign", "post"),
            ("/tickets/{id}/comments", "post"),
            ("/tickets/{id}/close", "post"),
            ("/tickets/{id}/history", "get"),
            ("/tickets/stats", "get"),
            ("/health", "get"),
            ("/ready", "get"),
            ("/metrics", "get"),
            ("/ws", "get"),
        ] {
            let operation = &api.body["paths"][path][method];
            assert!(operation.is_object(), "{method} {path} is documented");
            // Bodies refuse unknown fields, and the spec says so.
            let body = &operation["requestBody"]["content"]["application/json"]["schema"];
            if body.is_object() {
                assert_eq!(body["additionalProperties"], false, "{method} {path}");
            }
        }
        let home = s.http.get(s.url("/")).send().await.unwrap();
        assert!(
            home.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        assert!(home.text().await.unwrap().contains("Helpdesk"));

        let id_header = s
            .http
            .get(s.url("/health"))
            .header("x-request-id", "abc-123")
            .send()
            .await
            .unwrap();
        assert_eq!(
            id_header.headers()["x-request-id"],
            "abc-123",
            "request ids propagate"
        );
        let generated = s.http.get(s.url("/health")).send().await.unwrap();
        assert!(
            generated.headers().get("x-request-id").is_some(),
            "and are made when missing"
        );
        s.stop().await;
    })
    .await;
}
