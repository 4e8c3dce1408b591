//! Failed-login throttling per (email, client address).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::clock::Clock;
use cqrs_core::ports::StoreError;
use helpdesk_api::{client_key, site_key};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

/// Counts failed logins in a sliding window.
///
/// Every attempt is counted before the password is checked, in the same step as the check
/// of the limit, and taken back when it succeeds: concurrent attempts cannot all pass the
/// check before any of them is counted (a burst of guesses would otherwise get past it).
#[async_trait]
pub trait LoginThrottle: Send + Sync + 'static {
    /// Counts an attempt for this (email, client) key, unless the key is blocked: then
    /// returns the seconds until it may try again, and counts nothing.
    async fn attempt(&self, key: &str) -> Result<Attempt, StoreError>;
    /// The attempt `counted` for this key succeeded (or the server could not finish it): it
    /// is not a failure. Takes back that attempt, not the key's latest: another failure of
    /// the key counted meanwhile stays whole. An attempt that already left the window (or was
    /// swept) is gone already; nothing else is taken back for it.
    async fn take_back(&self, key: &str, counted: Counted) -> Result<(), StoreError>;
}

/// What [`LoginThrottle::attempt`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Counted; [`LoginThrottle::take_back`] undoes it.
    Counted(Counted),
    /// The key is blocked: nothing was counted.
    Blocked {
        /// Whole seconds until the key may try again (at least 1).
        retry_after: u64,
    },
}

impl Attempt {
    /// The seconds to wait when blocked, `None` when counted.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Counted(_) => None,
            Self::Blocked { retry_after } => Some(*retry_after),
        }
    }
}

/// One counted attempt, as its throttle knows it: the instant it was counted at. Two attempts
/// of one key at the same instant are alike, so taking back either undoes one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    at: DateTime<Utc>,
}

impl Counted {
    /// The attempt a throttle counted at `at` (a throttle of your own makes these).
    pub fn at(at: DateTime<Utc>) -> Self {
        Self { at }
    }

    /// When it was counted.
    pub fn instant(&self) -> DateTime<Utc> {
        self.at
    }
}

/// An attempt counted on a throttle under a key, to take back unless it is found a failure.
pub(crate) type Count = (Arc<dyn LoginThrottle>, String, Counted);

/// How many times a client's limit one IPv6 site (a /48) may use across all its /64s.
pub(crate) const SITE_BUDGET_FACTOR: u32 = 4;

/// A limit on what one client address may try, at two grains: the client itself
/// ([`client_key`]: an IPv4 address, an IPv6 /64), and for IPv6 its site ([`site_key`], the
/// /48) with [`SITE_BUDGET_FACTOR`] times the limit. Without the site's count, a party holding
/// a /48 (what a provider hands one customer, a tunnel broker one user, for free) would get
/// 65,536 clients' worth of attempts; with it, the /48 gets a few. Not the site's limit
/// alone: unrelated clients can share a /48 (a mobile carrier's), and one of them must not
/// use up the others' attempts by itself.
#[derive(Clone)]
pub(crate) struct AddressLimit {
    pub(crate) client: Arc<dyn LoginThrottle>,
    pub(crate) site: Arc<dyn LoginThrottle>,
}

impl AddressLimit {
    /// The (throttle, key) pairs an attempt of `kind` from `ip` counts under, the client's
    /// first. Keys are `{kind}|{client}` and `{kind}|{site}`: a /64's key ends in `/64` and a
    /// site's in `/48`, so the two never meet in one table.
    pub(crate) fn keys(
        &self,
        kind: &str,
        ip: Option<IpAddr>,
    ) -> Vec<(Arc<dyn LoginThrottle>, String)> {
        let mut keys = vec![(self.client.clone(), format!("{kind}|{}", client_key(ip)))];
        if let Some(site) = site_key(ip) {
            keys.push((self.site.clone(), format!("{kind}|{site}")));
        }
        keys
    }

    /// Counts an attempt of `kind` from `ip` under each of its keys into `counted`, unless one
    /// is blocked: then returns the seconds until it may try again, and takes back what this
    /// call counted (a refusal is no attempt), or returns the error of a throttle that failed,
    /// with the same take-back.
    pub(crate) async fn attempt(
        &self,
        kind: &str,
        ip: Option<IpAddr>,
        counted: &mut CountedAttempts,
    ) -> Result<Option<u64>, StoreError> {
        let before = counted.counted.len();
        for (throttle, key) in self.keys(kind, ip) {
            let outcome = counted.attempt(&throttle, &key).await;
            if !matches!(outcome, Ok(None)) {
                counted.take_back_since(before).await;
                return outcome;
            }
        }
        Ok(None)
    }
}

/// The attempts one login counted, taken back unless the login is found to be a failure.
///
/// Only a login whose password was checked and found wrong (or whose email is unknown) is a
/// failed attempt. One the server could not finish (a store error, a throttle error after the
/// first count, or a future dropped at an `.await`: a time-out, a client gone) must not count,
/// or an outage would lock clients out. [`keep`](Self::keep) says the login failed; otherwise
/// [`take_back`](Self::take_back) undoes the counts, and a guard dropped before either (the
/// login was cancelled) takes them back on a task of its own.
#[must_use = "dropping it takes the counts back on a task; say what happened instead"]
pub(crate) struct CountedAttempts {
    counted: Vec<Count>,
}

impl CountedAttempts {
    /// Nothing counted yet.
    pub(crate) fn new() -> Self {
        Self {
            counted: Vec::new(),
        }
    }

    /// Counts an attempt for `key` on `throttle`, unless the key is blocked: then returns the
    /// seconds until it may try again, as [`LoginThrottle::attempt`] does.
    ///
    /// The attempt runs on a task of its own, which hands the count over in a guard of this
    /// kind: a login dropped while its attempt was under way (a `COMMIT` whose answer was late,
    /// past the request's time budget) never learned of a count the store kept, and nothing
    /// took it back. Now the guard, unreceived, takes it back as any dropped login's does.
    pub(crate) async fn attempt(
        &mut self,
        throttle: &Arc<dyn LoginThrottle>,
        key: &str,
    ) -> Result<Option<u64>, StoreError> {
        let (throttle, key) = (throttle.clone(), key.to_owned());
        let (answer, answered) = tokio::sync::oneshot::channel();
        let attempt = async move {
            let outcome = throttle.attempt(&key).await.map(|attempt| match attempt {
                Attempt::Counted(counted) => Ok(CountedAttempts {
                    counted: vec![(throttle, key, counted)],
                }),
                Attempt::Blocked { retry_after } => Err(retry_after),
            });
            // Unreceived, the guard in it is dropped here, and takes the count back.
            let _ = answer.send(outcome);
        };
        tokio::spawn(attempt.in_current_span());
        match answered.await {
            Ok(Ok(Ok(mut counted))) => {
                self.counted.append(&mut counted.counted);
                Ok(None)
            }
            Ok(Ok(Err(retry_after))) => Ok(Some(retry_after)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Backend {
                backend: "login throttle",
                source: "the login attempt's count ended without an answer (it panicked, or \
                         the runtime is shutting down)"
                    .into(),
            }),
        }
    }

    /// The password was checked and found wrong: the counts stay.
    pub(crate) fn keep(mut self) {
        self.counted.clear();
    }

    /// The counts, handed over to a guard of another kind: this one no longer takes them back.
    pub(crate) fn into_counts(mut self) -> Vec<Count> {
        std::mem::take(&mut self.counted)
    }

    /// Takes back the counts made after the first `len`, logging a failure to.
    async fn take_back_since(&mut self, len: usize) {
        let since = self.counted.split_off(len.min(self.counted.len()));
        if let Err(e) = take_back_all(since).await {
            tracing::warn!(error = %e, "a refused attempt stays counted");
        }
    }

    /// Takes every count back (the login succeeded, or the server could not finish it). Tries
    /// each, and returns the first error.
    pub(crate) async fn take_back(mut self) -> Result<(), StoreError> {
        take_back_all(std::mem::take(&mut self.counted)).await
    }
}

/// Takes `counts` back, newest first, on a task of its own, and waits for it: a login
/// cancelled while a take-back waits (for a pooled connection) leaves the task to finish.
/// Awaited in the login's future, the counts it had not reached stayed counted, and the one
/// under way could not be done again by the guard's drop: taking an attempt back twice
/// undoes another one counted at the same instant (alike attempts are one). Returns the
/// first error; tries each (a throttle that panics on one is an error for that one). The
/// task logs the error itself when the login is gone and cannot.
async fn take_back_all(counts: Vec<Count>) -> Result<(), StoreError> {
    if counts.is_empty() {
        return Ok(());
    }
    let take_back = undo(counts);
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return take_back.await;
    };
    let (answer, answered) = tokio::sync::oneshot::channel();
    runtime.spawn(
        async move {
            if let Err(Err(e)) = answer.send(take_back.await) {
                tracing::warn!(error = %e, "a cancelled login's attempt stays counted");
            }
        }
        .in_current_span(),
    );
    answered.await.unwrap_or_else(|_| {
        Err(StoreError::Backend {
            backend: "login throttle",
            source: "the take-back of login attempts stopped (the runtime is shutting down?)"
                .into(),
        })
    })
}

/// Takes each of `counts` back, newest first, where it runs (the caller's task): tries each
/// (a throttle that panics on one is an error for that one) and returns the first error.
async fn undo(mut counts: Vec<Count>) -> Result<(), StoreError> {
    let mut first_error = None;
    while let Some((throttle, key, counted)) = counts.pop() {
        let undone = cqrs_core::CatchUnwind::new(async { throttle.take_back(&key, counted).await })
            .await
            .unwrap_or_else(|panic| {
                Err(StoreError::Backend {
                    backend: "login throttle",
                    source: format!("its take-back panicked: {panic}").into(),
                })
            });
        if let Err(e) = undone {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

impl Drop for CountedAttempts {
    fn drop(&mut self) {
        if self.counted.is_empty() {
            return;
        }
        let counted = std::mem::take(&mut self.counted);
        // A drop cannot wait: the login's future was dropped, so the take-back runs on its own.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("a cancelled login's attempts stay counted: no runtime to undo them");
            return;
        };
        runtime.spawn(async move {
            if let Err(e) = undo(counted).await {
                tracing::warn!(error = %e, "a cancelled login's attempt stays counted");
            }
        });
    }
}

/// How many attempts between two sweeps of keys whose attempts all left the window.
const SWEEP_EVERY: u64 = 1024;

/// The most keys an [`InMemoryLoginThrottle`] tracks at once by default.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

#[derive(Default)]
struct Attempts {
    by_key: HashMap<String, VecDeque<DateTime<Utc>>>,
    since_sweep: u64,
}

/// A throttle in process memory, on an injectable clock.
///
/// It tracks at most [`max_keys`](Self::max_keys) keys (100,000 by default, a few hundred
/// bytes each): each email and client address tried adds some, and an attacker trying from
/// many addresses could otherwise grow it without bound within a window. When a new key
/// finds it holding that many, the keys whose attempts all left the window are dropped, and
/// if that leaves less than a tenth of the places free, those with the fewest failures in the
/// window (the oldest first among equals) until a tenth is, logged at warn level. Those are what a spray of many
/// emails from many addresses leaves, one or two failures each; the counts that block
/// someone (an address's budget, an account guessed at) are the last to go. Refusing new
/// keys instead would let such a spray lock every other sign-in out.
#[derive(Clone)]
pub struct InMemoryLoginThrottle {
    attempts: Arc<Mutex<Attempts>>,
    clock: Arc<dyn Clock>,
    limit: u32,
    window: Duration,
    max_keys: usize,
}

impl std::fmt::Debug for InMemoryLoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryLoginThrottle")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// The longest window a throttle keeps attempts for: a century. A longer one (`Duration::MAX`
/// for "never forget") counts as a century, so that an attempt's time plus the window stays a
/// time chrono holds.
pub(crate) const LONGEST_WINDOW: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl InMemoryLoginThrottle {
    /// Blocks a key after `limit` failures within `window` (at most a century).
    pub fn new(clock: Arc<dyn Clock>, limit: u32, window: Duration) -> Self {
        Self {
            attempts: Arc::default(),
            clock,
            limit,
            window: window.min(LONGEST_WINDOW),
            max_keys: DEFAULT_MAX_KEYS,
        }
    }

    /// The most keys tracked at once (at least 1; [`DEFAULT_MAX_KEYS`] by default); see the
    /// type's docs.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max.max(1);
        self
    }

    fn window(&self) -> chrono::Duration {
        // A century at most (`new`): always a chrono duration.
        chrono::Duration::from_std(self.window).unwrap_or(chrono::Duration::days(36_500))
    }
}

#[async_trait]
impl LoginThrottle for InMemoryLoginThrottle {
    async fn attempt(&self, key: &str) -> Result<Attempt, StoreError> {
        let now = self.clock.now();
        let window = self.window();
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        attempts.since_sweep += 1;
        let new_key_when_full =
            attempts.by_key.len() >= self.max_keys && !attempts.by_key.contains_key(key);
        if attempts.since_sweep >= SWEEP_EVERY || new_key_when_full {
            // Keys of many different emails would otherwise stay forever.
            attempts.since_sweep = 0;
            attempts.by_key.retain(|_, list| {
                while list.front().is_some_and(|t| *t + window <= now) {
                    list.pop_front();
                }
                !list.is_empty()
            });
            // Down to nine tenths whatever the sweep freed: the next sweep of a full map comes
            // a tenth of it in new keys later, not at the next new key (with keys leaving the
            // window about as fast as new ones come, each would sweep them all).
            let evicted = if new_key_when_full {
                evict_fewest(&mut attempts.by_key, self.max_keys)
            } else {
                0
            };
            if evicted > 0 {
                tracing::warn!(
                    keys = attempts.by_key.len(),
                    evicted,
                    "the login throttle tracks as many keys as it may, each with a failure in its \
                     window: it forgot those with the fewest (many addresses trying many emails: \
                     an attack?)"
                );
            }
        }
        let list = attempts.by_key.entry(key.to_owned()).or_default();
        while list.front().is_some_and(|t| *t + window <= now) {
            list.pop_front();
        }
        if list.len() >= self.limit as usize {
            // Blocked until the oldest attempt in the window leaves it.
            let until = list.front().map_or(now, |t| *t + window);
            return Ok(Attempt::Blocked {
                retry_after: retry_after(until - now),
            });
        }
        list.push_back(now);
        Ok(Attempt::Counted(Counted::at(now)))
    }

    async fn take_back(&self, key: &str, counted: Counted) -> Result<(), StoreError> {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = attempts.by_key.get_mut(key) {
            // The newest alike: the list is in the order attempts were counted.
            if let Some(at) = list.iter().rposition(|t| *t == counted.at) {
                list.remove(at);
            }
            if list.is_empty() {
                attempts.by_key.remove(key);
            }
        }
        Ok(())
    }
}

/// Whole seconds to wait for `left` to pass, rounded up (a client that waits what it is told
/// must not be refused again), at least 1.
pub(crate) fn retry_after(left: chrono::Duration) -> u64 {
    // Microseconds: what Postgres keeps of a timestamp (past ~292,000 years, milliseconds).
    match left.num_microseconds() {
        Some(us) => (us.max(0) as u64).div_ceil(1_000_000),
        None => (left.num_milliseconds().max(0) as u64).div_ceil(1000),
    }
    .max(1)
}

/// Drops the keys with the fewest attempts (their lists hold only attempts in the window; the
/// oldest latest attempt first among equals) until a tenth of `max` is free. Returns how many.
fn evict_fewest(by_key: &mut HashMap<String, VecDeque<DateTime<Utc>>>, max: usize) -> usize {
    let rank = |list: &VecDeque<DateTime<Utc>>| (list.len(), list.back().copied());
    let len = by_key.len();
    // A tenth of `max` free, and a place for the new key whatever `max` (1, say).
    let goal = len
        .saturating_sub(max - max / 10)
        .max((len + 1).saturating_sub(max))
        .min(len);
    if goal == 0 {
        return 0;
    }
    let mut ranks: Vec<_> = by_key.values().map(rank).collect();
    let (below, last, _) = ranks.select_nth_unstable(goal - 1);
    let last = *last;
    // Every key ranked below the `goal`-th goes, and as many ranked like it as make `goal`.
    let mut alike = goal - below.iter().filter(|r| **r < last).count();
    by_key.retain(|_, list| {
        let r = rank(list);
        if r < last {
            false
        } else if r == last && alike > 0 {
            alike -= 1;
            false
        } else {
            true
        }
    });
    goal
}

/// With `throttle` allowing 2 attempts a minute on `clock`: an attempt taken back after a
/// later failure was counted leaves that failure in the window. Run on every throttle.
#[cfg(test)]
pub(crate) async fn a_take_back_keeps_a_later_failure(
    throttle: &dyn LoginThrottle,
    clock: &cqrs_core::clock::ManualClock,
) {
    let Attempt::Counted(first) = throttle.attempt("k").await.unwrap() else {
        panic!("blocked")
    };
    clock.advance(Duration::from_secs(30));
    // A failure, counted while the first attempt is still in flight.
    assert_eq!(throttle.attempt("k").await.unwrap().retry_after(), None);
    throttle.take_back("k", first).await.unwrap();
    clock.advance(Duration::from_secs(31));
    // The failure, counted at 30 s, stays in the window until 90 s.
    assert_eq!(throttle.attempt("k").await.unwrap().retry_after(), None);
    assert!(
        throttle.attempt("k").await.unwrap().retry_after().is_some(),
        "the failure was taken back in place of the first attempt"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_core::clock::ManualClock;

    /// Full of keys with failures in their window, the throttle takes a new key in place of
    /// a tenth of them, those with the fewest failures (the oldest first among equals); a key
    /// with more keeps its count, and blocks at its limit as before. Keys whose failures all
    /// left the window go first.
    #[tokio::test]
    async fn a_full_throttle_forgets_the_keys_with_the_fewest_failures() {
        let clock = ManualClock::at(Utc::now());
        let throttle =
            InMemoryLoginThrottle::new(Arc::new(clock.clone()), 3, Duration::from_secs(60))
                .max_keys(20);
        let counted = |a: Attempt| a.retry_after().is_none();
        let keys = || {
            let mut keys: Vec<String> = throttle
                .attempts
                .lock()
                .unwrap()
                .by_key
                .keys()
                .cloned()
                .collect();
            keys.sort();
            keys
        };
        for _ in 0..2 {
            assert!(counted(throttle.attempt("hot").await.unwrap()));
        }
        for n in 0..19 {
            assert!(counted(
                throttle.attempt(&format!("spray{n:02}")).await.unwrap()
            ));
            clock.advance(Duration::from_secs(1));
        }
        assert_eq!(keys().len(), 20);
        // Two places made (a tenth of 20): the two oldest of the sprayed keys, one failure each.
        assert!(counted(throttle.attempt("new").await.unwrap()));
        let kept = keys();
        assert_eq!(kept.len(), 19);
        assert!(!kept.contains(&"spray00".to_owned()) && !kept.contains(&"spray01".to_owned()));
        assert!(kept.contains(&"hot".to_owned()) && kept.contains(&"spray02".to_owned()));
        assert!(counted(throttle.attempt("hot").await.unwrap()), "its third");
        assert!(
            throttle
                .attempt("hot")
                .await
                .unwrap()
                .retry_after()
                .is_some(),
            "hot kept its count"
        );
        // At 69 s the keys sprayed up to 9 s left the window: the next new key to find the
        // throttle full takes their places, and no key with a failure in the window goes.
        clock.advance(Duration::from_secs(50));
        for n in 0..3 {
            assert!(counted(
                throttle.attempt(&format!("late{n}")).await.unwrap()
            ));
        }
        let kept = keys();
        assert_eq!(kept.len(), 14, "{kept:?}");
        assert!(!kept.contains(&"spray09".to_owned()), "left the window");
        for key in ["hot", "spray10", "spray18", "new", "late0", "late2"] {
            assert!(kept.contains(&key.to_owned()), "{key}: {kept:?}");
        }
        // Full again; at 70 s one key leaves the window (`spray10`): the next new key's sweep
        // frees its place, and the throttle still goes down to nine tenths, so the key after
        // it does not sweep the whole map again.
        for n in 0..6 {
            assert!(counted(
                throttle.attempt(&format!("fill{n}")).await.unwrap()
            ));
        }
        assert_eq!(keys().len(), 20);
        clock.advance(Duration::from_secs(1));
        assert!(counted(throttle.attempt("one_more").await.unwrap()));
        let kept = keys();
        assert_eq!(kept.len(), 19, "{kept:?}");
        assert!(
            !kept.contains(&"spray11".to_owned()),
            "the next fewest: {kept:?}"
        );
    }

    /// Counts every attempt; each take-back waits for the test's permit, then is counted.
    struct Gated {
        clock: ManualClock,
        started: tokio::sync::Semaphore,
        permits: tokio::sync::Semaphore,
        taken_back: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl LoginThrottle for Gated {
        async fn attempt(&self, _key: &str) -> Result<Attempt, StoreError> {
            Ok(Attempt::Counted(Counted::at(self.clock.now())))
        }

        async fn take_back(&self, key: &str, _counted: Counted) -> Result<(), StoreError> {
            self.started.add_permits(1);
            self.permits.acquire().await.expect("open").forget();
            self.taken_back.lock().unwrap().push(key.to_owned());
            Ok(())
        }
    }

    /// Counts every attempt once the test lets it answer (`answers`), saying when it counted
    /// (`counted`): a `COMMIT` whose answer comes late. Takes back as the store it wraps does.
    struct LateAnswers {
        inner: InMemoryLoginThrottle,
        counted: tokio::sync::Notify,
        answers: tokio::sync::Notify,
    }

    #[async_trait]
    impl LoginThrottle for LateAnswers {
        async fn attempt(&self, key: &str) -> Result<Attempt, StoreError> {
            let attempt = self.inner.attempt(key).await;
            let answers = self.answers.notified();
            self.counted.notify_one();
            answers.await;
            attempt
        }

        async fn take_back(&self, key: &str, counted: Counted) -> Result<(), StoreError> {
            self.inner.take_back(key, counted).await
        }
    }

    /// A login dropped while its attempt was being counted (the store kept the count, its
    /// answer late) does not keep a count it never learned of.
    #[tokio::test]
    async fn a_login_dropped_while_its_attempt_is_counted_keeps_no_count() {
        let clock = Arc::new(ManualClock::new());
        let late = Arc::new(LateAnswers {
            inner: InMemoryLoginThrottle::new(clock.clone(), 1, Duration::from_secs(60)),
            counted: tokio::sync::Notify::new(),
            answers: tokio::sync::Notify::new(),
        });
        let throttle: Arc<dyn LoginThrottle> = late.clone();
        let mut login = CountedAttempts::new();
        tokio::select! {
            attempted = login.attempt(&throttle, "k") => panic!("answered early: {attempted:?}"),
            // Dropped here, the count kept and its answer not come yet.
            () = late.counted.notified() => {}
        }
        drop(login);
        late.answers.notify_one();
        let runtime = tokio::runtime::Handle::current().metrics();
        tokio::time::timeout(Duration::from_secs(10), async {
            while runtime.num_alive_tasks() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the attempt's task and its take-back end");
        assert!(
            matches!(late.inner.attempt("k").await.unwrap(), Attempt::Counted(_)),
            "the dropped login's count was taken back (the limit is 1)"
        );
    }

    /// A login whose take-back is cancelled while one waits (for a pooled connection, say)
    /// still takes every count back: the one under way too, which the guard's drop cannot
    /// do again (it would undo an alike attempt of another login).
    #[tokio::test]
    async fn a_take_back_cancelled_part_way_still_takes_every_count_back() {
        let gated = Arc::new(Gated {
            clock: ManualClock::new(),
            started: tokio::sync::Semaphore::new(0),
            permits: tokio::sync::Semaphore::new(0),
            taken_back: Default::default(),
        });
        let throttle: Arc<dyn LoginThrottle> = gated.clone();
        let mut counted = CountedAttempts::new();
        for key in ["pair", "address"] {
            assert_eq!(counted.attempt(&throttle, key).await.unwrap(), None);
        }
        let mut take_back = Box::pin(counted.take_back());
        // Polled until the first take-back waits, then dropped: the login was cancelled.
        tokio::select! {
            _ = &mut take_back => panic!("the take-back finished without its permit"),
            started = gated.started.acquire() => started.expect("open").forget(),
        }
        drop(take_back);
        gated.permits.add_permits(2);
        tokio::time::timeout(Duration::from_secs(10), async {
            while gated.taken_back.lock().unwrap().len() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("both counts taken back within 10 s");
        let mut taken_back = gated.taken_back.lock().unwrap().clone();
        taken_back.sort();
        assert_eq!(taken_back, ["address", "pair"]);
    }

    /// A window of `Duration::MAX` ("never forget") counts as a century: the attempts' times
    /// plus the window overflowed chrono and panicked at the second attempt.
    #[tokio::test]
    async fn a_window_of_duration_max_counts_as_a_century() {
        let clock = ManualClock::new();
        let throttle = InMemoryLoginThrottle::new(Arc::new(clock.clone()), 1, Duration::MAX);
        assert!(matches!(
            throttle.attempt("k").await.unwrap(),
            Attempt::Counted(_)
        ));
        let blocked = throttle.attempt("k").await.unwrap().retry_after();
        assert_eq!(blocked, Some(100 * 365 * 24 * 3600));
    }

    #[tokio::test]
    async fn the_limit_counts_attempts_and_successes_are_taken_back() {
        let clock = ManualClock::new();
        let throttle =
            InMemoryLoginThrottle::new(Arc::new(clock.clone()), 3, Duration::from_secs(60));
        let mut counted = Vec::new();
        for _ in 0..3 {
            match throttle.attempt("k").await.unwrap() {
                Attempt::Counted(c) => counted.push(c),
                blocked => panic!("{blocked:?}"),
            }
        }
        assert!(
            throttle.attempt("k").await.unwrap().retry_after().is_some(),
            "blocked"
        );
        throttle.take_back("k", counted[2]).await.unwrap();
        assert_eq!(
            throttle.attempt("k").await.unwrap().retry_after(),
            None,
            "one taken back"
        );
        clock.advance(Duration::from_secs(61));
        assert_eq!(
            throttle.attempt("k").await.unwrap().retry_after(),
            None,
            "the window passed"
        );
    }

    #[tokio::test]
    async fn keys_whose_attempts_left_the_window_are_forgotten() {
        let clock = ManualClock::new();
        let throttle =
            InMemoryLoginThrottle::new(Arc::new(clock.clone()), 3, Duration::from_secs(60));
        for n in 0..SWEEP_EVERY - 1 {
            throttle.attempt(&format!("k{n}")).await.unwrap();
        }
        clock.advance(Duration::from_secs(61));
        throttle.attempt("last").await.unwrap();
        let keys = throttle.attempts.lock().unwrap().by_key.len();
        assert_eq!(keys, 1, "only the key tried within the window is kept");
    }

    /// `retry_after` rounds up: a client that waits exactly what it was told is let through.
    #[tokio::test]
    async fn waiting_the_retry_after_is_enough() {
        let clock = ManualClock::new();
        let throttle =
            InMemoryLoginThrottle::new(Arc::new(clock.clone()), 1, Duration::from_secs(60));
        assert_eq!(throttle.attempt("k").await.unwrap().retry_after(), None);
        clock.advance(Duration::from_millis(58_500));
        let wait = throttle
            .attempt("k")
            .await
            .unwrap()
            .retry_after()
            .expect("blocked");
        assert_eq!(wait, 2, "1.5 s left");
        clock.advance(Duration::from_secs(wait));
        assert_eq!(throttle.attempt("k").await.unwrap().retry_after(), None);
        assert_eq!(retry_after(chrono::Duration::microseconds(59_000_400)), 60);
        assert_eq!(retry_after(chrono::Duration::seconds(59)), 59);
        assert_eq!(retry_after(chrono::Duration::zero()), 1);
    }

    /// A take-back undoes its own attempt, not the key's latest: a failure counted while it
    /// was in flight keeps its place in the window, and one whose attempt already left the
    /// window takes back nothing else.
    #[tokio::test]
    async fn a_take_back_undoes_its_own_attempt_not_a_later_failure() {
        let clock = ManualClock::new();
        let throttle =
            InMemoryLoginThrottle::new(Arc::new(clock.clone()), 2, Duration::from_secs(60));
        a_take_back_keeps_a_later_failure(&throttle, &clock).await;

        // An attempt that left the window before its take-back: nothing else goes.
        let throttle =
            InMemoryLoginThrottle::new(Arc::new(clock.clone()), 1, Duration::from_secs(5));
        let Attempt::Counted(late) = throttle.attempt("k").await.unwrap() else {
            panic!("blocked")
        };
        clock.advance(Duration::from_secs(6));
        assert_eq!(throttle.attempt("k").await.unwrap().retry_after(), None);
        throttle.take_back("k", late).await.unwrap();
        assert!(
            throttle.attempt("k").await.unwrap().retry_after().is_some(),
            "a failure was taken back for an attempt that had left the window"
        );
    }
}
