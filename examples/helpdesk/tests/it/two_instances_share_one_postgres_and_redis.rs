//! Two instances on one Postgres schema and one Redis prefix, as behind a load balancer. These
//! run on Postgres + Redis whatever `HELPDESK_TEST_BACKEND` says, and are skipped when the
//! services are down (a failure under `CQRS_REQUIRE_SERVICES=1`).

use crate::support::*;
use crate::websocket_clients_get_the_ticket_events_they_may_see::{connect, next, send, subscribe};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// Instance A (does not drop the namespace) and instance B (drops it when stopped last), or
/// `None` when the services are down.
async fn two_instances() -> Option<(TestServer, TestServer)> {
    let backend = Backend::postgres().await?;
    let a = TestServer::start_on(backend.shared(), |_| {}).await;
    let b = TestServer::start_on(backend, |_| {}).await;
    Some((a, b))
}

async fn history(s: &TestServer, token: &str, id: &str) -> Vec<Value> {
    let r = s.get(&format!("/tickets/{id}/history"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    r.body["items"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_on_b_receives_the_events_of_commands_sent_to_a() {
    within_for(Duration::from_secs(150), async {
        let Some((a, b)) = two_instances().await else {
            return;
        };
        let (agent, _) = b.agent().await;
        let (customer, _) = a.customer().await;
        let mut ws = connect(&b, &agent).await;
        subscribe(&mut ws, "tickets").await;

        let id = a.ticket(&customer, "sent to A").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        a.post(
            &format!("/tickets/{id}/comments"),
            &customer,
            json!({ "body": "still A" }),
        )
        .await;
        let first = next(&mut ws).await;
        let second = next(&mut ws).await;
        for (frame, (event_type, version)) in [
            (first, ("TicketOpened", 1)),
            (second, ("TicketCommented", 2)),
        ] {
            assert_eq!(frame["event"]["ticket_id"], id, "{frame}");
            assert_eq!(frame["event"]["type"], event_type, "{frame}");
            assert_eq!(frame["event"]["version"], version, "{frame}");
        }
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_counted_once_although_both_instances_consume() {
    within_for(Duration::from_secs(150), async {
        let Some((a, b)) = two_instances().await else {
            return;
        };
        let (customer, _) = a.customer().await;
        let (agent, agent_id) = b.agent().await;
        let mut ids = Vec::new();
        for i in 0..6 {
            let s = if i % 2 == 0 { &a } else { &b };
            ids.push(
                s.ticket(&customer, &format!("t{i}")).await["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        for id in &ids[..3] {
            let r = a
                .post(
                    &format!("/tickets/{id}/assign"),
                    &agent,
                    json!({ "assignee_id": agent_id }),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
        }
        for id in &ids[..2] {
            let r = b
                .post(&format!("/tickets/{id}/close"), &agent, json!({}))
                .await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
        }
        let expected = json!({ "open": 3, "assigned": 1, "closed": 2 });
        for s in [&a, &b] {
            cqrs_core::testing::eventually(
                Duration::from_secs(30),
                "both instances report the counts",
                || async {
                    let r = s.get("/tickets/stats", &agent).await;
                    (r.body == expected).then_some(())
                },
            )
            .await;
        }
        // A duplicate of an earlier event could still be on its way: marker tickets opened
        // now (one on each instance) are counted after every earlier event, and then the
        // counts must be exact on both.
        a.ticket(&customer, "marker on A").await;
        b.ticket(&customer, "marker on B").await;
        let expected = json!({ "open": 5, "assigned": 1, "closed": 2 });
        for s in [&a, &b] {
            let counted = cqrs_core::testing::eventually(
                Duration::from_secs(30),
                "both instances count the marker tickets",
                || async {
                    let r = s.get("/tickets/stats", &agent).await;
                    (r.body["open"].as_u64() >= Some(5)).then_some(r.body)
                },
            )
            .await;
            assert_eq!(
                counted, expected,
                "the earlier events counted once each, and each marker once"
            );
        }
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_opened_on_a_and_closed_on_b_has_one_consistent_history() {
    within_for(Duration::from_secs(150), async {
        let Some((a, b)) = two_instances().await else {
            return;
        };
        let (customer, _) = a.customer().await;
        let (agent, _) = b.agent().await;
        let id = a.ticket(&customer, "across").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let r = b
            .post(
                &format!("/tickets/{id}/comments"),
                &agent,
                json!({ "body": "from B", "expected_version": 1 }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        // A stale version is refused on the other instance too.
        a.post(
            &format!("/tickets/{id}/close"),
            &customer,
            json!({ "expected_version": 1 }),
        )
        .await
        .assert_error(StatusCode::CONFLICT, "version_conflict");
        let r = b
            .post(&format!("/tickets/{id}/close"), &agent, json!({}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.body["version"], 3);

        let on_a = history(&a, &customer, &id).await;
        let on_b = history(&b, &agent, &id).await;
        assert_eq!(on_a, on_b);
        let summary: Vec<(&str, u64)> = on_a
            .iter()
            .map(|e| (e["type"].as_str().unwrap(), e["version"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            summary,
            [
                ("TicketOpened", 1),
                ("TicketCommented", 2),
                ("TicketClosed", 3)
            ]
        );
        let listed = a.get("/tickets?status=closed", &customer).await;
        assert_eq!(listed.body["items"][0]["id"], id, "{listed:?}");
        assert_eq!(listed.body["items"][0]["version"], 3);
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_by_an_instance_that_stopped_before_shipping_them_are_not_lost() {
    within_for(Duration::from_secs(150), async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        // A commits but never ships (its relay does not run), then stops.
        let a = TestServer::start_without_relay(backend.shared()).await;
        let (customer, _) = a.customer().await;
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(
                a.ticket(&customer, &format!("last words {i}")).await["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        a.stop().await;
        // B starts on the same database: its relay continues from the shared checkpoint and
        // ships what A committed; its stats consumer counts each ticket once.
        let b = TestServer::start_on(backend, |_| {}).await;
        let (agent, _) = b.agent().await;
        cqrs_core::testing::eventually(
            Duration::from_secs(30),
            "B counts every ticket A committed",
            || async {
                let r = b.get("/tickets/stats", &agent).await;
                (r.body == json!({ "open": 3, "assigned": 0, "closed": 0 })).then_some(())
            },
        )
        .await;
        for id in &ids {
            let r = b.get(&format!("/tickets/{id}"), &agent).await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
        }
        b.stop().await;
    })
    .await;
}

/// `(position, ticket, type, version)` of an event frame on `tickets`.
fn change(frame: &Value) -> (String, String, String, u64) {
    assert_eq!(frame["type"], "event", "{frame}");
    assert_eq!(frame["topic"], "tickets", "{frame}");
    (
        frame["position"].as_str().unwrap().to_owned(),
        frame["event"]["ticket_id"].as_str().unwrap().to_owned(),
        frame["event"]["type"].as_str().unwrap().to_owned(),
        frame["event"]["version"].as_u64().unwrap(),
    )
}

/// A runs none of the relays (neither to the transport nor to the WebSocket hubs): B's realtime
/// relay, sharing its checkpoint through the schema, pushes A's events to B's clients, live,
/// and B replays them to a client resuming from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_pushes_to_its_websocket_clients_the_events_of_an_instance_running_no_relay() {
    within_for(Duration::from_secs(150), async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let a = TestServer::start_without_relay(backend.shared()).await;
        let b = TestServer::start_on(backend, |_| {}).await;
        let (customer, _) = a.customer().await;
        let (agent, _) = b.agent().await;
        let mut live = connect(&b, &agent).await;
        subscribe(&mut live, "tickets").await;

        let id = a.ticket(&customer, "committed by A").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let pushed = change(&next(&mut live).await);
        assert_eq!(
            (&pushed.1, pushed.2.as_str(), pushed.3),
            (&id, "TicketOpened", 1),
            "{pushed:?}"
        );

        let mut resumed = connect(&b, &agent).await;
        send(
            &mut resumed,
            json!({ "type": "subscribe", "topic": "tickets", "since": "0" }),
        )
        .await;
        assert_eq!(next(&mut resumed).await["type"], "subscribed");
        assert_eq!(
            change(&next(&mut resumed).await),
            pushed,
            "the replay from the start holds A's event, at the position pushed live"
        );
        drop((live, resumed));
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_stopped_right_after_a_commit_loses_nothing() {
    within_for(Duration::from_secs(150), async {
        let Some((a, b)) = two_instances().await else {
            return;
        };
        let (customer, _) = a.customer().await;
        let (agent, _) = b.agent().await;
        let id = a.ticket(&customer, "last words").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        // A stops at once, its relay perhaps mid-batch: B's relay takes over the checkpoint.
        a.stop().await;
        cqrs_core::testing::eventually(
            Duration::from_secs(30),
            "B counts the ticket A committed",
            || async {
                let r = b.get("/tickets/stats", &agent).await;
                (r.body == json!({ "open": 1, "assigned": 0, "closed": 0 })).then_some(())
            },
        )
        .await;
        let r = b.get(&format!("/tickets/{id}"), &agent).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_on_both_instances_without_an_expected_version_all_land_once() {
    within_for(Duration::from_secs(150), async {
        let Some((a, b)) = two_instances().await else {
            return;
        };
        let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
        let (customer, _) = a.customer().await;
        let id = a.ticket(&customer, "busy").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                let (customer, id) = (customer.clone(), id.clone());
                tokio::spawn(async move {
                    let mut request = s
                        .http
                        .post(s.url(&format!("/tickets/{id}/comments")))
                        .bearer_auth(&customer)
                        .json(&json!({ "body": format!("c{i}") }));
                    // Half of them idempotent: their key commits with the change, so a
                    // conflict at commit retries the claim too.
                    if i < 3 {
                        request = request.header("idempotency-key", format!("k{i}"));
                    }
                    Response::from(request.send().await.unwrap()).await
                })
            })
            .collect();
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        }
        let t = b.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(t.body["version"], 7, "{t:?}");
        assert_eq!(t.body["comments"].as_array().unwrap().len(), 6);
        let (a, b) = (
            std::sync::Arc::into_inner(a).unwrap(),
            std::sync::Arc::into_inner(b).unwrap(),
        );
        a.stop().await;
        b.stop().await;
    })
    .await;
}
