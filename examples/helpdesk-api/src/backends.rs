//! What the gateway gives plugins: backends, settings, and the buses once built.

use crate::ApiError;
use cqrs_core::clock::Clock;
use cqrs_core::ports::{ConsumerOptions, EventStore, EventTransport, IdempotencyStore, PubSub};
use cqrs_core::{CommandBus, EventBus, QueryBus};
use cqrs_postgres::PgDatabase;
use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Which backends the server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Everything in process memory: no setup, nothing survives a restart, one instance.
    Memory,
    /// Postgres holds state, events (the outbox), idempotency keys, inboxes and checkpoints.
    /// With Redis, events travel on Redis Streams and realtime fans out over Redis pub/sub;
    /// without it (one instance), realtime fans out in process and events go to no transport
    /// (consumers read the event store).
    Postgres,
}

/// The backends, provided to plugins as a resource.
#[derive(Clone)]
pub struct Backends {
    /// Which mode.
    pub mode: Mode,
    /// The event store (the source of truth for tickets).
    pub events: Arc<dyn EventStore>,
    /// The idempotency store.
    pub idempotency: Arc<dyn IdempotencyStore>,
    /// The event transport the outbox relay ships every event to, on [`topic`](Self::topic).
    /// In [`Mode::Memory`], an in-process transport (kept in memory, trimmed of what every
    /// group acknowledged). In [`Mode::Postgres`] with Redis, a Redis stream (persistent,
    /// consumer groups). In [`Mode::Postgres`] without Redis, none really: one that takes
    /// every event and drops it (the relay runs only to keep its checkpoint at the head of the
    /// store, so that Redis added later gets only new events), refuses consumers with
    /// `TransportError::Invalid`, and is not persistent: consumers read the event store
    /// there (check [`capabilities`](EventTransport::capabilities)`().persistent`).
    pub transport: Arc<dyn EventTransport>,
    /// The pub/sub for realtime fan-out.
    pub pubsub: Arc<dyn PubSub>,
    /// The clock (tests inject a manual one).
    pub clock: Arc<dyn Clock>,
    /// The topic of [`transport`](Self::transport) the outbox relay publishes every event to
    /// (dropped there in [`Mode::Postgres`] without Redis).
    pub topic: String,
    /// The database in [`Mode::Postgres`]: plugins keep their tables in its schema and write
    /// them in the command's transaction (`cqrs_postgres::PgUnitOfWork`).
    pub postgres: Option<PgDatabase>,
}

impl fmt::Debug for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backends")
            .field("mode", &self.mode)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Settings plugins read, provided as a resource.
#[derive(Clone)]
pub struct Settings {
    /// The HS256 secret (at least 32 bytes).
    pub jwt_secret: Arc<[u8]>,
    /// How long a token lives.
    pub token_ttl: Duration,
    /// Emails that register as agents (in any case and Unicode form: the auth plugin keys them
    /// as accounts).
    pub agent_emails: Arc<HashSet<String>>,
    /// Failed logins per email and client address before 429.
    pub login_attempts: u32,
    /// The window for counting failed logins.
    pub login_window: Duration,
    /// How long idempotency keys live.
    pub idempotency_ttl: Duration,
    /// How often consumers poll and wait (short in tests).
    pub poll_interval: Duration,
    /// How often housekeeping runs: expired idempotency records, old inbox entries, stream
    /// trimming.
    pub purge_interval: Duration,
    /// The most passwords hashed at once; `None`: the auth plugin's default (two per core, at
    /// most 16).
    pub max_concurrent_hashes: Option<usize>,
}

/// The shortest redelivery delay a consumer gets: the Redis transport refuses shorter ones
/// (`cqrs_redis::MIN_REDELIVERY_DELAY`; the gateway's tests check the two agree).
pub const MIN_REDELIVERY_DELAY: Duration = Duration::from_millis(100);

impl Settings {
    /// The options of the background consumers: they wait `poll_interval` for events, and a
    /// delivery left unacknowledged comes back after ten of those, but never sooner than
    /// [`MIN_REDELIVERY_DELAY`] (a short `--poll-ms` must not make the Redis transport refuse
    /// them).
    pub fn consumer_options(&self) -> ConsumerOptions {
        ConsumerOptions::default()
            .block(self.poll_interval)
            .redelivery_delay((self.poll_interval * 10).max(MIN_REDELIVERY_DELAY))
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("jwt_secret", &"<redacted>")
            .field("token_ttl", &self.token_ttl)
            .field("agent_emails", &self.agent_emails.len())
            .field("login_attempts", &self.login_attempts)
            .field("login_window", &self.login_window)
            .field("max_concurrent_hashes", &self.max_concurrent_hashes)
            .finish_non_exhaustive()
    }
}

/// The three buses.
#[derive(Clone, Debug)]
pub struct Buses {
    /// Commands.
    pub commands: CommandBus,
    /// Queries.
    pub queries: QueryBus,
    /// Events (in process).
    pub events: EventBus,
}

/// The buses, filled in by the gateway after every plugin registered its handlers. Route
/// handlers read it per request; it is set once before the server accepts requests.
#[derive(Clone, Debug, Default)]
pub struct BusHandle(Arc<OnceLock<Buses>>);

impl BusHandle {
    /// An empty handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the buses; a second call is ignored.
    pub fn set(&self, buses: Buses) {
        let _ = self.0.set(buses);
    }

    /// The buses, or a 503 before they are set.
    pub fn get(&self) -> Result<&Buses, ApiError> {
        self.0.get().ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "starting",
                "the server is still starting",
            )
        })
    }
}

/// A background worker a plugin contributes (a consumer, a projection); the gateway runs it in
/// its [`Runtime`](cqrs_core::runtime::Runtime).
pub struct BackgroundWorker(pub Box<dyn cqrs_core::runtime::Worker>);

impl fmt::Debug for BackgroundWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BackgroundWorker")
            .field(&self.0.name())
            .finish()
    }
}

/// What a plugin offers the realtime hub: how its events map to topics and frames, and who may
/// see them. The gateway joins every plugin's feed into the one hub it mounts at `/ws`: a topic
/// belongs to the one feed whose routing carries it, and that feed's authorizer decides who
/// may subscribe to it and see its events (a topic two feeds carry is refused to everyone); an
/// event is pushed as the one feed that routes it says, onto that feed's own topics only (one
/// it puts on another's topic is not pushed, nor is an event two feeds route: a warning says
/// so, once per event type). Give a feed topics of its own, and route only your own events.
#[derive(Clone)]
pub struct RealtimeFeed {
    /// Topics, channels and the pushed `event` object of each event.
    pub routing: Arc<dyn cqrs_realtime::EventRouting>,
    /// Who may subscribe to what, and see which event.
    pub authorizer: Arc<dyn cqrs_realtime::Authorizer<crate::User>>,
}

impl fmt::Debug for RealtimeFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RealtimeFeed").finish_non_exhaustive()
    }
}

/// Idempotent DDL a plugin contributes in [`Mode::Postgres`] (`CREATE TABLE IF NOT EXISTS ...`
/// in the database's schema). The gateway runs the contributions at start, in plugin order,
/// after the framework's own migrations, one transaction each under an advisory lock, so
/// instances starting together do not race. Each runs once per schema and text: the schema's
/// `helpdesk_migrations` table records `plugin/name` with each SQL text that ran, and a start
/// skips a text already applied; changed SQL runs again (so keep it idempotent).
#[derive(Clone, Debug)]
pub struct Migration {
    /// A name for logs and errors (`"auth.users"`).
    pub name: &'static str,
    /// The SQL: one or more statements, safe to run again.
    pub sql: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(poll_ms: u64) -> Settings {
        Settings {
            jwt_secret: Arc::from(&[0u8; 32][..]),
            token_ttl: Duration::from_secs(3600),
            agent_emails: Arc::default(),
            login_attempts: 10,
            login_window: Duration::from_secs(900),
            idempotency_ttl: Duration::from_secs(86_400),
            poll_interval: Duration::from_millis(poll_ms),
            purge_interval: Duration::from_secs(3600),
            max_concurrent_hashes: None,
        }
    }

    /// A short `--poll-ms` (tests use 10, and 1 is allowed) never makes the redelivery delay
    /// shorter than the Redis transport accepts; a long one gives ten polls.
    #[test]
    fn the_redelivery_delay_is_ten_polls_but_never_below_the_minimum() {
        let options = settings(1).consumer_options();
        assert_eq!(options.block, Duration::from_millis(1));
        assert_eq!(options.redelivery_delay, MIN_REDELIVERY_DELAY);
        let options = settings(50).consumer_options();
        assert_eq!(options.redelivery_delay, Duration::from_millis(500));
    }
}
