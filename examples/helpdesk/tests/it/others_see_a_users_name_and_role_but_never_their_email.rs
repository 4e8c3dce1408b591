//! `GET /users/{id}`: what a client shows for the ids of tickets, comments and history (a
//! reporter, an assignee, an author): the display name and role, never the email. An agent
//! sees anyone; a customer sees the agents and themselves, and another customer no more than
//! an id of no one (404 alike), so customers' ids cannot be probed.

use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_shown_by_name_and_role_to_those_who_may_see_them() {
    within(async {
        let s = TestServer::start_on(Backend::from_env().await, |_| {}).await;
        let ada = email("ada");
        let registered = s
            .send(
                Method::POST,
                "/auth/register",
                None,
                Some(json!({ "email": ada, "password": PASSWORD, "display_name": "Ada L." })),
            )
            .await;
        assert_eq!(registered.status, StatusCode::CREATED, "{registered:?}");
        let ada_id = registered.body["user_id"].as_str().unwrap().to_owned();
        let ada_token = s.login(&ada).await.body["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let (other, other_id) = s.customer().await;
        let (agent, agent_id) = s.agent().await;

        // An agent sees the reporter of a ticket.
        let seen = s.get(&format!("/users/{ada_id}"), &agent).await;
        assert_eq!(seen.status, StatusCode::OK, "{seen:?}");
        assert_eq!(
            seen.body,
            json!({ "user_id": ada_id, "display_name": "Ada L.", "role": "customer" })
        );
        assert!(!seen.body.to_string().contains('@'), "no email: {seen:?}");
        // A customer sees the agent on their ticket, and themselves.
        let the_agent = s.get(&format!("/users/{agent_id}"), &ada_token).await;
        assert_eq!(the_agent.status, StatusCode::OK, "{the_agent:?}");
        assert_eq!(the_agent.body["role"], "agent");
        let herself = s.get(&format!("/users/{ada_id}"), &ada_token).await;
        assert_eq!(herself.body["display_name"], "Ada L.", "{herself:?}");
        // Another customer is no more there than an id of no one.
        for hidden in [other_id.as_str(), "0190f3e2-7c1d-7c4e-9a57-2bd4d2f1a0c3"] {
            s.get(&format!("/users/{hidden}"), &ada_token)
                .await
                .assert_error(StatusCode::NOT_FOUND, "not_found");
        }
        s.get(&format!("/users/{ada_id}"), &other)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
        s.get("/users/not-a-uuid", &agent)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_path");
        s.send(Method::GET, &format!("/users/{ada_id}"), None, None)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        s.stop().await;
    })
    .await;
}
