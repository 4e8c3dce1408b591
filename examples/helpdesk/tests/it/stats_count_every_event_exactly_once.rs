use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_catch_up_and_count_each_ticket_in_its_current_status() {
    within(async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        s.get("/tickets/stats", &customer)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                s.ticket(&customer, &format!("s{i}")).await["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        for id in &ids[..3] {
            s.post(
                &format!("/tickets/{id}/assign"),
                &agent,
                json!({ "assignee_id": agent_id }),
            )
            .await;
        }
        s.post(&format!("/tickets/{}/close", ids[0]), &agent, json!({}))
            .await;
        s.post(&format!("/tickets/{}/close", ids[4]), &agent, json!({}))
            .await;
        // Comments and a reassignment do not change the counts.
        s.post(
            &format!("/tickets/{}/comments", ids[1]),
            &customer,
            json!({ "body": "?" }),
        )
        .await;
        s.post(
            &format!("/tickets/{}/assign", ids[1]),
            &agent,
            json!({ "assignee_id": agent_id }),
        )
        .await;

        let expected = json!({ "open": 1, "assigned": 2, "closed": 2 });
        let stats = cqrs_core::testing::eventually(
            Duration::from_secs(5),
            "the stats catch up",
            || async {
                let r = s.get("/tickets/stats", &agent).await;
                (r.body == expected).then_some(r.body)
            },
        )
        .await;
        assert_eq!(stats, expected);
        // A duplicate of an earlier event could still be on its way: a marker ticket opened
        // now is counted after every earlier event, and then the counts must be exact.
        s.ticket(&customer, "marker").await;
        let after_marker = cqrs_core::testing::eventually(
            Duration::from_secs(5),
            "the stats count the marker ticket",
            || async {
                let r = s.get("/tickets/stats", &agent).await;
                (r.body["open"].as_u64() >= Some(2)).then_some(r.body)
            },
        )
        .await;
        assert_eq!(
            after_marker,
            json!({ "open": 2, "assigned": 2, "closed": 2 }),
            "the earlier events counted once each, and the marker once"
        );
        s.stop().await;
    })
    .await;
}

/// On Postgres without Redis the transport is in process memory, and whatever it held at a
/// stop was lost to the stats (the relay had moved its checkpoint past it). The stats then
/// read the event store itself, committing their checkpoint with their counts: they count
/// every ticket even with no relay shipping anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_without_redis_the_stats_read_the_event_store() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    within(async {
        let s = TestServer::start_without_relay_with(backend, |c| c.redis_url = None).await;
        let (customer, _) = s.customer().await;
        let (agent, _) = s.agent().await;
        s.ticket(&customer, "counted without the relay").await;
        cqrs_core::testing::eventually(Duration::from_secs(10), "the stats count it", || async {
            let r = s.get("/tickets/stats", &agent).await;
            (r.body["open"] == 1).then_some(())
        })
        .await;
        s.stop().await;
    })
    .await;
}
