//! Limits and intervals of a hub.

use std::time::Duration;

/// The channel prefix both the hub and the [`Publisher`](crate::Publisher) use by default.
pub const DEFAULT_CHANNEL_PREFIX: &str = "realtime:";

/// A hub's limits, buffers and intervals. Every setter documents its default; the defaults
/// suit a server holding ~10,000 mostly idle connections whose clients send a few small
/// frames.
///
/// ```
/// use cqrs_realtime::HubOptions;
/// use std::time::Duration;
///
/// let options = HubOptions::new()
///     .send_queue(64)
///     .max_subscriptions(16)
///     .ping_interval(Duration::from_secs(20))
///     .idle_timeout(Duration::from_secs(45));
/// assert_eq!(options.get_send_queue(), 64);
/// ```
#[derive(Clone, Debug)]
pub struct HubOptions {
    pub(crate) send_queue: usize,
    pub(crate) read_buffer_size: usize,
    pub(crate) write_buffer_size: usize,
    pub(crate) max_write_buffer_size: usize,
    pub(crate) max_message_size: usize,
    pub(crate) max_frame_size: usize,
    pub(crate) max_subscriptions: usize,
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_principal: usize,
    pub(crate) max_connections_per_client: usize,
    pub(crate) ping_interval: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) replay_batch: usize,
    pub(crate) replay_limit: usize,
    pub(crate) resumes_per_minute: u32,
    pub(crate) max_concurrent_replays: usize,
    pub(crate) subscription_changes_per_second: u32,
    pub(crate) replay_buffer: usize,
    pub(crate) upstream_linger: Duration,
    pub(crate) max_lingering_channels: usize,
    pub(crate) channel_prefix: String,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            send_queue: 128,
            read_buffer_size: 512,
            write_buffer_size: 0,
            max_write_buffer_size: 256 * 1024,
            max_message_size: 4 * 1024,
            max_frame_size: 4 * 1024,
            max_subscriptions: 32,
            max_connections: 20_000,
            max_connections_per_principal: 16,
            max_connections_per_client: 1_000,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            close_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(10),
            replay_batch: 256,
            replay_limit: 10_000,
            resumes_per_minute: 10,
            max_concurrent_replays: 16,
            subscription_changes_per_second: 64,
            replay_buffer: 1024,
            upstream_linger: Duration::from_secs(5),
            max_lingering_channels: 1024,
            channel_prefix: DEFAULT_CHANNEL_PREFIX.to_owned(),
        }
    }
}

impl HubOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Frames waiting to be written to one connection. A connection whose queue is full when
    /// an event arrives is too slow: it is closed with code 1008. Default 128.
    pub fn send_queue(mut self, frames: usize) -> Self {
        self.send_queue = frames;
        self
    }

    /// The read buffer of each connection, allocated up front (tungstenite's default is
    /// 128 KiB). Default 512 bytes: client frames are small (a `subscribe` with the longest
    /// topic and a position fits), and a larger message, up to
    /// [`max_message_size`](Self::max_message_size), still arrives whole: the buffer grows to
    /// hold it (and may stay grown). Each connection keeps the buffer for its whole life, so it is a large share of
    /// an idle connection's memory.
    pub fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.read_buffer_size = bytes;
        self
    }

    /// How many bytes of outgoing frames are gathered before a write to the socket; 0 writes
    /// each frame at once (the buffer then never holds more than the frame being written).
    /// Default 0.
    pub fn write_buffer_size(mut self, bytes: usize) -> Self {
        self.write_buffer_size = bytes;
        self
    }

    /// The most bytes the write buffer may hold; at least `write_buffer_size` + 1024 (room
    /// for the frames the hub writes itself: an error echoing a topic, `event_too_large`,
    /// under 1 KiB with a frame's overhead). An event
    /// frame larger than the difference (less a frame header and room for a control frame,
    /// 141 bytes in all) is not sent: an
    /// `event_too_large` error frame takes its place. Default 256 KiB.
    pub fn max_write_buffer_size(mut self, bytes: usize) -> Self {
        self.max_write_buffer_size = bytes;
        self
    }

    /// The largest client message; a larger one closes the connection with code 1009.
    /// Default 4 KiB (client frames are small).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The largest client frame (a message may span frames). Default 4 KiB.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// Subscriptions one connection may hold. Default 32.
    pub fn max_subscriptions(mut self, subscriptions: usize) -> Self {
        self.max_subscriptions = subscriptions;
        self
    }

    /// Connections the hub holds at once; further handshakes get 503. Default 20,000.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections;
        self
    }

    /// Connections one principal holds at once, for principals the
    /// [`Authenticator::connection_key`](crate::Authenticator::connection_key) names; further
    /// handshakes of that principal get 429. Default 16 (tabs and devices of one user).
    pub fn max_connections_per_principal(mut self, connections: usize) -> Self {
        self.max_connections_per_principal = connections;
        self
    }

    /// Connections one client holds at once, for handshakes that carry a
    /// [`ClientKey`](crate::ClientKey) (its address, as the server's middleware tells it);
    /// further handshakes of that client get 429. Where accounts are cheap to make, the
    /// per-principal limit alone lets one client fill the hub with many principals. Default
    /// 1,000 (room for a network behind one NAT address).
    pub fn max_connections_per_client(mut self, connections: usize) -> Self {
        self.max_connections_per_client = connections;
        self
    }

    /// How often the hub sends a WebSocket ping to each connection (and closes those whose
    /// credentials expired). Default 30 s. At least 10 ms, and at most half the
    /// [`idle_timeout`](Self::idle_timeout); an interval too long for the clock (near
    /// `Duration::MAX`) never comes round: no pings, expiry checked only at `subscribe`. A
    /// connection whose send queue has at most one free slot is not pinged on a tick (the
    /// slot is kept for an event), unless the queue is empty: an idle connection is pinged
    /// whatever its queue's size.
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// A connection from which nothing (no frame, no pong) arrived for this long is closed
    /// with code 1000. At least twice the ping interval: a tick may skip a busy connection,
    /// and pongs come late behind queued frames. Default 75 s; up to `Duration::MAX` (no idle
    /// limit).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long a closing connection may take to send its close frame and receive the
    /// client's, before the socket is dropped. Default 5 s. Must be above zero; a timeout too
    /// long for the clock (`Duration::MAX`) waits as long as it takes.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// The time budget of one backend call made for a client: the handshake's `authenticate`
    /// (past it the handshake gets 503 `unavailable`), the authorizer's
    /// `authorize_subscribe`, the upstream subscription, one event store read of a replay.
    /// Twice it (at least 1 s) is also how long the hub remembers a revocation for the
    /// handshakes being checked then ([`Hub::close_connections_of`](crate::Hub::close_connections_of)).
    /// Default 10 s.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Events a replay reads from the store at a time. Default 256; at least 1 and at most
    /// [`replay_limit`](Self::replay_limit).
    pub fn replay_batch(mut self, events: usize) -> Self {
        self.replay_batch = events;
        self
    }

    /// The most stored events one replay reads (of every topic: the store's global order).
    /// A longer gap gets `resume_failed`, and the client reloads its state another way.
    /// Default 10,000; at least 1 and at least [`replay_batch`](Self::replay_batch) (a smaller
    /// limit would be cut to one batch anyway).
    pub fn replay_limit(mut self, events: usize) -> Self {
        self.replay_limit = events;
        self
    }

    /// How many subscriptions with `since` one principal may start per minute (a burst of
    /// that many, then one every `60 s / n`): each replay reads up to `replay_limit` stored
    /// events, so a client looping over `subscribe` / `unsubscribe`, or over reconnects, must
    /// not make the hub read the log without end. The budget is the principal's, by
    /// [`Authenticator::connection_key`](crate::Authenticator::connection_key), shared by its
    /// connections (a connection's own without a key). Past it, `since` gets
    /// `too_many_resumes`. Default 10.
    pub fn resumes_per_minute(mut self, resumes: u32) -> Self {
        self.resumes_per_minute = resumes;
        self
    }

    /// How many replays (subscriptions with `since`) read the event store at once, across
    /// all the hub's connections: after a pub/sub reconnect every client is told to resume at
    /// about the same moment, which `resumes_per_minute` (a principal's budget) does not
    /// spread out. A replay holds its permit while it reads, not while it waits for its
    /// client to take frames, so slow clients do not keep other resumes out; nor, once its
    /// client has freed no room for a second, does it keep what it read, beyond the frame
    /// that waits (it reads the rest again): a client that stops reading holds no batch for
    /// long. (One that frees room within each second keeps its batch, `replay_batch` events,
    /// while it reads: reading it again would cost a read per wait.) A resume that
    /// finds every permit busy waits up to [`operation_timeout`](Self::operation_timeout),
    /// then gets `unavailable` ("try again"), which does not use up its principal's budget;
    /// a replay that cannot get one back for its next read in that time ends with
    /// `resume_failed`. At least 1. Default 16.
    pub fn max_concurrent_replays(mut self, replays: usize) -> Self {
        self.max_concurrent_replays = replays;
        self
    }

    /// How many `subscribe` and `unsubscribe` frames one connection may send per second (a
    /// burst of that many, then one every `1 s / n`): each takes the registry's lock, which
    /// the fan-out of every event takes too, and a subscribe may ask the authorizer, so a
    /// client looping over `subscribe` / `unsubscribe` must not slow the hub for every other
    /// connection. Past it, the frame is ignored and answered `too_many_subscription_changes`.
    /// At least 1. Default 64 (a connection may take all of its `max_subscriptions` at once,
    /// and drop them).
    pub fn subscription_changes_per_second(mut self, changes: u32) -> Self {
        self.subscription_changes_per_second = changes;
        self
    }

    /// Live events held for one subscription while its replay runs. When more arrive, the
    /// replay reads them back from the store instead. Default 1024.
    pub fn replay_buffer(mut self, events: usize) -> Self {
        self.replay_buffer = events;
        self
    }

    /// How long the hub stays subscribed to a pub/sub channel after the last subscription
    /// needing it went: a subscribe within that time reuses the upstream subscription instead
    /// of making a new one, so a client looping over `subscribe` / `unsubscribe` (or clients
    /// that reconnect) costs no pub/sub round trip per loop. Events arriving meanwhile reach
    /// no one. Once the hub shuts down nothing lingers. `Duration::ZERO` unsubscribes at once.
    /// Default 5 s.
    pub fn upstream_linger(mut self, linger: Duration) -> Self {
        self.upstream_linger = linger;
        self
    }

    /// How many channels may linger (see [`upstream_linger`](Self::upstream_linger)) at once:
    /// past it, a channel whose last subscription goes is unsubscribed at once. With coarse
    /// channels (one per topic family) the hub never comes near it; it bounds what clients
    /// looping over many topics cost a hub whose routing gives each topic a channel of its
    /// own (each lingering channel is a pub/sub subscription and a task). `0`: nothing
    /// lingers. Default 1024.
    pub fn max_lingering_channels(mut self, channels: usize) -> Self {
        self.max_lingering_channels = channels;
        self
    }

    /// Prepended to every pub/sub channel name, so several applications (or tests) can share
    /// one broker. The publisher must use the same prefix. Default `realtime:`.
    pub fn channel_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.channel_prefix = prefix.into();
        self
    }

    /// The send queue length.
    pub fn get_send_queue(&self) -> usize {
        self.send_queue
    }

    /// The most connections the hub holds at once.
    pub fn get_max_connections(&self) -> usize {
        self.max_connections
    }

    /// The channel prefix.
    pub fn get_channel_prefix(&self) -> &str {
        &self.channel_prefix
    }

    /// Every problem [`HubBuilder::build`](crate::HubBuilder::build) would refuse these
    /// options for (empty when there is none): for a server to check its configuration at
    /// start, before it builds the hub.
    ///
    /// ```
    /// use cqrs_realtime::HubOptions;
    /// use std::time::Duration;
    ///
    /// assert!(HubOptions::new().problems().is_empty());
    /// let problems = HubOptions::new().ping_interval(Duration::from_millis(1)).problems();
    /// assert!(problems[0].contains("ping_interval"), "{problems:?}");
    /// ```
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut at_least = |name: &str, value: usize, min: usize| {
            if value < min {
                problems.push(format!("{name} must be at least {min}, got {value}"));
            }
        };
        at_least("send_queue", self.send_queue, 1);
        at_least("read_buffer_size", self.read_buffer_size, 256);
        at_least("max_message_size", self.max_message_size, 256);
        at_least("max_frame_size", self.max_frame_size, 256);
        at_least("max_subscriptions", self.max_subscriptions, 1);
        at_least("max_connections", self.max_connections, 1);
        at_least(
            "max_connections_per_principal",
            self.max_connections_per_principal,
            1,
        );
        at_least(
            "max_connections_per_client",
            self.max_connections_per_client,
            1,
        );
        at_least("replay_batch", self.replay_batch, 1);
        at_least("replay_limit", self.replay_limit, 1);
        at_least("resumes_per_minute", self.resumes_per_minute as usize, 1);
        at_least("max_concurrent_replays", self.max_concurrent_replays, 1);
        at_least(
            "subscription_changes_per_second",
            self.subscription_changes_per_second as usize,
            1,
        );
        at_least("replay_buffer", self.replay_buffer, 1);
        // tungstenite reserves what a frame header declares, up to the limit: a limit of
        // `usize::MAX` ("none") would let one client's header make the process abort on
        // a failed allocation, and a read buffer that large fails every upgrade.
        for (name, value) in [
            ("read_buffer_size", self.read_buffer_size),
            ("max_message_size", self.max_message_size),
            ("max_frame_size", self.max_frame_size),
        ] {
            if value > MAX_CLIENT_MESSAGE {
                problems.push(format!(
                    "{name} must be at most {MAX_CLIENT_MESSAGE} (16 MiB; client frames are \
                     small), got {value}"
                ));
            }
        }
        if self
            .write_buffer_size
            .checked_add(MIN_WRITE_ROOM)
            .is_none_or(|least| self.max_write_buffer_size < least)
        {
            problems.push(format!(
                "max_write_buffer_size ({}) must be at least write_buffer_size ({}) + \
                 {MIN_WRITE_ROOM}: the frames the hub writes itself (an error, `event_too_large`) \
                 must fit, or the write fails and the client is dropped without a close",
                self.max_write_buffer_size, self.write_buffer_size
            ));
        }
        if self.replay_limit < self.replay_batch {
            problems.push(format!(
                "replay_limit ({}) must be at least replay_batch ({})",
                self.replay_limit, self.replay_batch
            ));
        }
        if self.ping_interval < MIN_PING_INTERVAL {
            problems.push(format!(
                "ping_interval must be at least {MIN_PING_INTERVAL:?}, got {:?}",
                self.ping_interval
            ));
        }
        // A healthy client's pongs come one interval apart give or take the queueing, and a
        // tick skips a connection whose queue is nearly full: with less than two intervals, a
        // client that is merely busy is closed as idle.
        if self.idle_timeout < self.ping_interval.saturating_mul(2) {
            problems.push(format!(
                "idle_timeout ({:?}) must be at least twice ping_interval ({:?}): a ping may be \
                 skipped while the connection's queue is nearly full",
                self.idle_timeout, self.ping_interval
            ));
        }
        if self.close_timeout.is_zero() {
            problems.push("close_timeout must not be zero".to_owned());
        }
        if self.operation_timeout.is_zero() {
            problems.push("operation_timeout must not be zero".to_owned());
        }
        problems
    }
}

/// The most `read_buffer_size`, `max_message_size` and `max_frame_size` may be.
const MAX_CLIENT_MESSAGE: usize = 16 * 1024 * 1024;

/// The least room between `write_buffer_size` and `max_write_buffer_size`: the largest frame
/// the hub writes itself (an error frame echoing a 200-byte topic, an `event_too_large` frame:
/// under 600 bytes), a frame header and a control frame tungstenite may queue (141 bytes),
/// with margin.
const MIN_WRITE_ROOM: usize = 1024;

/// The shortest `ping_interval`: each tick takes the connections' lock and queues a ping on
/// every connection, so a tick at timer resolution would do little else.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);

#[cfg(test)]
mod tests {
    use super::*;

    /// "No limit" as `usize::MAX` was accepted: one client's frame header declaring a
    /// terabyte then made tungstenite reserve it, and the process aborted; a read buffer that
    /// large failed every upgrade.
    #[test]
    fn client_message_limits_past_16_mib_are_refused() {
        let problems = HubOptions::new()
            .max_frame_size(usize::MAX)
            .max_message_size(usize::MAX)
            .read_buffer_size(usize::MAX)
            .problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        for name in ["read_buffer_size", "max_message_size", "max_frame_size"] {
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("{name} must be at most"))),
                "{name}: {problems:?}"
            );
        }
        let at_the_limit = HubOptions::new()
            .max_frame_size(MAX_CLIENT_MESSAGE)
            .max_message_size(MAX_CLIENT_MESSAGE)
            .read_buffer_size(MAX_CLIENT_MESSAGE);
        assert_eq!(at_the_limit.problems(), Vec::<String>::new());
    }

    /// A write buffer too small for the hub's own frames was accepted: every event became an
    /// `event_too_large` frame the buffer could not take either, the write failed, and the
    /// client, dropped without a close, reconnected in a loop.
    #[test]
    fn a_write_buffer_too_small_for_the_hubs_own_frames_is_refused() {
        assert_eq!(
            HubOptions::new().max_write_buffer_size(300).problems(),
            [
                "max_write_buffer_size (300) must be at least write_buffer_size (0) + 1024: the \
              frames the hub writes itself (an error, `event_too_large`) must fit, or the \
              write fails and the client is dropped without a close"
            ]
        );
        assert_eq!(
            HubOptions::new()
                .write_buffer_size(4096)
                .max_write_buffer_size(4096 + 1023)
                .problems()
                .len(),
            1
        );
        assert!(
            HubOptions::new()
                .max_write_buffer_size(1024)
                .problems()
                .is_empty()
        );
        assert!(
            HubOptions::new()
                .write_buffer_size(usize::MAX)
                .max_write_buffer_size(usize::MAX)
                .problems()
                .iter()
                .any(|p| p.starts_with("max_write_buffer_size"))
        );
    }

    /// A replay limit of zero, or below the batch, was accepted: the limit became one batch,
    /// and clients were told of a gap of "more than 0 events".
    #[test]
    fn a_replay_limit_below_one_or_below_the_batch_is_refused() {
        assert_eq!(
            HubOptions::new().replay_limit(0).problems(),
            [
                "replay_limit must be at least 1, got 0",
                "replay_limit (0) must be at least replay_batch (256)",
            ]
        );
        assert_eq!(
            HubOptions::new()
                .replay_batch(64)
                .replay_limit(10)
                .problems(),
            ["replay_limit (10) must be at least replay_batch (64)"]
        );
        assert!(
            HubOptions::new()
                .replay_batch(64)
                .replay_limit(64)
                .problems()
                .is_empty()
        );
    }

    /// No replay could ever run with no permit: every `since` would wait out its timeout.
    #[test]
    fn a_replay_concurrency_of_zero_is_refused() {
        assert_eq!(
            HubOptions::new().max_concurrent_replays(0).problems(),
            ["max_concurrent_replays must be at least 1, got 0"]
        );
        assert!(
            HubOptions::new()
                .max_concurrent_replays(1)
                .problems()
                .is_empty()
        );
    }

    /// A ping interval at timer resolution would spin the keepalive; an idle timeout under
    /// two intervals closes a client whose ping was skipped or whose pong came late.
    #[test]
    fn the_ping_interval_has_a_floor_and_the_idle_timeout_a_margin() {
        assert_eq!(
            HubOptions::new()
                .ping_interval(Duration::from_nanos(1))
                .idle_timeout(Duration::from_nanos(2))
                .problems(),
            ["ping_interval must be at least 10ms, got 1ns"]
        );
        assert_eq!(
            HubOptions::new()
                .ping_interval(Duration::from_secs(30))
                .idle_timeout(Duration::from_millis(30_001))
                .problems(),
            [
                "idle_timeout (30.001s) must be at least twice ping_interval (30s): a ping may \
                 be skipped while the connection's queue is nearly full"
            ]
        );
        for (ping, idle) in [
            (Duration::from_millis(10), Duration::from_millis(20)),
            (Duration::from_secs(30), Duration::from_secs(75)),
            (Duration::MAX - Duration::from_secs(1), Duration::MAX),
        ] {
            let problems = HubOptions::new()
                .ping_interval(ping)
                .idle_timeout(idle)
                .problems();
            assert!(problems.is_empty(), "{ping:?} / {idle:?}: {problems:?}");
        }
    }
}
