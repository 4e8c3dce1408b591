//! The in-memory idempotency store.

use crate::clock::{Clock, SystemClock};
use crate::ports::{
    Claim, ClaimWaitElapsed, IdempotencyGuard, IdempotencyStore, StoreError, StoredResponse,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

enum Entry {
    /// Claimed; the watch fires when the claim completes or is dropped.
    InProgress {
        fingerprint: String,
        done: watch::Receiver<bool>,
        /// How many duplicate claims wait for it.
        waiting: Arc<AtomicUsize>,
    },
    Done {
        fingerprint: String,
        response: StoredResponse,
        expires_at: DateTime<Utc>,
    },
}

type Key = (String, String);

/// The claim wait of [`InMemoryIdempotencyStore`] unless set: Postgres's default.
const DEFAULT_CLAIM_WAIT: Duration = Duration::from_secs(5);

/// An idempotency store in process memory, with an injectable clock for expiry.
#[derive(Clone)]
pub struct InMemoryIdempotencyStore {
    entries: Arc<Mutex<HashMap<Key, Entry>>>,
    clock: Arc<dyn Clock>,
    claim_wait: Duration,
}

impl std::fmt::Debug for InMemoryIdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryIdempotencyStore")
            .field("claim_wait", &self.claim_wait)
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryIdempotencyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryIdempotencyStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// An empty store on the given clock (tests use a [`ManualClock`](crate::clock::ManualClock)).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            entries: Arc::default(),
            clock,
            claim_wait: DEFAULT_CLAIM_WAIT,
        }
    }

    /// How long a claim waits while another claim with the same key and fingerprint holds
    /// the key (default 5 s, as on Postgres), before it fails as
    /// [`Unavailable`](StoreError::Unavailable) with a [`ClaimWaitElapsed`] source: "still
    /// running, retry once it has finished". Measured on tokio's clock (the injected clock
    /// dates expiry only), so a duplicate claim needs tokio's time driver; a wait too long
    /// for the clock (`Duration::MAX`) waits as long as the holder runs. Zero counts as a
    /// millisecond.
    ///
    /// ```
    /// use cqrs_core::memory::InMemoryIdempotencyStore;
    /// use std::time::Duration;
    ///
    /// let store = InMemoryIdempotencyStore::new().with_claim_wait(Duration::from_secs(2));
    /// # let _ = store;
    /// ```
    pub fn with_claim_wait(mut self, wait: Duration) -> Self {
        self.claim_wait = wait.max(Duration::from_millis(1));
        self
    }

    /// How many claims of `key` in `scope` wait for the claim that holds it (duplicates, with
    /// its fingerprint): 0 when none does or nothing holds it. Lets tests make sure duplicates
    /// wait before the holder completes or drops its claim.
    pub fn waiting_claims(&self, scope: &str, key: &str) -> usize {
        match self.lock().get(&(scope.to_owned(), key.to_owned())) {
            Some(Entry::InProgress { waiting, .. }) => waiting.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        // A std mutex: nothing awaits while it is held.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Guard {
    store: InMemoryIdempotencyStore,
    key: Option<Key>,
    ttl: Duration,
    done: watch::Sender<bool>,
}

#[async_trait]
impl IdempotencyGuard for Guard {
    async fn complete(mut self: Box<Self>, response: StoredResponse) -> Result<(), StoreError> {
        // What Postgres would keep, so a replay in memory answers as one on Postgres.
        let (response, why) = response.storable();
        if let Some(why) = why {
            tracing::warn!(key = ?self.key, %why, "stored a note in place of a response no store can keep");
        }
        if let Some(key) = self.key.take() {
            // A ttl too long for the calendar (`Duration::MAX` as "keep forever") saturates.
            let now = self.store.clock.now();
            let expires_at = chrono::Duration::from_std(self.ttl)
                .ok()
                .and_then(|ttl| now.checked_add_signed(ttl))
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
            let mut entries = self.store.lock();
            let fingerprint = match entries.remove(&key) {
                Some(Entry::InProgress { fingerprint, .. })
                | Some(Entry::Done { fingerprint, .. }) => fingerprint,
                None => String::new(),
            };
            entries.insert(
                key,
                Entry::Done {
                    fingerprint,
                    response,
                    expires_at,
                },
            );
        }
        let _ = self.done.send(true);
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Not completed: release the key so a retry may run the work.
        if let Some(key) = self.key.take() {
            self.store.lock().remove(&key);
        }
        let _ = self.done.send(true);
    }
}

/// Counts one claim waiting for the claim that holds its key, while it lives (the claim's
/// future may be dropped while it waits).
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn on(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl IdempotencyStore for InMemoryIdempotencyStore {
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        // Refused as Postgres refuses it, so that tests on this store meet the refusal.
        let nul = [("scope", scope), ("key", key), ("fingerprint", fingerprint)]
            .into_iter()
            .find(|(_, text)| text.contains('\0'));
        if let Some((what, _)) = nul {
            return Err(StoreError::Rejected {
                backend: "memory",
                source: format!("the idempotency {what} holds U+0000, which Postgres cannot store")
                    .into(),
            });
        }
        let id: Key = (scope.to_owned(), key.to_owned());
        let mismatch = || StoreError::FingerprintMismatch {
            scope: scope.to_owned(),
            key: key.to_owned(),
        };
        // One bound for the whole wait, however many holders come and go meanwhile; none for a
        // wait too long for the clock (`Duration::MAX`: wait as long as the holder runs).
        let until = tokio::time::Instant::now().checked_add(self.claim_wait);
        // Read once, when the claim is made: a claim that waited for the key's holder replays
        // that holder's response, however short its TTL (Postgres compares with the claim's
        // time as well). Read after the wait, a TTL that ran out meanwhile would run the work
        // a second time.
        let now = self.clock.now();
        loop {
            let (mut wait, waiting) = {
                let mut entries = self.lock();
                match entries.get(&id) {
                    Some(Entry::Done {
                        fingerprint: stored,
                        response,
                        expires_at,
                    }) if *expires_at > now => {
                        if stored != fingerprint {
                            return Err(mismatch());
                        }
                        return Ok(Claim::Replay(response.clone()));
                    }
                    Some(Entry::InProgress {
                        fingerprint: stored,
                        done,
                        waiting,
                    }) => {
                        if stored != fingerprint {
                            return Err(mismatch());
                        }
                        (done.clone(), Waiting::on(waiting))
                    }
                    _ => {
                        let (done_tx, done_rx) = watch::channel(false);
                        entries.insert(
                            id.clone(),
                            Entry::InProgress {
                                fingerprint: fingerprint.to_owned(),
                                done: done_rx,
                                waiting: Arc::default(),
                            },
                        );
                        return Ok(Claim::New(Box::new(Guard {
                            store: self.clone(),
                            key: Some(id),
                            ttl,
                            done: done_tx,
                        })));
                    }
                }
            };
            // Wait for the first claim to finish, then look again.
            let finished = match until {
                Some(until) => tokio::time::timeout_at(until, wait.wait_for(|done| *done))
                    .await
                    .is_ok(),
                None => {
                    let _ = wait.wait_for(|done| *done).await;
                    true
                }
            };
            drop(waiting);
            if !finished {
                return Err(StoreError::Unavailable {
                    backend: "memory",
                    source: Box::new(ClaimWaitElapsed::new(self.claim_wait)),
                });
            }
        }
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = self.clock.now();
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|_, e| !matches!(e, Entry::Done { expires_at, .. } if *expires_at <= now));
        Ok((before - entries.len()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A claim wait too long for the clock means no bound: a claim neither panics nor gives
    /// up, and a duplicate waits for the holder, then replays its response.
    #[tokio::test]
    async fn a_claim_wait_of_duration_max_waits_as_long_as_the_holder_runs() {
        let store = InMemoryIdempotencyStore::new().with_claim_wait(Duration::MAX);
        let day = Duration::from_secs(86_400);
        let Claim::New(guard) = store.claim("s", "k", "fp", day).await.unwrap() else {
            panic!("the first claim takes the key");
        };
        let duplicate = tokio::spawn({
            let store = store.clone();
            async move { store.claim("s", "k", "fp", day).await }
        });
        crate::testing::eventually(Duration::from_secs(10), "the duplicate waits", || async {
            (store.waiting_claims("s", "k") == 1).then_some(())
        })
        .await;
        let response = StoredResponse::new(201, json!({"made": true}));
        guard.complete(response.clone()).await.unwrap();
        match duplicate.await.unwrap() {
            Ok(Claim::Replay(replayed)) => assert_eq!(replayed, response),
            Ok(Claim::New(_)) => panic!("the duplicate took the key"),
            Err(error) => panic!("the duplicate gave up: {error}"),
        }
    }
}
