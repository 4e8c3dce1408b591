//! Every signed-in user's commands and queries share one token bucket
//! (`HELPDESK_USER_REQUESTS_PER_SECOND`, `HELPDESK_USER_REQUEST_BURST`): past it a request
//! gets 429 `rate_limited` with `Retry-After`, and nothing of it runs; other users, and the
//! routes before sign-in, are not held back; the bucket refills with the server's clock.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_past_its_request_rate_gets_429_and_others_do_not() {
    within(async {
        let s = TestServer::start_with(|config| {
            config.user_requests_per_second = 1;
            config.user_request_burst = 3;
        })
        .await;
        let (alice, _) = s.customer().await;
        s.ticket(&alice, "first").await;
        for _ in 0..2 {
            assert_eq!(s.get("/tickets", &alice).await.status, StatusCode::OK);
        }
        // The burst is spent, by a command and queries alike.
        let refused = s.get("/tickets", &alice).await;
        refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        assert_eq!(refused.headers["retry-after"], "1", "{refused:?}");
        assert_eq!(refused.body["error"]["details"]["retry_after"], 1);
        let refused = s
            .post("/tickets", &alice, json!({ "title": "second" }))
            .await;
        refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");

        // Another user, and signing in (no user yet), are not held back.
        let (bob, _) = s.customer().await;
        assert_eq!(s.get("/tickets", &bob).await.status, StatusCode::OK);

        // A second later, alice has one request again; the refused command ran nothing.
        s.clock.advance(Duration::from_secs(1));
        let page = s.get("/tickets", &alice).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        assert_eq!(ids(&page.body).len(), 1, "only the first ticket: {page:?}");
        s.get("/tickets", &alice)
            .await
            .assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        s.stop().await;
    })
    .await;
}

/// The next frame that is not an event: the ticket's `TicketOpened` may still be on its way
/// when the subscription goes live, and arrive between the answers.
async fn answer(
    ws: &mut crate::websocket_clients_get_the_ticket_events_they_may_see::Ws,
) -> serde_json::Value {
    loop {
        let frame = crate::websocket_clients_get_the_ticket_events_they_may_see::next(ws).await;
        if frame["type"] != "event" {
            return frame;
        }
    }
}

/// A WebSocket subscribe to a ticket asks the bus whether the user may see it, and counts
/// against the same limit: past it the client gets an error frame saying the user made too
/// many requests (not that the ticket could not be read), and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_subscribe_past_the_limit_is_refused_and_the_socket_stays_open() {
    use crate::websocket_clients_get_the_ticket_events_they_may_see::{connect, send};
    within(async {
        let s = TestServer::start_with(|config| {
            config.user_requests_per_second = 1;
            config.user_request_burst = 2;
        })
        .await;
        let (alice, _) = s.customer().await;
        let id = s.ticket(&alice, "watched").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let topic = format!("ticket:{id}");
        let mut ws = connect(&s, &alice).await;
        send(&mut ws, json!({ "type": "subscribe", "topic": topic })).await;
        assert_eq!(
            answer(&mut ws).await,
            json!({ "type": "subscribed", "topic": topic })
        );
        send(&mut ws, json!({ "type": "unsubscribe", "topic": topic })).await;
        assert_eq!(answer(&mut ws).await["type"], "unsubscribed");
        send(&mut ws, json!({ "type": "subscribe", "topic": topic })).await;
        let refused = answer(&mut ws).await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["code"], "unavailable", "{refused}");
        assert!(
            refused["message"]
                .as_str()
                .is_some_and(|m| m.contains("too many requests")),
            "{refused}"
        );
        send(&mut ws, json!({ "type": "ping" })).await;
        assert_eq!(
            answer(&mut ws).await["type"],
            "pong",
            "the socket stays open"
        );
        s.clock.advance(std::time::Duration::from_secs(1));
        send(&mut ws, json!({ "type": "subscribe", "topic": topic })).await;
        assert_eq!(
            answer(&mut ws).await,
            json!({ "type": "subscribed", "topic": topic })
        );
        s.stop().await;
    })
    .await;
}
