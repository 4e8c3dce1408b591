//! The errors ports report.

use crate::{BoxError, ErrorKind, HandlerError};

/// What an event store, snapshot store, idempotency store, inbox or checkpoint store reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream is not at the expected version: someone else appended first. Reload and
    /// decide again, or report a conflict (409).
    #[error(
        "version conflict on stream {stream}: expected {expected}, found version {actual}; someone else changed it first: reload it and try again"
    )]
    Conflict {
        /// The stream.
        stream: String,
        /// What the caller expected.
        expected: crate::ExpectedVersion,
        /// The stream's actual version.
        actual: u64,
    },
    /// An idempotency key was reused with a different request. Tell the client (422).
    #[error(
        "idempotency key `{key}` in scope `{scope}` was already used for a different request; a new request needs a new key (a retry sends the same request with the same key)"
    )]
    FingerprintMismatch {
        /// The key's scope.
        scope: String,
        /// The key.
        key: String,
    },
    /// The backend cannot be reached or refused the operation for now. Retryable; usually 503.
    #[error("{backend} is unavailable: {source}")]
    Unavailable {
        /// Which backend (`postgres`, `redis`, ...).
        backend: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The operation ran past its time budget. Retryable.
    #[error("{backend} did not answer in time: {source}")]
    Timeout {
        /// Which backend.
        backend: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// Stored data could not be encoded or decoded.
    #[error("could not encode or decode stored data: {0}")]
    Codec(#[source] BoxError),
    /// The backend cannot store a value the caller gave: text holding U+0000 in Postgres, a
    /// key too large for an index, a payload nested more than
    /// [`MAX_PAYLOAD_DEPTH`](crate::ports::MAX_PAYLOAD_DEPTH) deep. The caller's data is at
    /// fault, not the server: validate it earlier (422).
    // The source stays out of the message: clients see it, and it may quote server internals.
    #[error(
        "{backend} cannot store a value it was given (text holding U+0000, a value too large \
         to index, or arrays and objects nested more than {} deep)",
        crate::ports::MAX_PAYLOAD_DEPTH
    )]
    Rejected {
        /// Which backend.
        backend: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// Anything else the backend reported; a bug or a misconfiguration.
    #[error("{backend} failed: {source}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Conflict { .. } => ErrorKind::Conflict,
            StoreError::FingerprintMismatch { .. } | StoreError::Rejected { .. } => {
                ErrorKind::Invalid
            }
            StoreError::Unavailable { .. } => ErrorKind::Unavailable,
            StoreError::Timeout { .. } => ErrorKind::Timeout,
            StoreError::Codec(_) | StoreError::Backend { .. } => ErrorKind::Internal,
        }
    }
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        let code = match &error {
            StoreError::Conflict { .. } => "version_conflict",
            StoreError::FingerprintMismatch { .. } => "idempotency_key_reused",
            StoreError::Rejected { .. } => "unstorable_value",
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::Timeout { .. } => "timeout",
            StoreError::Codec(_) | StoreError::Backend { .. } => "internal",
        };
        let details = match &error {
            // What a client needs to decide again, whichever layer met the conflict.
            StoreError::Conflict { actual, .. } => {
                Some(serde_json::json!({ "current_version": actual }))
            }
            _ => None,
        };
        let message = match &error {
            // For the caller's client: the stream's name is the server's own (the error, kept
            // as the source, still names it for the log).
            StoreError::Conflict {
                expected, actual, ..
            } => format!(
                "version conflict: expected {expected}, found version {actual}; someone else \
                 changed it first: reload it and try again"
            ),
            _ => error.to_string(),
        };
        let handler_error = HandlerError::new(error.kind(), code, message);
        let handler_error = match details {
            Some(details) => handler_error.with_details(details),
            None => handler_error,
        };
        handler_error.with_source(error)
    }
}

/// What an event transport or a pub/sub reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The broker cannot be reached. Retryable; the outbox relay retries with backoff.
    #[error("{backend} is unavailable: {source}")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The broker did not answer in time. Retryable.
    #[error("{backend} did not answer in time")]
    Timeout {
        /// Which backend.
        backend: &'static str,
    },
    /// A message could not be encoded or decoded.
    #[error("could not encode or decode a message: {0}")]
    Codec(#[source] BoxError),
    /// The transport refuses this event for good, for a reason other than its encoding (its
    /// consumers gave up on it: see
    /// [`EventBusTransport`](crate::projection::EventBusTransport)). Like
    /// [`Codec`](Self::Codec), it is about the event: the relays skip it.
    #[error("the transport refuses this event for good: {0}")]
    Refused(#[source] BoxError),
    /// The consumer or subscription was closed (shutdown).
    #[error(
        "the transport is closed: it, or this consumer or subscription, was shut down; open a new one to go on"
    )]
    Closed,
    /// The caller asked for something the transport refuses (a topic name it cannot use,
    /// consumer options that would break its guarantees). Not retryable: fix the caller.
    #[error("{0}")]
    Invalid(String),
    /// Anything else the broker reported.
    #[error("{backend} failed: {source}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
}

impl TransportError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransportError::Unavailable { .. } | TransportError::Closed => ErrorKind::Unavailable,
            TransportError::Timeout { .. } => ErrorKind::Timeout,
            TransportError::Invalid(_) => ErrorKind::Invalid,
            TransportError::Codec(_)
            | TransportError::Refused(_)
            | TransportError::Backend { .. } => ErrorKind::Internal,
        }
    }

    /// Whether the error is about the published events themselves (one cannot be encoded, or
    /// is refused for good), so publishing the others alone may succeed. Every other error,
    /// retryable or not (a permission, a topic the broker refuses, a full server), would
    /// refuse any event alike: the relays skip an event only on these two, and retry on the
    /// rest.
    pub fn is_about_the_events(&self) -> bool {
        matches!(self, TransportError::Codec(_) | TransportError::Refused(_))
    }
}

impl From<TransportError> for HandlerError {
    /// The handler error of the same kind, but for [`Invalid`](TransportError::Invalid),
    /// which is `Internal`: what a transport refuses as invalid (a topic, consumer options, a
    /// key prefix) is the server's own making, so a handler's client must not be told its
    /// request was at fault (422) and not to retry. [`TransportError::kind`] stays `Invalid`
    /// for the relays and operators.
    fn from(error: TransportError) -> Self {
        let kind = match error.kind() {
            ErrorKind::Invalid => ErrorKind::Internal,
            kind => kind,
        };
        HandlerError::new(kind, kind.as_str(), error.to_string()).with_source(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport's `Invalid` is the server's own making: a handler that meets it fails as
    /// `Internal` (500), not as a client's bad request (422).
    #[test]
    fn a_transport_refusing_the_servers_own_call_is_internal_to_a_handler() {
        let error = HandlerError::from(TransportError::Invalid("topic `a b` ...".into()));
        assert_eq!(
            (error.kind(), error.code()),
            (ErrorKind::Internal, "internal")
        );
        let error = HandlerError::from(TransportError::Timeout { backend: "redis" });
        assert_eq!(
            (error.kind(), error.code()),
            (ErrorKind::Timeout, "timeout")
        );
    }

    #[test]
    fn a_conflict_tells_the_current_version() {
        let error = HandlerError::from(StoreError::Conflict {
            stream: "s".into(),
            expected: crate::ExpectedVersion::Exactly(1),
            actual: 3,
        });
        assert_eq!(error.code(), "version_conflict");
        assert_eq!(
            error.details(),
            Some(&serde_json::json!({ "current_version": 3 }))
        );
        assert_eq!(
            error.message(),
            "version conflict: expected version 1, found version 3; someone else changed it \
             first: reload it and try again"
        );
        let error = HandlerError::from(StoreError::Codec("bad".into()));
        assert_eq!(error.details(), None);
    }
}
