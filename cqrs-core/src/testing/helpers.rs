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
/// [`eventually_ok`] says what the last check found.
///
/// The deadline bounds the checks too: a check that hangs (a query against a server that
/// stopped answering) fails with `what` at the deadline instead of stalling the test.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(deadline, what, || {
        let check = condition();
        async move { check.await.ok_or(None) }
    })
    .await
}

/// Like [`eventually`], for a check that says why it is not there yet: `Err` with what it
/// found, which the panic at the deadline shows (the last one), where `eventually` can only
/// say that it timed out.
///
/// ```
/// use cqrs_core::testing::eventually_ok;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let polls = AtomicU32::new(0);
/// let seen = eventually_ok(Duration::from_secs(5), "three polls", || async {
///     match polls.fetch_add(1, Ordering::SeqCst) + 1 {
///         n if n >= 3 => Ok(n),
///         n => Err(format!("{n} so far")),
///     }
/// })
/// .await;
/// assert_eq!(seen, 3);
/// # });
/// ```
pub async fn eventually_ok<T, E, F, Fut>(deadline: Duration, what: &str, mut condition: F) -> T
where
    E: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    poll_until(deadline, what, || {
        let check = condition();
        async move { check.await.map_err(|e| Some(format!("{e:?}"))) }
    })
    .await
}

/// [`eventually`] and [`eventually_ok`]: `Err(Some(found))` is "not yet", with what was found.
async fn poll_until<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Option<String>>>,
{
    let now = tokio::time::Instant::now();
    // A deadline too far to add (`Duration::MAX`): a century is as good.
    let until = now
        .checked_add(deadline)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
    let mut found: Option<String> = None;
    let said = |found: &Option<String>| {
        found
            .as_ref()
            .map(|f| format!("; its last check found: {f}"))
            .unwrap_or_default()
    };
    loop {
        match tokio::time::timeout_at(until, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(now)) => found = now,
            Err(_) => panic!(
                "timed out after {deadline:?} waiting for: {what} (its last check did not \
                 finish){}",
                said(&found)
            ),
        }
        if tokio::time::Instant::now() >= until {
            panic!(
                "timed out after {deadline:?} waiting for: {what}{}",
                said(&found)
            );
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

/// Makes a subscriber a test installs for its own thread (`tracing::subscriber::set_default`,
/// `with_default`) see every log line, also one that another thread reached first. Call it
/// before installing the subscriber; calling it again does nothing.
///
/// Why: while a process has one subscriber registered (the test's scoped one, no global
/// one), `tracing` asks only the thread that reaches a log line first whether anyone wants
/// it, and caches the answer. When that thread is another test's, which has no subscriber,
/// the answer is "never", and the line is not logged on the test's thread either (until a
/// subscriber is registered again somewhere): a test that reads its logs fails now and then,
/// when tests run in parallel. This registers a second subscriber, which wants nothing (and
/// says so for every level, so it lowers no level filter), for the rest of the process, so
/// that every registered subscriber is asked instead. It helps lines logged on the thread
/// whose default the test set; a line logged on another thread goes to that one's.
///
/// ```rust,standalone_crate
/// use cqrs_core::reexports::tracing::level_filters::LevelFilter;
/// use cqrs_core::reexports::tracing::subscriber::set_default;
/// use cqrs_core::reexports::tracing::{Event, Metadata, Subscriber, span, warn};
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// /// Counts the lines it is given.
/// struct Counter(Arc<AtomicUsize>);
///
/// impl Subscriber for Counter {
///     fn enabled(&self, _: &Metadata<'_>) -> bool { true }
///     fn new_span(&self, _: &span::Attributes<'_>) -> span::Id { span::Id::from_u64(1) }
///     fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
///     fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
///     fn event(&self, _: &Event<'_>) { self.0.fetch_add(1, Ordering::SeqCst); }
///     fn enter(&self, _: &span::Id) {}
///     fn exit(&self, _: &span::Id) {}
/// }
///
/// fn log() {
///     warn!("a line other tests reach too");
/// }
///
/// cqrs_core::testing::scoped_subscribers_see_every_callsite();
/// // It wants no level: registered alone, it leaves every level off.
/// assert_eq!(LevelFilter::current(), LevelFilter::OFF);
/// let seen = Arc::new(AtomicUsize::new(0));
/// let _guard = set_default(Counter(seen.clone()));
/// // Another test's thread, with no subscriber, reaches the line first...
/// std::thread::spawn(log).join().unwrap();
/// // ...and the line this test logs is seen all the same.
/// log();
/// assert_eq!(seen.load(Ordering::SeqCst), 1);
/// ```
pub fn scoped_subscribers_see_every_callsite() {
    static WANTS_NOTHING: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    // `Dispatch::new` registers it; the static keeps it registered.
    WANTS_NOTHING.get_or_init(|| tracing::Dispatch::new(WantsNothing));
}

/// A subscriber that wants no line and no span, at any level. Unlike `NoSubscriber`, it says
/// so in its level hint: one without a hint counts as wanting every level, which would keep
/// `LevelFilter::current()` at `TRACE` for the process.
struct WantsNothing;

impl tracing::Subscriber for WantsNothing {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::never()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::OFF)
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(0xDEAD)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The metric names `src` (every `.rs` file below it) records: string literals starting
/// with `prefix` on a line that names a `counter!`, `gauge!`, `histogram!` or
/// `Key::from_static_parts`, or within the two lines after one. For a crate's test that its
/// catalogue (`METRICS`) lists every metric it records, and nothing else; names recorded
/// through a constant or a variable are not found (list those by hand).
///
/// ```
/// let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
/// let recorded = cqrs_core::testing::metric_names_recorded_in(&src, "cqrs_");
/// assert!(recorded.contains("cqrs_dispatch_total"));
/// ```
pub fn metric_names_recorded_in(
    src: &std::path::Path,
    prefix: &str,
) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("the crate's sources are readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a source file reads");
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let recording = lines[i.saturating_sub(2)..=i].iter().any(|l| {
                    [
                        "counter!(",
                        "gauge!(",
                        "histogram!(",
                        "Key::from_static_parts(",
                    ]
                    .iter()
                    .any(|m| l.contains(m))
                });
                if !recording {
                    continue;
                }
                let quoted = format!("\"{prefix}");
                let mut rest = *line;
                while let Some(start) = rest.find(&quoted) {
                    let after = &rest[start + 1..];
                    let end = after.find('"').unwrap_or(after.len());
                    names.insert(after[..end].to_owned());
                    rest = &after[end..];
                }
            }
        }
    }
    names
}

/// Asserts that `listed` (a crate's catalogue, its `METRICS`) names each metric the sources
/// below `src` record under one of `prefixes` ([`metric_names_recorded_in`]) once, and no
/// other; names `described_elsewhere` lists (another crate's series this one records too,
/// described there) are left out.
///
/// ```
/// let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
/// cqrs_core::testing::assert_metrics_listed(&src, &["cqrs_"], cqrs_core::METRICS, &[]);
/// ```
pub fn assert_metrics_listed(
    src: &std::path::Path,
    prefixes: &[&str],
    listed: &[crate::MetricDescription],
    described_elsewhere: &[crate::MetricDescription],
) {
    let mut recorded = std::collections::BTreeSet::new();
    for prefix in prefixes {
        recorded.extend(metric_names_recorded_in(src, prefix));
    }
    recorded.retain(|name| !described_elsewhere.iter().any(|m| m.name == name));
    let names: std::collections::BTreeSet<String> =
        listed.iter().map(|m| m.name.to_owned()).collect();
    assert_eq!(names.len(), listed.len(), "a name listed twice: {listed:?}");
    assert_eq!(recorded, names, "recorded (left) and listed (right) differ");
}

#[cfg(test)]
mod tests {
    use super::{eventually, eventually_ok, no_harness, without_user_info};
    use std::time::Duration;

    /// At the deadline, `eventually_ok` says what its last check found.
    #[tokio::test]
    #[should_panic(expected = "waiting for: a green light; its last check found: \"red\"")]
    async fn eventually_ok_says_what_its_last_check_found() {
        eventually_ok(Duration::from_millis(50), "a green light", || async {
            Err::<(), _>("red")
        })
        .await;
    }

    /// `eventually` has nothing to say but that it timed out.
    #[tokio::test]
    #[should_panic(expected = "timed out after 50ms waiting for: a green light")]
    async fn eventually_says_what_it_waited_for() {
        eventually(Duration::from_millis(50), "a green light", || async {
            None::<()>
        })
        .await;
    }

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
