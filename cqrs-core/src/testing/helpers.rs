//! Small helpers every test needs.

use std::future::Future;
use std::time::Duration;

/// A unique id for one test: `{name}_{12 hex digits}`, lower-case, safe in Postgres schema
/// names, Redis keys and channel names.
///
/// ```
/// let a = cqrs_core::testing::test_id("append");
/// let b = cqrs_core::testing::test_id("append");
/// assert!(a.starts_with("append_"));
/// assert_ne!(a, b);
/// ```
pub fn test_id(name: &str) -> String {
    let uuid = uuid::Uuid::now_v7().simple().to_string();
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    // The random tail of a v7 UUID, so ids made in the same millisecond differ.
    format!("{name}_{}", &uuid[uuid.len() - 12..])
}

/// Runs `future`, failing the test if it takes longer than `limit`: a hang fails instead of
/// stalling CI.
pub async fn with_timeout<F: Future>(limit: Duration, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(out) => out,
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

/// Polls `condition` every 10 ms until it returns `Some`, or panics after `deadline` with
/// `what` in the message. For conditions that become true eventually; never sleep and hope.
///
/// The deadline bounds the checks too: a check that hangs (a query against a server that
/// stopped answering) fails with `what` at the deadline instead of stalling the test.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(until, condition()).await {
            Ok(Some(value)) => return value,
            Ok(None) => {}
            Err(_) => panic!(
                "timed out after {deadline:?} waiting for: {what} (its last check did not finish)"
            ),
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether tests that need `service` (reached at `url`) should run. Returns `false`, after
/// printing why, when the service is unreachable and `CQRS_REQUIRE_SERVICES` is not `1`;
/// panics when it is `1` (CI), so a missing service fails the run instead of skipping it.
pub fn require_services(service: &str, url: &str, reachable: bool) -> bool {
    if reachable {
        return true;
    }
    let url = without_user_info(url);
    if std::env::var("CQRS_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!(
            "{service} at {url} is unreachable and CQRS_REQUIRE_SERVICES=1: start it (scripts/test.sh does)"
        );
    }
    eprintln!(
        "skipping: {service} at {url} is unreachable (set CQRS_REQUIRE_SERVICES=1 to fail instead)"
    );
    false
}

/// A conformance scenario whose harness gave it nothing to test: skipped, unless services are
/// required (`CQRS_REQUIRE_SERVICES=1`), where a harness returns `None` only by mistake (its
/// own `require_services` fails the test when the service is away).
#[doc(hidden)]
pub fn __no_harness(scenario: &str) {
    no_harness(
        scenario,
        std::env::var("CQRS_REQUIRE_SERVICES").as_deref() == Ok("1"),
    );
}

fn no_harness(scenario: &str, services_required: bool) {
    if services_required {
        panic!(
            "the harness gave `{scenario}` nothing to test (it returned `None`) and \
             CQRS_REQUIRE_SERVICES=1: a harness returns `None` only when its service is \
             unreachable, through `require_services`"
        );
    }
    eprintln!("skipping `{scenario}`: the harness gave it nothing to test");
}

/// `url` with what comes between its `://` and its last `@` (the user info: a password,
/// maybe holding `/` or `?` unencoded) hidden, for messages.
fn without_user_info(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Whether the long variants of tests (soak, stress) run: `CQRS_LONG=1`. `scripts/test.sh`
/// and CI leave it unset, so what they run stays quick; a test picks its size with it.
///
/// ```
/// let events = if cqrs_core::testing::long() { 20_000 } else { 200 };
/// # assert!(events >= 200);
/// ```
pub fn long() -> bool {
    std::env::var("CQRS_LONG").as_deref() == Ok("1")
}

#[cfg(test)]
mod tests {
    use super::{no_harness, without_user_info};

    /// With services required, a harness that returns `None` fails the scenario.
    #[test]
    #[should_panic(expected = "the harness gave `a_scenario` nothing to test")]
    fn a_missing_harness_fails_when_services_are_required() {
        no_harness("a_scenario", true);
    }

    #[test]
    fn a_missing_harness_is_a_skip_otherwise() {
        no_harness("a_scenario", false);
    }

    /// A test that cannot reach a service names its URL, never its password (scripts/test.sh
    /// puts a generated one in `DATABASE_URL`).
    #[test]
    fn messages_hide_a_urls_user_info() {
        assert_eq!(
            without_user_info("postgres://postgres:s3cret@127.0.0.1:5432/test"),
            "postgres://***@127.0.0.1:5432/test"
        );
        assert_eq!(
            without_user_info("redis://:pa/ss?w@host:6379"),
            "redis://***@host:6379"
        );
        assert_eq!(
            without_user_info("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
