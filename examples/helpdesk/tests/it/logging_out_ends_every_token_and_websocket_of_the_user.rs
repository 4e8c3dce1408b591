//! `POST /auth/logout` ends every token of the user's issued until then, and closes the
//! user's WebSocket connections, on every instance; nobody else's.

use crate::support::*;
use crate::websocket_clients_get_the_ticket_events_they_may_see::{Ws, connect, next, subscribe};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const LOGGED_OUT: &str = "the token was ended by a logout; log in again";

/// The close frame `ws` gets next (pings skipped), within 15 s.
async fn closed(ws: &mut Ws) -> CloseFrame {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Close(Some(frame))))) => return frame,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// `ws`, `token`'s, is open and gets the events of the ticket `token` opens now.
async fn still_served(s: &TestServer, token: &str, ws: &mut Ws) {
    let ticket = s.ticket(token, "still here").await;
    let frame = next(ws).await;
    assert_eq!(frame["event"]["ticket_id"], ticket["id"], "{frame}");
}

/// `ws` is closed with 1008 `credentials revoked`.
async fn closed_as_revoked(ws: &mut Ws) {
    let frame = closed(ws).await;
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "credentials revoked");
}

/// A handshake with `token` is refused with 401.
async fn handshake_refused(s: &TestServer, token: &str) {
    let url = format!("{}/ws?token={token}", s.base.replace("http://", "ws://"));
    let refused = tokio_tungstenite::connect_async(url).await;
    assert!(
        matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == StatusCode::UNAUTHORIZED),
        "{refused:?}"
    );
}

#[track_caller]
fn assert_logged_out(r: &Response) {
    r.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(r.body["error"]["message"], LOGGED_OUT, "{r:?}");
}

async fn log_out(s: &TestServer, token: &str) -> Response {
    s.send(Method::POST, "/auth/logout", Some(token), None)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_ends_the_users_tokens_and_websockets_and_nobody_elses() {
    within(async {
        let s = TestServer::start().await;
        let (ada, ada_id) = s.customer().await;
        let ada_elsewhere = s.token_of(&ada_id).await;
        let (bob, _) = s.customer().await;
        let mut ada_ws = connect(&s, &ada).await;
        subscribe(&mut ada_ws, "tickets").await;
        let mut bob_ws = connect(&s, &bob).await;
        subscribe(&mut bob_ws, "tickets").await;

        // From the other session: this one's socket closes all the same.
        let r = log_out(&s, &ada_elsewhere).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
        closed_as_revoked(&mut ada_ws).await;

        for token in [&ada, &ada_elsewhere] {
            for path in ["/auth/me", "/tickets"] {
                assert_logged_out(&s.get(path, token).await);
            }
            handshake_refused(&s, token).await;
        }
        assert_logged_out(&log_out(&s, &ada).await);

        // Bob is untouched: his requests and his socket carry on.
        assert_eq!(s.get("/auth/me", &bob).await.status, StatusCode::OK);
        still_served(&s, &bob, &mut bob_ws).await;

        // A new login is a new session, and it ends at the next logout.
        let again = s.token_of(&ada_id).await;
        let me = s.get("/auth/me", &again).await;
        assert_eq!(me.status, StatusCode::OK, "{me:?}");
        let mut again_ws = connect(&s, &again).await;
        subscribe(&mut again_ws, "tickets").await;
        assert_eq!(log_out(&s, &again).await.status, StatusCode::NO_CONTENT);
        closed_as_revoked(&mut again_ws).await;
        assert_logged_out(&s.get("/auth/me", &again).await);
        s.stop().await;
    })
    .await;
}

/// A logout the store counted but whose answer it lost (a 503) has closed the user's sockets
/// all the same: sent again, it finds the token ended (401) and would close nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_whose_answer_the_store_lost_still_closes_the_websockets() {
    within(async {
        let users =
            crate::an_unavailable_store_is_a_503_that_does_not_quote_it::FailingUsers::default();
        let s =
            TestServer::start_with_hooks(Backend::from_env().await, users.hooks(), |_| {}).await;
        let (ada, _) = s.customer().await;
        let mut ws = connect(&s, &ada).await;
        subscribe(&mut ws, "tickets").await;

        users
            .logouts_lost
            .store(true, std::sync::atomic::Ordering::SeqCst);
        log_out(&s, &ada)
            .await
            .assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
        closed_as_revoked(&mut ws).await;
        assert_logged_out(&log_out(&s, &ada).await);
        s.stop().await;
    })
    .await;
}

/// Two instances on one Postgres and Redis: a logout sent to A ends the token on B, and closes
/// the user's socket on B (told over Redis pub/sub).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_one_instance_closes_the_users_websockets_on_the_other() {
    within_for(Duration::from_secs(150), async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let a = TestServer::start_on(backend.shared(), |_| {}).await;
        let b = TestServer::start_on(backend, |_| {}).await;
        let (ada, ada_id) = a.customer().await;
        let (bob, _) = a.customer().await;
        let mut ada_on_b = connect(&b, &ada).await;
        subscribe(&mut ada_on_b, "tickets").await;
        let mut bob_on_b = connect(&b, &bob).await;
        subscribe(&mut bob_on_b, "tickets").await;

        assert_eq!(log_out(&a, &ada).await.status, StatusCode::NO_CONTENT);
        closed_as_revoked(&mut ada_on_b).await;
        assert_logged_out(&b.get("/auth/me", &ada).await);
        handshake_refused(&b, &ada).await;

        still_served(&a, &bob, &mut bob_on_b).await;
        let again = a.token_of(&ada_id).await;
        assert_eq!(b.get("/auth/me", &again).await.status, StatusCode::OK);
        a.stop().await;
        b.stop().await;
    })
    .await;
}

/// A database of a release before logouts were counted (its `users` without `logouts`) gets
/// the column at the next start, its users at 0: their tokens keep working, and a logout
/// ends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_logouts_gets_the_count_and_keeps_its_tokens() {
    within_for(Duration::from_secs(150), async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (database_url, schema) = backend.database().unwrap();
        let old = TestServer::start_on(backend.shared(), |_| {}).await;
        let (ada, _) = old.customer().await;
        old.stop().await;
        // As the release before left it.
        execute(
            &database_url,
            &format!(
                "ALTER TABLE {schema}.users DROP COLUMN logouts; \
                 DELETE FROM {schema}.helpdesk_migrations WHERE name LIKE '%users_logouts'"
            ),
        )
        .await;

        let s = TestServer::start_on(backend, |_| {}).await;
        let me = s.get("/auth/me", &ada).await;
        assert_eq!(me.status, StatusCode::OK, "{me:?}");
        assert_eq!(log_out(&s, &ada).await.status, StatusCode::NO_CONTENT);
        assert_logged_out(&s.get("/auth/me", &ada).await);
        s.stop().await;
    })
    .await;
}

/// A stopped server lets go of every database connection it opened: nothing it holds (its
/// hub, reached by the logout's handler, which the hub reaches through its authorizers) keeps
/// its pool alive. Its connections carry an `application_name` of their own to be counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_lets_go_of_its_database_connections() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (database_url, _) = backend.database().unwrap();
        let name = cqrs_core::testing::test_id("leak");
        let separator = if database_url.contains('?') { '&' } else { '?' };
        let url = format!("{database_url}{separator}application_name={name}");
        let count =
            format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'");
        let s = TestServer::start_on(backend, |config| config.database_url = Some(url)).await;
        let (ada, _) = s.customer().await;
        let mut ws = connect(&s, &ada).await;
        subscribe(&mut ws, "tickets").await;
        assert_eq!(log_out(&s, &ada).await.status, StatusCode::NO_CONTENT);
        closed(&mut ws).await;
        let open = scalar(&database_url, &count).await;
        assert!(
            open > 0,
            "the server's connections are named {name}: {open}"
        );

        s.stop().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let open = scalar(&database_url, &count).await;
            if open == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{open} connection(s) of the stopped server still open after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Runs `sql` (one or more statements) on a connection of its own.
async fn execute(database_url: &str, sql: &str) {
    use cqrs_postgres::sqlx::{self, Connection};
    let mut conn = sqlx::PgConnection::connect(database_url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// One number from `sql`, on a connection of its own.
async fn scalar(database_url: &str, sql: &str) -> i64 {
    use cqrs_postgres::sqlx::{self, Connection};
    let mut conn = sqlx::PgConnection::connect(database_url).await.unwrap();
    let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    n
}
