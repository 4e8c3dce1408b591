//! Revocations across instances: every hub listens on one pub/sub channel of its prefix, and
//! [`Hub::close_connections_everywhere`](crate::Hub::close_connections_everywhere) publishes
//! there, so each instance closes the connections it holds of a revoked principal.

use crate::connections::Connections;
use crate::metrics::Metrics;
use crate::signal::Ending;
use cqrs_core::ports::{PubSub, Subscription};
use cqrs_core::runtime::Shutdown;
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;
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
    /// The hub that published it, which closed its own connections before and skips it
    /// (taking it again would refuse handshakes begun after its revocation). Absent from
    /// other publishers: every hub takes those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<std::borrow::Cow<'a, str>>,
}

/// The message that revokes `key`'s connections, published by the hub `from`.
pub(crate) fn message(key: &str, from: &str) -> Arc<str> {
    let revocation = Revocation {
        close_connections_of: key.into(),
        from: Some(from.into()),
    };
    // A struct of one string field always serializes.
    Arc::from(serde_json::to_string(&revocation).expect("a revocation serializes"))
}

/// Where the hub's listener stands. Handshakes wait while it is [`Starting`](Self::Starting),
/// so a connection open when a revocation is published is not missed for want of a listener
/// that had not subscribed yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listening {
    /// Its first subscribe is on its way (or it has not started: no handshake yet).
    Starting,
    /// Subscribed: every revocation published from now on reaches it (pub/sub is
    /// at-most-once: unless it is lost, as realtime.md says).
    Yes,
    /// A subscribe failed or took longer than the hub's `operation_timeout`, or the pub/sub
    /// ended the subscription: it tries again.
    Retrying,
    /// The hub stopped, and the listener's subscription is gone.
    Stopped,
}

/// How often the listener looks whether its subscription missed messages, when none comes
/// to show it (a reconnect of the pub/sub loses what was published meanwhile).
const MISSED_CHECK: Duration = Duration::from_secs(5);

/// What the listener needs of its hub.
pub(crate) struct Listener {
    pub(crate) connections: Weak<Connections>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pubsub: Arc<dyn PubSub>,
    pub(crate) channel: String,
    /// This hub's id in the revocations it publishes: it skips them.
    pub(crate) hub: Arc<str>,
    /// How long a subscribe may take before it counts as failed.
    pub(crate) subscribe_timeout: Duration,
    pub(crate) state: watch::Sender<Listening>,
    pub(crate) stopped: Shutdown,
}

impl Listener {
    /// Listens for revocations until the hub stops or is gone, closing the connections of each
    /// revoked key; subscribes again, with a growing delay, when a subscribe fails or the
    /// pub/sub ends the subscription. Ends [`Stopped`](Listening::Stopped), its subscription
    /// dropped.
    pub(crate) async fn run(self) {
        self.listen().await;
        // `Stopped` is sent as `self` drops, after the subscription did.
    }

    fn set(&self, state: Listening) {
        debug_assert!(state != Listening::Stopped, "sent by `drop` alone");
        self.state.send_replace(state);
        self.metrics.revocations_listening(state == Listening::Yes);
    }

    async fn listen(&self) {
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let subscribe =
                tokio::time::timeout(self.subscribe_timeout, self.pubsub.subscribe(&self.channel));
            let subscribed = tokio::select! {
                biased;
                () = self.stopped.requested() => return,
                subscribed = subscribe => subscribed,
            };
            match subscribed {
                Ok(Ok(mut subscription)) => {
                    self.set(Listening::Yes);
                    delay = FIRST_RETRY_DELAY;
                    if self.take(&mut subscription).await.is_break() {
                        return;
                    }
                    tracing::warn!(
                        channel = %self.channel,
                        "the pub/sub ended the subscription to revocations; subscribing again"
                    );
                }
                Ok(Err(error)) => tracing::warn!(
                    channel = %self.channel,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "could not subscribe to revocations: connections revoked on other \
                     instances stay open here until this succeeds"
                ),
                Err(_) => tracing::warn!(
                    channel = %self.channel,
                    timeout_ms = self.subscribe_timeout.as_millis() as u64,
                    retry_in_ms = delay.as_millis() as u64,
                    "subscribing to revocations took longer than the hub's operation timeout: \
                     connections revoked on other instances stay open here until it succeeds"
                ),
            }
            self.set(Listening::Retrying);
            tokio::select! {
                biased;
                () = self.stopped.requested() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    /// Acts on the subscription's messages until the pub/sub ends it (`Continue`: subscribe
    /// again) or the hub stops or is gone (`Break`).
    async fn take(&self, subscription: &mut Subscription) -> ControlFlow<()> {
        let mut missed = subscription.missed();
        let mut check = tokio::time::interval(MISSED_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                biased;
                () = self.stopped.requested() => return ControlFlow::Break(()),
                message = subscription.recv() => message,
                _ = check.tick() => {
                    missed = self.report_missed(subscription, missed);
                    continue;
                }
            };
            missed = self.report_missed(subscription, missed);
            let Some(message) = message else {
                return ControlFlow::Continue(());
            };
            let Some(connections) = self.connections.upgrade() else {
                return ControlFlow::Break(());
            };
            let closed = revoke(&connections, &self.channel, &self.hub, &message.payload);
            if closed > 0 {
                self.metrics.revoked(closed as u64, true);
            }
        }
    }

    /// Counts and logs what the subscription missed since `before`; returns its count now.
    fn report_missed(&self, subscription: &Subscription, before: u64) -> u64 {
        let now = subscription.missed();
        if now > before {
            self.metrics.revocations_missed(now - before);
            tracing::warn!(
                channel = %self.channel,
                missed = now - before,
                "revocations were missed (the listener fell behind, or the pub/sub dropped \
                 them, as across a reconnect): connections of those principals may stay open \
                 here until their credentials expire"
            );
        }
        now
    }
}

impl Drop for Listener {
    /// `Stopped` also when the task is dropped before it ended (its runtime shut down), so
    /// `Hub::closed` never waits for a listener that will not run again.
    fn drop(&mut self) {
        self.state.send_replace(Listening::Stopped);
        // Maybe dropped while unwinding: a recorder that panics must not abort.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.metrics.revocations_listening(false);
        }));
    }
}

/// Closes the connections a received revocation names, and returns how many; a message that
/// is not one is logged and ignored.
fn revoke(connections: &Connections, channel: &str, hub: &str, payload: &str) -> usize {
    match serde_json::from_str::<Revocation<'_>>(payload) {
        Ok(revocation) if revocation.from.as_deref() == Some(hub) => 0,
        Ok(revocation) => {
            let closed = connections.close_keyed(&revocation.close_connections_of, Ending::REVOKED);
            if closed > 0 {
                tracing::debug!(
                    connections = closed,
                    "closed a principal's connections revoked by another instance"
                );
            }
            closed
        }
        Err(error) => {
            tracing::warn!(
                channel = %channel,
                error = %error,
                "ignored a message on the revocation channel that is not a revocation"
            );
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_reads_back_whatever_its_key_holds() {
        for key in ["user-7", "", "quote \" and \\ and \u{0} and é"] {
            let payload = message(key, "hub-1");
            let read: Revocation<'_> = serde_json::from_str(&payload).unwrap();
            assert_eq!(read.close_connections_of, key);
            assert_eq!(read.from.as_deref(), Some("hub-1"));
        }
    }

    /// A hub skips its own revocations (it closed its connections before it published), and
    /// takes another hub's and those of publishers that name none.
    #[test]
    fn a_hub_skips_the_revocations_it_published() {
        let connections = Connections::new(Duration::from_secs(1));
        let before = connections.revocations();
        assert_eq!(
            revoke(&connections, "c", "hub-1", &message("a", "hub-1")),
            0
        );
        assert_eq!(connections.revocations(), before, "not taken again");
        revoke(&connections, "c", "hub-1", &message("a", "hub-2"));
        revoke(
            &connections,
            "c",
            "hub-1",
            r#"{"close_connections_of":"b"}"#,
        );
        assert_eq!(connections.revocations(), before + 2);
    }

    #[test]
    fn the_channel_is_no_topics() {
        let name = channel("realtime:");
        let topic = name.strip_prefix("realtime:").unwrap();
        assert!(crate::Topic::parse(topic).is_err(), "{topic}");
    }
}
