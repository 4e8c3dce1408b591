use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_writers_at_one_expected_version_one_wins() {
    within(async {
        let s = Arc::new(TestServer::start().await);
        let (customer, _) = s.customer().await;
        let id = s.ticket(&customer, "race").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (s, customer, id) = (s.clone(), customer.clone(), id.clone());
                tokio::spawn(async move {
                    s.post(
                        &format!("/tickets/{id}/comments"),
                        &customer,
                        json!({ "body": format!("writer {i}"), "expected_version": 1 }),
                    )
                    .await
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            let r = t.await.unwrap();
            match r.status {
                StatusCode::CREATED => won += 1,
                StatusCode::CONFLICT => {
                    r.assert_error(StatusCode::CONFLICT, "version_conflict");
                    // Whether the conflict was met before or at the append, the client learns
                    // the version to decide again on.
                    let current = r.body["error"]["details"]["current_version"].as_u64();
                    assert!(current.is_some_and(|v| v >= 2), "{r:?}");
                }
                other => panic!("unexpected {other}: {r:?}"),
            }
        }
        assert_eq!(won, 1);
        let t = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(t.body["version"], 2);
        assert_eq!(t.body["comments"].as_array().unwrap().len(), 1);
        Arc::into_inner(s).unwrap().stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_without_an_expected_version_all_land() {
    within(async {
        let s = Arc::new(TestServer::start().await);
        let (customer, _) = s.customer().await;
        let id = s.ticket(&customer, "no pin").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let tasks: Vec<_> = (0..5)
            .map(|i| {
                let (s, customer, id) = (s.clone(), customer.clone(), id.clone());
                tokio::spawn(async move {
                    s.post(
                        &format!("/tickets/{id}/comments"),
                        &customer,
                        json!({ "body": format!("c{i}") }),
                    )
                    .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().status, StatusCode::CREATED);
        }
        let t = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(t.body["version"], 6);
        Arc::into_inner(s).unwrap().stop().await;
    })
    .await;
}
