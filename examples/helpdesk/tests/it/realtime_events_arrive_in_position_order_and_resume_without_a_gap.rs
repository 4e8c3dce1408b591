//! The `tickets` topic spans every ticket: its events must reach a client in position order,
//! whatever the concurrency of the commands that made them and whichever instance handled
//! them, or a client that resumes from the last position it saw would never get an earlier
//! event that arrived after it. Memory mode (or Postgres + Redis under
//! `HELPDESK_TEST_BACKEND=postgres`) with one instance, Postgres alone, and Postgres + Redis
//! with two instances.

use crate::support::*;
use crate::websocket_clients_get_the_ticket_events_they_may_see::{Ws, connect, next, send};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::BTreeSet;

/// Tickets changed at once, and comments per ticket per round.
const TICKETS: usize = 8;
const COMMENTS: usize = 8;

/// One event frame: its position, ticket and version.
type Seen = (u64, String, u64);

/// The next `n` event frames on `tickets`.
async fn events(ws: &mut Ws, n: usize) -> Vec<Seen> {
    let mut seen = Vec::with_capacity(n);
    while seen.len() < n {
        let frame = next(ws).await;
        assert_eq!(frame["type"], "event", "after {seen:?}: {frame}");
        assert_eq!(frame["topic"], "tickets", "{frame}");
        seen.push((
            frame["position"]
                .as_str()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("a position: {frame}")),
            frame["event"]["ticket_id"].as_str().unwrap().to_owned(),
            frame["event"]["version"].as_u64().unwrap(),
        ));
    }
    seen
}

#[track_caller]
fn assert_increasing(what: &str, seen: &[Seen]) {
    for pair in seen.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "{what}: position {} arrived after {}; a client resuming from {} would never get \
             it. Every frame: {:?}",
            pair[1].0,
            pair[0].0,
            pair[0].0,
            seen.iter().map(|s| s.0).collect::<Vec<_>>()
        );
    }
}

/// `(ticket, version)` of each event.
fn changes(seen: &[Seen]) -> BTreeSet<(String, u64)> {
    seen.iter().map(|(_, t, v)| (t.clone(), *v)).collect()
}

/// `COMMENTS` comments on every ticket, sixteen at once, alternately to each server. Returns
/// the `(ticket, version)` they made. (All at once, a loaded machine's tail requests could
/// wait out the pool's acquire timeout behind the others' commits, and get a 503.)
async fn comment_on_all(
    servers: [&TestServer; 2],
    token: &str,
    ids: &[String],
) -> BTreeSet<(String, u64)> {
    let comments: Vec<_> = (0..COMMENTS)
        .flat_map(|c| ids.iter().map(move |id| (c, id)))
        .enumerate()
        .collect();
    let mut made = BTreeSet::new();
    for wave in comments.chunks(16) {
        let requests = wave.iter().map(|&(i, (c, id))| async move {
            let r = servers[i % 2]
                .post(
                    &format!("/tickets/{id}/comments"),
                    token,
                    json!({ "body": format!("comment {c}") }),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
            (id.clone(), r.body["version"].as_u64().unwrap())
        });
        made.extend(join_all(requests).await);
    }
    made
}

/// A client of `a` on `tickets` receives the events of many concurrent changes to several
/// tickets in strictly increasing positions, exactly the events the store holds; after it
/// disconnects and more changes land, a resume on `b` from the last position it saw gets
/// exactly the changes it missed, then the live ones.
async fn ordered_and_resumable(a: &TestServer, b: &TestServer) {
    let (customer, _) = a.customer().await;
    let (agent, _) = b.agent().await;
    let mut live = connect(a, &agent).await;
    send(
        &mut live,
        json!({ "type": "subscribe", "topic": "tickets" }),
    )
    .await;
    assert_eq!(next(&mut live).await["type"], "subscribed");

    // Round 1, live: tickets opened at once, then comments on all of them at once.
    let opened = join_all((0..TICKETS).map(|i| {
        let s = if i % 2 == 0 { a } else { b };
        let customer = &customer;
        async move {
            s.ticket(customer, &format!("t{i}")).await["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    }))
    .await;
    let mut expected: BTreeSet<(String, u64)> = opened.iter().map(|id| (id.clone(), 1)).collect();
    expected.extend(comment_on_all([a, b], &customer, &opened).await);
    let first = events(&mut live, expected.len()).await;
    assert_increasing("live", &first);
    assert_eq!(changes(&first), expected, "every change, once each");
    let since = first.last().unwrap().0;
    drop(live);

    // Round 2, while the client is away.
    let missed = comment_on_all([b, a], &customer, &opened).await;
    let mut resumed = connect(b, &agent).await;
    send(
        &mut resumed,
        json!({ "type": "subscribe", "topic": "tickets", "since": since.to_string() }),
    )
    .await;
    assert_eq!(next(&mut resumed).await["type"], "subscribed");
    let second = events(&mut resumed, missed.len()).await;
    assert_increasing("resumed", &second);
    assert!(second[0].0 > since, "{second:?} after {since}");
    assert_eq!(changes(&second), missed, "exactly the missed changes");
    // Then live, with nothing in between: no late duplicate of what the replay sent.
    let marker = a
        .post(
            &format!("/tickets/{}/comments", opened[0]),
            &customer,
            json!({ "body": "marker" }),
        )
        .await;
    assert_eq!(marker.status, StatusCode::CREATED, "{marker:?}");
    let after = events(&mut resumed, 1).await;
    assert_eq!(
        (after[0].1.clone(), after[0].2),
        (opened[0].clone(), marker.body["version"].as_u64().unwrap()),
        "the next frame is the marker"
    );
    assert!(after[0].0 > second.last().unwrap().0);

    // What the client saw, live and resumed, is the store's order: a replay of the whole log.
    let mut everything = first;
    everything.extend(second);
    everything.extend(after);
    let mut log = connect(a, &agent).await;
    send(
        &mut log,
        json!({ "type": "subscribe", "topic": "tickets", "since": "0" }),
    )
    .await;
    assert_eq!(next(&mut log).await["type"], "subscribed");
    assert_eq!(events(&mut log, everything.len()).await, everything);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_pushes_in_position_order_and_resumes_without_a_gap() {
    within(async {
        let s = TestServer::start().await;
        ordered_and_resumable(&s, &s).await;
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_push_in_position_order_and_resume_on_the_other_without_a_gap() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let a = TestServer::start_on(backend.shared(), |_| {}).await;
        let b = TestServer::start_on(backend, |_| {}).await;
        ordered_and_resumable(&a, &b).await;
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_without_redis_pushes_in_position_order_and_resumes_without_a_gap() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let s = TestServer::start_on(backend, |c| c.redis_url = None).await;
        ordered_and_resumable(&s, &s).await;
        s.stop().await;
    })
    .await;
}
