//! Revocations across instances: every hub listens on one pub/sub channel of its prefix, and
//! [`Hub::close_connections_everywhere`](crate::Hub::close_connections_everywhere) publishes
//! there, so each instance closes the connections it holds of a revoked principal.

use crate::connections::Connections;
use crate::signal::Ending;
use cqrs_core::ports::PubSub;
use cqrs_core::runtime::Shutdown;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// The channel's name after the hub's prefix. `#` is in no topic's name, so no topic's
/// channel is this one.
const CHANNEL: &str = "#revocations";

/// The first wait before subscribing again after a failure; it doubles up to
/// [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// The channel revocations travel on, for a hub whose channels are prefixed with `prefix`.
pub(crate) fn channel(prefix: &str) -> String {
    format!("{prefix}{CHANNEL}")
}

/// What is published: an object, so other instructions can join it without old builds
/// taking them for a revocation.
#[derive(Serialize, Deserialize)]
struct Revocation<'a> {
    close_connections_of: std::borrow::Cow<'a, str>,
}

/// The message that revokes `key`'s connections.
pub(crate) fn message(key: &str) -> Arc<str> {
    let revocation = Revocation {
        close_connections_of: key.into(),
    };
    // A struct of one string field always serializes.
    Arc::from(serde_json::to_string(&revocation).expect("a revocation serializes"))
}

/// Where the hub's listener stands; handshakes wait while it is [`Starting`](Self::Starting),
/// so a connection a revocation published after its handshake must close is never missed by
/// a listener that had not subscribed yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listening {
    /// Its first subscribe is on its way.
    Starting,
    /// Subscribed: every revocation published from now on reaches it (pub/sub is
    /// at-most-once: unless it is lost, as realtime.md says).
    Yes,
    /// Its subscribe failed, or the pub/sub shut down: it tries again.
    Retrying,
}

/// Listens for revocations on `channel` until `stopped` is requested or the connections are
/// gone with their hub, closing the connections of each revoked key; subscribes again, with
/// a growing delay, when subscribing fails or the pub/sub ends the subscription.
pub(crate) async fn listen(
    connections: Weak<Connections>,
    pubsub: Arc<dyn PubSub>,
    channel: String,
    state: watch::Sender<Listening>,
    stopped: Shutdown,
) {
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        let subscribed = tokio::select! {
            subscribed = pubsub.subscribe(&channel) => subscribed,
            () = stopped.requested() => return,
        };
        match subscribed {
            Ok(mut subscription) => {
                state.send_replace(Listening::Yes);
                delay = FIRST_RETRY_DELAY;
                let mut missed = 0;
                loop {
                    let message = tokio::select! {
                        message = subscription.recv() => message,
                        () = stopped.requested() => return,
                    };
                    let Some(message) = message else { break };
                    if subscription.missed() > missed {
                        tracing::warn!(
                            channel = %channel,
                            missed = subscription.missed() - missed,
                            "revocations were missed (the listener fell behind, or the pub/sub \
                             dropped them): connections of those principals may stay open here \
                             until their credentials expire"
                        );
                        missed = subscription.missed();
                    }
                    let Some(connections) = connections.upgrade() else {
                        return;
                    };
                    revoke(&connections, &channel, &message.payload);
                }
                tracing::warn!(
                    channel = %channel,
                    "the pub/sub ended the subscription to revocations; subscribing again"
                );
            }
            Err(error) => {
                tracing::warn!(
                    channel = %channel,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "could not subscribe to revocations: connections revoked on other \
                     instances stay open here until this succeeds"
                );
            }
        }
        state.send_replace(Listening::Retrying);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped.requested() => return,
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Closes the connections a received revocation names; a message that is not one is logged
/// and ignored.
fn revoke(connections: &Connections, channel: &str, payload: &str) {
    match serde_json::from_str::<Revocation<'_>>(payload) {
        Ok(revocation) => {
            let closed = connections.close_keyed(&revocation.close_connections_of, Ending::REVOKED);
            if closed > 0 {
                tracing::debug!(
                    connections = closed,
                    "closed a principal's connections revoked by another instance"
                );
            }
        }
        Err(error) => tracing::warn!(
            channel = %channel,
            error = %error,
            "ignored a message on the revocation channel that is not a revocation"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_reads_back_whatever_its_key_holds() {
        for key in ["user-7", "", "quote \" and \\ and \u{0} and é"] {
            let payload = message(key);
            let read: Revocation<'_> = serde_json::from_str(&payload).unwrap();
            assert_eq!(read.close_connections_of, key);
        }
    }

    #[test]
    fn the_channel_is_no_topics() {
        let name = channel("realtime:");
        let topic = name.strip_prefix("realtime:").unwrap();
        assert!(crate::Topic::parse(topic).is_err(), "{topic}");
    }
}
