//! Only a login whose password was checked and found wrong counts against the client: one the
//! server could not finish (its user store down, or the request cut off by its time budget)
//! does not, so an outage does not lock users out once it ends.

use crate::an_unavailable_store_is_a_503_that_does_not_quote_it::FailingUsers;
use crate::support::*;
use reqwest::StatusCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_refused_by_an_unavailable_store_are_not_failed_attempts() {
    within(async {
        let users = FailingUsers::default();
        // Three failed attempts lock a client out here: the outage makes more than that.
        let s = TestServer::start_with_hooks(Backend::from_env().await, users.hooks(), |c| {
            c.login_attempts = 3;
        })
        .await;
        let address = email("outage");
        let registered = s.register(&address).await;
        assert_eq!(registered.status, StatusCode::CREATED, "{registered:?}");

        users.down.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            s.login(&address)
                .await
                .assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
        }
        users.down.store(false, Ordering::SeqCst);
        let r = s.login(&address).await;
        assert_eq!(r.status, StatusCode::OK, "not locked out: {r:?}");
        s.stop().await;
    })
    .await;
}

/// A login cut off by the time budget is dropped part-way: its counts are taken back then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_cut_off_by_the_time_budget_are_not_failed_attempts() {
    within(async {
        let users = FailingUsers::default();
        let address = email("hung");
        // Registered on an instance with the default budget, sharing the users: a loaded
        // machine's password hashing alone may take most of a second.
        let other =
            TestServer::start_with_hooks(Backend::from_env().await, users.hooks(), |_| {}).await;
        let registered = other.register(&address).await;
        assert_eq!(registered.status, StatusCode::CREATED, "{registered:?}");
        other.stop().await;
        let s = TestServer::start_with_hooks(Backend::from_env().await, users.hooks(), |c| {
            c.request_timeout_ms = 1_000;
            c.login_attempts = 3;
        })
        .await;

        users.hung.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            s.login(&address)
                .await
                .assert_error(StatusCode::SERVICE_UNAVAILABLE, "timeout");
        }
        users.hung.store(false, Ordering::SeqCst);
        // The take-back runs on a task of its own once the login is dropped: poll for it. A
        // login cut off again by the budget (a loaded machine) counts for nothing either.
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = s.login(&address).await;
            if r.status == StatusCode::OK {
                break;
            }
            if r.status != StatusCode::SERVICE_UNAVAILABLE {
                r.assert_error(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts");
            } else {
                r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "timeout");
            }
            assert!(
                tokio::time::Instant::now() < until,
                "still locked out 20 s after the store answers again: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.stop().await;
    })
    .await;
}
