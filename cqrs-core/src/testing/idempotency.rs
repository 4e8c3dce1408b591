//! The idempotency store conformance suite. See [`IdempotencyStore`] for the contract.
//!
//! Run it with [`idempotency_conformance!`](crate::idempotency_conformance).

use super::Harness;
use crate::clock::ManualClock;
use crate::ports::{Claim, ClaimWaitElapsed, IdempotencyStore, StoreError, StoredResponse};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// What an idempotency store adapter provides to its conformance suite.
#[async_trait::async_trait]
pub trait IdempotencyHarness: Harness {
    /// The store under test.
    fn store(&self) -> Arc<dyn IdempotencyStore>;

    /// The store under test with a claim wait of `wait` (the bound on a claim's wait for the
    /// claim holding its key), for [`a_claim_waits_no_longer_than_the_claim_wait`]. The
    /// other scenarios hold keys as long as they need, so give [`store`](Self::store) a long
    /// one (the shipped harnesses give it a minute), or they may fail on a slow machine.
    fn store_with_claim_wait(&self, wait: Duration) -> Arc<dyn IdempotencyStore>;

    /// The manual clock the store reads, when it takes one. The expiry scenarios count what a
    /// purge removes, so the store must then hold no keys but the scenario's own. `None` (the
    /// default) when the store reads a clock of its own: run the suite with
    /// `idempotency_conformance!(harness, without_clock)`, which leaves out the two scenarios
    /// that move the clock ([`keys_expire_after_their_ttl`] and
    /// [`a_claim_in_progress_is_never_purged`]; they fail on `None`, so they never pass without
    /// testing); [`a_ttl_of_duration_max_keeps_the_response`] then replays without moving it.
    fn clock(&self) -> Option<ManualClock> {
        None
    }

    /// How many claims of `key` in `scope` wait for the claim that holds it, when the harness
    /// can tell (ask the store's backend where it can, e.g. sessions blocked on a lock). The
    /// scenarios with waiting duplicates make sure they all wait before the holder completes
    /// or drops its claim. `None` (the default) when the harness cannot tell: run the suite
    /// with `idempotency_conformance!(harness, without_waiting_claims)`, which leaves out the
    /// two scenarios whose point is claims that wait (they fail on `None`), and runs
    /// [`concurrent_claims_of_one_key_run_the_work_once`] without making sure the others wait.
    async fn waiting_claims(&self, scope: &str, key: &str) -> Option<usize> {
        let _ = (scope, key);
        None
    }
}

/// Returns once `count` claims of `key` in `scope` wait for the claim holding it (within
/// 10 s), as the harness tells; fails when the harness cannot tell.
async fn until_waiting<H: IdempotencyHarness>(h: &H, scope: &str, key: &str, count: usize) {
    if h.waiting_claims(scope, key).await.is_none() {
        panic!(
            "the harness cannot tell waiting claims (`waiting_claims` returned None): run the \
             suite with `idempotency_conformance!(harness, without_waiting_claims)`"
        );
    }
    super::eventually(
        Duration::from_secs(10),
        &format!("{count} claims of `{key}` wait for the claim that holds it"),
        || async { (h.waiting_claims(scope, key).await == Some(count)).then_some(()) },
    )
    .await;
}

/// The harness's manual clock; fails, saying how to run the suite, when it has none.
fn manual_clock<H: IdempotencyHarness>(h: &H) -> ManualClock {
    h.clock().unwrap_or_else(|| {
        panic!(
            "the harness has no manual clock (`clock` returned None): run the suite with \
             `idempotency_conformance!(harness, without_clock)`"
        )
    })
}

/// Expands to one `#[tokio::test]` per idempotency scenario.
///
/// Two hooks of [`IdempotencyHarness`] have no answer for some stores, and the suite is then
/// run with what the harness lacks named, so the test list shows what is not run rather than
/// a test that passes without testing: `without_clock` (no [`IdempotencyHarness::clock`])
/// leaves out [`keys_expire_after_their_ttl`] and [`a_claim_in_progress_is_never_purged`];
/// `without_waiting_claims` (no
/// [`IdempotencyHarness::waiting_claims`]) leaves out
/// [`claims_with_another_fingerprint_fail_at_once_while_the_key_is_held`] and
/// [`a_dropped_claim_hands_the_key_to_one_waiting_duplicate`]. Either leaves out
/// [`a_waiting_duplicate_replays_its_holder_whatever_the_ttl`], which needs both. Both, in
/// that order:
/// `idempotency_conformance!(harness, without_clock, without_waiting_claims)`.
#[macro_export]
macro_rules! idempotency_conformance {
    ($make:path) => {
        $crate::idempotency_conformance!($make, without_clock, without_waiting_claims);
        $crate::__conformance!(
            $make,
            idempotency,
            [a_waiting_duplicate_replays_its_holder_whatever_the_ttl]
        );
        $crate::__conformance!(
            $make,
            idempotency,
            [
                keys_expire_after_their_ttl,
                a_claim_in_progress_is_never_purged
            ]
        );
        $crate::__conformance!(
            $make,
            idempotency,
            [
                claims_with_another_fingerprint_fail_at_once_while_the_key_is_held,
                a_dropped_claim_hands_the_key_to_one_waiting_duplicate,
            ]
        );
    };
    ($make:path, without_clock) => {
        $crate::idempotency_conformance!($make, without_clock, without_waiting_claims);
        $crate::__conformance!(
            $make,
            idempotency,
            [
                claims_with_another_fingerprint_fail_at_once_while_the_key_is_held,
                a_dropped_claim_hands_the_key_to_one_waiting_duplicate,
            ]
        );
    };
    ($make:path, without_waiting_claims) => {
        $crate::idempotency_conformance!($make, without_clock, without_waiting_claims);
        $crate::__conformance!(
            $make,
            idempotency,
            [
                keys_expire_after_their_ttl,
                a_claim_in_progress_is_never_purged
            ]
        );
    };
    ($make:path, without_clock, without_waiting_claims) => {
        $crate::__conformance!(
            $make,
            idempotency,
            [
                a_completed_key_replays_its_response,
                a_response_no_store_can_keep_replays_as_a_note_with_its_status,
                a_key_a_store_cannot_hold_is_refused_or_kept_whole,
                a_key_reused_with_another_request_is_rejected,
                concurrent_claims_of_one_key_run_the_work_once,
                a_dropped_claim_releases_the_key,
                scopes_are_independent,
                a_ttl_of_duration_max_keeps_the_response,
                a_completion_finishes_when_its_caller_stops_waiting,
                a_claim_waits_no_longer_than_the_claim_wait,
            ]
        );
    };
}

const DAY: Duration = Duration::from_secs(24 * 3600);

#[track_caller]
fn new(claim: Claim) -> Box<dyn crate::ports::IdempotencyGuard> {
    match claim {
        Claim::New(guard) => guard,
        Claim::Replay(r) => panic!("expected a new claim, got a replay of {r:?}"),
    }
}

#[track_caller]
fn replay(claim: Claim) -> StoredResponse {
    match claim {
        Claim::Replay(r) => r,
        Claim::New(_) => panic!("expected a replay, got a new claim"),
    }
}

/// The first claim is new; after it completes, a claim with the same fingerprint replays.
pub async fn a_completed_key_replays_its_response<H: IdempotencyHarness>(h: &H) {
    let store = h.store();
    let scope = h.test_id();
    let guard = new(store.claim(scope, "k1", "fp", DAY).await.unwrap());
    let response = StoredResponse::new(201, json!({"id": "t1", "text": "ünïcødé"}));
    guard.complete(response.clone()).await.unwrap();
    assert_eq!(
        replay(store.claim(scope, "k1", "fp", DAY).await.unwrap()),
        response
    );
    assert_eq!(
        replay(store.claim(scope, "k1", "fp", DAY).await.unwrap()),
        response
    );
}

/// A response whose body no store can keep (holding U+0000, which Postgres's `jsonb` refuses,
/// or nested too deep to read back) completes all the same, and a replay answers its status
/// with a note in place of the body ([`StoredResponse::storable`]): the same on every store,
/// and the key is not released (the work ran).
pub async fn a_response_no_store_can_keep_replays_as_a_note_with_its_status<
    H: IdempotencyHarness,
>(
    h: &H,
) {
    let store = h.store();
    let scope = h.test_id();
    let mut deep = json!(1);
    for _ in 0..=crate::ports::MAX_RESPONSE_DEPTH {
        deep = json!([deep]);
    }
    for (key, body) in [("nul", json!({ "title": "a\u{0}b" })), ("deep", deep)] {
        let guard = new(store.claim(scope, key, "fp", DAY).await.unwrap());
        let response = StoredResponse::new(201, body);
        let (kept, why) = response.clone().storable();
        assert!(why.is_some(), "{key}: no store can keep it");
        guard.complete(response).await.unwrap();
        let replayed = replay(store.claim(scope, key, "fp", DAY).await.unwrap());
        assert_eq!(replayed, kept, "{key}");
        assert_eq!(replayed.status, 201, "{key}");
    }
}

/// A scope, key or fingerprint holding U+0000 (text Postgres cannot store) is refused with
/// [`StoreError::Rejected`], or kept whole: claimed, completed and replayed as any other,
/// never stored cut short (where another key would meet it) nor failed as a retryable error
/// (a client would retry it for ever).
pub async fn a_key_a_store_cannot_hold_is_refused_or_kept_whole<H: IdempotencyHarness>(h: &H) {
    let store = h.store();
    let scope = format!("{}-nul", h.test_id());
    let with_nul = format!("{scope}\u{0}");
    for (what, scope, key, fingerprint) in [
        ("scope", with_nul.as_str(), "k", "fp"),
        ("key", scope.as_str(), "k\u{0}", "fp"),
        ("fingerprint", scope.as_str(), "k2", "fp\u{0}"),
    ] {
        match store.claim(scope, key, fingerprint, DAY).await {
            Err(StoreError::Rejected { .. }) => {}
            Ok(Claim::New(guard)) => {
                let response = StoredResponse::new(201, json!({ "ok": true }));
                guard.complete(response.clone()).await.unwrap();
                let again = store.claim(scope, key, fingerprint, DAY).await;
                assert!(
                    matches!(&again, Ok(Claim::Replay(r)) if *r == response),
                    "{what} with U+0000, kept: replays whole, got {again:?}"
                );
            }
            other => panic!("{what} with U+0000: refused as `Rejected` or kept, got {other:?}"),
        }
    }
    // Nothing of them stands for the same text without U+0000: `k` is a new key, and `k2`,
    // if kept, was kept with its whole fingerprint, so `fp` alone is another request.
    let clean = store.claim(&scope, "k", "fp", DAY).await.unwrap();
    assert!(
        matches!(clean, Claim::New(_)),
        "`k` without U+0000 is a new key"
    );
    match store.claim(&scope, "k2", "fp", DAY).await {
        Err(StoreError::FingerprintMismatch { .. }) | Ok(Claim::New(_)) => {}
        Ok(Claim::Replay(r)) => {
            panic!("`fp` replayed the request whose fingerprint holds U+0000: {r:?}")
        }
        Err(e) => panic!("`k2` with `fp`: {e:?}"),
    }
}

/// The same key with a different fingerprint is a typed error, before and after completion.
pub async fn a_key_reused_with_another_request_is_rejected<H: IdempotencyHarness>(h: &H) {
    let store = h.store();
    let scope = h.test_id();
    let guard = new(store.claim(scope, "k", "fp-1", DAY).await.unwrap());
    let while_held = tokio::time::timeout(
        Duration::from_secs(10),
        store.claim(scope, "k", "fp-2", DAY),
    )
    .await
    .expect(
        "a claim with another fingerprint is refused at once while the key is held, not waited for",
    )
    .map(|_| ());
    assert!(
        matches!(while_held, Err(StoreError::FingerprintMismatch { .. })),
        "a claim with another fingerprint is refused while the key is held: {while_held:?}"
    );
    guard
        .complete(StoredResponse::new(200, json!({})))
        .await
        .unwrap();
    match store.claim(scope, "k", "fp-2", DAY).await {
        Err(StoreError::FingerprintMismatch { scope: s, key }) => {
            assert_eq!((s.as_str(), key.as_str()), (scope, "k"))
        }
        other => panic!("expected a fingerprint mismatch, got {other:?}"),
    }
}

/// Ten concurrent requests with one key: the work runs once, and every other request gets
/// its response.
pub async fn concurrent_claims_of_one_key_run_the_work_once<H: IdempotencyHarness>(h: &H) {
    let store = h.store();
    let scope = h.test_id().to_owned();
    let runs = Arc::new(AtomicUsize::new(0));
    // Tells the claim that got the key that the others wait.
    let (all_wait, others_wait) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (store, scope, runs) = (store.clone(), scope.clone(), runs.clone());
            let mut others_wait = others_wait.clone();
            tokio::spawn(async move {
                match store.claim(&scope, "once", "fp", DAY).await.unwrap() {
                    Claim::New(guard) => {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = others_wait.wait_for(|all| *all).await;
                        let response = StoredResponse::new(201, json!({"made": true}));
                        guard.complete(response.clone()).await.unwrap();
                        response
                    }
                    Claim::Replay(r) => r,
                }
            })
        })
        .collect();
    // The nine others wait for the one that got the key before it completes (where the
    // harness can tell; otherwise some may come after it completed, and replay).
    if h.waiting_claims(&scope, "once").await.is_some() {
        until_waiting(h, &scope, "once", 9).await;
    }
    all_wait.send_replace(true);
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            StoredResponse::new(201, json!({"made": true}))
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran once");
}

/// A claim of a held key waits at most its store's claim wait (300 ms here): then it fails
/// as [`StoreError::Unavailable`] with a [`ClaimWaitElapsed`] among its sources that names the
/// wait, not sooner than the wait and within 10 s; the holder keeps the key, and once it
/// completes, a claim replays its response.
pub async fn a_claim_waits_no_longer_than_the_claim_wait<H: IdempotencyHarness>(h: &H) {
    const WAIT: Duration = Duration::from_millis(300);
    let store = h.store_with_claim_wait(WAIT);
    let scope = h.test_id();
    let guard = new(store.claim(scope, "busy", "fp", DAY).await.unwrap());
    let started = tokio::time::Instant::now();
    let waited_out = tokio::time::timeout(PROMPTLY, store.claim(scope, "busy", "fp", DAY))
        .await
        .expect("a claim of a held key gave up within 10 s");
    let waited = started.elapsed();
    let Err(error) = waited_out else {
        panic!("a claim of a held key got an answer while the key was held");
    };
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    let elapsed = std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .find_map(|e| e.downcast_ref::<ClaimWaitElapsed>())
    .unwrap_or_else(|| panic!("no ClaimWaitElapsed among the sources of {error:?}"));
    assert_eq!(elapsed.wait(), WAIT, "{error}");
    assert!(
        waited >= WAIT,
        "it gave up after {waited:?}, before its wait"
    );
    let response = StoredResponse::new(201, json!({"made": true}));
    guard.complete(response.clone()).await.unwrap();
    assert_eq!(
        replay(store.claim(scope, "busy", "fp", DAY).await.unwrap()),
        response,
        "the holder kept the key"
    );
}

/// A claim dropped without completing (the work failed) frees the key for a retry.
pub async fn a_dropped_claim_releases_the_key<H: IdempotencyHarness>(h: &H) {
    let store = h.store();
    let scope = h.test_id();
    let guard = new(store.claim(scope, "k", "fp", DAY).await.unwrap());
    drop(guard);
    let retry = new(store.claim(scope, "k", "fp", DAY).await.unwrap());
    retry
        .complete(StoredResponse::new(200, json!(1)))
        .await
        .unwrap();
}

/// How long a claim may take to answer when it must not wait for another claim.
const PROMPTLY: Duration = Duration::from_secs(10);

/// While a claim of `(k, fp-1)` is held, eight concurrent claims of `k` with `fp-2` all fail
/// with [`StoreError::FingerprintMismatch`] without waiting for it (within 10 s, the
/// guard still held); four concurrent claims with `fp-1`, waiting for it before those start
/// (as the harness tells, see [`IdempotencyHarness::waiting_claims`]), are still waiting once
/// they have all answered, and replay the response after the guard completes.
pub async fn claims_with_another_fingerprint_fail_at_once_while_the_key_is_held<
    H: IdempotencyHarness,
>(
    h: &H,
) {
    let store = h.store();
    let scope = h.test_id().to_owned();
    let guard = new(store.claim(&scope, "k", "fp-1", DAY).await.unwrap());
    let claim = |fingerprint: &'static str| {
        let (store, scope) = (store.clone(), scope.clone());
        tokio::spawn(async move { store.claim(&scope, "k", fingerprint, DAY).await })
    };
    let duplicates: Vec<_> = (0..4).map(|_| claim("fp-1")).collect();
    // The duplicates wait for the holder before the others come: the others then fail past
    // claims that wait, not merely before them.
    until_waiting(h, &scope, "k", 4).await;
    let others: Vec<_> = (0..8).map(|_| claim("fp-2")).collect();
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    for (i, other) in others.into_iter().enumerate() {
        let answer = tokio::time::timeout_at(deadline, other)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "claim {i} with another fingerprint did not answer within {PROMPTLY:?} while \
                 the first claim was held: it waits for the first claim instead of failing"
                )
            });
        match answer.unwrap() {
            Err(StoreError::FingerprintMismatch { scope: s, key }) => {
                assert_eq!((s.as_str(), key.as_str()), (scope.as_str(), "k"))
            }
            Ok(Claim::New(_)) => panic!("claim {i} with another fingerprint took a held key"),
            other => {
                panic!("claim {i} with another fingerprint: expected a mismatch, got {other:?}")
            }
        }
    }
    assert!(
        duplicates.iter().all(|d| !d.is_finished()),
        "a claim with the holder's fingerprint answered while the key was held"
    );
    let response = StoredResponse::new(201, json!({"made": "once"}));
    guard.complete(response.clone()).await.unwrap();
    for duplicate in duplicates {
        let answer = tokio::time::timeout(PROMPTLY, duplicate)
            .await
            .expect("a waiting duplicate did not answer promptly once the key completed");
        assert_eq!(replay(answer.unwrap().unwrap()), response);
    }
}

/// A claim dropped while duplicates (same fingerprint) wait for it hands the key to exactly one
/// of them; the others wait for that one and replay its response.
pub async fn a_dropped_claim_hands_the_key_to_one_waiting_duplicate<H: IdempotencyHarness>(h: &H) {
    let store = h.store();
    let scope = h.test_id().to_owned();
    let guard = new(store.claim(&scope, "k", "fp", DAY).await.unwrap());
    let response = StoredResponse::new(200, json!({"by": "a duplicate"}));
    let duplicates: Vec<_> = (0..4)
        .map(|_| {
            let (store, scope, response) = (store.clone(), scope.clone(), response.clone());
            tokio::spawn(async move {
                match store.claim(&scope, "k", "fp", DAY).await.unwrap() {
                    Claim::New(guard) => {
                        guard.complete(response).await.unwrap();
                        true
                    }
                    Claim::Replay(r) => {
                        assert_eq!(r, response);
                        false
                    }
                }
            })
        })
        .collect();
    // Dropped only once all four wait for it: a duplicate that came later would find the key
    // free, not be handed it.
    until_waiting(h, &scope, "k", 4).await;
    drop(guard);
    let mut took = 0;
    for duplicate in duplicates {
        if tokio::time::timeout(PROMPTLY, duplicate)
            .await
            .expect("a duplicate did not answer promptly once the first claim was dropped (is the key freed when a claim's guard is dropped?)")
            .unwrap()
        {
            took += 1;
        }
    }
    assert_eq!(took, 1, "exactly one duplicate took the dropped key");
}

/// A duplicate that waited for the key's holder replays its response, also when the holder's
/// TTL (zero here) ran out by the time the duplicate looks: the work runs once.
pub async fn a_waiting_duplicate_replays_its_holder_whatever_the_ttl<H: IdempotencyHarness>(h: &H) {
    let clock = manual_clock(h);
    let store = h.store();
    let scope = h.test_id().to_owned();
    let guard = new(store
        .claim(&scope, "k", "fp", Duration::ZERO)
        .await
        .unwrap());
    let duplicate = {
        let (store, scope) = (store.clone(), scope.clone());
        tokio::spawn(async move { store.claim(&scope, "k", "fp", Duration::ZERO).await })
    };
    until_waiting(h, &scope, "k", 1).await;
    clock.advance(Duration::from_secs(1));
    let response = StoredResponse::new(201, json!({"by": "the holder"}));
    guard.complete(response.clone()).await.unwrap();
    let claim = tokio::time::timeout(PROMPTLY, duplicate)
        .await
        .expect("the duplicate answers once the holder completed")
        .unwrap()
        .unwrap();
    assert_eq!(replay(claim), response);
}

/// One key in two scopes is two keys.
pub async fn scopes_are_independent<H: IdempotencyHarness>(h: &H) {
    let store = h.store();
    let (a, b) = (format!("{}-a", h.test_id()), format!("{}-b", h.test_id()));
    new(store.claim(&a, "k", "fp-a", DAY).await.unwrap())
        .complete(StoredResponse::new(200, json!("a")))
        .await
        .unwrap();
    let guard = new(store.claim(&b, "k", "fp-b", DAY).await.unwrap());
    guard
        .complete(StoredResponse::new(200, json!("b")))
        .await
        .unwrap();
    assert_eq!(
        replay(store.claim(&a, "k", "fp-a", DAY).await.unwrap()).body,
        json!("a")
    );
}

/// A key is replayed until its TTL passes, counted from its completion (not its claim), then
/// is new again, and purging removes it.
pub async fn keys_expire_after_their_ttl<H: IdempotencyHarness>(h: &H) {
    let clock = manual_clock(h);
    let store = h.store();
    let scope = h.test_id();
    let mut guards = Vec::new();
    for key in ["k", "purged"] {
        guards.push(new(store.claim(scope, key, "fp", DAY).await.unwrap()));
    }
    // The work takes an hour: a store that counted the TTL from the claim would let the key
    // expire an hour early.
    clock.advance(Duration::from_secs(3600));
    for guard in guards {
        guard
            .complete(StoredResponse::new(200, json!(1)))
            .await
            .unwrap();
    }
    clock.advance(DAY - Duration::from_secs(60));
    replay(store.claim(scope, "k", "fp", DAY).await.unwrap());
    clock.advance(Duration::from_secs(120));
    // Expired is new again, whether a purge ran or not.
    new(store.claim(scope, "k", "other-fp", DAY).await.unwrap())
        .complete(StoredResponse::new(200, json!(2)))
        .await
        .unwrap();
    // "k" was completed anew (a day to live): only "purged" goes, and only once.
    assert_eq!(
        store.purge_expired().await.unwrap(),
        1,
        "the one expired completed key is purged"
    );
    assert_eq!(
        store.purge_expired().await.unwrap(),
        0,
        "a second purge finds nothing left"
    );
    assert_eq!(
        replay(store.claim(scope, "k", "other-fp", DAY).await.unwrap()).body,
        json!(2),
        "the renewed key is kept"
    );
    new(store.claim(scope, "purged", "other-fp", DAY).await.unwrap());

    // The TTL is the one given, not the store's own: ten minutes here.
    let ten_minutes = Duration::from_secs(600);
    new(store
        .claim(scope, "short", "fp", ten_minutes)
        .await
        .unwrap())
    .complete(StoredResponse::new(200, json!(3)))
    .await
    .unwrap();
    clock.advance(Duration::from_secs(540));
    replay(
        store
            .claim(scope, "short", "fp", ten_minutes)
            .await
            .unwrap(),
    );
    clock.advance(Duration::from_secs(120));
    match store
        .claim(scope, "short", "fp", ten_minutes)
        .await
        .unwrap()
    {
        Claim::New(_) => {}
        Claim::Replay(r) => {
            panic!("a key claimed with a TTL of ten minutes replays eleven minutes later: {r:?}")
        }
    }
}

/// A claim still in progress long past its TTL (slow work) is never purged: its completion
/// is kept and replays. Nor is an expired key claimed again, whose expired record the purge
/// still finds while the new claim runs. A purge that took either would let a retry run the
/// work again.
pub async fn a_claim_in_progress_is_never_purged<H: IdempotencyHarness>(h: &H) {
    let clock = manual_clock(h);
    let store = h.store();
    let scope = h.test_id();
    let guard = new(store.claim(scope, "slow", "fp", DAY).await.unwrap());
    clock.advance(DAY * 3);
    assert_eq!(
        store.purge_expired().await.unwrap(),
        0,
        "a purge took a claim still in progress"
    );
    guard
        .complete(StoredResponse::new(201, json!("done")))
        .await
        .unwrap();
    assert_eq!(
        replay(store.claim(scope, "slow", "fp", DAY).await.unwrap()).body,
        json!("done"),
        "the completion of the claim the purge left is kept"
    );

    // Expired in turn, it goes, so the purge below has only the next key to find.
    clock.advance(DAY * 2);
    assert_eq!(
        store.purge_expired().await.unwrap(),
        1,
        "the completed key expired"
    );

    // An expired key claimed again: the purge still finds its expired record, and must not
    // delete the claim that is about to complete it again (a retry would run the work a
    // third time).
    let first = new(store.claim(scope, "again", "fp", DAY).await.unwrap());
    first
        .complete(StoredResponse::new(201, json!({ "run": 1 })))
        .await
        .unwrap();
    clock.advance(DAY * 2);
    let second = new(store.claim(scope, "again", "fp", DAY).await.unwrap());
    let mut purging = tokio::spawn({
        let store = store.clone();
        async move { store.purge_expired().await }
    });
    // The purge passes the held claim by, or waits for it: give it the time to read the
    // expired record before the claim completes (the verdict below is the same either way).
    let ended = tokio::select! {
        ended = &mut purging => Some(ended),
        () = tokio::time::sleep(Duration::from_secs(1)) => None,
    };
    second
        .complete(StoredResponse::new(201, json!({ "run": 2 })))
        .await
        .unwrap();
    // Whatever the purge removed (a store that keeps the claim apart from the expired
    // record may remove that record), the completion it must not take is kept.
    let purged = match ended {
        Some(ended) => ended,
        None => purging.await,
    };
    purged.unwrap().unwrap();
    assert_eq!(
        replay(store.claim(scope, "again", "fp", DAY).await.unwrap()).body,
        json!({ "run": 2 }),
        "the key claimed again and completed is kept"
    );
}

/// A completion whose caller stops waiting for it (its time budget ran out: the future is
/// polled once, then dropped) still finishes: the work the key guards has run, and a key
/// released then would let a retry run it again.
pub async fn a_completion_finishes_when_its_caller_stops_waiting<H: IdempotencyHarness>(h: &H) {
    let store = h.store();
    let scope = h.test_id();
    let guard = new(store.claim(scope, "k", "fp", DAY).await.unwrap());
    {
        let mut completing = guard.complete(StoredResponse::new(200, json!("kept")));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // Finished at once or not, it is dropped here.
        let _ = completing.as_mut().poll(&mut cx);
    }
    // A duplicate waits for the completion in flight, then replays it; one that gets the key
    // (a new claim) means the completion was lost.
    match store.claim(scope, "k", "fp", DAY).await.unwrap() {
        Claim::Replay(r) => assert_eq!(r.body, json!("kept")),
        Claim::New(_) => panic!("the completion was lost when its caller stopped waiting"),
    }
}

/// A ttl too long for any calendar (`Duration::MAX`, "keep it") is no error and no panic: the
/// response is kept and replays.
pub async fn a_ttl_of_duration_max_keeps_the_response<H: IdempotencyHarness>(h: &H) {
    let store = h.store();
    let scope = h.test_id();
    let guard = new(store
        .claim(scope, "forever", "fp", Duration::MAX)
        .await
        .unwrap());
    let response = StoredResponse::new(200, json!({"kept": true}));
    guard.complete(response.clone()).await.unwrap();
    // A century on, where the harness can move the clock: a store that takes `Duration::MAX`
    // for "no time at all", or lets it overflow, expires it.
    if let Some(clock) = h.clock() {
        clock.advance(Duration::from_secs(100 * 365 * 24 * 3600));
    }
    assert_eq!(
        replay(
            store
                .claim(scope, "forever", "fp", Duration::MAX)
                .await
                .unwrap()
        ),
        response
    );
}
