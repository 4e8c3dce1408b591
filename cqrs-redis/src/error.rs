//! Errors: what `connect` reports, and how fred's errors map to the core's [`TransportError`].

use cqrs_core::ErrorKind;
use cqrs_core::ports::TransportError;
use fred::error::{Error as FredError, ErrorKind as FredKind};

pub(crate) const BACKEND: &str = "redis";

/// What [`RedisStreamOptions::connect`](crate::RedisStreamOptions::connect) and
/// [`RedisPubSubOptions::connect`](crate::RedisPubSubOptions::connect) report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The options are not valid; every problem is listed. Fix the configuration.
    #[error("invalid redis options: {}", problems.join("; "))]
    Invalid {
        /// Each problem, in words.
        problems: Vec<String>,
    },
    /// The server is older than Redis 7.0, whose stream commands the transport needs. Upgrade
    /// the server.
    #[error(
        "redis {found} is too old: the transport needs redis {required} or later; upgrade the \
         server"
    )]
    UnsupportedServer {
        /// The version the server reported.
        found: String,
        /// The oldest version that works.
        required: &'static str,
    },
    /// The TLS handshake failed: the server's certificate was refused (signed by a CA this
    /// client does not trust, or not naming the URL's host), the server refused this client
    /// (no client certificate, or one it does not accept), or the server broke the protocol.
    /// Fix the configuration (`tls_ca_file`, `tls_client_cert`, the URL); retrying does not
    /// help. Only with the crate's `tls` feature. (A server that speaks plain RESP on the port
    /// does not answer the handshake: that connect times out.)
    #[error("TLS to redis at {server} failed: {reason}; {}", tls_advice(reason))]
    Tls {
        /// The server, `host:port`.
        server: String,
        /// What the TLS library reported.
        reason: String,
    },
    /// The server could not be reached or refused a setup command. Retryable when its
    /// [`kind`](TransportError::kind) is `Unavailable` or `Timeout`.
    #[error(transparent)]
    Redis(#[from] TransportError),
}

impl ConnectError {
    /// The class of this error: `Invalid` for bad options, old servers and refused TLS
    /// handshakes, else the class of the Redis error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConnectError::Invalid { .. }
            | ConnectError::UnsupportedServer { .. }
            | ConnectError::Tls { .. } => ErrorKind::Invalid,
            ConnectError::Redis(e) => e.kind(),
        }
    }
}

/// What to check after a failed TLS handshake, by what failed.
fn tls_advice(reason: &str) -> &'static str {
    // The server's alerts about the client's certificate (TLS 1.3 `certificate_required`,
    // and the older alerts a server sends for one it refuses).
    let client_refused = [
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "AccessDenied",
    ]
    .iter()
    .any(|alert| reason.contains(&format!("AlertReceived({alert})")));
    if client_refused {
        "the server wants a client certificate it accepts: set tls_client_cert to a \
         certificate (and its key) that a CA the server trusts signed"
    } else {
        "check that a CA this client trusts signed the server's certificate (the one in \
         tls_ca_file, else the system's root certificates) and that the certificate names the \
         URL's host"
    }
}

/// Maps a fred error: connection trouble is retryable (`Unavailable`, `Timeout`), a server
/// that is loading, failing over, out of memory or out of client slots too, and sentinels
/// that name no primary; anything else is a backend failure.
pub(crate) fn transport_error(error: FredError) -> TransportError {
    let details = error.details();
    let transient_reply = [
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "OOM",
        // A demoted primary (reconnected away from), a primary short of replicas, one whose
        // snapshots fail: each refuses writes until it is fixed or replaced.
        "READONLY",
        "NOREPLICAS",
        "MISCONF",
    ]
    // The reply's first word is its code: `BUSY` is transient, `BUSYGROUP` and `BUSYKEY` are not.
    .contains(&details.split_whitespace().next().unwrap_or_default())
        // A full server (`maxclients`) has only the generic code: told by its text.
        || details.starts_with("ERR max number of clients reached");
    match error.kind() {
        FredKind::Timeout => TransportError::Timeout { backend: BACKEND },
        FredKind::IO
        | FredKind::Canceled
        | FredKind::Routing
        | FredKind::Cluster
        | FredKind::Backpressure => TransportError::Unavailable {
            backend: BACKEND,
            source: Box::new(error),
        },
        kind if transient_reply || passes_in_fred_words(kind, details) => {
            TransportError::Unavailable {
                backend: BACKEND,
                source: Box::new(error),
            }
        }
        _ => TransportError::Backend {
            backend: BACKEND,
            source: Box::new(error),
        },
    }
}

/// A failure fred reports in its own words, not with a Redis reply code, that passes.
fn passes_in_fred_words(kind: &FredKind, details: &str) -> bool {
    match kind {
        // No sentinel answered, or the primary one named is a replica now (mid-failover).
        // fred gives every other failure behind sentinels this kind too (a wrong password, an
        // unknown service name), which retrying does not mend.
        FredKind::Sentinel => {
            details.starts_with("Failed to connect to all sentinel nodes")
                || details.starts_with("Invalid role")
        }
        // A cluster whose slots are not all served (mid-failover): fred's check of each seed
        // node at connect, not `CLUSTERDOWN`.
        FredKind::Protocol => {
            details.starts_with("Invalid or missing cluster state")
                || details.starts_with("Invalid or missing CLUSTER SLOTS")
        }
        _ => false,
    }
}

/// Like [`transport_error`], but a timeout while `client` is not connected is reported as
/// `Unavailable`: fred may hold a command it accepted just before it noticed the connection
/// was gone until the command times out, and the caller should hear that Redis is away.
pub(crate) fn client_error<C: fred::interfaces::ClientLike>(
    client: &C,
    error: FredError,
) -> TransportError {
    if *error.kind() == FredKind::Timeout && !client.is_connected() {
        return TransportError::Unavailable {
            backend: BACKEND,
            source: Box::new(error),
        };
    }
    transport_error(error)
}

/// A backend error with a message of ours.
pub(crate) fn backend(message: impl Into<String>) -> TransportError {
    TransportError::Backend {
        backend: BACKEND,
        source: message.into().into(),
    }
}

pub(crate) fn is_noscript(error: &FredError) -> bool {
    error.details().starts_with("NOSCRIPT")
}

/// The group is gone: `NOGROUP` (no such group; for a blocking read, `NOGROUP the consumer
/// group this client was blocked on no longer exists`), or `UNBLOCKED the stream key no longer
/// exists` for a blocking read whose stream was deleted (`DEL`, `FLUSHDB`) while it waited.
/// Either way the group is created again.
///
/// Not any `UNBLOCKED`: Redis also ends a blocking read with `UNBLOCKED client unblocked via
/// CLIENT UNBLOCK` (`CLIENT UNBLOCK <id> ERROR`) and `UNBLOCKED force unblock from blocking
/// operation, instance state changed` (a master turned replica), and the group is still
/// there then: taking those for a group gone would forget the entries the consumer holds.
pub(crate) fn is_nogroup(error: &FredError) -> bool {
    let details = error.details();
    details.contains("NOGROUP") || is_stream_gone(details)
}

/// `UNBLOCKED the stream key no longer exists`: a blocking read whose stream was deleted.
fn is_stream_gone(details: &str) -> bool {
    details.contains("UNBLOCKED") && details.contains("no longer exists")
}

/// Any other `UNBLOCKED`: Redis ended a blocking read with an error, having served it nothing
/// (`CLIENT UNBLOCK <id> ERROR`, a master turned replica).
pub(crate) fn is_unblocked(error: &FredError) -> bool {
    let details = error.details();
    details.contains("UNBLOCKED") && !is_stream_gone(details)
}

pub(crate) fn is_busygroup(error: &FredError) -> bool {
    error.details().starts_with("BUSYGROUP")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(details: &str) -> TransportError {
        transport_error(FredError::new(FredKind::Unknown, details.to_owned()))
    }

    /// A reply is transient by its code, its first word: `BUSY` is, `BUSYGROUP` is not.
    #[test]
    fn transient_replies_are_told_by_their_whole_code() {
        for transient in [
            "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica.",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "ERR max number of clients reached",
        ] {
            assert!(
                matches!(reply(transient), TransportError::Unavailable { .. }),
                "{transient}"
            );
        }
        // What fred says at connect of a cluster whose slots are not all served.
        for down in [
            "Invalid or missing cluster state.",
            "Invalid or missing CLUSTER SLOTS response.",
        ] {
            assert!(
                matches!(
                    transport_error(FredError::new(FredKind::Protocol, down.to_owned())),
                    TransportError::Unavailable { .. }
                ),
                "{down}"
            );
        }
        let sentinel =
            |details: &str| transport_error(FredError::new(FredKind::Sentinel, details.to_owned()));
        for passing in [
            "Failed to connect to all sentinel nodes.",
            "Invalid role: slave",
        ] {
            assert!(
                matches!(sentinel(passing), TransportError::Unavailable { .. }),
                "{passing}"
            );
        }
        for lasting in [
            "WRONGPASS invalid username-password pair or user is disabled.",
            "Missing primary address in response from sentinel node.",
        ] {
            assert!(
                matches!(sentinel(lasting), TransportError::Backend { .. }),
                "{lasting}"
            );
        }
        for lasting in [
            "BUSYGROUP Consumer Group name already exists",
            "BUSYKEY Target key name already exists.",
            "OOMPH not a code Redis sends",
            "ERR unknown command",
            "",
        ] {
            assert!(
                matches!(reply(lasting), TransportError::Backend { .. }),
                "{lasting}"
            );
        }
    }
}
