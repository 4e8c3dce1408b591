use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_failures_block_the_pair_even_with_the_right_password_until_the_window_passes() {
    within(async {
        let s = TestServer::start().await;
        let address = email("throttled");
        s.user(&address).await;
        let login = |password: &'static str| {
            let body = json!({ "email": address.clone(), "password": password });
            let s = &s;
            async move { s.send(Method::POST, "/auth/login", None, Some(body)).await }
        };
        for _ in 0..10 {
            login("wrong password")
                .await
                .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
        }
        let blocked = login(PASSWORD).await;
        blocked.assert_error(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts");
        let retry_after: u64 = blocked.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=900).contains(&retry_after), "{retry_after}");

        // Another email from the same client is not affected.
        let other = email("other");
        s.user(&other).await;
        let r = s
            .send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": other, "password": PASSWORD })),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);

        s.clock.advance(Duration::from_secs(15 * 60 + 1));
        assert_eq!(
            login(PASSWORD).await.status,
            StatusCode::OK,
            "the window has passed"
        );
        s.stop().await;
    })
    .await;
}

/// Attempts are counted as they start, not when their password check fails: a burst of
/// guesses sent at once gets no more than the limit checked, the rest get 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_concurrent_guesses_gets_no_more_than_the_limit_checked() {
    within(async {
        let s = TestServer::start().await;
        let address = email("burst");
        s.user(&address).await;
        let guesses = (0..30).map(|i| {
            let body = json!({ "email": address.clone(), "password": format!("guess {i}") });
            let s = &s;
            async move { s.send(Method::POST, "/auth/login", None, Some(body)).await }
        });
        let answers = futures_util::future::join_all(guesses).await;
        let checked = answers
            .iter()
            .filter(|r| r.status == StatusCode::UNAUTHORIZED)
            .count();
        let refused = answers
            .iter()
            .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
            .count();
        assert_eq!(checked + refused, 30, "only 401 and 429");
        assert_eq!(checked, 10, "as many guesses checked as the limit");
        s.stop().await;
    })
    .await;
}

/// A successful login does not count as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_logins_do_not_count_against_the_limit() {
    within(async {
        let s = TestServer::start().await;
        let address = email("regular");
        s.user(&address).await;
        let body = json!({ "email": address.clone(), "password": PASSWORD });
        for _ in 0..15 {
            let r = s
                .send(Method::POST, "/auth/login", None, Some(body.clone()))
                .await;
            assert_eq!(r.status, StatusCode::OK);
        }
        s.stop().await;
    })
    .await;
}
