//! Errors: what a handler reports, what a bus reports, and the kind that classifies both.

use crate::MessageKind;
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error and its causes on one line, joined with `: `, each cause left out when the text
/// before already holds it.
///
/// The errors of this crate and its adapters name their cause in their own message, so that
/// the message alone (`%error` in a log line) says it all, and give it as their
/// [`source`](std::error::Error::source) too, so that code can inspect it. A report that
/// walks the chain (anyhow's `{:#}`, eyre's) then says each cause once per level above it;
/// this one says it once.
///
/// ```
/// use cqrs_core::ErrorChain;
/// use cqrs_core::ports::StoreError;
///
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let error = StoreError::Unavailable { backend: "postgres", source: Box::new(refused) };
/// assert_eq!(error.to_string(), "postgres is unavailable: connection refused");
/// // Walked level by level, the cause comes twice; the chain says it once.
/// assert_eq!(ErrorChain(&error).to_string(), "postgres is unavailable: connection refused");
/// // In a log line:
/// cqrs_core::reexports::tracing::error!(error = %ErrorChain(&error), "could not load the ticket");
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = String::new();
        let mut cause = Some(self.0);
        while let Some(error) = cause {
            let text = error.to_string();
            if !text.is_empty() && !said.contains(&text) {
                if !said.is_empty() {
                    said.push_str(": ");
                }
                said.push_str(&text);
            }
            cause = error.source();
        }
        f.write_str(&said)
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The class of an error, so a gateway maps errors to responses in one place.
///
/// The comment on each variant says how a caller should usually handle it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input is malformed or breaks a rule. Do not retry unchanged; usually a 400 or 422.
    Invalid,
    /// The caller is not authenticated. Usually a 401.
    Unauthorized,
    /// The caller is authenticated but not allowed. Usually a 403.
    Forbidden,
    /// The target does not exist (or is not visible to the caller). Usually a 404.
    NotFound,
    /// The state changed under the caller (a stale expected version, a taken name). Reload and
    /// retry, or report; usually a 409.
    Conflict,
    /// Too many requests. Retry later; usually a 429 with `Retry-After`.
    RateLimited,
    /// The work ran past its time budget. It may or may not have taken effect; usually a 503.
    Timeout,
    /// A backend is unavailable. Retryable; usually a 503 with `Retry-After`.
    Unavailable,
    /// A bug or an unexpected failure. Usually a 500, logged with its source.
    Internal,
}

impl ErrorKind {
    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Timeout | ErrorKind::Unavailable | ErrorKind::RateLimited
        )
    }

    /// The HTTP status this kind usually maps to, as each variant says: 422, 401, 403, 404,
    /// 409, 429, 503 (`Timeout` and `Unavailable`) and 500. For a gateway's error responses.
    ///
    /// ```
    /// use cqrs_core::ErrorKind;
    ///
    /// assert_eq!(ErrorKind::Conflict.http_status(), 409);
    /// assert_eq!(ErrorKind::Timeout.http_status(), 503);
    /// ```
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorKind::Invalid => 422,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::RateLimited => 429,
            ErrorKind::Timeout | ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }

    /// A snake_case name for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

/// The error a handler returns: a kind, a stable snake_case `code` for clients, a message for
/// humans, optional structured details and an optional source.
///
/// One constructor per kind. Those whose code says more than the kind take it first; the
/// others use the kind's name as the code ([`with_code`](Self::with_code) changes it):
///
/// | kind | constructor | code |
/// |---|---|---|
/// | `Invalid` | [`invalid(code, message)`](Self::invalid) | yours |
/// | `Conflict` | [`conflict(code, message)`](Self::conflict) | yours |
/// | `RateLimited` | [`rate_limited(code, message)`](Self::rate_limited) | yours |
/// | `NotFound` | [`not_found(message)`](Self::not_found) | `not_found` |
/// | `Forbidden` | [`forbidden(message)`](Self::forbidden) | `forbidden` |
/// | `Unauthorized` | [`unauthorized(message)`](Self::unauthorized) | `unauthorized` |
/// | `Timeout` | [`timeout(message)`](Self::timeout) | `timeout` |
/// | `Unavailable` | [`unavailable(message, source)`](Self::unavailable) | `unavailable` |
/// | `Internal` | [`internal(source)`](Self::internal) | `internal` |
///
/// ```
/// use cqrs_core::{ErrorKind, HandlerError};
///
/// let err = HandlerError::conflict("ticket_closed", "the ticket is closed");
/// assert_eq!(err.kind(), ErrorKind::Conflict);
/// assert_eq!(err.code(), "ticket_closed");
/// assert_eq!(err.to_string(), "the ticket is closed");
/// ```
pub struct HandlerError {
    // One pointer: a `Result<T, HandlerError>` stays small, and the success path of every
    // dispatch moves a few bytes instead of the error's hundred.
    inner: Box<Inner>,
}

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    code: Cow<'static, str>,
    message: Cow<'static, str>,
    details: Option<serde_json::Value>,
    source: Option<BoxError>,
    permanent: bool,
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.inner.kind)
            .field("code", &self.inner.code)
            .field("message", &self.inner.message)
            .field("details", &self.inner.details)
            .field("source", &self.inner.source)
            .field("permanent", &self.inner.permanent)
            .finish()
    }
}

impl HandlerError {
    /// An error of any kind.
    pub fn new(
        kind: ErrorKind,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                code: code.into(),
                message: message.into(),
                details: None,
                source: None,
                permanent: false,
            }),
        }
    }

    /// Invalid input ([`ErrorKind::Invalid`]).
    pub fn invalid(
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::new(ErrorKind::Invalid, code, message)
    }

    /// Not allowed ([`ErrorKind::Forbidden`]).
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Forbidden, "forbidden", message)
    }

    /// Not authenticated ([`ErrorKind::Unauthorized`]).
    pub fn unauthorized(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unauthorized, "unauthorized", message)
    }

    /// Not found ([`ErrorKind::NotFound`]).
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::NotFound, "not_found", message)
    }

    /// A conflict with the current state ([`ErrorKind::Conflict`]).
    pub fn conflict(
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::new(ErrorKind::Conflict, code, message)
    }

    /// Too many requests ([`ErrorKind::RateLimited`]): retry later. A gateway's
    /// `Retry-After` may come from [`details`](Self::with_details).
    pub fn rate_limited(
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::new(ErrorKind::RateLimited, code, message)
    }

    /// The work ran past its time budget ([`ErrorKind::Timeout`]); it may or may not have
    /// taken effect.
    pub fn timeout(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Timeout, "timeout", message)
    }

    /// A backend is down ([`ErrorKind::Unavailable`]); keeps the backend's error as source.
    pub fn unavailable(message: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Unavailable, "unavailable", message).with_source(source)
    }

    /// An unexpected failure ([`ErrorKind::Internal`]); keeps the cause as source. The
    /// message is the cause's own text (a driver's error, with table or host names): for
    /// logs, not for clients; see [`message`](Self::message).
    pub fn internal(source: impl Into<BoxError>) -> Self {
        let source = source.into();
        Self::new(ErrorKind::Internal, "internal", source.to_string()).with_source(source)
    }

    /// Attaches structured details for the client.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.inner.details = Some(details);
        self
    }

    /// Replaces the code (keeping the kind and message).
    pub fn with_code(mut self, code: impl Into<Cow<'static, str>>) -> Self {
        self.inner.code = code.into();
        self
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Marks the failure as permanent: handling the same message again would fail the same
    /// way (an event whose data the handler can never accept). An event consumer
    /// ([`EventBusConsumer`](crate::projection::EventBusConsumer)) then dead-letters the event
    /// at once instead of redelivering it `max_deliveries` times (only when every handler
    /// that failed on the event says so), a relay's
    /// [`EventBusTransport`](crate::projection::EventBusTransport) gives it up at once, and a
    /// [`ProjectionRunner`](crate::projection::ProjectionRunner) fed by a transport
    /// dead-letters the event a projection refuses so. Its kind, code and message stay; a kind
    /// that says to wait (`Unavailable`, `RateLimited`) still waits.
    ///
    /// ```
    /// use cqrs_core::HandlerError;
    ///
    /// let refused = HandlerError::invalid("unknown_region", "no warehouse serves it");
    /// let refused = refused.permanent();
    /// assert!(refused.is_permanent());
    /// assert!(!HandlerError::invalid("bad_input", "try again").is_permanent());
    /// ```
    pub fn permanent(mut self) -> Self {
        self.inner.permanent = true;
        self
    }

    /// Whether it was marked [`permanent`](Self::permanent).
    pub fn is_permanent(&self) -> bool {
        self.inner.permanent
    }

    /// The error this one was made from ([`with_source`](Self::with_source)), or one of its
    /// causes, when it is an `E`: a caller that matches on a domain error's type, not on the
    /// code, gets it back through a bus that carries only `HandlerError`s.
    ///
    /// ```
    /// use cqrs_core::HandlerError;
    ///
    /// #[derive(Debug)]
    /// struct InsufficientFunds { missing: u64 }
    ///
    /// impl std::fmt::Display for InsufficientFunds {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         write!(f, "insufficient funds: {} cents short", self.missing)
    ///     }
    /// }
    ///
    /// impl std::error::Error for InsufficientFunds {}
    ///
    /// impl From<InsufficientFunds> for HandlerError {
    ///     fn from(e: InsufficientFunds) -> Self {
    ///         HandlerError::conflict("insufficient_funds", e.to_string()).with_source(e)
    ///     }
    /// }
    ///
    /// let error = HandlerError::from(InsufficientFunds { missing: 250 });
    /// assert_eq!(error.code(), "insufficient_funds");
    /// assert_eq!(error.source_as::<InsufficientFunds>().map(|e| e.missing), Some(250));
    /// ```
    pub fn source_as<E: std::error::Error + 'static>(&self) -> Option<&E> {
        let mut next = std::error::Error::source(self);
        while let Some(error) = next {
            if let Some(found) = error.downcast_ref::<E>() {
                return Some(found);
            }
            next = error.source();
        }
        None
    }

    /// The error's class.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The stable snake_case code for clients.
    pub fn code(&self) -> &str {
        &self.inner.code
    }

    /// The message for humans. For the client-facing kinds ([`ErrorKind::Invalid`],
    /// [`ErrorKind::Forbidden`], [`ErrorKind::Conflict`] and the like) a handler wrote it for
    /// the client; for
    /// [`ErrorKind::Internal`], [`ErrorKind::Unavailable`] and [`ErrorKind::Timeout`] it may
    /// be a backend's own text ([`internal`](Self::internal), and the conversion from a
    /// store's error, copy it): log it, and answer clients with a fixed text for those kinds
    /// (the helpdesk's API error does).
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// The structured details, if any.
    pub fn details(&self) -> Option<&serde_json::Value> {
        self.inner.details.as_ref()
    }
}

/// Why a dispatch through a bus failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// No handler is registered for the message. A server bug: register the handler, or check
    /// the bus at start-up with [`CommandBus::check`](crate::CommandBus::check).
    #[error(
        "no {kind} handler is registered for `{name}`; register one on the bus builder or through a plugin (is the plugin's crate linked with `use its_crate as _;`?)"
    )]
    NoHandler {
        /// Which bus.
        kind: MessageKind,
        /// The message's wire name.
        name: &'static str,
    },
    /// The handler returned an error, or a layer refused with a [`HandlerError`] (an
    /// authorization layer's `forbidden`): its kind says how to handle it, whichever of them
    /// refused.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// The handler panicked. The bus is unaffected; this one message failed. A bug to fix.
    #[error("the handler for {kind} `{name}` panicked: {message}")]
    Panicked {
        /// Which bus.
        kind: MessageKind,
        /// The message's wire name.
        name: &'static str,
        /// The panic message, when it was a string.
        message: String,
    },
    /// The dispatch ran past its time budget (see [`TimeoutLayer`](crate::middleware::TimeoutLayer)).
    /// The handler was dropped at an `.await`; it may have taken effect.
    #[error(
        "{kind} `{name}` ran past its time budget of {after:?} and was dropped (it may have taken effect); if it needs longer, raise the budget (a `TimeoutLayer`'s, or the event bus's `handler_timeout`)"
    )]
    Timeout {
        /// Which bus.
        kind: MessageKind,
        /// The message's wire name.
        name: &'static str,
        /// The budget that ran out.
        after: Duration,
    },
    /// A middleware layer failed the dispatch with an error of its own (not a
    /// [`HandlerError`], which is [`DispatchError::Handler`]). Its error is the source;
    /// downcast it to match on your layer's error type. Its [`kind`](DispatchError::kind) is
    /// `timeout` for tower's `Elapsed` (`tower::timeout::TimeoutLayer`), `unavailable` for
    /// tower's `Overloaded` (`tower::load_shed::LoadShedLayer`), and `internal` for any other
    /// (a 500 at a gateway): a layer that refuses a dispatch for the caller to see returns a
    /// [`HandlerError`] of the kind it means, with its own error as the source if it wants it
    /// matched. A layer that panicked is reported here too (kind `internal`); a handler's panic
    /// is [`DispatchError::Panicked`].
    #[error("middleware failed the dispatch: {0}")]
    Middleware(#[source] BoxError),
    /// An event was published and some of its handlers failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl DispatchError {
    /// Whether a publish failed only because every handler that failed refused the event
    /// [permanently](HandlerError::permanent): no redelivery mends that.
    pub(crate) fn refused_for_good(&self) -> bool {
        match self {
            DispatchError::Publish(e) => {
                !e.failures.is_empty()
                    && e.failures.iter().all(|f| {
                        f.error
                            .handler_error()
                            .is_some_and(HandlerError::is_permanent)
                    })
            }
            _ => false,
        }
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DispatchError::NoHandler { .. } | DispatchError::Panicked { .. } => ErrorKind::Internal,
            DispatchError::Handler(e) => e.kind(),
            DispatchError::Timeout { .. } => ErrorKind::Timeout,
            DispatchError::Middleware(e) => middleware_kind(e.as_ref()),
            DispatchError::Publish(e) => e.kind(),
        }
    }

    /// The handler's error, when the handler (or a layer, with a [`HandlerError`]) refused.
    pub fn handler_error(&self) -> Option<&HandlerError> {
        match self {
            DispatchError::Handler(e) => Some(e),
            DispatchError::Middleware(e) => e.downcast_ref::<HandlerError>(),
            _ => None,
        }
    }

    /// Turns the error a tower layer produced back into a `DispatchError`: our own errors pass
    /// through, and everything else becomes [`DispatchError::Middleware`] (whose
    /// [`kind`](DispatchError::kind) tells tower's own errors apart).
    pub(crate) fn from_layer(error: BoxError) -> Self {
        match error.downcast::<DispatchError>() {
            Ok(own) => *own,
            Err(other) => match other.downcast::<HandlerError>() {
                Ok(handler) => DispatchError::Handler(*handler),
                Err(other) => DispatchError::Middleware(other),
            },
        }
    }
}

/// `error`'s message followed by those of its causes it does not show already. The usual
/// style keeps a cause out of `Display` (thiserror's `#[source]`, anyhow's context): a log
/// line or a health report of the message alone says what failed, not why.
pub(crate) fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let message = error.to_string();
        if !message.is_empty() && !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = error.source();
    }
    text
}

/// The kind of an error a layer failed a dispatch with: a [`HandlerError`]'s own; tower's
/// `Elapsed` (`tower::timeout`) a timeout and `Overloaded` (`tower::load_shed`) unavailable,
/// both retryable, as the core's own layers' would be; anything else internal.
pub(crate) fn middleware_kind(
    error: &(dyn std::error::Error + Send + Sync + 'static),
) -> ErrorKind {
    if let Some(handler) = error.downcast_ref::<HandlerError>() {
        handler.kind()
    } else if error.is::<tower::timeout::error::Elapsed>() {
        ErrorKind::Timeout
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Internal
    }
}

/// A dispatch that failed inside a handler (a query an authorizer or another handler sent),
/// as that handler's own error, so `?` works there: a handler's error passes through as it
/// was; any other keeps its kind (a timeout stays retryable), with code `dispatch_failed`, and
/// is [permanent](HandlerError::permanent) when it is a publish whose failing handlers all
/// refused permanently.
///
/// ```
/// use cqrs_core::{DispatchError, HandlerError};
///
/// let refused = HandlerError::not_found("no such ticket").with_code("no_ticket");
/// assert_eq!(HandlerError::from(DispatchError::Handler(refused)).code(), "no_ticket");
///
/// // A layer's refusal keeps its details.
/// let layer = HandlerError::conflict("stale", "the ticket changed")
///     .with_details(cqrs_core::reexports::serde_json::json!({"current_version": 3}));
/// let back = HandlerError::from(DispatchError::Middleware(Box::new(layer)));
/// assert_eq!(back.details(), Some(&cqrs_core::reexports::serde_json::json!({"current_version": 3})));
/// ```
impl From<DispatchError> for HandlerError {
    fn from(error: DispatchError) -> Self {
        let other = match error {
            DispatchError::Handler(handler) => return handler,
            // A layer's refusal (a `CheckLayer`'s), whole: its details too.
            DispatchError::Middleware(error) => match error.downcast::<HandlerError>() {
                Ok(handler) => return *handler,
                Err(error) => DispatchError::Middleware(error),
            },
            other => other,
        };
        // A publish every failing handler refused for good stays a refusal for good: the
        // caller (a projection, an event handler) dead-letters instead of retrying.
        let permanent = other.refused_for_good();
        let error = HandlerError::new(other.kind(), "dispatch_failed", other.to_string())
            .with_source(other);
        if permanent { error.permanent() } else { error }
    }
}

/// Some handlers of a published event failed; the others ran.
#[derive(Debug, thiserror::Error)]
#[error("{} of {handlers} handlers of event `{event}` failed: {}", failures.len(), every_failure(failures))]
#[non_exhaustive]
pub struct PublishError {
    /// The event's wire name.
    pub event: &'static str,
    /// How many handlers ran.
    pub handlers: usize,
    /// Each failed handler's name and error.
    pub failures: Vec<HandlerFailure>,
}

impl PublishError {
    /// The failures' kind when they share one; when they differ, `Unavailable` if each may
    /// pass by retrying (a timeout, a backend away, a rate limit), else `Internal`. So a
    /// caller that publishes with `?` (a projection, a handler) keeps a retryable failure
    /// retryable.
    pub fn kind(&self) -> ErrorKind {
        let mut kinds = self.failures.iter().map(|f| f.error.kind());
        let Some(first) = kinds.next() else {
            return ErrorKind::Internal;
        };
        let mut same = true;
        let mut retryable = first.is_retryable();
        for kind in kinds {
            same &= kind == first;
            retryable &= kind.is_retryable();
        }
        match (same, retryable) {
            (true, _) => first,
            (false, true) => ErrorKind::Unavailable,
            (false, false) => ErrorKind::Internal,
        }
    }
}

/// Every failure, each with its handler's name: one that always fails must not hide the
/// others (the text is what a sink logs and what a consumer records as the retry's reason).
fn every_failure(failures: &[HandlerFailure]) -> String {
    failures
        .iter()
        .map(|f| format!("{}: {}", f.handler, f.error))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One event handler that failed.
#[derive(Debug)]
#[non_exhaustive]
pub struct HandlerFailure {
    /// The handler's name ([`EventHandler::name`](crate::EventHandler::name)).
    pub handler: std::sync::Arc<str>,
    /// Its error (a handler error, or a panic).
    pub error: DispatchError,
}

/// Why a bus could not be built, or a start-up check failed. Lists every problem at once.
/// Its `Debug` is that list too: a `main` that returns the error prints the `Debug` form.
#[derive(thiserror::Error)]
#[error("{}", problems.join("; "))]
#[non_exhaustive]
pub struct BuildError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl std::fmt::Debug for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each constructor makes its kind, with the code the table in `HandlerError`'s docs
    /// gives, and each kind's status is the one its docs name.
    #[test]
    fn each_constructor_makes_its_kind_and_each_kind_has_its_status() {
        let io = || std::io::Error::other("down");
        let made = [
            (
                HandlerError::invalid("bad", "m"),
                ErrorKind::Invalid,
                "bad",
                422,
            ),
            (
                HandlerError::conflict("taken", "m"),
                ErrorKind::Conflict,
                "taken",
                409,
            ),
            (
                HandlerError::rate_limited("slow_down", "m"),
                ErrorKind::RateLimited,
                "slow_down",
                429,
            ),
            (
                HandlerError::not_found("m"),
                ErrorKind::NotFound,
                "not_found",
                404,
            ),
            (
                HandlerError::forbidden("m"),
                ErrorKind::Forbidden,
                "forbidden",
                403,
            ),
            (
                HandlerError::unauthorized("m"),
                ErrorKind::Unauthorized,
                "unauthorized",
                401,
            ),
            (
                HandlerError::timeout("m"),
                ErrorKind::Timeout,
                "timeout",
                503,
            ),
            (
                HandlerError::unavailable("m", io()),
                ErrorKind::Unavailable,
                "unavailable",
                503,
            ),
            (
                HandlerError::internal(io()),
                ErrorKind::Internal,
                "internal",
                500,
            ),
        ];
        for (error, kind, code, status) in made {
            assert_eq!((error.kind(), error.code()), (kind, code), "{error:?}");
            assert_eq!(kind.http_status(), status, "{kind:?}");
        }
    }

    #[derive(Debug)]
    struct Outer(std::io::Error, &'static str);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.1)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// A cause the message leaves out is added; one it shows already is not repeated.
    #[test]
    fn with_causes_adds_what_the_message_leaves_out() {
        let hidden = Outer(std::io::Error::other("refused"), "could not connect");
        assert_eq!(with_causes(&hidden), "could not connect: refused");
        let shown = Outer(
            std::io::Error::other("refused"),
            "could not connect: refused",
        );
        assert_eq!(with_causes(&shown), "could not connect: refused");
        let plain = std::io::Error::other("refused");
        assert_eq!(with_causes(&plain), "refused");
    }

    fn publish_error<const N: usize>(errors: [HandlerError; N]) -> DispatchError {
        DispatchError::Publish(PublishError {
            event: "ticket_opened",
            handlers: N + 1,
            failures: errors
                .into_iter()
                .map(|e| HandlerFailure {
                    handler: "h".into(),
                    error: DispatchError::Handler(e),
                })
                .collect(),
        })
    }

    /// A publish keeps its handlers' kind: the shared one, else retryable when each is.
    #[test]
    fn a_publish_error_keeps_its_handlers_kind() {
        let away = || HandlerError::unavailable("down", "the backend is away");
        let slow = || HandlerError::new(ErrorKind::Timeout, "slow", "too slow");
        let stale = || HandlerError::conflict("stale", "a stale version");
        assert_eq!(
            publish_error([away(), away()]).kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(publish_error([stale()]).kind(), ErrorKind::Conflict);
        assert_eq!(
            publish_error([away(), slow()]).kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(publish_error([away(), stale()]).kind(), ErrorKind::Internal);
        assert_eq!(publish_error([]).kind(), ErrorKind::Internal);
        let retryable = HandlerError::from(publish_error([away()]));
        assert!(retryable.kind().is_retryable(), "{retryable:?}");
    }

    /// A publish whose failing handlers all refused for good is a refusal for good as a
    /// handler error too (`?` in a projection's `apply`), so it is dead-lettered at once; one
    /// that may pass on a retry is not.
    #[test]
    fn a_publish_refused_for_good_stays_permanent_as_a_handler_error() {
        let never = || HandlerError::invalid("no_region", "no warehouse serves it").permanent();
        let away = || HandlerError::unavailable("down", "the backend is away");
        assert!(HandlerError::from(publish_error([never(), never()])).is_permanent());
        assert!(!HandlerError::from(publish_error([never(), away()])).is_permanent());
        assert!(!HandlerError::from(publish_error([away()])).is_permanent());
        assert!(!HandlerError::from(publish_error([])).is_permanent());
        let timed_out = DispatchError::Timeout {
            kind: MessageKind::Event,
            name: "ticket_opened",
            after: Duration::from_secs(1),
        };
        assert!(!HandlerError::from(timed_out).is_permanent());
    }
}
