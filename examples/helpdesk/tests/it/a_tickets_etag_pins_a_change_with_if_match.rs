//! Optimistic concurrency the HTTP way, beside `expected_version`: every answer with a ticket
//! (or a comment and the ticket's version) names the version in `ETag`; `If-Match` with it
//! pins a change, and a stale one is 412 `precondition_failed`.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `POST path` with `If-Match: if_match` (when given) and `body`.
async fn post_if_match(
    s: &TestServer,
    token: &str,
    path: &str,
    if_match: Option<&str>,
    body: Value,
) -> (Response, Option<String>) {
    let mut request = s.http.post(s.url(path)).bearer_auth(token).json(&body);
    if let Some(tag) = if_match {
        request = request.header("if-match", tag);
    }
    let answer = request.send().await.unwrap();
    let etag = answer
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (Response::from(answer).await, etag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_pinned_by_if_match_lands_and_a_stale_one_is_412() {
    within(async {
        let s = TestServer::start_on(Backend::from_env().await, |_| {}).await;
        let (customer, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let (opened, etag) =
            post_if_match(&s, &customer, "/tickets", None, json!({ "title": "etag" })).await;
        assert_eq!(opened.status, StatusCode::CREATED, "{opened:?}");
        assert_eq!(etag.as_deref(), Some("\"1\""));
        let id = opened.body["id"].as_str().unwrap().to_owned();

        let read = s
            .http
            .get(s.url(&format!("/tickets/{id}")))
            .bearer_auth(&agent)
            .send()
            .await
            .unwrap();
        assert_eq!(read.headers()["etag"], "\"1\"");

        let comments = format!("/tickets/{id}/comments");
        let (commented, etag) = post_if_match(
            &s,
            &agent,
            &comments,
            Some("\"1\""),
            json!({ "body": "on it" }),
        )
        .await;
        assert_eq!(commented.status, StatusCode::CREATED, "{commented:?}");
        assert_eq!(
            etag.as_deref(),
            Some("\"2\""),
            "the version after the comment"
        );

        // Stale: another change came first.
        let close = format!("/tickets/{id}/close");
        let (stale, _) = post_if_match(&s, &agent, &close, Some("\"1\""), json!({})).await;
        stale.assert_error(StatusCode::PRECONDITION_FAILED, "precondition_failed");
        assert_eq!(
            stale.body["error"]["details"]["current_version"], 2,
            "{stale:?}"
        );
        let message = stale.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("If-Match \"2\""), "{message}");

        // What If-Match cannot be: a weak tag, a list, one at odds with expected_version.
        let assign = format!("/tickets/{id}/assign");
        for (tag, body) in [
            ("W/\"2\"", json!({ "assignee_id": agent_id })),
            ("\"2\", \"3\"", json!({ "assignee_id": agent_id })),
            ("2", json!({ "assignee_id": agent_id })),
            (
                "\"2\"",
                json!({ "assignee_id": agent_id, "expected_version": 1 }),
            ),
        ] {
            let (refused, _) = post_if_match(&s, &agent, &assign, Some(tag), body).await;
            refused.assert_error(StatusCode::BAD_REQUEST, "invalid_if_match");
        }
        // `*` pins nothing; alike with expected_version is taken.
        let (assigned, etag) = post_if_match(
            &s,
            &agent,
            &assign,
            Some("\"2\""),
            json!({ "assignee_id": agent_id, "expected_version": 2 }),
        )
        .await;
        assert_eq!(assigned.status, StatusCode::OK, "{assigned:?}");
        assert_eq!(etag.as_deref(), Some("\"3\""));
        // With an Idempotency-Key: the replay names the same version; the key with another
        // If-Match stands for another request.
        let keyed = |tag: &'static str| {
            let (s, agent, comments) = (&s, agent.clone(), comments.clone());
            async move {
                let answer = s
                    .http
                    .post(s.url(&comments))
                    .bearer_auth(&agent)
                    .header("if-match", tag)
                    .header("idempotency-key", "etag-k1")
                    .json(&json!({ "body": "once" }))
                    .send()
                    .await
                    .unwrap();
                let header = |name: &str| {
                    answer
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let (etag, replayed) = (header("etag"), header("idempotency-replayed"));
                (Response::from(answer).await, etag, replayed)
            }
        };
        let (first, etag, _) = keyed("\"3\"").await;
        assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
        assert_eq!(etag.as_deref(), Some("\"4\""));
        let (again, etag, replayed) = keyed("\"3\"").await;
        assert_eq!(again.status, StatusCode::CREATED, "{again:?}");
        assert_eq!(
            etag.as_deref(),
            Some("\"4\""),
            "the replay names the same version"
        );
        assert_eq!(replayed.as_deref(), Some("true"));
        let (other, _, _) = keyed("\"4\"").await;
        other.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
        let (closed, etag) = post_if_match(&s, &agent, &close, Some("*"), json!({})).await;
        assert_eq!(closed.status, StatusCode::OK, "{closed:?}");
        assert_eq!(etag.as_deref(), Some("\"5\""));
        s.stop().await;
    })
    .await;
}
