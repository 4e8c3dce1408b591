use crate::support::*;
use reqwest::{Method, StatusCode};
use std::time::Duration;

fn b64(bytes: &[u8]) -> String {
    // base64url without padding, enough for forging test tokens.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_forged_and_expired_tokens_are_401() {
    within(async {
        let s = TestServer::start().await;
        let (token, id) = s.customer().await;
        assert_eq!(s.get("/auth/me", &token).await.status, StatusCode::OK);

        let payload =
            b64(format!(r#"{{"sub":"{id}","role":"agent","exp":9999999999}}"#).as_bytes());
        let none_alg = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        let hs512 = format!(
            "{}.{payload}.{}",
            b64(br#"{"alg":"HS512","typ":"JWT"}"#),
            b64(&[7; 64])
        );
        let parts: Vec<&str> = token.split('.').collect();
        let elevated = format!("{}.{payload}.{}", parts[0], parts[2]);
        // Expired long ago, and forged: not told as expired.
        let old_payload = b64(format!(r#"{{"sub":"{id}","role":"agent","exp":1}}"#).as_bytes());
        let forged_expired = format!("{}.{old_payload}.{}", parts[0], parts[2]);
        let bad_signature = format!("{}.{}.{}", parts[0], parts[1], b64(&[0; 32]));

        let cases: Vec<(&str, Option<String>)> = vec![
            ("missing", None),
            ("empty bearer", Some("Bearer ".into())),
            ("no scheme", Some(token.clone())),
            ("basic scheme", Some(format!("Basic {token}"))),
            ("garbage", Some("Bearer garbage".into())),
            ("alg none", Some(format!("Bearer {none_alg}"))),
            ("another algorithm", Some(format!("Bearer {hs512}"))),
            ("a forged payload", Some(format!("Bearer {elevated}"))),
            (
                "a forged expired payload",
                Some(format!("Bearer {forged_expired}")),
            ),
            ("a bad signature", Some(format!("Bearer {bad_signature}"))),
            ("non-ascii", Some("Bearer tøken".into())),
        ];
        for (what, header) in cases {
            let mut request = s.http.request(Method::GET, s.url("/auth/me"));
            if let Some(h) = header {
                request = request.header("authorization", h.into_bytes());
            }
            let r = Response::from(request.send().await.unwrap()).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {r:?}");
            r.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
            // Only a token this server signed is told as expired, whatever its `exp` says.
            let message = r.body["error"]["message"].as_str().unwrap();
            assert!(!message.contains("expired"), "{what}: {message}");
        }

        s.clock.advance(Duration::from_secs(3601));
        for path in ["/auth/me", "/tickets"] {
            let r = s.get(path, &token).await;
            r.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
            assert_eq!(
                r.body["error"]["message"], "the token has expired; log in again",
                "{path}"
            );
        }
        s.stop().await;
    })
    .await;
}

/// A well-signed token is only as good as its user here: a token of another server that
/// shares the secret (its user does not exist on this one) is 401 on every route and at the
/// WebSocket handshake, not only on `/auth/me`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_user_does_not_exist_here_is_401_everywhere() {
    within(async {
        let a = TestServer::start().await;
        let b = TestServer::start().await;
        let (from_a, _) = a.agent().await;
        assert_eq!(a.get("/tickets", &from_a).await.status, StatusCode::OK);
        for path in ["/auth/me", "/tickets", "/tickets/stats"] {
            let r = b.get(path, &from_a).await;
            r.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
            assert!(
                r.body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("does not exist"),
                "{path}: {r:?}"
            );
        }
        let opened = b
            .post(
                "/tickets",
                &from_a,
                serde_json::json!({ "title": "from elsewhere" }),
            )
            .await;
        opened.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        let ws = tokio_tungstenite::connect_async(format!(
            "{}/ws?token={from_a}",
            b.base.replace("http://", "ws://")
        ))
        .await;
        match ws {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            }
            other => panic!("the handshake was not refused with 401: {other:?}"),
        }
        a.stop().await;
        b.stop().await;
    })
    .await;
}

/// The role is the user store's, not the token's: an agent demoted in the store is a customer
/// at the next request, with the token it already holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_agent_loses_the_role_with_the_token_it_holds() {
    // On Postgres: the users table is what this test can change from outside the server.
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let Backend::Postgres {
        database_url,
        namespace,
        ..
    } = &backend
    else {
        unreachable!("a Postgres backend")
    };
    within(async {
        let s = TestServer::start_on(backend.clone(), |_| {}).await;
        let (customer, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let ticket = s.ticket(&customer, "printer").await;
        let path = format!("/tickets/{}", ticket["id"].as_str().unwrap());
        assert_eq!(
            s.get(&path, &agent).await.status,
            StatusCode::OK,
            "an agent sees it"
        );
        // A WebSocket opened while still an agent.
        let mut ws =
            crate::websocket_clients_get_the_ticket_events_they_may_see::connect(&s, &agent).await;

        let pool = cqrs_postgres::sqlx::PgPool::connect(database_url)
            .await
            .unwrap();
        cqrs_postgres::sqlx::query(cqrs_postgres::sqlx::AssertSqlSafe(format!(
            "UPDATE {namespace}.users SET role = 'customer' WHERE id = $1"
        )))
        .bind(uuid::Uuid::parse_str(&agent_id).unwrap())
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        s.get(&path, &agent)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
        let me = s.get("/auth/me", &agent).await;
        assert_eq!(me.body["role"], "customer", "{me:?}");
        // The open WebSocket's next subscribe reads the role again.
        let topic = format!("ticket:{}", ticket["id"].as_str().unwrap());
        crate::websocket_clients_get_the_ticket_events_they_may_see::send(
            &mut ws,
            serde_json::json!({ "type": "subscribe", "topic": topic }),
        )
        .await;
        let refused =
            crate::websocket_clients_get_the_ticket_events_they_may_see::next(&mut ws).await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["code"], "forbidden", "{refused}");
        // Nor `tickets`, whose events would be filtered with the handshake's agent role.
        crate::websocket_clients_get_the_ticket_events_they_may_see::send(
            &mut ws,
            serde_json::json!({ "type": "subscribe", "topic": "tickets" }),
        )
        .await;
        let refused =
            crate::websocket_clients_get_the_ticket_events_they_may_see::next(&mut ws).await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
        s.stop().await;
    })
    .await;
}

/// A user row whose `created_at` was set outside the server to a time chrono cannot hold
/// (`infinity`, by hand or a restore) still serves that user: decoding it panicked inside
/// sqlx, a 500 on every request of theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_created_at_infinity_is_still_served() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let (database_url, namespace) = backend.database().expect("a Postgres backend");
    within(async {
        let s = TestServer::start_on(backend.clone(), |_| {}).await;
        let (customer, customer_id) = s.customer().await;
        let pool = cqrs_postgres::sqlx::PgPool::connect(&database_url)
            .await
            .unwrap();
        for at in ["infinity", "-infinity", "294276-12-31Z"] {
            cqrs_postgres::sqlx::query(cqrs_postgres::sqlx::AssertSqlSafe(format!(
                "UPDATE {namespace}.users SET created_at = $2::timestamptz WHERE id = $1"
            )))
            .bind(uuid::Uuid::parse_str(&customer_id).unwrap())
            .bind(at)
            .execute(&pool)
            .await
            .unwrap();
            let me = s.get("/auth/me", &customer).await;
            assert_eq!(me.status, StatusCode::OK, "created at {at}: {me:?}");
        }
        pool.close().await;
        s.stop().await;
    })
    .await;
}
