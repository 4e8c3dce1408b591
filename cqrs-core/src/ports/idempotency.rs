//! The idempotency port: a request repeated with the same key gets the first response again.

use super::StoreError;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// The response stored for an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredResponse {
    /// The HTTP status (or any code the caller uses).
    pub status: u16,
    /// The response body.
    pub body: serde_json::Value,
}

/// The deepest nesting of arrays and objects a stored response's body may have: `serde_json`
/// reads at most 128 levels, so a deeper body could be stored but never read back.
pub const MAX_RESPONSE_DEPTH: usize = 127;

impl StoredResponse {
    /// A response.
    pub fn new(status: u16, body: serde_json::Value) -> Self {
        Self { status, body }
    }

    /// Why no idempotency store can keep this response's body, if none can: it nests arrays
    /// and objects more than [`MAX_RESPONSE_DEPTH`] deep, or holds U+0000 (which Postgres's
    /// `jsonb` refuses).
    pub fn unstorable(&self) -> Option<String> {
        super::unholdable(&self.body, MAX_RESPONSE_DEPTH, "the response")
    }

    /// What an idempotency store keeps of this response, and why it is not the response
    /// itself when it is not: the response, or, when its body is
    /// [`unstorable`](Self::unstorable), its status with `{"response_not_stored": why}` in
    /// place of the body. The work has run: a body that cannot be kept is no reason to release
    /// the key, which would let a retry run the work again. Every store keeps the same (and
    /// logs the reason), so a replay answers alike on each.
    ///
    /// ```
    /// use cqrs_core::ports::StoredResponse;
    /// use cqrs_core::reexports::serde_json::json;
    ///
    /// let (kept, why) = StoredResponse::new(201, json!({ "title": "a\u{0}b" })).storable();
    /// assert_eq!(kept.status, 201);
    /// assert_eq!(kept.body["response_not_stored"].as_str(), why.as_deref());
    /// let fine = StoredResponse::new(201, json!({ "title": "ab" }));
    /// assert_eq!(fine.clone().storable(), (fine, None));
    /// ```
    pub fn storable(self) -> (Self, Option<String>) {
        match self.unstorable() {
            None => (self, None),
            Some(why) => {
                let note = serde_json::json!({ "response_not_stored": why });
                (Self::new(self.status, note), Some(why))
            }
        }
    }
}

/// The outcome of claiming a key.
pub enum Claim {
    /// The key is new: do the work, then [`complete`](IdempotencyGuard::complete) the guard.
    /// Until then, a concurrent request with the same key and fingerprint waits; one with
    /// another fingerprint fails at once with [`StoreError::FingerprintMismatch`].
    New(Box<dyn IdempotencyGuard>),
    /// The key was used before for the same request: send this response again.
    Replay(StoredResponse),
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::New(_) => f.write_str("Claim::New(..)"),
            Claim::Replay(r) => f.debug_tuple("Claim::Replay").field(r).finish(),
        }
    }
}

/// Holds a claimed key while the work runs.
///
/// Dropping the guard without completing it releases the key (the work failed, and a retry may
/// run it). Adapters that keep the record in the command's own transaction complete it in that
/// transaction, so the response and the command's effects commit together.
#[async_trait]
pub trait IdempotencyGuard: Send {
    /// Stores the response; later requests with the key replay it.
    ///
    /// Once polled, the completion finishes even if the caller stops waiting for it (its time
    /// budget ran out): the work the key guards has run, and a key released then would let a
    /// retry run it again. An adapter that needs a round trip runs it in a task of its own.
    /// The returned future does nothing until it is polled (`async_trait` defers the body):
    /// dropped unpolled (a `select!` whose other branch was ready first), it drops the guard,
    /// which releases the key. Await it, or spawn it, rather than racing it.
    ///
    /// When it fails (the store was lost meanwhile), the work has run and its response is not
    /// stored: a retry with the key may run the work again. Answer the caller with the work's
    /// response all the same and log the failure; a retryable error would invite that retry.
    /// (An adapter that keeps the record in the command's own transaction has no such gap: the
    /// record and the effects commit together, or neither.)
    async fn complete(self: Box<Self>, response: StoredResponse) -> Result<(), StoreError>;
}

/// Maps `(scope, key)` to a request fingerprint and the stored response, for `ttl`.
///
/// The contract (checked by [`testing::idempotency`](crate::testing::idempotency)):
///
/// * The first `claim` of a key returns [`Claim::New`]; after the guard completes, a claim with
///   the same fingerprint returns [`Claim::Replay`] with the stored response.
/// * A claim with the same key and a different fingerprint fails with
///   [`StoreError::FingerprintMismatch`], at once, also while another claim of the key is in
///   progress.
/// * A claim with the same fingerprint while another claim of the key is in progress waits
///   for it, then replays its response (or, if the first was dropped, one waiting claim
///   becomes the new claim). The work runs once. The wait is bounded (the store's claim wait,
///   5 s by default in the shipped stores): past it the claim fails as
///   [`StoreError::Unavailable`] with a [`ClaimWaitElapsed`] among its sources, and the
///   holder keeps the key.
/// * Scopes are independent (the same key in two scopes is two keys).
/// * A key expires `ttl` after completion; an expired key is new again. Expired keys are
///   purged.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` in `scope` for a request with this fingerprint.
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        ttl: Duration,
    ) -> Result<Claim, StoreError>;

    /// Removes expired keys; returns how many.
    async fn purge_expired(&self) -> Result<u64, StoreError>;
}

/// Why a claim failed as [`StoreError::Unavailable`] after waiting its store's whole claim
/// wait for the claim that holds its key: usually another request with the same key and
/// content, still running. A retry once that one has finished replays its response.
///
/// It is among the error's sources, so a server can tell a busy key from a store out of reach
/// by walking them (the helpdesk answers 409 `idempotency_key_in_use`):
///
/// ```
/// use cqrs_core::ports::ClaimWaitElapsed;
///
/// fn key_in_use(error: &(dyn std::error::Error + 'static)) -> bool {
///     std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<ClaimWaitElapsed>())
/// }
/// # let _ = key_in_use;
/// ```
#[derive(Debug, thiserror::Error)]
#[error(
    "waited up to {wait:?} for the claim that holds this idempotency key, usually another request \
     with this key and the same content that is still running: retry once it has finished \
     (the retry then gets its response)"
)]
pub struct ClaimWaitElapsed {
    wait: Duration,
    #[source]
    source: Option<crate::BoxError>,
}

impl ClaimWaitElapsed {
    /// A claim that waited `wait`.
    pub fn new(wait: Duration) -> Self {
        Self { wait, source: None }
    }

    /// With the backend's own error that ended the wait (a lock timeout, say).
    pub fn with_source(mut self, source: impl Into<crate::BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The store's claim wait; a backend's own limit, when shorter, may have ended the wait
    /// sooner.
    pub fn wait(&self) -> Duration {
        self.wait
    }
}
