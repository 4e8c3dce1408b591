use crate::support::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;

async fn post_with_key(
    s: &TestServer,
    path: &str,
    token: &str,
    key: &str,
    body: Value,
) -> Response {
    let r = s
        .http
        .post(s.url(path))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    Response::from(r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_returns_the_same_response_without_a_second_effect() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let first = post_with_key(&s, "/tickets", &token, "k-1", json!({ "title": "once" })).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let again = post_with_key(&s, "/tickets", &token, "k-1", json!({ "title": "once" })).await;
        assert_eq!(
            (again.status, &again.body),
            (StatusCode::CREATED, &first.body)
        );
        let list = s.get("/tickets", &token).await;
        assert_eq!(
            list.body["items"].as_array().unwrap().len(),
            1,
            "one ticket only"
        );

        let id = first.body["id"].as_str().unwrap();
        // The replay names the ticket too, though the record keeps only status and body.
        for answer in [&first, &again] {
            assert_eq!(
                answer.headers.get("location").map(|l| l.to_str().unwrap()),
                Some(format!("/tickets/{id}").as_str())
            );
        }
        let c1 = post_with_key(
            &s,
            &format!("/tickets/{id}/comments"),
            &token,
            "k-2",
            json!({ "body": "hello" }),
        )
        .await;
        let c2 = post_with_key(
            &s,
            &format!("/tickets/{id}/comments"),
            &token,
            "k-2",
            json!({ "body": "hello" }),
        )
        .await;
        assert_eq!((c2.status, &c2.body), (StatusCode::CREATED, &c1.body));
        assert_eq!(
            s.get(&format!("/tickets/{id}"), &token).await.body["version"],
            2
        );

        let reused = post_with_key(
            &s,
            "/tickets",
            &token,
            "k-1",
            json!({ "title": "different" }),
        )
        .await;
        reused.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");

        // Keys belong to their user: another user's same key is another key.
        let (other, _) = s.customer().await;
        let theirs = post_with_key(&s, "/tickets", &other, "k-1", json!({ "title": "once" })).await;
        assert_eq!(theirs.status, StatusCode::CREATED);
        assert_ne!(theirs.body["id"], first.body["id"]);

        // A failed request is not stored: fixing it under the same key works.
        let bad = post_with_key(&s, "/tickets", &token, "k-3", json!({ "title": "" })).await;
        bad.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        let fixed = post_with_key(&s, "/tickets", &token, "k-3", json!({ "title": "fixed" })).await;
        assert_eq!(fixed.status, StatusCode::CREATED, "{fixed:?}");
        assert_eq!(fixed.body["title"], "fixed");
        assert_ne!(fixed.body["id"], first.body["id"], "a new ticket");
        let mine = s.get("/tickets", &token).await;
        let mut titles: Vec<&str> = mine.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["title"].as_str().unwrap())
            .collect();
        titles.sort();
        assert_eq!(titles, ["fixed", "once"], "{mine:?}");
        for bad_key in ["k".repeat(256), "a b".into(), "a\tb".into()] {
            post_with_key(&s, "/tickets", &token, &bad_key, json!({ "title": "x" }))
                .await
                .assert_error(StatusCode::BAD_REQUEST, "invalid_idempotency_key");
        }

        // Keys live at least 24 hours.
        s.clock
            .advance(std::time::Duration::from_secs(24 * 3600 - 1));
        // The token has expired by now; the same user logs in again.
        let user_id = first.body["reporter_id"].as_str().unwrap().to_owned();
        let token = s.token_of(&user_id).await;
        let late = post_with_key(&s, "/tickets", &token, "k-1", json!({ "title": "once" })).await;
        assert_eq!(late.body, first.body);
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_the_work_once_and_share_its_response() {
    within(async {
        let s = Arc::new(TestServer::start().await);
        let (token, _) = s.customer().await;
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (s, token) = (s.clone(), token.clone());
                tokio::spawn(async move {
                    post_with_key(&s, "/tickets", &token, "same", json!({ "title": "dup" })).await
                })
            })
            .collect();
        let mut bodies = Vec::new();
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
            bodies.push(r.body);
        }
        assert!(
            bodies.windows(2).all(|w| w[0] == w[1]),
            "every duplicate got the first response"
        );
        assert_eq!(
            s.get("/tickets", &token).await.body["items"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        Arc::into_inner(s).unwrap().stop().await;
    })
    .await;
}

/// More concurrent idempotent changes than the database pool has connections (10): each
/// command holds one connection from its claim to its commit, and reads its ticket (and, to
/// assign, the assignee's role) on that connection, so none waits for a second one and all
/// complete. The pool is Postgres's (`HELPDESK_TEST_BACKEND=postgres`); in memory there is
/// none, and the test only shows that the changes all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_concurrent_idempotent_changes_than_pool_connections_all_complete() {
    within(async {
        let s = Arc::new(TestServer::start().await);
        let (token, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let mut ids = Vec::new();
        for i in 0..16 {
            ids.push(
                s.ticket(&token, &format!("pool {i}")).await["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        let changes = [
            (
                "comments",
                token.clone(),
                json!({ "body": "hi" }),
                StatusCode::CREATED,
            ),
            (
                "assign",
                agent.clone(),
                json!({ "assignee_id": agent_id }),
                StatusCode::OK,
            ),
        ];
        for (route, token, body, expected) in changes {
            let tasks: Vec<_> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let (s, token, body) = (s.clone(), token.clone(), body.clone());
                    let (path, key) = (format!("/tickets/{id}/{route}"), format!("{route}-{i}"));
                    tokio::spawn(async move { post_with_key(&s, &path, &token, &key, body).await })
                })
                .collect();
            for t in tasks {
                let r = t.await.unwrap();
                assert_eq!(r.status, expected, "{route}: {r:?}");
            }
        }
        // Stopped before its schema is dropped (the tasks holding it are done).
        Arc::into_inner(s)
            .expect("no task holds the server any more")
            .stop()
            .await;
    })
    .await;
}

/// Writers racing on one ticket, each with a key of its own and no `expected_version`: a
/// command that meets another's commit is retried with its claim, so each lands once (all
/// 201, the ticket one version per comment, each comment once), and each key sent again
/// replays its own answer, not another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_writers_racing_on_one_ticket_each_land_once() {
    within(async {
        const WRITERS: usize = 12;
        let s = Arc::new(TestServer::start().await);
        let (token, _) = s.customer().await;
        let ticket = s.ticket(&token, "raced").await;
        let id = ticket["id"].as_str().unwrap().to_owned();
        let path = format!("/tickets/{id}/comments");
        let comment = |i: usize| json!({ "body": format!("comment {i}") });
        let tasks: Vec<_> = (0..WRITERS)
            .map(|i| {
                let (s, token, path) = (s.clone(), token.clone(), path.clone());
                tokio::spawn(async move {
                    post_with_key(&s, &path, &token, &format!("race-{i}"), comment(i)).await
                })
            })
            .collect();
        let mut first = Vec::new();
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
            first.push(r);
        }
        let read = s.get(&format!("/tickets/{id}"), &token).await;
        assert_eq!(read.body["version"], json!(1 + WRITERS), "{read:?}");
        let mut bodies: Vec<String> = read.body["comments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["body"].as_str().unwrap().to_owned())
            .collect();
        bodies.sort();
        let mut expected: Vec<String> = (0..WRITERS).map(|i| format!("comment {i}")).collect();
        expected.sort();
        assert_eq!(bodies, expected, "each comment once");
        for (i, answer) in first.iter().enumerate() {
            let again = post_with_key(&s, &path, &token, &format!("race-{i}"), comment(i)).await;
            assert_eq!(
                (again.status, &again.body),
                (StatusCode::CREATED, &answer.body),
                "key race-{i} replays its own answer"
            );
        }
        let read = s.get(&format!("/tickets/{id}"), &token).await;
        assert_eq!(
            read.body["version"],
            json!(1 + WRITERS),
            "replays changed nothing"
        );
        Arc::into_inner(s)
            .expect("no task holds the server any more")
            .stop()
            .await;
    })
    .await;
}

/// The API description says what the server checks: 1 to 255 visible ASCII characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_describes_the_key_as_visible_ascii() {
    within(async {
        let s = TestServer::start().await;
        let api = s
            .send(reqwest::Method::GET, "/openapi.json", None, None)
            .await;
        assert_eq!(api.status, StatusCode::OK, "{api:?}");
        for (path, method) in [
            ("/tickets", "post"),
            ("/tickets/{id}/assign", "post"),
            ("/tickets/{id}/comments", "post"),
            ("/tickets/{id}/close", "post"),
        ] {
            let params = api.body["paths"][path][method]["parameters"]
                .as_array()
                .unwrap_or_else(|| panic!("{path} {method}: {}", api.body));
            let key = params
                .iter()
                .find(|p| p["name"] == "Idempotency-Key")
                .unwrap_or_else(|| panic!("{path} {method}"));
            assert_eq!(key["schema"]["pattern"], "^[!-~]{1,255}$", "{key}");
            // The key's own answers are among the operation's.
            let responses = &api.body["paths"][path][method]["responses"];
            for (status, code) in [
                ("400", "invalid_idempotency_key"),
                ("422", "idempotency_key_reused"),
                ("409", "idempotency_key_in_use"),
            ] {
                let description = responses[status]["description"]
                    .as_str()
                    .unwrap_or_default();
                assert!(
                    description.contains(code),
                    "{path} {method} {status}: {responses}"
                );
            }
        }
        // The pattern is the server's check: a key with a space is refused, one of every
        // other visible character is not.
        let (token, _) = s.customer().await;
        let spaced = post_with_key(&s, "/tickets", &token, "a b", json!({ "title": "t" })).await;
        spaced.assert_error(StatusCode::BAD_REQUEST, "invalid_idempotency_key");
        // Two keys on one request: refused, not stored under one of them.
        let twice = s
            .http
            .post(s.url("/tickets"))
            .bearer_auth(&token)
            .header("idempotency-key", "k-a")
            .header("idempotency-key", "k-b")
            .json(&json!({ "title": "t" }))
            .send()
            .await
            .unwrap();
        let twice = Response::from(twice).await;
        twice.assert_error(StatusCode::BAD_REQUEST, "invalid_idempotency_key");
        // The key is checked before the body is read: a bad key is reported as such whatever
        // the body holds (here not JSON at all).
        let id = s.ticket(&token, "keyed").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        for path in ["/tickets".to_owned(), format!("/tickets/{id}/comments")] {
            let garbled = s
                .http
                .post(s.url(&path))
                .bearer_auth(&token)
                .header("idempotency-key", "a b")
                .header("content-type", "application/json")
                .body("{not json")
                .send()
                .await
                .unwrap();
            Response::from(garbled)
                .await
                .assert_error(StatusCode::BAD_REQUEST, "invalid_idempotency_key");
        }
        let message = twice.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("one Idempotency-Key"), "{twice:?}");
        for key in ["k-a", "k-b"] {
            let fresh = post_with_key(&s, "/tickets", &token, key, json!({ "title": key })).await;
            assert_eq!(
                fresh.status,
                StatusCode::CREATED,
                "{key} was not used: {fresh:?}"
            );
            assert!(
                fresh.headers.get("idempotency-replayed").is_none(),
                "{fresh:?}"
            );
        }
        let visible: String = ('!'..='~').collect();
        let ok = post_with_key(&s, "/tickets", &token, &visible, json!({ "title": "t" })).await;
        assert_eq!(ok.status, StatusCode::CREATED, "{ok:?}");
        s.stop().await;
    })
    .await;
}
