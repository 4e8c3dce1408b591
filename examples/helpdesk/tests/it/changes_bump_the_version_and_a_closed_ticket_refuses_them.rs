use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assign_comment_and_close_each_add_one_to_the_version() {
    within(async {
        let s = TestServer::start().await;
        let (customer, customer_id) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let id = s.ticket(&customer, "change me").await["id"]
            .as_str()
            .unwrap()
            .to_owned();

        s.post(
            &format!("/tickets/{id}/assign"),
            &customer,
            json!({ "assignee_id": agent_id }),
        )
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
        let not_an_agent = s
            .post(
                &format!("/tickets/{id}/assign"),
                &agent,
                json!({ "assignee_id": customer_id }),
            )
            .await;
        assert!(
            matches!(
                not_an_agent.status,
                StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY
            ),
            "{not_an_agent:?}"
        );
        let nobody = s
            .post(
                &format!("/tickets/{id}/assign"),
                &agent,
                json!({ "assignee_id": uuid::Uuid::now_v7() }),
            )
            .await;
        assert!(
            matches!(
                nobody.status,
                StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY
            ),
            "{nobody:?}"
        );

        let assigned = s
            .post(
                &format!("/tickets/{id}/assign"),
                &agent,
                json!({ "assignee_id": agent_id, "expected_version": 1 }),
            )
            .await;
        assert_eq!(assigned.status, StatusCode::OK, "{assigned:?}");
        assert_eq!(
            (
                assigned.body["status"].as_str(),
                assigned.body["version"].as_u64()
            ),
            (Some("assigned"), Some(2))
        );
        assert_eq!(assigned.body["assignee_id"], agent_id);

        let commented = s
            .post(
                &format!("/tickets/{id}/comments"),
                &customer,
                json!({ "body": "  <i>thanks</i>  " }),
            )
            .await;
        assert_eq!(commented.status, StatusCode::CREATED, "{commented:?}");
        // The new comment and the version, not the whole ticket.
        assert_eq!(commented.body["version"], 3);
        assert_eq!(commented.body["ticket_id"], id.as_str());
        assert!(commented.body.get("comments").is_none(), "{commented:?}");
        let comment = &commented.body["comment"];
        assert_eq!(comment["body"], "  <i>thanks</i>  ");
        assert_eq!(comment["author_id"], customer_id);
        let ticket = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(&ticket.body["comments"][0], comment);
        for bad in [
            json!({ "body": "" }),
            json!({ "body": "   " }),
            json!({ "body": "b".repeat(10_001) }),
        ] {
            s.post(&format!("/tickets/{id}/comments"), &customer, bad)
                .await
                .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        }

        let closed = s
            .post(
                &format!("/tickets/{id}/close"),
                &customer,
                json!({ "resolution": "works now" }),
            )
            .await;
        assert_eq!(closed.status, StatusCode::OK, "{closed:?}");
        assert_eq!(
            (
                closed.body["status"].as_str(),
                closed.body["version"].as_u64()
            ),
            (Some("closed"), Some(4))
        );

        // With or without the version the client saw, the current one or a stale one: closed
        // is the answer (a stale one was `version_conflict`, and the retry at the new version
        // only then `ticket_closed`).
        for (path, body) in [
            ("comments", json!({ "body": "again" })),
            ("assign", json!({ "assignee_id": agent_id })),
            ("close", json!({})),
            ("close", json!({ "expected_version": 3 })),
            ("close", json!({ "expected_version": 4 })),
            (
                "comments",
                json!({ "body": "again", "expected_version": 1 }),
            ),
            (
                "assign",
                json!({ "assignee_id": agent_id, "expected_version": 2 }),
            ),
        ] {
            s.post(&format!("/tickets/{id}/{path}"), &agent, body.clone())
                .await
                .assert_error(StatusCode::CONFLICT, "ticket_closed");
        }
        let after = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(after.body["version"], 4, "refused changes change nothing");
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_expected_version_is_a_conflict_and_changes_nothing() {
    within(async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        let id = s.ticket(&customer, "versions").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        s.post(
            &format!("/tickets/{id}/comments"),
            &customer,
            json!({ "body": "one", "expected_version": 1 }),
        )
        .await;
        let stale = s
            .post(
                &format!("/tickets/{id}/comments"),
                &customer,
                json!({ "body": "two", "expected_version": 1 }),
            )
            .await;
        stale.assert_error(StatusCode::CONFLICT, "version_conflict");
        let future = s
            .post(
                &format!("/tickets/{id}/close"),
                &customer,
                json!({ "expected_version": 9 }),
            )
            .await;
        future.assert_error(StatusCode::CONFLICT, "version_conflict");
        let t = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(
            (t.body["version"].as_u64(), t.body["status"].as_str()),
            (Some(2), Some("open"))
        );
        assert_eq!(t.body["comments"].as_array().unwrap().len(), 1);
        s.stop().await;
    })
    .await;
}

/// A ticket that does not exist is 404 whoever the assignment names: the assignee is checked
/// against the directory only for a ticket there is, where a non-agent is still a 422 (also on
/// a closed ticket, and ahead of a stale `expected_version`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigning_a_missing_ticket_is_404_whoever_the_assignee_is() {
    within(async {
        let s = TestServer::start().await;
        let (customer, customer_id) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let missing = uuid::Uuid::now_v7();
        for assignee in [
            customer_id.clone(),
            uuid::Uuid::now_v7().to_string(),
            agent_id.clone(),
        ] {
            s.post(
                &format!("/tickets/{missing}/assign"),
                &agent,
                json!({ "assignee_id": assignee }),
            )
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
        }
        // A body of the wrong shape is still refused as such, ahead of the ticket.
        s.post(
            &format!("/tickets/{missing}/assign"),
            &agent,
            json!({ "assignee_id": "not-a-uuid" }),
        )
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");

        let id = s.ticket(&customer, "assign me").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let path = format!("/tickets/{id}/assign");
        for body in [
            json!({ "assignee_id": customer_id }),
            json!({ "assignee_id": customer_id, "expected_version": 7 }),
        ] {
            let r = s.post(&path, &agent, body).await;
            r.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
            assert_eq!(r.body["error"]["details"]["field"], "assignee_id", "{r:?}");
        }
        let closed = s
            .post(&format!("/tickets/{id}/close"), &customer, json!({}))
            .await;
        assert_eq!(closed.status, StatusCode::OK, "{closed:?}");
        s.post(&path, &agent, json!({ "assignee_id": customer_id }))
            .await
            .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        s.post(&path, &agent, json!({ "assignee_id": agent_id }))
            .await
            .assert_error(StatusCode::CONFLICT, "ticket_closed");
        s.stop().await;
    })
    .await;
}
