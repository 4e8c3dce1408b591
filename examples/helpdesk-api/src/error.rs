//! The JSON error contract: `{"error": {"code", "message", "details"?}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cqrs_core::{DispatchError, ErrorKind, HandlerError};
use serde::Serialize;

/// The body of every error response.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// A stable snake_case code.
    pub code: String,
    /// For humans.
    pub message: String,
    /// Structured details, when there are any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// What a client whose request ran past its time budget can safely do next: the advice of
/// [`ApiError::timeout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterTimeout {
    /// Try again: the route takes no `Idempotency-Key` (a read, or a change a second try
    /// cannot make twice).
    TryAgain,
    /// Check before sending it again: the route changes state and takes an `Idempotency-Key`,
    /// but the request carried none, so there is no key to retry with.
    CheckFirst,
    /// Retry with the same `Idempotency-Key`: the server answers a retry with the first
    /// request's outcome, never applying it twice.
    RetrySameKey,
    /// Check before sending it again, although the request carried an `Idempotency-Key`: its
    /// work failed, which freed the key (nothing was stored), so a retry with it would run the
    /// work again ([`idempotency::once`](crate::idempotency::once), in memory).
    CheckFirstKeyFreed,
}

/// An HTTP error with the JSON body of the contract.
#[derive(Debug)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// The stable code.
    pub code: String,
    /// The message.
    pub message: String,
    /// Details.
    pub details: Option<serde_json::Value>,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
    /// The `error` of a 401's `WWW-Authenticate: Bearer` challenge (RFC 6750), when the
    /// request's credentials were wrong rather than missing.
    bearer_error: Option<&'static str>,
    /// What ran out of time, for a 503 `timeout`: the advice of a route that takes an
    /// `Idempotency-Key` keeps it in its message.
    timed_out: Option<TimedOut>,
}

/// What a 503 `timeout` is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimedOut {
    /// The request ran past its time budget.
    Budget,
    /// A backend did not answer in time, or its answer was lost (a commit whose outcome is
    /// unknown): the request itself was within its budget.
    Backend,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            details: None,
            retry_after: None,
            bearer_error: None,
            timed_out: None,
        }
    }

    /// 400 with a code.
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422 with a code.
    pub fn unprocessable(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 `timeout`: the request ran past its time budget, with the advice `after` gives:
    /// what the client can safely do next depends on the route and on whether the request
    /// carried an `Idempotency-Key`. With `Retry-After`, except when the advice is to check
    /// first: a generic client that retries any 503 with `Retry-After` would otherwise send a
    /// change again that may have been applied.
    pub fn timeout(after: AfterTimeout) -> Self {
        Self::timed_out(TimedOut::Budget, after)
    }

    /// 503 `timeout`: a backend did not answer in time, or its answer was lost (a commit
    /// whose outcome is unknown), with the advice `after` gives, as [`ApiError::timeout`].
    pub fn backend_timeout(after: AfterTimeout) -> Self {
        Self::timed_out(TimedOut::Backend, after)
    }

    fn timed_out(what: TimedOut, after: AfterTimeout) -> Self {
        let message = match (what, after) {
            (TimedOut::Budget, AfterTimeout::TryAgain) => {
                "the request ran past its time budget; try again shortly"
            }
            (TimedOut::Budget, AfterTimeout::CheckFirst) => {
                "the request ran past its time budget; a change may have been applied: check \
                 before sending it again (with an Idempotency-Key, a retry is safe)"
            }
            (TimedOut::Budget, AfterTimeout::CheckFirstKeyFreed) => {
                "the request ran past its time budget; a change may have been applied: check \
                 before sending it again"
            }
            (TimedOut::Budget, AfterTimeout::RetrySameKey) => {
                "the request ran past its time budget; a change may have been applied: retry \
                 with the same Idempotency-Key to be safe"
            }
            (TimedOut::Backend, AfterTimeout::TryAgain) => {
                "a backend did not answer in time; try again shortly"
            }
            (TimedOut::Backend, AfterTimeout::CheckFirst) => {
                "a backend did not answer in time, or its answer was lost; a change may have \
                 been applied: check before sending it again (with an Idempotency-Key, a retry \
                 is safe)"
            }
            (TimedOut::Backend, AfterTimeout::CheckFirstKeyFreed) => {
                "a backend did not answer in time, or its answer was lost; a change may have \
                 been applied: check before sending it again"
            }
            (TimedOut::Backend, AfterTimeout::RetrySameKey) => {
                "a backend did not answer in time, or its answer was lost; a change may have \
                 been applied: retry with the same Idempotency-Key to be safe"
            }
        };
        let mut error = Self::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", message);
        error.timed_out = Some(what);
        match after {
            AfterTimeout::CheckFirst | AfterTimeout::CheckFirstKeyFreed => error,
            AfterTimeout::TryAgain | AfterTimeout::RetrySameKey => error.with_retry_after(1),
        }
    }

    /// The same 503 `timeout`, with the advice `after` gives instead (a route that takes an
    /// `Idempotency-Key` knows better than the place the time-out was found); any other error
    /// as it is.
    pub fn advised(self, after: AfterTimeout) -> Self {
        match self.timed_out {
            Some(what) if self.is_timeout() => Self::timed_out(what, after),
            // A time-out some layer made without a cause: the request's own budget.
            None if self.is_timeout() => Self::timeout(after),
            _ => self,
        }
    }

    /// Whether this is a 503 `timeout`: the request ran past its time budget, or a backend did
    /// not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.status == StatusCode::SERVICE_UNAVAILABLE && self.code == "timeout"
    }

    /// Adds details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Adds `Retry-After`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Names what was wrong with the bearer token in a 401's challenge (RFC 6750):
    /// `invalid_token` (bad signature, expired, no such user) or `invalid_request` (not a
    /// bearer token). Every 401 carries `WWW-Authenticate: Bearer` (RFC 7235 requires a
    /// challenge); this adds `error="..."` to it.
    pub fn with_bearer_error(mut self, error: &'static str) -> Self {
        self.bearer_error = Some(error);
        self
    }

    /// The body this error sends.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.clone(),
                message: self.message.clone(),
                details: self.details.clone(),
            },
        }
    }

    /// The status a kind of error maps to: the one place kinds become statuses.
    pub fn status_of(kind: ErrorKind) -> StatusCode {
        StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<crate::AuthError> for ApiError {
    /// 401 `unauthorized` (challenging with `error="invalid_token"` or `"invalid_request"` when
    /// a token was sent), or 503 `unavailable` (retry after a second) when the user store
    /// could not be asked.
    fn from(e: crate::AuthError) -> Self {
        if e.is_unavailable() {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
            .with_retry_after(1)
        } else {
            let error = ApiError::unauthorized(e.to_string());
            match e {
                // No credentials: the bare challenge, as RFC 6750 asks.
                crate::AuthError::Missing => error,
                crate::AuthError::Malformed | crate::AuthError::Repeated => {
                    error.with_bearer_error("invalid_request")
                }
                _ => error.with_bearer_error("invalid_token"),
            }
        }
    }
}

/// What a 500 says: its cause is logged, never sent.
const INTERNAL: &str = "the server failed; the error is logged";

/// Whether a 503's message was written for clients (`busy`, "this build cannot load the
/// aggregate"), rather than copied from a store's or a broker's error, whose text quotes the
/// driver ("pool timed out", a host name, a relation). The copies are known by their source
/// (a `StoreError` or `TransportError` converted into a `HandlerError` keeps it), by a message
/// that is their source's text, or, when a layer rebuilt the error without its source, by the
/// generic codes those conversions give.
fn written_for_clients(e: &HandlerError) -> bool {
    use cqrs_core::ports::{StoreError, TransportError};
    match std::error::Error::source(e) {
        Some(source) => {
            !(source.is::<StoreError>()
                || source.is::<TransportError>()
                || source.to_string() == e.message())
        }
        None => !matches!(e.code(), "unavailable" | "timeout" | "dispatch_failed"),
    }
}

/// The message a 503 sends when its own is not for clients.
fn unavailable_message(kind: ErrorKind) -> &'static str {
    if kind == ErrorKind::Timeout {
        "a backend did not answer in time; try again shortly"
    } else {
        "a backend is unavailable; try again shortly"
    }
}

impl From<&HandlerError> for ApiError {
    /// The error's status, code, details and message, but for a server error's: a 500 says
    /// only that the server failed (and has no details), a 503 keeps a message written for
    /// clients and otherwise says that a backend is unavailable. A server error's own text,
    /// and its source, are logged instead.
    fn from(e: &HandlerError) -> Self {
        let status = Self::status_of(e.kind());
        let message = if !status.is_server_error() {
            e.message()
        } else {
            // The error and its causes, each once, in their messages, never a `Debug`: a
            // driver's error, printed so, holds what its message leaves out on purpose
            // (Postgres's DETAIL quotes the row a constraint refused: an email, a password
            // hash).
            let error = cqrs_core::ErrorChain(e);
            if status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(%error, code = e.code(), "request failed");
                INTERNAL
            } else if written_for_clients(e) {
                // A refusal the server chose (too busy, shutting down): load shed as designed,
                // not a fault, so a flood of them is no flood of errors in the log.
                tracing::warn!(error = %e, code = e.code(), "request refused");
                e.message()
            } else {
                tracing::error!(%error, code = e.code(), "request failed");
                unavailable_message(e.kind())
            }
        };
        let mut error = ApiError::new(status, e.code(), message);
        if status == StatusCode::SERVICE_UNAVAILABLE && e.kind() == ErrorKind::Timeout {
            error.timed_out = Some(TimedOut::Backend);
        }
        // A 500's details are no more for clients than its message.
        error.details = e
            .details()
            .cloned()
            .filter(|_| status != StatusCode::INTERNAL_SERVER_ERROR);
        if e.kind().is_retryable() {
            // The wait the handler named (a throttle's `details.retry_after`, in seconds), so
            // the header and the body agree; else a second.
            let named = e
                .details()
                .and_then(|d| d.get("retry_after"))
                .and_then(serde_json::Value::as_u64)
                .filter(|seconds| *seconds > 0);
            error.retry_after = Some(named.unwrap_or(1));
        }
        error
    }
}

impl From<HandlerError> for ApiError {
    fn from(e: HandlerError) -> Self {
        ApiError::from(&e)
    }
}

impl From<ApiError> for HandlerError {
    /// The kind its status stands for, with its code and message: for code outside a request
    /// (an event handler, a worker) that calls what answers `ApiError`s, such as
    /// [`BusHandle::get`](crate::BusHandle::get), with `?`. A 503 stays retryable.
    fn from(e: ApiError) -> Self {
        let kind = match e.status {
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => ErrorKind::Invalid,
            StatusCode::UNAUTHORIZED => ErrorKind::Unauthorized,
            StatusCode::FORBIDDEN => ErrorKind::Forbidden,
            StatusCode::NOT_FOUND => ErrorKind::NotFound,
            StatusCode::CONFLICT => ErrorKind::Conflict,
            StatusCode::TOO_MANY_REQUESTS => ErrorKind::RateLimited,
            // A backend's time-out counts as an attempt, where a refusal for now does not.
            StatusCode::SERVICE_UNAVAILABLE if e.timed_out.is_some() => ErrorKind::Timeout,
            StatusCode::SERVICE_UNAVAILABLE => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        };
        let mut error = HandlerError::new(kind, e.code, e.message);
        if let Some(details) = e.details {
            error = error.with_details(details);
        }
        error
    }
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Handler(h) => h.into(),
            // Advice for any route; one that takes an `Idempotency-Key` gives its own.
            DispatchError::Timeout { .. } => {
                // A refusal the server chose, not a fault: a warning (see `From<&HandlerError>`).
                tracing::warn!(error = %e, "request refused: its dispatch ran past its time budget");
                ApiError::timeout(AfterTimeout::TryAgain)
            }
            // A layer's timeout or load shedding (tower's own, whose kinds the core tells):
            // retryable, as the core's own timeout is.
            DispatchError::Middleware(_) if e.kind() == cqrs_core::ErrorKind::Timeout => {
                tracing::warn!(error = %e, "request refused: a layer timed its dispatch out");
                ApiError::timeout(AfterTimeout::TryAgain)
            }
            DispatchError::Middleware(_) if e.kind() == cqrs_core::ErrorKind::Unavailable => {
                tracing::warn!(error = %e, "request refused: a layer shed its dispatch");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the server is too busy to take this request now: try again",
                )
                .with_retry_after(1)
            }
            other => match other.handler_error() {
                Some(h) => h.into(),
                None => {
                    tracing::error!(error = %other, "dispatch failed");
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", INTERNAL)
                }
            },
        }
    }
}

impl From<cqrs_core::ports::StoreError> for ApiError {
    fn from(e: cqrs_core::ports::StoreError) -> Self {
        HandlerError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = match self.bearer_error {
                Some(error) => HeaderValue::from_str(&format!("Bearer error=\"{error}\""))
                    .unwrap_or(HeaderValue::from_static("Bearer")),
                None => HeaderValue::from_static("Bearer"),
            };
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_core::ports::{StoreError, TransportError};

    const SECRET: &str = "pool timed out on db-7.internal: relation secret_table";

    fn body_of(error: ApiError) -> String {
        serde_json::to_string(&error.body()).unwrap()
    }

    /// A retryable refusal's `Retry-After` is the wait its handler named in
    /// `details.retry_after` (a throttle's), so header and body agree; else a second.
    #[test]
    fn retry_after_is_the_wait_the_handler_named() {
        let throttled = HandlerError::new(ErrorKind::RateLimited, "too_many_attempts", "slow down")
            .with_details(serde_json::json!({ "retry_after": 37 }));
        let error = ApiError::from(cqrs_core::DispatchError::Handler(throttled));
        assert_eq!(error.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error.retry_after, Some(37));
        for details in [
            serde_json::json!({}),
            serde_json::json!({ "retry_after": 0 }),
        ] {
            let busy = HandlerError::unavailable("busy", "too busy").with_details(details);
            assert_eq!(ApiError::from(busy).retry_after, Some(1));
        }
        let refused = HandlerError::conflict("stale", "stale")
            .with_details(serde_json::json!({ "retry_after": 37 }));
        assert_eq!(ApiError::from(refused).retry_after, None, "not retryable");
    }

    /// An event handler that asks for the buses with `?` gets a retryable refusal while the
    /// server starts, not an internal error (which the event feed would count toward giving
    /// the event up).
    #[test]
    fn an_api_error_becomes_the_handler_error_of_its_status() {
        let starting = HandlerError::from(crate::BusHandle::new().get().unwrap_err());
        assert_eq!(starting.kind(), ErrorKind::Unavailable);
        assert_eq!(starting.code(), "starting");
        let refused = ApiError::new(
            StatusCode::CONFLICT,
            "ticket_closed",
            "the ticket is closed",
        )
        .with_details(serde_json::json!({ "version": 3 }));
        let refused = HandlerError::from(refused);
        assert_eq!(refused.kind(), ErrorKind::Conflict);
        assert_eq!(refused.message(), "the ticket is closed");
        assert_eq!(
            refused.details(),
            Some(&serde_json::json!({ "version": 3 }))
        );
        // A backend's time-out stays one: it counts as an attempt where "not now" does not.
        let slow = ApiError::from(HandlerError::new(ErrorKind::Timeout, "timeout", "slow"));
        assert_eq!(slow.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(HandlerError::from(slow).kind(), ErrorKind::Timeout);
        let teapot = ApiError::new(StatusCode::IM_A_TEAPOT, "teapot", "short and stout");
        assert_eq!(HandlerError::from(teapot).kind(), ErrorKind::Internal);
    }

    /// A route's advice on what to do after a time-out keeps what timed out: a backend (a
    /// commit whose answer was lost, within the request's budget) is not told as the
    /// request's budget running out, which would send an operator to the wrong setting.
    #[test]
    fn advice_after_a_time_out_keeps_what_timed_out() {
        let lost_commit = ApiError::from(HandlerError::from(StoreError::Timeout {
            backend: "postgres",
            source: SECRET.into(),
        }));
        assert_eq!(
            lost_commit.message,
            "a backend did not answer in time; try again shortly"
        );
        let advised = lost_commit.advised(AfterTimeout::RetrySameKey);
        assert!(advised.is_timeout());
        assert_eq!(
            advised.message,
            "a backend did not answer in time, or its answer was lost; a change may have been \
             applied: retry with the same Idempotency-Key to be safe"
        );
        assert_eq!(advised.retry_after, Some(1));
        let advised = ApiError::from(HandlerError::from(StoreError::Timeout {
            backend: "postgres",
            source: SECRET.into(),
        }))
        .advised(AfterTimeout::CheckFirst);
        assert!(
            advised
                .message
                .starts_with("a backend did not answer in time, or its answer")
        );
        assert!(advised.message.contains("check before sending it again"));
        assert_eq!(advised.retry_after, None, "no leave to send a change again");

        let budget = ApiError::timeout(AfterTimeout::TryAgain).advised(AfterTimeout::RetrySameKey);
        assert_eq!(
            budget.message,
            "the request ran past its time budget; a change may have been applied: retry with \
             the same Idempotency-Key to be safe"
        );
        // Anything else passes as it is.
        let conflict = ApiError::new(StatusCode::CONFLICT, "version_conflict", "stale")
            .advised(AfterTimeout::RetrySameKey);
        assert_eq!(
            (conflict.status, conflict.message.as_str()),
            (StatusCode::CONFLICT, "stale")
        );
    }

    /// A store's version conflict (as the Postgres command layer meets it at commit, after a
    /// plugin's handler returned) does not name the internal stream; it keeps the version.
    #[test]
    fn a_stores_conflict_does_not_name_the_stream() {
        let conflict = StoreError::Conflict {
            stream: "ticket_tags-0193".into(),
            expected: cqrs_core::ExpectedVersion::Exactly(1),
            actual: 2,
        };
        let through = [
            ApiError::from(HandlerError::from(conflict)),
            ApiError::from(DispatchError::Handler(HandlerError::from(
                StoreError::Conflict {
                    stream: "ticket_tags-0193".into(),
                    expected: cqrs_core::ExpectedVersion::Any,
                    actual: 2,
                },
            ))),
        ];
        for error in through {
            assert_eq!(error.status, StatusCode::CONFLICT);
            assert_eq!(error.code, "version_conflict");
            assert!(!error.message.contains("ticket_tags"), "{}", error.message);
            assert!(error.message.contains("version 2"), "{}", error.message);
            assert_eq!(
                error.details,
                Some(serde_json::json!({ "current_version": 2 }))
            );
        }
        // A handler's own message for a conflict stays.
        let own = HandlerError::new(ErrorKind::Conflict, "version_conflict", "the ticket moved")
            .with_source(StoreError::Conflict {
                stream: "ticket-1".into(),
                expected: cqrs_core::ExpectedVersion::Any,
                actual: 3,
            });
        assert_eq!(ApiError::from(own).message, "the ticket moved");
        // A conflict a plugin passed on as internal stays a 500 that says only that.
        let internal = HandlerError::internal(StoreError::Conflict {
            stream: "ticket-1".into(),
            expected: cqrs_core::ExpectedVersion::Any,
            actual: 3,
        });
        let internal = ApiError::from(internal);
        assert_eq!(internal.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(internal.message, INTERNAL);
    }

    /// A store's or a broker's error, however it reaches the gateway, is a 503 (or 500) whose
    /// body does not quote it.
    #[test]
    fn server_errors_do_not_quote_the_backend() {
        let unavailable = || StoreError::Unavailable {
            backend: "postgres",
            source: SECRET.into(),
        };
        let errors = [
            HandlerError::from(unavailable()),
            HandlerError::from(StoreError::Timeout {
                backend: "postgres",
                source: SECRET.into(),
            }),
            HandlerError::from(StoreError::Backend {
                backend: "postgres",
                source: SECRET.into(),
            }),
            HandlerError::from(TransportError::Unavailable {
                backend: "redis",
                source: SECRET.into(),
            }),
            HandlerError::internal(SECRET),
            // As a layer passes a handler's error on: without its source.
            HandlerError::from(DispatchError::Middleware(Box::new(HandlerError::from(
                unavailable(),
            )))),
        ];
        for error in errors {
            let kind = error.kind();
            let api = ApiError::from(error);
            assert!(api.status.is_server_error(), "{kind:?}: {api}");
            let body = body_of(api);
            assert!(!body.contains("secret"), "{kind:?}: {body}");
        }
        let api = ApiError::from(DispatchError::Middleware(Box::new(HandlerError::from(
            unavailable(),
        ))));
        assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(api.code, "unavailable");
        assert_eq!(api.retry_after, Some(1));
        assert!(!body_of(api).contains("secret"));
        let internal = ApiError::from(HandlerError::internal(SECRET));
        assert_eq!(internal.message, INTERNAL);
    }

    /// A 503 a handler wrote for clients keeps its message.
    #[test]
    fn messages_written_for_clients_are_kept() {
        let busy = HandlerError::new(ErrorKind::Unavailable, "busy", "try again in a moment");
        assert_eq!(ApiError::from(busy).message, "try again in a moment");
        let waiting = HandlerError::unavailable(
            "this build cannot load the aggregate; retry later",
            std::io::Error::other(SECRET),
        );
        assert_eq!(
            ApiError::from(waiting).message,
            "this build cannot load the aggregate; retry later"
        );
        let conflict = HandlerError::conflict("ticket_closed", "the ticket is closed");
        assert_eq!(ApiError::from(conflict).message, "the ticket is closed");
    }

    /// tower's own timeout and load shedding fail a dispatch as middleware errors of kind
    /// `timeout` and `unavailable`: a retryable 503, not a 500 `internal`.
    #[test]
    fn a_layers_timeout_or_shedding_is_a_retryable_503() {
        let shed = cqrs_core::DispatchError::Middleware(Box::new(
            cqrs_core::reexports::tower::load_shed::error::Overloaded::new(),
        ));
        let api = ApiError::from(shed);
        assert_eq!(
            (api.status, api.code.as_str(), api.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable", Some(1))
        );
        let elapsed = cqrs_core::DispatchError::Middleware(Box::new(
            cqrs_core::reexports::tower::timeout::error::Elapsed::new(),
        ));
        assert!(ApiError::from(elapsed).is_timeout());
        let other = cqrs_core::DispatchError::Middleware("refused by a filter".into());
        assert_eq!(
            ApiError::from(other).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
