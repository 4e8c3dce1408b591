//! The `Idempotency-Key` header on POST routes.

use crate::{AfterTimeout, ApiError, User};
use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cqrs_core::ports::ClaimWaitElapsed;
use cqrs_core::ports::{Claim, IdempotencyStore, StoredResponse};
use cqrs_core::{Command, Metadata};
use cqrs_postgres::{IdempotencyKey, Idempotent, PgCommandExecutor};
use serde::Serialize;
use std::future::Future;
use std::time::Duration;

/// The header.
pub const HEADER: &str = "idempotency-key";

/// What a request is, for its `Idempotency-Key`: its route and its body. A key sent again
/// with another of either is 422 `idempotency_key_reused`, never answered with the first
/// request's response (a key sent to `.../archive` and then `.../delete` must not have the
/// delete answered as done).
///
/// ```
/// use helpdesk_api::idempotency::Fingerprint;
/// use serde_json::json;
///
/// let body = json!({ "body": "hi" });
/// assert_ne!(
///     Fingerprint::of("POST /tickets/1/comments", &body),
///     Fingerprint::of("POST /tickets/2/comments", &body),
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of a request to `route`, the method and the concrete path
    /// (`"POST /tickets/{id}/comments"` with the id filled in, not the template), with `body`
    /// as parsed. The body must serialize alike every time: a `HashMap` in it would give one
    /// request several fingerprints, and its retry a 422 (use a `BTreeMap`). A body that
    /// fails to serialize gets a fingerprint of its own, matching nothing: its retry is 422,
    /// never another request's response.
    pub fn of(route: &str, body: &impl Serialize) -> Self {
        let mut bytes = route.as_bytes().to_vec();
        bytes.push(0);
        match serde_json::to_vec(body) {
            Ok(body) => bytes.extend(body),
            Err(_) => bytes.extend(uuid::Uuid::new_v4().as_bytes()),
        }
        Self(hex_digest(&bytes))
    }
}

/// Runs `work` at most once per `(user, Idempotency-Key)`: a replay with the same key and the
/// same request ([`Fingerprint`]: route and body) returns the stored status and body; the same key with a different request is
/// 422 `idempotency_key_reused`; a concurrent duplicate waits for the first, at most the
/// store's claim wait, then answers 409 `idempotency_key_in_use`.
/// Without the header, `work` just runs. Failed work (an `Err`) is not stored, so the client
/// may retry it; what `Ok` carries is stored, whatever its status, so return an error for
/// work that did not take effect.
///
/// With a key, the work and the record of its answer run in a task of their own: a request
/// dropped in between (its time budget spent, the client gone) would drop the claim, freeing
/// the key, and the retry its 503 advises would run the work a second time. The task runs to
/// the end; the retry waits for it and replays its answer.
pub async fn once<T, F, Fut>(
    store: &dyn IdempotencyStore,
    headers: &HeaderMap,
    user: &User,
    fingerprint: &Fingerprint,
    ttl: Duration,
    work: F,
) -> Result<Response, ApiError>
where
    T: Serialize + Send + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(StatusCode, T), ApiError>> + Send + 'static,
{
    let Some(key) = parse_key(headers)? else {
        let (status, body) = work()
            .await
            .map_err(|e| advise(e, AfterTimeout::CheckFirst))?;
        return Ok((status, Json(body)).into_response());
    };
    let scope = format!("user:{}", user.id);
    match store.claim(&scope, key, &fingerprint.0, ttl).await {
        Ok(Claim::Replay(stored)) => Ok(replay(stored)),
        Ok(Claim::New(guard)) => {
            let work = work();
            // In the request's span: the command's logs keep the request id and route.
            let task = tokio::spawn(tracing::Instrument::instrument(
                async move {
                    // Failed work frees its key (nothing is stored), so a retry with it runs the
                    // work again: after a time-out, whose change may have been applied, the
                    // advice is to check first, not to retry with the key.
                    let (status, body) = work
                        .await
                        .map_err(|e| advise(e, AfterTimeout::CheckFirstKeyFreed))?;
                    // The work has run, so its key must not be freed: a body that cannot be
                    // serialized is stored as a 500 that says only that the server failed (the
                    // serializer's text, which may quote the body, is logged, never sent), and
                    // a retry replays that instead of running the work again.
                    match serde_json::to_value(body) {
                        Ok(body) => {
                            let stored = StoredResponse::new(status.as_u16(), body.clone());
                            completed(guard.complete(stored).await);
                            Ok::<_, ApiError>((status, body))
                        }
                        Err(e) => {
                            let error = ApiError::from(cqrs_core::HandlerError::internal(e));
                            let body = serde_json::to_value(error.body()).unwrap_or_default();
                            let stored = StoredResponse::new(error.status.as_u16(), body);
                            completed(guard.complete(stored).await);
                            Err(error)
                        }
                    }
                },
                tracing::Span::current(),
            ));
            // A task that panicked is a 500, as a panicking handler is.
            let (status, body) = task
                .await
                .map_err(|e| ApiError::from(cqrs_core::HandlerError::internal(e)))??;
            Ok((status, Json(body)).into_response())
        }
        Err(cqrs_core::ports::StoreError::FingerprintMismatch { .. }) => Err(reused()),
        Err(e) if key_in_use(&e) => Err(in_use()),
        Err(e) => Err(e.into()),
    }
}

/// Logs a response its key could not store. The work has run, so its answer is sent all the
/// same: a 503 would have the client retry, and the retry (the key holding no response) run
/// the work again.
fn completed(stored: Result<(), cqrs_core::ports::StoreError>) {
    if let Err(error) = stored {
        tracing::error!(%error, "the work ran, but its response could not be stored under its Idempotency-Key; it is answered all the same, and a retry with the key would run the work again");
    }
}

/// [`once`] for Postgres mode: the command runs through `executor`, and the response (`body`
/// of the command's output) is stored by the command's own transaction, so the state change,
/// its events and the idempotency record commit together (or not at all), before the response
/// is sent. The HTTP behaviour is [`once`]'s: a replay returns the stored status and body, the
/// same key with another request is 422 `idempotency_key_reused`, a concurrent duplicate waits
/// for the first and replays its response (at most the database's claim wait, 5 s by default,
/// then 409 `idempotency_key_in_use`), failed work is not stored.
#[allow(clippy::too_many_arguments)]
pub async fn once_in_command<C>(
    executor: &PgCommandExecutor,
    headers: &HeaderMap,
    user: &User,
    fingerprint: &Fingerprint,
    ttl: Duration,
    status: StatusCode,
    command: C,
    metadata: Metadata,
    body: impl FnOnce(&C::Output) -> serde_json::Value,
) -> Result<Response, ApiError>
where
    C: Command,
{
    let Some(key) = parse_key(headers)? else {
        let output = executor
            .bus()
            .dispatch_with(command, metadata)
            .await
            .map_err(|e| advise(e.into(), AfterTimeout::CheckFirst))?;
        return Ok((status, Json(body(&output))).into_response());
    };
    let key = IdempotencyKey::new(format!("user:{}", user.id), key, fingerprint.0.clone(), ttl);
    let done = executor
        .execute_idempotent(&key, command, metadata, |output| {
            StoredResponse::new(status.as_u16(), body(output))
        })
        .await
        .map_err(|e| match e.handler_error() {
            Some(h) if h.code() == "idempotency_key_reused" => reused(),
            _ if key_in_use(&e) => in_use(),
            _ => advise(ApiError::from(e), AfterTimeout::RetrySameKey),
        })?;
    Ok(match done {
        Idempotent::Replayed(stored) => replay(stored),
        other => {
            let stored = other.response();
            (status, Json(stored.body.clone())).into_response()
        }
    })
}

/// Checks the request's `Idempotency-Key` (one, of 1 to 255 visible ASCII characters, or
/// none) before the body is read: put it before the body's extractor, so a malformed key is
/// answered as such (400 `invalid_idempotency_key`) whatever the body holds. [`once`] reads
/// the key itself; this only moves the check ahead.
#[derive(Clone, Copy, Debug)]
pub struct CheckedKey;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for CheckedKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        parse_key(&parts.headers).map(|_| CheckedKey)
    }
}

fn parse_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut keys = headers.get_all(HEADER).iter();
    let Some(key) = keys.next() else {
        return Ok(None);
    };
    // Two keys name two requests: taking one would make a retry that sends the other first
    // run the command again.
    if keys.next().is_some() {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "send one Idempotency-Key header, not several",
        ));
    }
    // `to_str` lets spaces and tabs through; a key is visible characters only.
    key.to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        })
}

/// A time-out on a route that takes an `Idempotency-Key` tells the client to retry with the
/// key it sent, or, having sent none, to check before sending the request again.
fn advise(error: ApiError, after: AfterTimeout) -> ApiError {
    error.advised(after)
}

fn reused() -> ApiError {
    ApiError::unprocessable(
        "idempotency_key_reused",
        "this Idempotency-Key belongs to a different request (another body or route), finished or still running; send this one with a new key",
    )
}

/// Whether `error` is a claim that waited its whole claim wait for a duplicate still running,
/// rather than a backend out of reach.
fn key_in_use(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<ClaimWaitElapsed>())
}

/// 409 `idempotency_key_in_use`: the retry it advises, with the same key, replays the answer
/// of the request that holds the key once that one has finished.
///
/// 409, as the IETF `Idempotency-Key` draft says for a retry sent while the first request
/// still runs: a conflict of the client's requests, not a failing server (a 503 counted
/// against the server's error rate and tripped clients' circuit breakers).
fn in_use() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_key_in_use",
        "a request with this Idempotency-Key and the same content is still running; retry \
         with the same key once it has finished, to get its answer",
    )
    .with_retry_after(1)
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut response = (status, Json(stored.body)).into_response();
    response.headers_mut().insert(
        "idempotency-replayed",
        axum::http::HeaderValue::from_static("true"),
    );
    response
}

/// A stable, non-cryptographic digest of the request (FNV-1a, 128 bits). It tells apart two
/// different requests under one key; it does not need to resist a forger, who could only
/// collide with their own earlier request.
fn hex_digest(bytes: &[u8]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x8422_2325_cbf2_9ce4;
    for byte in bytes {
        a = (a ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
        b = (b ^ u64::from(*byte).rotate_left(3)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{a:016x}{b:016x}:{}", bytes.len())
}

#[cfg(test)]
mod tests {
    /// The fingerprint of the tests' one request.
    fn request() -> super::Fingerprint {
        super::Fingerprint::of("POST /things", &"request")
    }

    use super::*;
    use cqrs_core::memory::InMemoryIdempotencyStore;
    use uuid::Uuid;

    /// Headers with this `Idempotency-Key`.
    fn with_key(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, key.parse().unwrap());
        headers
    }

    fn customer() -> User {
        User {
            id: Uuid::nil(),
            role: crate::Role::Customer,
        }
    }

    /// A body that cannot be serialized, whose error quotes what it holds.
    struct Unserializable;

    impl Serialize for Unserializable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("secret_column of db-7.internal"))
        }
    }

    /// A dispatch that runs past its budget is a 503 `timeout`: on a route that takes an
    /// `Idempotency-Key`, the advice is to check before sending the request again, with a key
    /// sent too (the failed work freed it, so a retry with it would run the work again: only
    /// Postgres's `once_in_command`, whose record commits with the change, advises the key);
    /// elsewhere it names no key.
    #[test]
    fn a_time_out_of_failed_work_advises_a_check_with_or_without_a_key() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let timed_out = || {
            ApiError::from(cqrs_core::DispatchError::Timeout {
                kind: cqrs_core::MessageKind::Command,
                name: "tickets.open",
                after: Duration::from_secs(1),
            })
        };
        let elsewhere = timed_out();
        assert!(elsewhere.is_timeout(), "{elsewhere}");
        assert!(
            !elsewhere.message.contains("Idempotency-Key"),
            "{elsewhere}"
        );
        let user = customer();
        let store = InMemoryIdempotencyStore::new();
        for headers in [HeaderMap::new(), with_key("key-2")] {
            let error = runtime
                .block_on(once(
                    &store,
                    &headers,
                    &user,
                    &request(),
                    Duration::from_secs(60),
                    move || async move { Err::<(StatusCode, ()), _>(timed_out()) },
                ))
                .unwrap_err();
            assert!(error.is_timeout(), "{error}");
            // No `Retry-After` when the advice is to check first: a generic client would take
            // it as leave to send the change again.
            assert_eq!(error.retry_after, None, "{error}");
            assert!(
                !error
                    .message
                    .contains("retry with the same Idempotency-Key"),
                "{error}"
            );
            assert!(error.message.contains("check before"), "{error}");
            assert_eq!(
                error
                    .message
                    .contains("with an Idempotency-Key, a retry is safe"),
                !headers.contains_key(HEADER),
                "a key sent was freed: {error}"
            );
        }
    }

    /// A store that cannot record the response once the work has run: the work's answer is
    /// sent (it was a 503, which a client retries, running the work again).
    #[test]
    fn an_answer_its_key_cannot_store_is_sent_all_the_same() {
        use cqrs_core::ports::{Claim, IdempotencyGuard, IdempotencyStore, StoreError};

        struct Failing;
        #[async_trait::async_trait]
        impl IdempotencyGuard for Failing {
            async fn complete(self: Box<Self>, _: StoredResponse) -> Result<(), StoreError> {
                Err(StoreError::Unavailable {
                    backend: "test",
                    source: "the connection was lost".into(),
                })
            }
        }
        struct Store;
        #[async_trait::async_trait]
        impl IdempotencyStore for Store {
            async fn claim(
                &self,
                _: &str,
                _: &str,
                _: &str,
                _: Duration,
            ) -> Result<Claim, StoreError> {
                Ok(Claim::New(Box::new(Failing)))
            }
            async fn purge_expired(&self) -> Result<u64, StoreError> {
                Ok(0)
            }
        }

        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let response = runtime
            .block_on(once(
                &Store,
                &with_key("key-1"),
                &customer(),
                &request(),
                Duration::from_secs(60),
                || async { Ok((StatusCode::CREATED, serde_json::json!({ "id": "t1" }))) },
            ))
            .expect("the work's answer");
        assert_eq!(response.status(), StatusCode::CREATED);
    }

    /// A request dropped after its work took effect and before the answer was recorded (its
    /// budget spent, the client gone) leaves the work to finish in its task: the retry with
    /// the same key replays its answer instead of running the work again.
    #[test]
    fn a_request_dropped_mid_work_leaves_its_answer_for_the_retry() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let headers = with_key("key-3");
        let user = customer();
        let store = InMemoryIdempotencyStore::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let tail = Arc::new(tokio::sync::Notify::new());
        let work = |runs: Arc<AtomicUsize>, tail: Arc<tokio::sync::Notify>| {
            move || async move {
                // The work takes effect, then has more to do before it answers.
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                tail.notified().await;
                Ok((StatusCode::CREATED, serde_json::json!({ "run": n })))
            }
        };
        runtime.block_on(async {
            let print = request();
            let first = once(
                &store,
                &headers,
                &user,
                &print,
                Duration::from_secs(60),
                work(runs.clone(), tail.clone()),
            );
            // Dropped once the work took effect.
            tokio::select! {
                answer = first => panic!("the first request answered: {answer:?}"),
                () = async {
                    while runs.load(Ordering::SeqCst) == 0 {
                        tokio::task::yield_now().await;
                    }
                } => {}
            }
            tail.notify_one();
            let retry = tokio::time::timeout(
                Duration::from_secs(10),
                once(
                    &store,
                    &headers,
                    &user,
                    &request(),
                    Duration::from_secs(60),
                    work(runs.clone(), tail.clone()),
                ),
            )
            .await
            .expect("the retry is answered")
            .unwrap();
            assert_eq!(retry.status(), StatusCode::CREATED);
            assert_eq!(retry.headers()["idempotency-replayed"], "true");
            assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran once");
        });
    }

    /// A response body that fails to serialize is a 500 whose body does not quote the error,
    /// stored for the key as any answer of work that ran.
    #[test]
    fn a_body_that_cannot_be_serialized_is_a_500_that_does_not_quote_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let headers = with_key("key-1");
        let user = customer();
        let store = InMemoryIdempotencyStore::new();
        let error = runtime
            .block_on(once(
                &store,
                &headers,
                &user,
                &request(),
                Duration::from_secs(60),
                || async { Ok((StatusCode::CREATED, Unserializable)) },
            ))
            .unwrap_err();
        assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.code, "internal");
        let body = serde_json::to_string(&error.body()).unwrap();
        assert!(!body.contains("secret"), "{body}");

        // The work ran, so the key is not freed: a retry replays the 500, and does not run
        // the work again.
        let retry = runtime
            .block_on(once(
                &store,
                &headers,
                &user,
                &request(),
                Duration::from_secs(60),
                // Were it run again, the answer would be this 200.
                || async { Ok((StatusCode::OK, ())) },
            ))
            .unwrap();
        assert_eq!(retry.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(retry.headers()["idempotency-replayed"], "true");
        let replayed = runtime
            .block_on(axum::body::to_bytes(retry.into_body(), 1 << 16))
            .unwrap();
        assert_eq!(replayed, body.as_bytes(), "the replay is the first answer");
    }

    /// The fingerprint's bytes are those the tickets plugin stored keys under before it moved
    /// here (route, a zero byte, the body's JSON): changed, every key stored before an
    /// upgrade would be refused after it, as `idempotency_key_reused`.
    #[test]
    fn the_fingerprint_format_is_the_one_keys_were_stored_under() {
        #[derive(Serialize)]
        struct Body {
            title: &'static str,
            priority: &'static str,
        }
        let body = Body {
            title: "printer",
            priority: "high",
        };
        let mut bytes = b"POST /tickets\0".to_vec();
        bytes.extend(serde_json::to_vec(&body).unwrap());
        assert_eq!(
            Fingerprint::of("POST /tickets", &body).0,
            hex_digest(&bytes)
        );
        assert_eq!(
            Fingerprint::of("POST /tickets", &body).0,
            "fe3548681d046ea3fba5a568c7540b2c:51",
            "the digest itself"
        );
    }

    /// One key sent with the same body to another route is refused, never answered with the
    /// first route's response: the fingerprint holds the route.
    #[test]
    fn a_key_sent_again_to_another_route_is_refused() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (headers, user) = (with_key("key-1"), customer());
        let store = InMemoryIdempotencyStore::new();
        let body = serde_json::json!({});
        let archived = runtime
            .block_on(once(
                &store,
                &headers,
                &user,
                &Fingerprint::of("POST /notes/1/archive", &body),
                Duration::from_secs(60),
                || async { Ok((StatusCode::OK, "archived")) },
            ))
            .unwrap();
        assert_eq!(archived.status(), StatusCode::OK);
        let deleted = runtime
            .block_on(once(
                &store,
                &headers,
                &user,
                &Fingerprint::of("POST /notes/1/delete", &body),
                Duration::from_secs(60),
                || async { Ok((StatusCode::OK, "deleted")) },
            ))
            .unwrap_err();
        assert_eq!(deleted.code, "idempotency_key_reused");
    }

    /// In memory, a duplicate that waits out the claim wait while the first request holds
    /// the key is told so, 409 `idempotency_key_in_use` with `Retry-After`, as on Postgres
    /// (below); it waited without end.
    #[test]
    fn a_duplicate_that_waits_out_the_claim_wait_in_memory_is_told_the_key_is_in_use() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = InMemoryIdempotencyStore::new().with_claim_wait(Duration::from_millis(100));
            told_the_key_is_in_use(&store, "key-5").await;
        });
    }

    /// While a claim of `key` is held on `store`, a request with that key and the same content
    /// waits out the store's claim wait and is told 409 `idempotency_key_in_use` with
    /// `Retry-After` (within 10 s).
    async fn told_the_key_is_in_use(store: &dyn cqrs_core::ports::IdempotencyStore, key: &str) {
        let user = customer();
        let (scope, fingerprint) = (format!("user:{}", user.id), request().0);
        let day = Duration::from_secs(86_400);
        let holder = store.claim(&scope, key, &fingerprint, day).await.unwrap();
        assert!(
            matches!(holder, Claim::New(_)),
            "the first claim takes the key"
        );
        let error = cqrs_core::testing::with_timeout(
            Duration::from_secs(10),
            once(store, &with_key(key), &user, &request(), day, || async {
                Ok((StatusCode::CREATED, ()))
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(error.status, StatusCode::CONFLICT, "{error}");
        assert_eq!(error.code, "idempotency_key_in_use", "{error}");
        assert_eq!(error.retry_after, Some(1), "{error}");
    }

    /// On Postgres, a duplicate that waits out the claim wait while the first request holds
    /// the key is told so, 409 `idempotency_key_in_use` with `Retry-After`, not that a backend
    /// is unreachable.
    #[test]
    fn a_duplicate_that_waits_out_the_claim_wait_is_told_the_key_is_in_use() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let url = std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
            let id = cqrs_core::testing::test_id("key_in_use");
            let connect = cqrs_postgres::PgOptions::new(url.clone())
                .schema(&id)
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(5))
                .connect();
            let connected = tokio::time::timeout(Duration::from_secs(10), connect).await;
            let Ok(Ok(db)) = connected else {
                cqrs_core::testing::require_services("postgres", &url, false);
                return;
            };
            db.migrate().await.expect("migrate the test schema");
            let db = db.with_claim_wait(Duration::from_millis(100));
            told_the_key_is_in_use(&db.idempotency_store(), "key-4").await;
            db.drop_schema().await.expect("drop the test schema");
        });
    }
}
