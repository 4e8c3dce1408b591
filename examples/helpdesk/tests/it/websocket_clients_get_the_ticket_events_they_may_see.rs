use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn connect(s: &TestServer, token: &str) -> Ws {
    let url = format!("{}/ws", s.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .expect("the handshake succeeds")
        .0
}

pub async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// The next JSON text frame (skipping pings), within 15 s: an event crosses the relay and
/// Redis, on a machine that may be loaded.
pub async fn next(ws: &mut Ws) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a frame within 15 s")
            .expect("the socket is open")
            .unwrap();
        match msg {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Nothing arrives before an event published after the ones that should have arrived: `token`
/// opens a ticket, and the next frame must be its `TicketOpened` on `tickets` (which `ws` is
/// subscribed to). Events travel in the store's order, so one that should not have come, or a
/// copy, would come before it: a marker, where a quiet spell would pass on a slow machine.
async fn nothing_before_a_later_event(s: &TestServer, token: &str, ws: &mut Ws) {
    let marker = s.ticket(token, "marker").await;
    let frame = next(ws).await;
    assert_eq!(
        (
            frame["type"].as_str(),
            frame["topic"].as_str(),
            frame["event"]["type"].as_str(),
            frame["event"]["ticket_id"].as_str()
        ),
        (
            Some("event"),
            Some("tickets"),
            Some("TicketOpened"),
            marker["id"].as_str()
        ),
        "the next frame is the later ticket's: {frame}"
    );
}

pub async fn subscribe(ws: &mut Ws, topic: &str) {
    send(ws, json!({ "type": "subscribe", "topic": topic })).await;
    assert_eq!(
        next(ws).await,
        json!({ "type": "subscribed", "topic": topic })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_needs_a_valid_token_in_the_header_or_the_query() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let url = s.url("/ws");
        for (what, request) in [
            ("no token", s.http.get(&url)),
            ("a bad token", s.http.get(&url).bearer_auth("garbage")),
            (
                "a bad query token",
                s.http.get(format!("{url}?token=garbage")),
            ),
        ] {
            let r = Response::from(
                request
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-version", "13")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {r:?}");
            assert_eq!(r.body["error"]["code"], "unauthorized");
        }
        let ws_url = format!("{}?token={token}", url.replace("http://", "ws://"));
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("a query token works");
        send(&mut ws, json!({ "type": "ping" })).await;
        assert_eq!(next(&mut ws).await, json!({ "type": "pong" }));
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_receive_their_own_ticket_events_and_agents_receive_all() {
    within(async {
        let s = TestServer::start().await;
        let (alice, alice_id) = s.customer().await;
        let (bob, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let mut alice_ws = connect(&s, &alice).await;
        let mut agent_ws = connect(&s, &agent).await;
        subscribe(&mut alice_ws, "tickets").await;
        subscribe(&mut agent_ws, "tickets").await;

        let ticket = s.ticket(&alice, "live").await;
        let id = ticket["id"].as_str().unwrap().to_owned();
        s.ticket(&bob, "bob's own").await;
        s.post(
            &format!("/tickets/{id}/assign"),
            &agent,
            json!({ "assignee_id": agent_id }),
        )
        .await;

        let first = next(&mut alice_ws).await;
        assert_eq!(first["type"], "event");
        assert_eq!(first["topic"], "tickets");
        let event = &first["event"];
        assert_eq!(event["type"], "TicketOpened");
        assert_eq!(event["ticket_id"], id);
        assert_eq!(event["version"], 1);
        assert_eq!(event["actor_id"], alice_id);
        assert_eq!(event["data"]["title"], "live");
        assert!(uuid::Uuid::parse_str(event["event_id"].as_str().unwrap()).is_ok());
        assert!(
            chrono::DateTime::parse_from_rfc3339(event["occurred_at"].as_str().unwrap()).is_ok()
        );
        let second = next(&mut alice_ws).await;
        assert_eq!(
            (
                second["event"]["type"].as_str(),
                second["event"]["version"].as_u64()
            ),
            (Some("TicketAssigned"), Some(2))
        );
        // Bob's ticket is not alice's business.
        nothing_before_a_later_event(&s, &alice, &mut alice_ws).await;

        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(
                next(&mut agent_ws).await["event"]["type"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        seen.sort();
        assert_eq!(seen, ["TicketAssigned", "TicketOpened", "TicketOpened"]);
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_ticket_topic_is_authorized_and_events_arrive_in_version_order() {
    within(async {
        let s = TestServer::start().await;
        let (alice, _) = s.customer().await;
        let (bob, _) = s.customer().await;
        let id = s.ticket(&alice, "watched").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let topic = format!("ticket:{id}");

        let mut bob_ws = connect(&s, &bob).await;
        send(&mut bob_ws, json!({ "type": "subscribe", "topic": topic })).await;
        let refused = next(&mut bob_ws).await;
        assert_eq!(
            (refused["type"].as_str(), refused["code"].as_str()),
            (Some("error"), Some("forbidden"))
        );
        send(&mut bob_ws, json!({ "type": "ping" })).await;
        assert_eq!(
            next(&mut bob_ws).await["type"],
            "pong",
            "the connection stays open"
        );

        let mut ws = connect(&s, &alice).await;
        // The ticket's `TicketOpened` may still be on its way and arrive after a subscription
        // is live: frames of version 1 are skipped below.
        send(&mut ws, json!({ "type": "subscribe", "topic": topic })).await;
        send(&mut ws, json!({ "type": "subscribe", "topic": "tickets" })).await;
        let mut confirmed = 0;
        while confirmed < 2 {
            let f = next(&mut ws).await;
            match f["type"].as_str() {
                Some("subscribed") => confirmed += 1,
                Some("event") => assert_eq!(f["event"]["version"], 1, "{f}"),
                _ => panic!("unexpected {f}"),
            }
        }
        for i in 0..5 {
            s.post(
                &format!("/tickets/{id}/comments"),
                &alice,
                json!({ "body": format!("c{i}") }),
            )
            .await;
        }
        // One frame per matching subscription: two per event.
        let mut by_topic: std::collections::HashMap<String, Vec<u64>> = Default::default();
        while by_topic.values().map(Vec::len).sum::<usize>() < 10 {
            let f = next(&mut ws).await;
            let version = f["event"]["version"].as_u64().unwrap();
            if version > 1 {
                by_topic
                    .entry(f["topic"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(version);
            }
        }
        assert_eq!(by_topic[&topic], [2, 3, 4, 5, 6], "version order");
        assert_eq!(by_topic["tickets"], [2, 3, 4, 5, 6]);

        send(&mut ws, json!({ "type": "unsubscribe", "topic": topic })).await;
        assert_eq!(
            next(&mut ws).await,
            json!({ "type": "unsubscribed", "topic": topic })
        );
        s.post(&format!("/tickets/{id}/close"), &alice, json!({}))
            .await;
        let only = next(&mut ws).await;
        assert_eq!(
            (only["topic"].as_str(), only["event"]["type"].as_str()),
            (Some("tickets"), Some("TicketClosed"))
        );
        nothing_before_a_later_event(&s, &alice, &mut ws).await;
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_frames_get_error_frames_and_the_connection_stays_open() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let mut ws = connect(&s, &token).await;
        for frame in [
            "not json".to_owned(),
            json!({ "type": "dance" }).to_string(),
            json!({ "type": "subscribe" }).to_string(),
            json!({ "type": "subscribe", "topic": "weather" }).to_string(),
            json!({ "type": "subscribe", "topic": "ticket:not-a-uuid" }).to_string(),
            // Events are published under the lower-case id only.
            json!({ "type": "subscribe", "topic": "ticket:0190A0B0-0000-7000-8000-000000000000" })
                .to_string(),
            json!({ "type": "subscribe", "topic": "ticket:0190a0b000007000800000000000000" })
                .to_string(),
            json!([1, 2, 3]).to_string(),
        ] {
            ws.send(Message::text(frame.clone())).await.unwrap();
            let answer = next(&mut ws).await;
            assert_eq!(answer["type"], "error", "{frame}: {answer}");
            assert!(
                answer["code"].is_string() && answer["message"].is_string(),
                "{answer}"
            );
        }
        ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
        assert_eq!(next(&mut ws).await["type"], "error");
        send(&mut ws, json!({ "type": "ping" })).await;
        assert_eq!(next(&mut ws).await["type"], "pong");

        // An agent may follow any ticket, but only under the id as the API spells it: an
        // upper-case id would be a live subscription that never receives an event.
        let (agent, _) = s.agent().await;
        let id = s.ticket(&token, "spelled").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut agent_ws = connect(&s, &agent).await;
        let shouting = format!("ticket:{}", id.to_uppercase());
        send(
            &mut agent_ws,
            json!({ "type": "subscribe", "topic": shouting }),
        )
        .await;
        let answer = next(&mut agent_ws).await;
        assert_eq!(
            (answer["type"].as_str(), answer["code"].as_str()),
            (Some("error"), Some("unknown_topic")),
            "{answer}"
        );
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("lower-case, hyphenated UUID")),
            "the refusal says how to spell the id: {answer}"
        );
        subscribe(&mut agent_ws, &format!("ticket:{id}")).await;
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resumes_from_its_last_position_misses_nothing_and_gets_nothing_twice() {
    within(async {
        let s = TestServer::start().await;
        let (alice, _) = s.customer().await;
        let mut ws = connect(&s, &alice).await;
        subscribe(&mut ws, "tickets").await;
        let id = s.ticket(&alice, "resume").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(next(&mut ws).await["event"]["version"], 1);
        s.post(
            &format!("/tickets/{id}/comments"),
            &alice,
            json!({ "body": "one" }),
        )
        .await;
        let seen = next(&mut ws).await;
        assert_eq!(seen["event"]["version"], 2);
        let position = seen["position"]
            .as_str()
            .expect("events carry their position")
            .to_owned();
        drop(ws);

        // Missed while disconnected.
        for body in ["two", "three"] {
            s.post(
                &format!("/tickets/{id}/comments"),
                &alice,
                json!({ "body": body }),
            )
            .await;
        }
        let mut ws = connect(&s, &alice).await;
        send(
            &mut ws,
            json!({ "type": "subscribe", "topic": "tickets", "since": position }),
        )
        .await;
        let mut versions = Vec::new();
        let mut subscribed = false;
        while versions.len() < 3 {
            let f = next(&mut ws).await;
            match f["type"].as_str() {
                Some("subscribed") => subscribed = true,
                Some("event") => {
                    versions.push(f["event"]["version"].as_u64().unwrap());
                    if versions.len() == 2 {
                        // Live again: this one arrives after the replay, exactly once.
                        s.post(&format!("/tickets/{id}/close"), &alice, json!({}))
                            .await;
                    }
                }
                other => panic!("unexpected {other:?}: {f}"),
            }
        }
        assert!(subscribed);
        assert_eq!(versions, [3, 4, 5], "no gap, no duplicate at the seam");
        nothing_before_a_later_event(&s, &alice, &mut ws).await;

        send(
            &mut ws,
            json!({ "type": "subscribe", "topic": "ticket:x", "since": "not-a-position" }),
        )
        .await;
        assert_eq!(next(&mut ws).await["type"], "error");
        s.stop().await;
    })
    .await;
}

/// A customer that resumes on `tickets` gets, of the events it missed, only those of its own
/// tickets: the replay from the store is filtered like the live events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_resuming_gets_none_of_the_other_customers_events() {
    within(async {
        let s = TestServer::start().await;
        let (alice, _) = s.customer().await;
        let (bob, _) = s.customer().await;
        let mut ws = connect(&s, &alice).await;
        subscribe(&mut ws, "tickets").await;
        let mine = s.ticket(&alice, "mine").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let opened = next(&mut ws).await;
        let position = opened["position"].as_str().expect("a position").to_owned();
        drop(ws);

        // While Alice is away: Bob's ticket and comment, then Alice's comment.
        let theirs = s.ticket(&bob, "theirs").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        s.post(
            &format!("/tickets/{theirs}/comments"),
            &bob,
            json!({ "body": "bob's" }),
        )
        .await;
        s.post(
            &format!("/tickets/{mine}/comments"),
            &alice,
            json!({ "body": "missed" }),
        )
        .await;

        let mut ws = connect(&s, &alice).await;
        send(
            &mut ws,
            json!({ "type": "subscribe", "topic": "tickets", "since": position }),
        )
        .await;
        assert_eq!(next(&mut ws).await["type"], "subscribed");
        let replayed = next(&mut ws).await;
        assert_eq!(
            (
                &replayed["event"]["ticket_id"],
                &replayed["event"]["version"]
            ),
            (&json!(mine), &json!(2)),
            "the missed comment, and none of Bob's events before it: {replayed}"
        );
        // A live marker: had the replay leaked Bob's events, they would come before it.
        let marker = s
            .post(
                &format!("/tickets/{mine}/comments"),
                &alice,
                json!({ "body": "marker" }),
            )
            .await;
        let live = next(&mut ws).await;
        assert_eq!(
            (&live["event"]["ticket_id"], &live["event"]["version"]),
            (&json!(mine), &marker.body["version"]),
            "{live}"
        );
        s.stop().await;
    })
    .await;
}

/// Fails unless `handshake` was refused with 429 `too_many_connections`.
fn too_many_connections<T: std::fmt::Debug>(
    what: &str,
    handshake: Result<T, tokio_tungstenite::tungstenite::Error>,
) {
    match handshake {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{what}");
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(
                body["error"]["code"], "too_many_connections",
                "{what}: {body}"
            );
        }
        other => panic!("{what}: {other:?}"),
    }
}

/// One client address holds at most `--ws-connections-per-address` WebSockets, whatever
/// accounts they belong to (anyone may register more): past it, 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_websocket_connections() {
    within(async {
        let s = TestServer::start_with(|c| c.ws_connections_per_address = 2).await;
        let (first, _) = s.customer().await;
        let (second, _) = s.customer().await;
        let _a = connect(&s, &first).await;
        let mut b = connect(&s, &second).await;
        let url = format!("{}/ws?token={first}", s.base.replace("http://", "ws://"));
        too_many_connections(
            "a third WebSocket from one address",
            tokio_tungstenite::connect_async(url.as_str()).await,
        );
        b.close(None).await.unwrap();
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the closed connection gives its place back",
            || async {
                tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .ok()
                    .map(drop)
            },
        )
        .await;
        s.stop().await;
    })
    .await;
}

/// With both per-address limits alike (their defaults are), an address holds at most all but
/// a tenth of its connections as WebSockets: its next handshake gets 429, and its requests are
/// served, instead of both being closed unanswered once WebSockets took every place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_leave_an_address_room_for_its_requests() {
    within(async {
        let s = TestServer::start_with(|c| {
            c.ws_connections_per_address = 30;
            c.http_connections_per_address = 30;
        })
        .await;
        let (first, _) = s.customer().await;
        let (second, _) = s.customer().await;
        let mut held = Vec::new();
        for i in 0..27 {
            held.push(connect(&s, if i < 16 { &first } else { &second }).await);
        }
        let url = format!("{}/ws?token={second}", s.base.replace("http://", "ws://"));
        too_many_connections(
            "a 28th WebSocket from one address",
            tokio_tungstenite::connect_async(url.as_str()).await,
        );
        let r = s.send(reqwest::Method::GET, "/health", None, None).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        drop(held);
        s.stop().await;
    })
    .await;
}

/// However high `--ws-connections-per-address` is, one address holds at most all but a tenth
/// of the WebSockets the hub holds: with 60 connections (54 for WebSockets), its 50th
/// handshake gets 429, where it took every place the hub had before (its accounts are
/// anyone's to register), and everyone else met 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_never_takes_every_websocket_place() {
    within(async {
        let s = TestServer::start_with(|c| c.max_connections = Some(60)).await;
        let mut tokens = Vec::new();
        for _ in 0..4 {
            tokens.push(s.customer().await.0);
        }
        let mut held = Vec::new();
        for i in 0..49 {
            held.push(connect(&s, &tokens[i / 16]).await);
        }
        let mut request = format!("{}/ws", s.base.replace("http://", "ws://"))
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", tokens[3]).parse().unwrap(),
        );
        too_many_connections(
            "a 50th WebSocket from one address",
            tokio_tungstenite::connect_async(request).await,
        );
        drop(held);
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_the_server_down_closes_websockets_with_1001() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let mut ws = connect(&s, &token).await;
        subscribe(&mut ws, "tickets").await;
        let metrics = s.metrics().await;
        assert!(
            metrics.contains("realtime_connections"),
            "open WebSockets are a metric"
        );
        let stopping = tokio::spawn(s.stop());
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(15), ws.next())
                .await
                .expect("a close within 15 s")
            {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
        stopping.await.unwrap();
    })
    .await;
}

/// A connection lives no longer than its token: once the token has expired, the next
/// `subscribe` closes it with 1008 (and the keepalive tick would, within `ping_interval`),
/// and a new handshake with the same token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_when_its_token_expires() {
    within(async {
        let s = TestServer::start().await;
        let (agent, _) = s.agent().await;
        let mut ws = connect(&s, &agent).await;
        subscribe(&mut ws, "tickets").await;

        s.clock.advance(Duration::from_secs(3601));
        send(&mut ws, json!({ "type": "subscribe", "topic": "ticket:any" })).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let close = loop {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Ok(Message::Close(frame)))) => break frame,
                other => panic!("expected the 1008 close, got {other:?}"),
            }
        };
        let close = close.expect("a close frame with a code");
        assert_eq!(close.code, CloseCode::Policy);
        assert_eq!(close.reason.as_str(), "credentials expired");

        let again = tokio_tungstenite::connect_async(format!(
            "{}/ws?token={agent}",
            s.base.replace("http://", "ws://")
        ))
        .await;
        assert!(
            matches!(&again, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == StatusCode::UNAUTHORIZED),
            "{again:?}"
        );
        s.stop().await;
    })
    .await;
}
