use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn raw(
    s: &TestServer,
    method: Method,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Response {
    let mut r = s.http.request(method, s.url(path)).body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    Response::from(r.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_body_errors_use_the_json_contract() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let t = Some(token.as_str());
        raw(&s, Method::GET, "/no/such/route", t, None, vec![])
            .await
            .assert_error(StatusCode::NOT_FOUND, "unknown_route");
        // A long path or query value is not quoted back whole.
        let long = "x".repeat(10_000);
        for (uri, code) in [
            (format!("/tickets/{long}"), "invalid_path"),
            (format!("/tickets?status={long}"), "invalid_query"),
        ] {
            let refused = raw(&s, Method::GET, &uri, t, None, vec![]).await;
            refused.assert_error(StatusCode::BAD_REQUEST, code);
            let message = refused.body["error"]["message"].as_str().unwrap();
            assert!(message.len() < 500, "{code}: {} bytes", message.len());
        }
        // A malformed id names the parameter, in the API's words, not axum's "Invalid URL".
        let refused = raw(&s, Method::GET, "/tickets/not-a-uuid", t, None, vec![]).await;
        refused.assert_error(StatusCode::BAD_REQUEST, "invalid_path");
        let message = refused.body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("path parameter `id` is not valid (")
                && message.ends_with("): `not-a-uuid`"),
            "{message}"
        );
        let wrong_method = raw(&s, Method::DELETE, "/tickets", t, None, vec![]).await;
        wrong_method.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        assert_eq!(wrong_method.headers["allow"], "POST,GET,HEAD");
        assert_eq!(
            wrong_method.body["error"]["message"],
            "this route does not take DELETE: `Allow` lists the methods it takes"
        );
        raw(
            &s,
            Method::POST,
            "/tickets",
            t,
            Some("text/plain"),
            b"{\"title\":\"x\"}".to_vec(),
        )
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
        raw(
            &s,
            Method::POST,
            "/tickets",
            t,
            None,
            b"{\"title\":\"x\"}".to_vec(),
        )
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
        raw(
            &s,
            Method::POST,
            "/tickets",
            t,
            Some("application/json"),
            b"{\"title\":".to_vec(),
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "malformed_json");
        // A compressed body is refused for its coding, not as broken JSON; `identity` is no
        // coding at all.
        for (coding, expected) in [
            ("gzip", StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ("identity, br", StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ("identity", StatusCode::CREATED),
        ] {
            let r = s
                .http
                .post(s.url("/tickets"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .header("content-encoding", coding)
                .body(b"{\"title\":\"encoded\"}".to_vec())
                .send()
                .await
                .unwrap();
            let r = Response::from(r).await;
            if expected == StatusCode::CREATED {
                assert_eq!(r.status, expected, "{coding}: {r:?}");
                continue;
            }
            r.assert_error(expected, "unsupported_media_type");
            let message = r.body["error"]["message"].as_str().unwrap();
            let named = coding.rsplit(", ").next().unwrap();
            assert!(message.contains(named), "{coding}: {message}");
        }
        // JSON is UTF-8: a body in another charset is refused, naming it (it was read as
        // UTF-8); so is a media type with nothing before `+json`.
        for (content_type, expected) in [
            (
                "application/json; charset=utf-16",
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                "application/json; charset=\"latin1\"",
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            ("application/+json", StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ("application/json; charset=UTF-8", StatusCode::CREATED),
            (
                "application/merge-patch+json; charset=\"utf-8\"",
                StatusCode::CREATED,
            ),
        ] {
            let r = s
                .http
                .post(s.url("/tickets"))
                .bearer_auth(&token)
                .header("content-type", content_type)
                .body(b"{\"title\":\"charset\"}".to_vec())
                .send()
                .await
                .unwrap();
            let r = Response::from(r).await;
            if expected == StatusCode::CREATED {
                assert_eq!(r.status, expected, "{content_type}: {r:?}");
                continue;
            }
            r.assert_error(expected, "unsupported_media_type");
        }
        // Two `Content-Type` headers, alike or not: refused, not the first taken.
        for second in [
            "text/plain",
            "application/json; charset=latin1",
            "application/json",
        ] {
            let r = s
                .http
                .post(s.url("/tickets"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .header("content-type", second)
                .body(b"{\"title\":\"two types\"}".to_vec())
                .send()
                .await
                .unwrap();
            let r = Response::from(r).await;
            r.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
            assert_eq!(
                r.body["error"]["message"], "send one `Content-Type` header, not several",
                "{second}: {r:?}"
            );
        }
        // A transfer coding other than chunked: hyper takes off the chunking, and the body
        // was read as JSON whatever the label said.
        {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let addr = s
                .url("")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned();
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let body = b"{\"title\":\"coded\"}";
            let request = format!(
                "POST /tickets HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\
                 Connection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                body.len(),
                String::from_utf8_lossy(body)
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.unwrap();
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");
            assert!(answer.contains("gzip"), "{answer}");
        }
        raw(
            &s,
            Method::POST,
            "/tickets",
            t,
            Some("application/json"),
            b"".to_vec(),
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "malformed_json");
        raw(
            &s,
            Method::POST,
            "/tickets",
            t,
            Some("application/json; charset=utf-8"),
            b"{\"title\": null}".to_vec(),
        )
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
        raw(
            &s,
            Method::POST,
            "/tickets",
            t,
            Some("application/json"),
            vec![0xff, 0xfe, 0x00],
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "malformed_json");
        // What the parser refused is quoted, but not in full: a 100 KB field name or value
        // came back whole in the error.
        let long = "n".repeat(100_000);
        for body in [
            format!(r#"{{"title":"x","{long}":1}}"#),
            format!(r#"{{"title":"x","priority":"{long}"}}"#),
        ] {
            let refused = raw(
                &s,
                Method::POST,
                "/tickets",
                t,
                Some("application/json"),
                body.into_bytes(),
            )
            .await;
            refused.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
            let message = refused.body["error"]["message"].as_str().unwrap();
            assert!(
                message.len() < 500 && message.contains("[… cut …]"),
                "{message}"
            );
            assert!(message.contains("line 1 column"), "where it is: {message}");
        }
        let (status, body) = s.oversize(&Method::POST, "/tickets", Some(&token)).await;
        assert_eq!(status, 413, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "payload_too_large");
        // Unauthenticated requests are 401 before anything else.
        raw(
            &s,
            Method::POST,
            "/tickets",
            None,
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        s.stop().await;
    })
    .await;
}

/// A bounded, seeded run of garbage: odd paths, methods, content types and bodies. Whatever the
/// input, the answer is a JSON error or a success, never a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_yields_a_server_error() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let id = s.ticket(&token, "target").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let paths = [
            "/tickets".to_owned(),
            format!("/tickets/{id}"),
            format!("/tickets/{id}/comments"),
            format!("/tickets/{id}/assign"),
            format!("/tickets/{id}/close"),
            format!("/tickets/{id}/history"),
            "/tickets/%00".to_owned(),
            "/tickets/..%2F..%2Fetc".to_owned(),
            "/auth/login".to_owned(),
            "/auth/register".to_owned(),
            "/tickets?limit=%FF".to_owned(),
            "/tickets?cursor=%00%00".to_owned(),
            "/tickets/stats".to_owned(),
            format!("/tickets/{id}x"),
            "/auth/me".to_owned(),
        ];
        let bodies: Vec<Vec<u8>> = vec![
            b"null".to_vec(),
            b"[]".to_vec(),
            b"\"str\"".to_vec(),
            b"{\"title\": {}}".to_vec(),
            b"{\"body\": 1e999}".to_vec(),
            b"{\"assignee_id\": \"nope\"}".to_vec(),
            b"{\"expected_version\": -1, \"body\": \"x\"}".to_vec(),
            b"{\"expected_version\": 1.5, \"body\": \"x\"}".to_vec(),
            b"{\"email\": [], \"password\": {}}".to_vec(),
            "{\"title\": \"\u{0}\u{202e}\"}".as_bytes().to_vec(),
            vec![b'{'; 5000],
            b"{\"a\":".repeat(300),
        ];
        let methods = [Method::GET, Method::POST, Method::PUT, Method::PATCH];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..200 {
            let path = &paths[next(paths.len())];
            let method = methods[next(methods.len())].clone();
            let body = bodies[next(bodies.len())].clone();
            let with_token = next(4) != 0;
            let r = raw(
                &s,
                method.clone(),
                path,
                with_token.then_some(token.as_str()),
                Some("application/json"),
                body.clone(),
            )
            .await;
            assert!(
                !r.status.is_server_error(),
                "{method} {path} with {:?} gave {r:?}",
                String::from_utf8_lossy(&body[..body.len().min(60)])
            );
            if !r.status.is_success() {
                assert!(
                    r.body["error"]["code"].is_string(),
                    "{method} {path}: {r:?}"
                );
            }
        }
        s.stop().await;
    })
    .await;
}

/// JSON may carry U+0000 (`"\u0000"`), which Postgres text cannot store: every text field
/// refuses it with 422 naming the field, and a login with it is just wrong credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_refused_not_stored() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let (agent, _) = s.agent().await;
        let id = s.ticket(&token, "target").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let nul = "a\u{0}b";
        let refused = [
            (
                "/tickets".to_owned(),
                &token,
                json!({ "title": nul }),
                "title",
            ),
            (
                "/tickets".to_owned(),
                &token,
                json!({ "title": "t", "description": nul }),
                "description",
            ),
            (
                format!("/tickets/{id}/comments"),
                &token,
                json!({ "body": nul }),
                "body",
            ),
            (
                format!("/tickets/{id}/close"),
                &agent,
                json!({ "resolution": nul }),
                "resolution",
            ),
        ];
        for (path, token, body, field) in refused {
            let r = s.post(&path, token, body).await;
            r.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
            assert_eq!(r.body["error"]["details"]["field"], field, "{r:?}");
        }
        let r = s
            .send(
                Method::POST,
                "/auth/register",
                None,
                Some(json!({ "email": email("nul"), "password": PASSWORD, "display_name": nul })),
            )
            .await;
        r.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(r.body["error"]["details"]["field"], "display_name");
        s.send(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({ "email": nul, "password": "x" })),
        )
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
        // Nothing was changed.
        let ticket = s.get(&format!("/tickets/{id}"), &token).await;
        assert_eq!(ticket.body["version"], 1, "{ticket:?}");
        s.stop().await;
    })
    .await;
}

/// A field the API does not know is refused, not dropped: a misspelled `expected_version`
/// would otherwise turn the version check off without the client knowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_refused_not_ignored() {
    within(async {
        let s = TestServer::start().await;
        let (agent, _) = s.agent().await;
        let ticket = s.ticket(&agent, "Printer on fire").await;
        let id = ticket["id"].as_str().unwrap();
        let close = s
            .post(
                &format!("/tickets/{id}/close"),
                &agent,
                json!({"expected_versoin": 7}),
            )
            .await;
        close.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
        assert!(
            close.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("expected_versoin"),
            "{}",
            close.body
        );
        let after = s.get(&format!("/tickets/{id}"), &agent).await;
        assert_eq!(after.body["status"], "open", "nothing changed");
        // An array is no object, though serde would read a struct's fields from one in order.
        let (_, customer_id) = s.customer().await;
        for (path, body) in [
            (format!("/tickets/{id}/close"), json!([])),
            (
                format!("/tickets/{id}/assign"),
                json!([customer_id.as_str()]),
            ),
            ("/tickets".to_owned(), json!(["Printer on fire"])),
        ] {
            let refused = s.post(&path, &agent, body).await;
            refused.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
            let message = refused.body["error"]["message"].as_str().unwrap();
            assert!(message.contains("must be a JSON object"), "{message}");
        }
        let after = s.get(&format!("/tickets/{id}"), &agent).await;
        assert_eq!(after.body["status"], "open", "nothing changed");
        assert_eq!(after.body["version"], 1, "nothing changed");
        // A broken array is still broken JSON.
        raw(
            &s,
            Method::POST,
            &format!("/tickets/{id}/close"),
            Some(&agent),
            Some("application/json"),
            b"[1,".to_vec(),
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "malformed_json");
        s.post(
            "/tickets",
            &agent,
            json!({"title": "x", "priorty": "urgent"}),
        )
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
        s.send(
            Method::POST,
            "/auth/register",
            None,
            Some(json!({"email": "u@example.com", "password": "correct horse", "admin": true})),
        )
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
        s.stop().await;
    })
    .await;
}
