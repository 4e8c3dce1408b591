//! Assigning a ticket to the agent who already has it records nothing (no event, no new
//! version, so a client pinning the version gets no spurious conflict), and one ticket is
//! assigned a bounded number of times, as it holds a bounded number of comments.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;

/// The bound of `helpdesk-tickets` (documented in docs/helpdesk.md).
const MAX_ASSIGNMENTS: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigning_a_ticket_to_its_agent_again_changes_nothing() {
    within(async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let id = s.ticket(&customer, "assign me twice").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let path = format!("/tickets/{id}/assign");
        let first = s
            .post(&path, &agent, json!({ "assignee_id": agent_id }))
            .await;
        assert_eq!(first.status, StatusCode::OK, "{first:?}");
        assert_eq!(first.body["version"], 2);

        for body in [
            json!({ "assignee_id": agent_id }),
            json!({ "assignee_id": agent_id, "expected_version": 2 }),
        ] {
            let again = s.post(&path, &agent, body).await;
            assert_eq!(again.status, StatusCode::OK, "{again:?}");
            assert_eq!(again.body["version"], 2, "no new version: {again:?}");
            assert_eq!(again.body["status"], "assigned");
            assert_eq!(again.body["assignee_id"], agent_id);
        }
        // A stale pin is still a conflict, as for any other change.
        s.post(
            &path,
            &agent,
            json!({ "assignee_id": agent_id, "expected_version": 1 }),
        )
        .await
        .assert_error(StatusCode::CONFLICT, "version_conflict");

        let history = s.get(&format!("/tickets/{id}/history"), &customer).await;
        let types: Vec<_> = history.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(types, ["TicketOpened", "TicketAssigned"]);

        // The customer, who saw version 2, comments at it without a conflict.
        let commented = s
            .post(
                &format!("/tickets/{id}/comments"),
                &customer,
                json!({ "body": "thanks", "expected_version": 2 }),
            )
            .await;
        assert_eq!(commented.status, StatusCode::CREATED, "{commented:?}");
        assert_eq!(commented.body["version"], 3);
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_is_assigned_a_bounded_number_of_times() {
    within(async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let (_, other_id) = s.agent_named("agent2@example.com").await;
        let id = s.ticket(&customer, "ping pong").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let path = format!("/tickets/{id}/assign");
        let to = |i: u64| {
            if i.is_multiple_of(2) {
                &agent_id
            } else {
                &other_id
            }
        };
        for i in 0..MAX_ASSIGNMENTS {
            let r = s.post(&path, &agent, json!({ "assignee_id": to(i) })).await;
            assert_eq!(r.status, StatusCode::OK, "assignment {i}: {r:?}");
        }
        let full = s
            .post(&path, &agent, json!({ "assignee_id": to(MAX_ASSIGNMENTS) }))
            .await;
        full.assert_error(StatusCode::CONFLICT, "ticket_full");
        // Re-assigning the agent who has it is still answered (it records nothing).
        let same = s
            .post(
                &path,
                &agent,
                json!({ "assignee_id": to(MAX_ASSIGNMENTS - 1) }),
            )
            .await;
        assert_eq!(same.status, StatusCode::OK, "{same:?}");
        let t = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(t.body["version"], MAX_ASSIGNMENTS + 1);
        // Comments and closing still work.
        let commented = s
            .post(
                &format!("/tickets/{id}/comments"),
                &customer,
                json!({ "body": "please settle on one" }),
            )
            .await;
        assert_eq!(commented.status, StatusCode::CREATED, "{commented:?}");
        let closed = s
            .post(
                &format!("/tickets/{id}/close"),
                &agent,
                json!({ "resolution": "settled" }),
            )
            .await;
        assert_eq!(closed.status, StatusCode::OK, "{closed:?}");
        assert_eq!(closed.body["status"], "closed", "{closed:?}");
        s.stop().await;
    })
    .await;
}
