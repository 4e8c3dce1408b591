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

/// Attempts are counted as they start, not when their password check fails: bursts of
/// guesses sent at once get no more than the limit checked, the rest get 429 (from the
/// throttle, or because the client already has two logins in progress).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_concurrent_guesses_gets_no_more_than_the_limit_checked() {
    within(async {
        let s = TestServer::start().await;
        let address = email("burst");
        s.user(&address).await;
        let mut checked = 0;
        // Each burst has one guess checked at least, until the pair is blocked.
        for _ in 0..11 {
            let guesses = (0..30).map(|i| {
                let body = json!({ "email": address.clone(), "password": format!("guess {i}") });
                let s = &s;
                async move { s.send(Method::POST, "/auth/login", None, Some(body)).await }
            });
            let answers = futures_util::future::join_all(guesses).await;
            let burst = answers
                .iter()
                .filter(|r| r.status == StatusCode::UNAUTHORIZED)
                .count();
            let refused = answers
                .iter()
                .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
                .count();
            assert_eq!(burst + refused, 30, "only 401 and 429");
            if burst == 0 {
                break;
            }
            checked += burst;
        }
        assert_eq!(checked, 10, "as many guesses checked as the limit");
        s.stop().await;
    })
    .await;
}

/// One client address failing logins across many emails (a few passwords tried on each) is
/// blocked once its failures reach five times the limit for one email, correct passwords
/// included; other clients are not. The proxy is trusted as a range (a load balancer whose
/// nodes change addresses within a subnet): the clients behind it are told apart all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_across_many_emails_block_the_address_but_no_other() {
    within(async {
        let s = TestServer::start_with(|c| {
            c.login_attempts = 2;
            c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        })
        .await;
        let address = email("sprayed");
        s.user(&address).await;
        // Under the limit of each email: one failure on each of ten.
        for _ in 0..10 {
            let r = login_via_proxy(&s, &email("nobody"), "a guess", "192.0.2.77").await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
        let blocked = login_via_proxy(&s, &address, PASSWORD, "192.0.2.77").await;
        assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = blocked.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=900).contains(&retry_after), "{retry_after}");
        let blocked = Response::from(blocked).await;
        blocked.assert_error(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts");
        let other = login_via_proxy(&s, &address, PASSWORD, "192.0.2.78").await;
        assert_eq!(other.status(), StatusCode::OK, "another client");
        s.clock.advance(Duration::from_secs(15 * 60 + 1));
        let later = login_via_proxy(&s, &address, PASSWORD, "192.0.2.77").await;
        assert_eq!(later.status(), StatusCode::OK, "the window has passed");
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

/// Ten failed logins from one client, as the proxy in front reports it.
async fn fail_ten_times_from(s: &TestServer, address: &str, forwarded_for: &str) {
    for _ in 0..10 {
        let r = login_via_proxy(s, address, "wrong password", forwarded_for).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
}

async fn login_via_proxy(
    s: &TestServer,
    address: &str,
    password: &str,
    forwarded_for: &str,
) -> reqwest::Response {
    s.http
        .post(s.url("/auth/login"))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({ "email": address, "password": password }))
        .send()
        .await
        .unwrap()
}

/// Behind a trusted proxy the throttle counts per client as the proxy reports it: one client's
/// failures do not block another's logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_clients_are_told_apart_by_x_forwarded_for() {
    within(async {
        let s = TestServer::start_with(|c| {
            c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        })
        .await;
        let address = email("proxied");
        s.user(&address).await;
        // What the client wrote itself stands left of what the proxy appended: not believed.
        fail_ten_times_from(&s, &address, "192.0.2.1, 203.0.113.7").await;
        let blocked = login_via_proxy(&s, &address, PASSWORD, "192.0.2.2, 203.0.113.7").await;
        assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
        let other = login_via_proxy(&s, &address, PASSWORD, "203.0.113.8").await;
        assert_eq!(
            other.status(),
            StatusCode::OK,
            "another client is not blocked"
        );
        s.stop().await;
    })
    .await;
}

/// Without trusted proxies, `X-Forwarded-For` is whatever the client says: ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    within(async {
        let s = TestServer::start().await;
        let address = email("spoofer");
        s.user(&address).await;
        fail_ten_times_from(&s, &address, "203.0.113.7").await;
        let r = login_via_proxy(&s, &address, PASSWORD, "203.0.113.8").await;
        assert_eq!(
            r.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "a new header is no way out"
        );
        s.stop().await;
    })
    .await;
}

/// IPv6 clients are counted by their /64: a host can pick any address in it, so moving to the
/// next address does not buy ten more guesses; another /64 is another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_are_counted_by_their_64() {
    within(async {
        let s = TestServer::start_with(|c| {
            c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        })
        .await;
        let address = email("v6");
        s.user(&address).await;
        fail_ten_times_from(&s, &address, "2001:db8:1:2::1").await;
        let next = login_via_proxy(&s, &address, PASSWORD, "2001:db8:1:2::ffff").await;
        assert_eq!(next.status(), StatusCode::TOO_MANY_REQUESTS, "same /64");
        let other = login_via_proxy(&s, &address, PASSWORD, "2001:db8:1:3::1").await;
        assert_eq!(other.status(), StatusCode::OK, "another /64");
        s.stop().await;
    })
    .await;
}

/// Proxies that write the client's port into `X-Forwarded-For` (`198.51.100.1:5000`,
/// `[2001:db8::1]:443`) still tell clients apart: one client's failures do not block another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_addresses_with_ports_are_told_apart() {
    within(async {
        let s = TestServer::start_with(|c| {
            c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        })
        .await;
        let address = email("ported");
        s.user(&address).await;
        fail_ten_times_from(&s, &address, "198.51.100.1:5000").await;
        let blocked = login_via_proxy(&s, &address, PASSWORD, "198.51.100.1:5001").await;
        assert_eq!(
            blocked.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "same client"
        );
        let other = login_via_proxy(&s, &address, PASSWORD, "198.51.100.2:6000").await;
        assert_eq!(other.status(), StatusCode::OK, "another client");
        let v6 = login_via_proxy(&s, &address, PASSWORD, "[2001:db8::1]:443").await;
        assert_eq!(v6.status(), StatusCode::OK, "an IPv6 client");
        s.stop().await;
    })
    .await;
}

/// Registrations from one client address are counted, taken emails and new accounts alike,
/// with the address's budget (five times the limit): past it, 429 even for a new email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_from_one_address_are_throttled() {
    within(async {
        let s = TestServer::start_with(|c| c.login_attempts = 1).await;
        let taken = email("taken");
        let first = s.register(&taken).await;
        assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
        for _ in 0..4 {
            s.register(&taken)
                .await
                .assert_error(StatusCode::CONFLICT, "email_taken");
        }
        s.register(&email("new"))
            .await
            .assert_error(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts");
        s.clock.advance(Duration::from_secs(15 * 60 + 1));
        let later = s.register(&email("new")).await;
        assert_eq!(
            later.status,
            StatusCode::CREATED,
            "the window has passed: {later:?}"
        );
        s.stop().await;
    })
    .await;
}

/// A password longer than any account can have (over 128 characters) is refused at once, like
/// a wrong one, but is no guess: it does not count towards the throttle (and is not hashed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlong_password_is_refused_without_counting_an_attempt() {
    within(async {
        let s = TestServer::start().await;
        let address = email("overlong");
        s.user(&address).await;
        let overlong = "x".repeat(129);
        for _ in 0..12 {
            s.send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": address.clone(), "password": overlong.clone() })),
            )
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
        }
        let r = s
            .send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": address, "password": PASSWORD })),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        s.stop().await;
    })
    .await;
}
