//! Building the application: backends, plugins, buses, workers, router.

use crate::Config;
use crate::http;
use anyhow::{Context, anyhow};
use axum::Router;
use cqrs_core::clock::{Clock, SystemClock};
use cqrs_core::memory::{
    InMemoryEventStore, InMemoryIdempotencyStore, InMemoryProjectionStore, InMemoryPubSub,
    InMemoryTransport,
};
use cqrs_core::middleware::{MetricsLayer, TimeoutLayer, TracingLayer};
use cqrs_core::ports::{EventTransport, PubSub};
use cqrs_core::projection::EventBusTransport;
use cqrs_core::relay::StoreRelay;
use cqrs_core::runtime::{Health, HealthCheck, Periodic, Runtime, Worker};
use cqrs_core::{CommandBus, EventBus, EventStoreSink, PluginRegistrar, Plugins, QueryBus};
use cqrs_postgres::{PgDatabase, PgOptions, PgOutboxRelay};
use cqrs_realtime::{Hub, PushedEvent, Refusal, Topic, Unauthenticated};
use cqrs_redis::{RedisPubSubOptions, RedisStreamOptions, StreamMaintenance};
use helpdesk_api::{
    Authenticator, Backends, BackgroundWorker, BusHandle, Buses, HttpApi, Migration, Mode,
    RealtimeFeed, Settings, TrustedProxies, User,
};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// The plugins this server must have. A missing `use <crate> as _;` line fails start-up with a
/// message naming the plugin.
pub const EXPECTED_PLUGINS: &[&str] = &["auth", "tickets"];

/// The transport topic every event is relayed to.
pub const EVENTS_TOPIC: &str = "helpdesk.events";

/// How often, at most, the outbox relay of Postgres without Redis moves its checkpoint (it
/// discards what it reads: every fifty `--poll-ms`, up to this), and the most events it passes
/// a batch.
const DISCARD_INTERVAL: Duration = Duration::from_secs(5);
const DISCARD_BATCH: usize = 1_000;

/// The name of the relay that publishes every event to the WebSocket hubs (its checkpoint's
/// name), and the topic it is given (the routing chooses the channels).
const REALTIME_RELAY: &str = "realtime";

/// The name of the relay that hands every event to the event bus's handlers (its checkpoint's
/// name), and the topic it is given. It ships one event a batch: each commits on its own, so
/// the relay moving to another instance (after a failure that outlasts the batch's retries)
/// never hands on again events before the failing one, and the retries' budget is that
/// event's alone.
const EVENT_BUS_RELAY: &str = "event-bus";

/// The other relays' batch: the relays' own default.
const RELAY_BATCH: usize = 100;

/// How long the relay to the event bus keeps handing a failing event on again within one
/// batch, holding the relay (on several instances, the attempts then stay with one instance).
const EVENT_RETRIES_WITHIN: Duration = Duration::from_secs(15);

/// How long each of the event bus's handlers of one event may take (they run together): past
/// it the handler is named as timed out and the event fails, an attempt toward being given
/// up. Below the relays' 30 s publish timeout, so a handler that hangs every time is given up
/// on rather than holding the feed for good.
const EVENT_HANDLER_TIMEOUT: Duration = Duration::from_secs(10);

/// What tests, and binaries of your own (see [`main_with`](crate::main_with)), add or replace.
#[derive(Clone, Default)]
pub struct Hooks {
    /// The clock (token expiry, login throttling, idempotency expiry).
    pub clock: Option<Arc<dyn Clock>>,
    /// Starts without the relays (to the transport, to the WebSocket hubs, and to the plugins'
    /// event handlers): events this instance commits are shipped only by another instance's
    /// relays (tests prove that nothing committed is lost that way).
    pub without_relay: bool,
    /// More background workers, each made by its function when the app is built and run with
    /// the others (tests add one that ignores shutdown, or see whether anything was built).
    pub workers: Vec<MakeWorker>,
    /// Provides the plugins more resources before they install, each by its function, after
    /// the server's own (a test's user store that fails on demand, as
    /// `Arc<dyn helpdesk_auth::UserStore>`, say).
    pub provide: Vec<ProvideResources>,
    /// Plugins handed over directly, installed with those linked in (through inventory), each
    /// made by its function: a test's, or a binary's own that it does not register.
    pub plugins: Vec<MakePlugin>,
    /// More plugins that must be linked, besides [`EXPECTED_PLUGINS`]: a binary that links
    /// plugins of its own names them, so one left unlinked (its `use ... as _;` line lost)
    /// fails the start naming it, instead of its routes answering 404.
    pub expect_plugins: Vec<&'static str>,
    /// How often a running instance on Postgres renews its record in the schema and its claim
    /// on the Redis key prefix; every 30 s when `None` (tests shorten it). More than zero and
    /// at most 30 s, or the start fails: a record counts as gone 90 s after its last renewal.
    pub deployment_checks_every: Option<Duration>,
}

/// Provides resources to the plugins; see [`Hooks::provide`].
// Crate-private shorthand: a test writes the closure, never this name.
pub(crate) type ProvideResources = Arc<dyn Fn(&mut PluginRegistrar) + Send + Sync>;

/// Makes a background worker; see [`Hooks::workers`].
pub type MakeWorker = Arc<dyn Fn() -> Box<dyn Worker> + Send + Sync>;

/// Makes a plugin; see [`Hooks::plugins`].
pub type MakePlugin = Arc<dyn Fn() -> Box<dyn cqrs_core::Plugin> + Send + Sync>;

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("clock", &self.clock.is_some())
            .field("without_relay", &self.without_relay)
            .field("workers", &self.workers.len())
            .field("provide", &self.provide.len())
            .field("plugins", &self.plugins.len())
            .field("expect_plugins", &self.expect_plugins)
            .field("deployment_checks_every", &self.deployment_checks_every)
            .finish()
    }
}

/// The built application, not yet serving.
pub struct App {
    /// The HTTP router, with every layer.
    pub router: Router,
    /// The background workers.
    pub runtime: Arc<Runtime>,
    /// The plugins, in installation order.
    pub plugins: Vec<&'static str>,
    /// The buses.
    pub buses: Buses,
    /// The WebSocket hub at `/ws`.
    pub hub: Hub<Session>,
    /// Set when a stop begins: `/ready` answers 503 `stopping` from then on, while requests
    /// are still served (see `--shutdown-delay-ms`).
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("plugins", &self.plugins)
            .finish_non_exhaustive()
    }
}

struct MemoryCheck;

#[async_trait::async_trait]
impl HealthCheck for MemoryCheck {
    async fn check(&self) -> Health {
        Health::Healthy
    }
}

fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The configuration's problems, every one, as one error.
pub(crate) fn validated(config: &Config) -> anyhow::Result<()> {
    config.validate().map_err(|problems| {
        anyhow!(
            "the configuration is invalid:\n  - {}",
            problems.join("\n  - ")
        )
    })
}

/// Builds the application from a configuration. Must run inside a tokio runtime: it starts the
/// background workers.
pub async fn build(config: &Config, hooks: Hooks) -> anyhow::Result<App> {
    // The metrics recorder first, so every component's metrics land in it.
    let _ = http::prometheus();
    validated(config)?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    match &config.database_url {
        None => tracing::info!(
            "backends: in memory (DATABASE_URL is unset): nothing survives a restart, and one instance only"
        ),
        Some(url) => tracing::info!(
            database = %crate::config::redacted_url(url),
            schema = %config.database_schema,
            redis = %config.redis_url.as_deref().map_or("none (one instance only)".into(), crate::config::redacted_redis_url),
            "backends: Postgres{}",
            if config.redis_url.is_some() { " and Redis" } else { "" }
        ),
    }
    let clock = hooks.clock.unwrap_or_else(|| Arc::new(SystemClock));
    let secret = match &config.jwt_secret {
        Some(s) => s.clone(),
        None => {
            tracing::warn!(
                "HELPDESK_JWT_SECRET is not set: using a random secret; tokens will not survive a restart"
            );
            random_secret()
        }
    };

    let agent_emails = config.agent_email_set();
    // On Postgres `validated` refused agent emails without a code: every instance must accept
    // the same one.
    let agent_code = match &config.agent_code {
        Some(code) => Some(code.clone()),
        None if agent_emails.is_empty() => None,
        None => {
            let code = random_secret();
            tracing::warn!(
                agent_code = %code,
                "HELPDESK_AGENT_EMAILS is set without HELPDESK_AGENT_CODE: agents register with this random code, sent as `agent_code`, until the process exits; set HELPDESK_AGENT_CODE to choose one"
            );
            Some(code)
        }
    };

    let poll = Duration::from_millis(config.poll_ms.max(1));
    let Started {
        backends,
        checks,
        relay,
        realtime_relay,
        event_bus_relay,
        seed_event_bus_relays,
        maintenance,
        redis,
    } = match &config.database_url {
        None => memory_backends(clock.clone(), poll, config.purge_interval()),
        Some(url) => postgres_backends(config, url, clock.clone(), poll).await?,
    };
    let settings = Settings {
        jwt_secret: Arc::from(secret.as_bytes()),
        token_ttl: Duration::from_secs(config.token_ttl_seconds),
        agent_emails: Arc::new(agent_emails),
        login_attempts: config.login_attempts,
        login_window: Duration::from_secs(config.login_window_seconds),
        idempotency_ttl: Duration::from_secs(24 * 3600),
        poll_interval: poll,
        purge_interval: config.purge_interval(),
        max_concurrent_hashes: config.max_concurrent_hashes.map(|n| n as usize),
    };
    let bus_handle = BusHandle::new();
    let live_sessions = helpdesk_api::LiveSessions::new();

    let mut registrar = PluginRegistrar::new();
    registrar.provide(backends.clone());
    registrar.provide(settings.clone());
    registrar.provide(bus_handle.clone());
    registrar.provide(live_sessions.clone());
    if let Some(code) = &agent_code {
        registrar.provide(helpdesk_auth::AgentCode::new(code));
    }
    for provide in &hooks.provide {
        provide(&mut registrar);
    }
    let plugins = Plugins::collect_with(hooks.plugins.iter().map(|make| make()).collect())?
        .expect(EXPECTED_PLUGINS)?
        .expect(&hooks.expect_plugins)?;
    plugins.install(&mut registrar)?;
    // Before anything connects or starts: colliding routes are a build error, not a panic.
    let api = merged_api(registrar.take_contributions_by_plugin::<HttpApi>())?;
    let mut migrations = registrar.take_contributions_by_plugin::<Migration>();
    let workers = registrar.take_contributions::<BackgroundWorker>();
    let feeds = registrar.take_contributions_by_plugin::<RealtimeFeed>();
    // A plugin's contribution of a type the server does not take fails the start here.
    registrar.check_contributions_taken()?;
    if let Some(db) = &backends.postgres {
        migrations.insert(0, ("helpdesk", crate::deployment::migration(db.schema())));
        crate::migrations::run(db, &migrations).await?;
    }

    let budget = config.request_timeout();
    // In Postgres mode the innermost layer runs each command in one transaction: the
    // handler's writes and its events (the outbox) commit together. In memory, the events a
    // handler records go to the in-memory store the relay ships from, so a plugin's
    // `ctx.record` reaches the consumers and the WebSocket clients on either backend.
    // The server's clock (a test's `ManualClock`) stamps what handlers record, as it does
    // tokens, throttles and expiries.
    // One limit for both buses: a user's commands and queries share one budget.
    let user_limit = config
        .user_rate_limit()
        .map(|limit| limit.clock(clock.clone()));
    let mut commands = CommandBus::builder()
        .clock(clock.clone())
        .layer(TracingLayer::new())
        .layer(MetricsLayer::new())
        .layer(tower::util::option_layer(user_limit.clone()))
        .layer(TimeoutLayer::new(budget))
        .layer(tower::util::option_layer(
            backends.postgres.as_ref().map(PgDatabase::command_layer),
        ))
        .handlers(registrar.take_commands());
    if backends.postgres.is_none() {
        commands = commands.event_sink(Arc::new(EventStoreSink::new(backends.events.clone())));
    }
    let commands = commands.build()?;
    let queries = QueryBus::builder()
        .clock(clock.clone())
        .layer(TracingLayer::new())
        .layer(MetricsLayer::new())
        .layer(tower::util::option_layer(user_limit))
        .layer(TimeoutLayer::new(budget))
        .handlers(registrar.take_queries())
        .build()?;
    let handlers = registrar.take_events();
    let by_plugin = handlers.clone().by_plugin();
    let events = event_bus(handlers)?;
    // The handlers plugins registered (`registrar.events()`) get every committed event from a
    // relay of their own, one per plugin, with its own checkpoint: one plugin's handler that
    // fails (or waits for its backend) holds up only its own plugin's. None registered: no
    // relay, and no connection held for it.
    let mut event_bus_feeds: Vec<EventBusFeed> = Vec::new();
    // The pooled connections the background workers may hold at once, and one for requests.
    let mut needed = 9 + 1;
    if !by_plugin.is_empty() && !hooks.without_relay {
        let server_own = by_plugin.iter().any(|(plugin, _)| plugin.is_empty());
        // The relays' two pooled connections each (a batch and its LISTEN), and the batch of
        // the `event-bus` relay following the store, besides the nine the helpdesk's workers
        // may hold at once and one for requests.
        needed += 2 * by_plugin.len() as u32 + u32::from(!server_own);
        if backends.postgres.is_some() && config.database_max_connections < needed {
            tracing::warn!(
                database_max_connections = config.database_max_connections,
                relays = by_plugin.len(),
                "the relays to the plugins' event handlers hold two pooled connections each (a batch and a LISTEN) besides the nine the helpdesk's workers may hold at once: with HELPDESK_DATABASE_MAX_CONNECTIONS below {needed}, requests may find none left; raise it"
            );
        }
        let mut plugin_relays = Vec::new();
        for (plugin, handlers) in by_plugin {
            let bus = event_bus(handlers)?;
            let mut handled: Vec<&str> = bus.names().collect();
            handled.sort_unstable();
            let (relay, check) = if plugin.is_empty() {
                (EVENT_BUS_RELAY.to_owned(), EVENT_HANDLERS_CHECK.to_owned())
            } else {
                (
                    format!("{EVENT_BUS_RELAY}.{plugin}"),
                    format!("{EVENT_HANDLERS_CHECK}.{plugin}"),
                )
            };
            tracing::info!(
                plugin,
                event_types = ?handled,
                %relay,
                "event handlers registered: every committed event is handed to them, in store order, at least once, by one instance at a time"
            );
            let transport =
                Arc::new(EventBusTransport::new(bus).retry_within(EVENT_RETRIES_WITHIN));
            if let Some(worker) = event_bus_relay(&relay, Some(transport.clone())) {
                event_bus_feeds.push(EventBusFeed {
                    worker,
                    check: Some((check, transport)),
                });
            }
            if !plugin.is_empty() {
                plugin_relays.push(relay);
            }
        }
        // Without handlers of the server's own, the `event-bus` relay still follows the store
        // (on Postgres), handing on nothing: a plugin's relay made later starts where it is.
        if !server_own && let Some(worker) = event_bus_relay(EVENT_BUS_RELAY, None) {
            event_bus_feeds.push(EventBusFeed {
                worker,
                check: None,
            });
        }
        // Before any relay runs (the one following the store above included): each plugin's
        // made now starts where `event-bus` is.
        if let Some(seed) = seed_event_bus_relays {
            seed(plugin_relays).await?;
        }
    }
    registrar.check_required(&commands, &queries)?;
    let buses = Buses {
        commands,
        queries,
        events,
    };
    bus_handle.set(buses.clone());

    let authenticator: Arc<dyn Authenticator> = registrar
        .resource()
        .context("no plugin provides an Authenticator (the auth plugin does)")?;

    let mut runtime = Runtime::builder();
    if !hooks.without_relay {
        runtime = runtime.worker(relay);
    }

    for (name, check, critical) in checks {
        runtime = runtime.check(name, check, critical);
    }
    for BackgroundWorker(worker) in workers {
        runtime = runtime.worker(worker);
    }
    if let Some(maintenance) = maintenance {
        runtime = runtime.worker(maintenance);
    }
    for EventBusFeed { worker, check } in event_bus_feeds {
        runtime = runtime.worker(worker);
        // Degraded while an event is handed to the handlers again: the relay says so only
        // once its batch gives up, 15 s later.
        if let Some((name, transport)) = check {
            runtime = runtime.check(&name, transport, false);
        }
    }
    for make in &hooks.workers {
        runtime = runtime.worker(make());
    }
    // Saved idempotent responses expire after a day but stay stored until purged: without
    // this, every `Idempotency-Key` ever sent would be kept (a full ticket each).
    let idempotency = backends.idempotency.clone();
    runtime = runtime.worker(
        Periodic::new("idempotency-purge", config.purge_interval(), move || {
            let idempotency = idempotency.clone();
            async move {
                let purged = idempotency.purge_expired().await?;
                if purged > 0 {
                    tracing::info!(purged, "deleted expired idempotency records");
                }
                Ok(())
            }
        })
        // The purge deletes in batches, each committed: cut short by a lock held for good, it
        // loses nothing, and the next run goes on from there.
        .timeout(Duration::from_secs(600)),
    );

    // The recorder keeps every histogram sample until something drains it: a scrape of
    // /metrics does, and so does this, so memory stays flat with no scraper (a request's
    // samples would otherwise be kept for the life of the process).
    runtime = runtime.worker(Periodic::new(
        "metrics-upkeep",
        Duration::from_secs(5),
        || {
            http::prometheus().run_upkeep();
            std::future::ready(Ok(()))
        },
    ));

    // Realtime: the feeds the plugins offer, as one, pushed by a hub that reads the durable log
    // for resume.
    if feeds.is_empty() {
        anyhow::bail!("no plugin offers a realtime feed (the tickets plugin does)");
    }
    let feeds = Arc::new(Feeds::new(feeds));
    // WebSockets are client connections too: they hold at most the server's limit less a
    // tenth, kept for HTTP requests (health probes among them), which held WebSockets would
    // otherwise leave waiting in the backlog; and, with `--max-connections` unset, at most
    // the hub's default, which keeps their memory bounded where the open-file limit is high.
    let share = crate::server::share_of(crate::server::client_connections(config));
    let hub_options = cqrs_realtime::HubOptions::new();
    let most = match config.max_connections {
        Some(_) => share,
        None => share.min(hub_options.get_max_connections()),
    };
    // One address holds at most all but a tenth of the hub's places, whatever the setting
    // says, as for HTTP connections: anyone may register the accounts to fill them all. And
    // all but a tenth of the connections it may hold: a WebSocket holds its connection's
    // place, and an address whose WebSockets took them all would have its next handshake,
    // and every request, closed unanswered instead of a 429.
    let connections_per_address =
        crate::server::connections_per_address(config, crate::server::client_connections(config));
    let per_address = config
        .ws_connections_per_address
        .min(crate::server::share_of(most))
        .min(crate::server::share_of(connections_per_address));
    if per_address < config.ws_connections_per_address {
        tracing::info!(
            ws_connections_per_address = config.ws_connections_per_address,
            websockets = most,
            connections_per_address,
            per_address,
            "one client address holds at most {per_address} WebSockets: all but a tenth of \
             the {most} the hub holds, kept for everyone else, and of the \
             {connections_per_address} connections one address holds, kept for its HTTP \
             requests (HELPDESK_WS_CONNECTIONS_PER_ADDRESS is more)"
        );
    }
    let hub_options = hub_options
        .max_connections(most)
        .max_connections_per_client(per_address);
    // A replay reads the event store, a pooled connection per read: on Postgres, at most half
    // of what the workers leave, so a resume storm (every client told `events_missed` after a
    // Redis reconnect) cannot take the connections requests need.
    let hub_options = match backends.postgres {
        Some(_) => hub_options
            .max_concurrent_replays(concurrent_replays(config.database_max_connections, needed)),
        None => hub_options,
    };
    let hub = Hub::builder(HubAuthenticator(authenticator.clone()))
        .authorizer(HubRules(feeds.clone()))
        .routing_arc(feeds)
        .pubsub(backends.pubsub.clone())
        .event_store(backends.events.clone())
        .clock(backends.clock.clone())
        .options(hub_options)
        .build()?;
    live_sessions.set(Arc::new(HubSessions(hub.downgrade())));
    // Published by a relay, in the store's position order, one instance at a time: a client
    // resuming `tickets` from the last position it saw then misses nothing (a consumer group
    // publishing tickets in parallel, on every instance, would publish out of order).
    if !hooks.without_relay {
        // The hub's own: its pub/sub, routing and channel prefix, whatever they are set to.
        let publisher = hub.publisher();
        runtime = runtime.worker(realtime_relay(Arc::new(publisher.into_transport())));
    }
    // Last before the workers start: a start that failed after it would leave its record.
    if let Some(db) = &backends.postgres {
        let target = redis
            .as_ref()
            .map(|transport| crate::deployment::RedisTarget {
                transport,
                url: config.redis_url.as_deref().unwrap_or_default(),
                prefix: &config.redis_prefix,
            });
        let every = match hooks.deployment_checks_every {
            None => crate::deployment::RENEW_EVERY,
            Some(every) if !every.is_zero() && every <= crate::deployment::RENEW_EVERY => every,
            Some(every) => anyhow::bail!(
                "Hooks::deployment_checks_every is {every:?}: give more than zero and at most \
                 30 s (an instance's record counts as gone 90 s after its last renewal)"
            ),
        };
        let token_key = crate::deployment::token_key(secret.as_bytes())?;
        let settings_key = crate::deployment::settings_key(
            secret.as_bytes(),
            &crate::deployment::SharedSettings {
                agent_emails: &settings.agent_emails,
                agent_code: agent_code.as_deref(),
                login_attempts: config.login_attempts,
                login_window_seconds: config.login_window_seconds,
            },
        )?;
        let joined = crate::deployment::join(
            db,
            target,
            !hooks.without_relay,
            config.bind,
            token_key,
            settings_key,
            every,
        )
        .await?;
        if let Some(instance) = joined.instance {
            runtime = runtime.worker(instance);
        }
        if let Some(claim) = joined.claim {
            runtime = runtime.worker(claim);
        }
    }
    let runtime = Arc::new(runtime.start());

    let (plugin_router, paths, schemas) = api.into_all();
    let idempotent_routes = http::IdempotentRoutes::documented_in(&paths);
    let openapi = openapi_document(paths, schemas);
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let router = http::router(http::State {
        plugin_router: plugin_router.route(
            "/ws",
            hub.route()
                .layer(axum::middleware::from_fn(websocket_client_key)),
        ),
        openapi: Arc::new(openapi),
        runtime: runtime.clone(),
        authenticator,
        request_timeout: budget,
        trusted_proxies: TrustedProxies::new(config.trusted_proxies.iter().copied()),
        idempotent_routes,
        ready_details: config.ready_details,
        ready_logged: Arc::default(),
        ready_checks: Arc::default(),
        stopping: stopping.clone(),
        cors_origins: config.cors_origins.clone(),
        metrics_token: config.metrics_token.as_deref().map(Arc::from),
    });
    Ok(App {
        router,
        runtime,
        plugins: plugins.names().collect(),
        buses,
        hub,
        stopping,
    })
}

/// Who contributed something: a plugin, or the hooks (`Hooks::provide`, outside any plugin).
fn contributor(plugin: &str) -> String {
    if plugin.is_empty() {
        "a contribution outside any plugin (Hooks::provide)".to_owned()
    } else {
        format!("the `{plugin}` plugin")
    }
}

/// The contributions merged into one, or an error listing every collision, naming the route
/// (or schema) and the contributors: a route at a path the gateway serves itself, one method
/// and path from two contributors, one schema name defined differently by two.
fn merged_api(contributions: Vec<(&'static str, HttpApi)>) -> anyhow::Result<HttpApi> {
    use std::collections::BTreeMap;
    let mut problems = Vec::new();
    let mut operations: BTreeMap<(String, String), &'static str> = BTreeMap::new();
    let mut schemas: BTreeMap<String, (String, Value)> = BTreeMap::new();
    schemas.insert("Error".into(), ("the gateway".into(), error_schema()));
    let mut merged = HttpApi::new();
    let mut merged_from = Vec::new();
    for (plugin, api) in contributions {
        let who = contributor(plugin);
        let before = problems.len();
        for path in api.route_paths() {
            if http::GATEWAY_PATHS.contains(&path) {
                let methods: Vec<String> = api
                    .operations()
                    .filter(|(_, p)| *p == path)
                    .map(|(method, _)| format!("{method} {path}"))
                    .collect();
                let route = if methods.is_empty() {
                    path.to_owned()
                } else {
                    methods.join(", ")
                };
                problems.push(format!(
                    "{who} contributes a route at {route}, a path the gateway serves itself ({})",
                    http::GATEWAY_PATHS.join(", ")
                ));
            }
        }
        for problem in api
            .route_path_problems()
            .into_iter()
            .chain(api.path_parameter_problems())
        {
            problems.push(format!("{who}: {problem}"));
        }
        for (method, path) in api.operations() {
            if let Some(first) = operations.insert((method.clone(), path.to_owned()), plugin) {
                problems.push(format!(
                    "{method} {path} is contributed by both {} and {who}",
                    contributor(first)
                ));
            }
        }
        for (name, schema) in api.schemas() {
            match schemas.get(name) {
                Some((first, defined)) if defined != schema => problems.push(format!(
                    "the OpenAPI schema `{name}` is defined differently by {first} and by {who}"
                )),
                Some(_) => {}
                None => {
                    schemas.insert(name.clone(), (who.clone(), schema.clone()));
                }
            }
        }
        if problems.len() == before {
            // What is left to find is an overlap no operation documents.
            merged = merged.try_merge(api).map_err(|why| {
                anyhow!(
                    "the routes of {who} collide with those of {}: {why}",
                    merged_from.join(", ")
                )
            })?;
            merged_from.push(who);
        }
    }
    if problems.is_empty() {
        Ok(merged)
    } else {
        Err(anyhow!(
            "the plugins' routes collide:\n  - {}",
            problems.join("\n  - ")
        ))
    }
}

/// Makes the relay that publishes committed events to the WebSocket hubs, given the
/// transport that publishes them.
type MakeRelay = Box<dyn FnOnce(Arc<dyn EventTransport>) -> Box<dyn Worker> + Send>;

/// Makes a relay to event handlers, given its name and the transport that hands the events to
/// them; given none, one that only keeps its checkpoint following the store, where the backend
/// keeps checkpoints (`None` otherwise).
type MakeEventBusRelay =
    Box<dyn Fn(&str, Option<Arc<dyn EventTransport>>) -> Option<Box<dyn Worker>> + Send>;

/// Creates the checkpoints of the plugins' relays to their event handlers (given their names)
/// that have none yet, where the `event-bus` relay is, before any relay runs.
type SeedEventBusRelays = Box<
    dyn FnOnce(Vec<String>) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> + Send,
>;

/// A relay to a plugin's event handlers, and the health check of its transport, named.
struct EventBusFeed {
    worker: Box<dyn Worker>,
    check: Option<(String, Arc<EventBusTransport>)>,
}

/// The name of the health check of the relay to the server's own event handlers; a plugin's
/// is this, a dot, and the plugin's name.
const EVENT_HANDLERS_CHECK: &str = "event-handlers";

/// An event bus over `handlers`, with the helpdesk's layers.
fn event_bus(handlers: cqrs_core::EventHandlers) -> Result<EventBus, cqrs_core::BuildError> {
    EventBus::builder()
        .layer(TracingLayer::new())
        .layer(MetricsLayer::new())
        .handler_timeout(EVENT_HANDLER_TIMEOUT)
        .handlers(handlers)
        .build()
}

/// `relay`, discarding what it reads, set to keep its checkpoint near the store's head cheaply:
/// woken by no append, it moves it every fifty `poll`s (up to [`DISCARD_INTERVAL`]) in one
/// batch, instead of a transaction (and its commit) for every append.
fn following_the_store(relay: PgOutboxRelay, poll: Duration) -> PgOutboxRelay {
    relay
        .listen(false)
        .poll_interval(
            poll.saturating_mul(50)
                .clamp(Duration::from_millis(50), DISCARD_INTERVAL),
        )
        .batch_size(DISCARD_BATCH)
}

/// What a mode starts with: its backends, its health checks, the worker shipping committed
/// events to the transport, and the one publishing them to the WebSocket hubs.
struct Started {
    backends: Backends,
    checks: Vec<(&'static str, Arc<dyn HealthCheck>, bool)>,
    relay: Box<dyn cqrs_core::runtime::Worker>,
    /// Like `relay`, with a name (and checkpoint) of its own: one is active at a time, reading
    /// the store in position order.
    realtime_relay: MakeRelay,
    /// Relays to the event handlers, each with a name (and checkpoint) of its own (run only
    /// when plugins registered some).
    event_bus_relay: MakeEventBusRelay,
    /// Where the backend keeps checkpoints, what places the plugins' relays the first time.
    seed_event_bus_relays: Option<SeedEventBusRelays>,
    /// Trims the event transport of what every group acknowledged (a Redis stream, or the
    /// in-process transport, which otherwise keeps every event ever published); none when the
    /// transport keeps nothing.
    maintenance: Option<Box<dyn cqrs_core::runtime::Worker>>,
    /// The Redis transport, on Redis: its key prefix is claimed for the schema.
    redis: Option<cqrs_redis::RedisStreamTransport>,
}

/// Trims the in-process transport's topic every `interval`.
fn memory_trim(
    transport: InMemoryTransport,
    interval: Duration,
) -> Box<dyn cqrs_core::runtime::Worker> {
    Box::new(Periodic::new("transport-trim", interval, move || {
        let trimmed = transport.trim(EVENTS_TOPIC);
        if trimmed > 0 {
            tracing::debug!(
                trimmed,
                "trimmed acknowledged events from the in-process transport"
            );
        }
        std::future::ready(Ok(()))
    }))
}

fn memory_backends(clock: Arc<dyn Clock>, poll: Duration, purge_interval: Duration) -> Started {
    let transport = InMemoryTransport::new();
    let backends = Backends {
        mode: Mode::Memory,
        events: Arc::new(InMemoryEventStore::new()),
        idempotency: Arc::new(InMemoryIdempotencyStore::with_clock(clock.clone())),
        transport: Arc::new(transport.clone()),
        pubsub: Arc::new(InMemoryPubSub::new()),
        clock,
        topic: EVENTS_TOPIC.to_owned(),
        postgres: None,
    };
    let relay = StoreRelay::new(
        "relay",
        backends.events.clone(),
        Arc::new(InMemoryProjectionStore::new()),
        backends.transport.clone(),
        EVENTS_TOPIC,
    )
    .intervals(poll / 2, Duration::from_secs(5));
    let in_memory_relay = |name: &'static str, batch: usize| -> MakeRelay {
        let events = backends.events.clone();
        Box::new(move |to| {
            Box::new(
                StoreRelay::new(
                    name,
                    events,
                    Arc::new(InMemoryProjectionStore::new()),
                    to,
                    name,
                )
                .batch_size(batch)
                .intervals(poll / 2, Duration::from_secs(5)),
            )
        })
    };
    let realtime_relay = in_memory_relay(REALTIME_RELAY, RELAY_BATCH);
    let event_bus_relay: MakeEventBusRelay = {
        let events = backends.events.clone();
        // Checkpoints in memory start with the empty store: none to keep following it.
        Box::new(move |name, to| {
            Some(Box::new(
                StoreRelay::new(
                    name,
                    events.clone(),
                    Arc::new(InMemoryProjectionStore::new()),
                    to?,
                    EVENT_BUS_RELAY,
                )
                .batch_size(1)
                .intervals(poll / 2, Duration::from_secs(5)),
            ))
        })
    };
    Started {
        backends,
        checks: vec![("memory", Arc::new(MemoryCheck), true)],
        relay: Box::new(relay),
        realtime_relay,
        event_bus_relay,
        // Checkpoints in memory start with the empty store.
        seed_event_bus_relays: None,
        maintenance: Some(memory_trim(transport, purge_interval)),
        redis: None,
    }
}

/// Postgres for state, events, outbox and idempotency; Redis (when configured) for the event
/// transport and realtime fan-out. Without Redis (one instance only) realtime fans out in
/// process and the events go to no transport: the relay to it discards them, but runs, so
/// that Redis added later gets only new events.
async fn postgres_backends(
    config: &Config,
    url: &str,
    clock: Arc<dyn Clock>,
    poll: Duration,
) -> anyhow::Result<Started> {
    let db = PgOptions::new(url)
        .schema(config.database_schema.clone())
        // The URL's or PGAPPNAME's, where an operator names the instance.
        .fallback_application_name("helpdesk")
        .max_connections(config.database_max_connections)
        .acquire_timeout(Duration::from_millis(config.database_acquire_timeout_ms))
        .connect()
        .await
        .context("cannot connect to Postgres (DATABASE_URL)")?
        .with_clock(clock.clone())
        .with_health_wait(http::postgres_health_wait(config.request_timeout()));
    db.migrate()
        .await
        .context("cannot run the framework's migrations")?;
    let mut checks: Vec<(&'static str, Arc<dyn HealthCheck>, bool)> =
        vec![("postgres", Arc::new(db.clone()), true)];
    let maintenance: Option<Box<dyn cqrs_core::runtime::Worker>>;
    let mut redis = None;
    let shipped_to: Arc<dyn EventTransport>;
    let (transport, pubsub): (Arc<dyn EventTransport>, Arc<dyn PubSub>) =
        match config.redis_connection() {
            Some(connection) => {
                let transport = RedisStreamOptions::with_connection(connection.clone())
                    .key_prefix(config.redis_prefix.clone())
                    .connect()
                    .await
                    .context("cannot connect to Redis (REDIS_URL) for the event transport")?;
                let pubsub = RedisPubSubOptions::with_connection(connection)
                    .channel_prefix(config.redis_prefix.clone())
                    .connect()
                    .await
                    .context("cannot connect to Redis (REDIS_URL) for pub/sub")?;
                // Not critical: commands still commit into the outbox while Redis is away.
                checks.push(("redis", Arc::new(transport.clone()), false));
                checks.push(("redis-pubsub", Arc::new(pubsub.clone()), false));
                // Without it the stream keeps every event ever published. Every minute at least:
                // a round trims up to a million entries (hourly, a stream taking more than
                // about 280 events a second would grow), and it reads the groups' gauges.
                maintenance = Some(Box::new(
                    StreamMaintenance::new(transport.clone(), [EVENTS_TOPIC])
                        .interval(config.purge_interval().min(Duration::from_secs(60))),
                ));
                redis = Some(transport.clone());
                let transport: Arc<dyn EventTransport> = Arc::new(transport);
                shipped_to = Arc::new(crate::metered::MeteredTransport::new(
                    transport.clone(),
                    "relay",
                ));
                (transport, Arc::new(pubsub))
            }
            None => {
                // Nothing reads a transport (the stats read the event store, the WebSockets get
                // the realtime relay's pushes), but the relay still runs, to one that discards:
                // its checkpoint then follows the store, and Redis added later gets only the
                // events committed from then on, not the whole history again (which the stats,
                // deduping through an inbox that keeps a week, would count again). Not counted
                // as published: nothing is.
                maintenance = None;
                let transport: Arc<dyn EventTransport> = Arc::new(crate::discard::DiscardTransport);
                shipped_to = transport.clone();
                (transport, Arc::new(InMemoryPubSub::new()))
            }
        };
    let relay = PgOutboxRelay::new(db.clone(), shipped_to).topic(EVENTS_TOPIC);
    let relay = if config.redis_url.is_some() {
        relay.poll_interval(poll.max(Duration::from_millis(50)))
    } else {
        // Discarding, it only keeps its checkpoint near the store's head: Redis added later
        // then re-ships at most the seconds of events since its last batch.
        following_the_store(relay, poll)
    };
    // A database that had events before this relay existed: it starts where the transport's
    // relay is, not at the beginning (which would push every old event to the WebSockets as
    // new). Read once here; used only if the realtime relay has no checkpoint yet.
    let start_from = relay
        .checkpoint()
        .await
        .context("cannot read the outbox relay's checkpoint")?;
    // They LISTEN for appends, so events reach the hubs and the handlers as soon as they
    // commit.
    let postgres_relay = |name: &'static str, batch: usize| -> MakeRelay {
        let db = db.clone();
        Box::new(move |to| {
            Box::new(
                PgOutboxRelay::new(
                    db,
                    Arc::new(crate::metered::MeteredTransport::new(to, name)),
                )
                .relay_name(name)
                .topic(name)
                .start_from(start_from)
                .batch_size(batch)
                .poll_interval(poll.max(Duration::from_millis(50))),
            )
        })
    };
    let realtime_relay = postgres_relay(REALTIME_RELAY, RELAY_BATCH);
    let event_bus_relay: MakeEventBusRelay = {
        let db = db.clone();
        Box::new(move |name, to| {
            let relay = match to {
                Some(to) => PgOutboxRelay::new(
                    db.clone(),
                    Arc::new(crate::metered::MeteredTransport::new(to, name.to_owned())),
                )
                .batch_size(1)
                .poll_interval(poll.max(Duration::from_millis(50))),
                // Only following the store, as the outbox relay without Redis does.
                None => following_the_store(
                    PgOutboxRelay::new(db.clone(), Arc::new(crate::discard::DiscardTransport)),
                    poll,
                ),
            };
            Some(Box::new(
                relay
                    .relay_name(name)
                    .topic(EVENT_BUS_RELAY)
                    .start_from(start_from),
            ))
        })
    };
    let seed_event_bus_relays: SeedEventBusRelays = {
        let db = db.clone();
        Box::new(move |plugin_relays| {
            Box::pin(async move {
                let relay = |name: &str| {
                    PgOutboxRelay::new(db.clone(), Arc::new(crate::discard::DiscardTransport))
                        .relay_name(name)
                };
                // Where the one relay that fed every plugin's handlers before each plugin had
                // its own is, or the one following the store since: a plugin's relay made now
                // hands on what that one had not, and not the history. Without one, where the
                // outbox relay is.
                let from = relay(EVENT_BUS_RELAY)
                    .stored_checkpoint()
                    .await
                    .context("cannot read the event-bus relay's checkpoint")?
                    .unwrap_or(start_from);
                for name in &plugin_relays {
                    relay(name)
                        .start_from(from)
                        .ensure_checkpoint()
                        .await
                        .with_context(|| {
                            format!("cannot create the checkpoint of relay `{name}`")
                        })?;
                }
                Ok(())
            })
        })
    };
    let backends = Backends {
        mode: Mode::Postgres,
        events: Arc::new(db.event_store()),
        idempotency: Arc::new(db.idempotency_store()),
        transport,
        pubsub,
        clock,
        topic: EVENTS_TOPIC.to_owned(),
        postgres: Some(db),
    };
    Ok(Started {
        backends,
        checks,
        relay: Box::new(relay),
        realtime_relay,
        event_bus_relay,
        seed_event_bus_relays: Some(seed_event_bus_relays),
        maintenance,
        redis,
    })
}

/// Who a WebSocket connection belongs to: the token's user, and when the token expires.
#[derive(Clone, Debug)]
pub struct Session {
    /// The user, as the user store had it at the handshake.
    pub user: User,
    /// When the token stops being valid.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The hub checks tokens with the auth plugin's authenticator.
struct HubAuthenticator(Arc<dyn Authenticator>);

#[async_trait::async_trait]
impl cqrs_realtime::Authenticator for HubAuthenticator {
    type Principal = Session;

    async fn authenticate(&self, token: &str) -> Result<Session, Unauthenticated> {
        let (user, expires_at) = self.0.verify_session(token).await.map_err(|e| {
            if e.is_unavailable() {
                Unauthenticated::unavailable(e.to_string())
            } else {
                Unauthenticated::new(e.to_string())
            }
        })?;
        Ok(Session { user, expires_at })
    }

    /// One user's connections are counted together (`max_connections_per_principal`).
    fn connection_key(&self, session: &Session) -> Option<String> {
        Some(session.user.id.to_string())
    }

    /// The hub closes the connection (1008) when the token expires.
    fn expires_at(&self, session: &Session) -> Option<chrono::DateTime<chrono::Utc>> {
        session.expires_at
    }
}

/// Closes a user's WebSocket connections for the plugins (the auth plugin's logout): the
/// hub's connections are keyed by user id (`HubAuthenticator::connection_key`). A weak
/// handle: the logout handler holding it is reached from the hub itself (through the feeds'
/// authorizers and the buses), and a strong one would keep the hub, and the database pool it
/// reads from, alive after the server stopped.
struct HubSessions(cqrs_realtime::WeakHub<Session>);

#[async_trait::async_trait]
impl helpdesk_api::CloseSessions for HubSessions {
    async fn close_everywhere(&self, user: uuid::Uuid) -> helpdesk_api::ClosedSessions {
        // Gone once the server dropped its router: none left here, and no one to tell the
        // others.
        let Some(hub) = self.0.upgrade() else {
            return helpdesk_api::ClosedSessions {
                here: 0,
                elsewhere: Err("this server's WebSocket hub has stopped".into()),
            };
        };
        let closed = hub.close_connections_everywhere(&user.to_string()).await;
        match closed {
            Ok(here) => helpdesk_api::ClosedSessions {
                here,
                elsewhere: Ok(()),
            },
            Err(e) => helpdesk_api::ClosedSessions {
                here: e.closed_here,
                elsewhere: Err(e.into()),
            },
        }
    }

    async fn tell_others(&self, user: uuid::Uuid) -> Option<Result<(), cqrs_core::BoxError>> {
        let hub = self.0.upgrade()?;
        Some(
            hub.publish_revocation(&user.to_string())
                .await
                .map_err(Into::into),
        )
    }
}

/// Tells the hub who a handshake comes from (as the login throttle counts clients, behind
/// `--trusted-proxies` too), for `--ws-connections-per-address`.
async fn websocket_client_key(
    helpdesk_api::ClientAddr(ip): helpdesk_api::ClientAddr,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // An unknown address (no peer, served some other way) is not counted: it would put every
    // such client under one key.
    if ip.is_some() {
        request
            .extensions_mut()
            .insert(cqrs_realtime::ClientKey(helpdesk_api::client_key(ip)));
    }
    next.run(request).await
}

/// The hub asks the feed's rules.
struct HubRules(Arc<dyn cqrs_realtime::Authorizer<User>>);

/// Every plugin's realtime feed as one. A topic belongs to the one feed whose routing carries
/// it, and that feed's authorizer decides who may subscribe to it and see its events. A topic
/// two feeds carry belongs to neither: refused, and nothing is pushed on it (a plugin must not
/// take over another's topics, whatever the plugin order). An event is pushed as the one feed
/// that routes it says, and only onto that feed's own topics: one it puts on another feed's
/// topic is not pushed, since that feed's authorizer would judge an event it does not know (a
/// note of one plugin with a `reporter_id` of its own shown to a ticket's reporter); and an
/// event two feeds route is not pushed either, whatever the plugin order, since either feed's
/// rules could show it to someone the other's hide it from (a plugin routing every event with a
/// `ticket_id` onto topics of its own would show ticket events under its rules).
struct Feeds {
    feeds: Vec<(&'static str, RealtimeFeed)>,
    /// The mistakes already warned about (kind, plugins, event type), so each is logged once,
    /// not once per event.
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Two feeds carry a topic; the first one's channel for it.
struct SharedTopic(String);

impl Feeds {
    fn new(feeds: Vec<(&'static str, RealtimeFeed)>) -> Self {
        Self {
            feeds,
            warned: Default::default(),
        }
    }

    /// The index of the feed `topic` belongs to, and its channel.
    fn owner(&self, topic: &Topic) -> Result<Option<(usize, String)>, SharedTopic> {
        let mut owner = None;
        for (index, (_, feed)) in self.feeds.iter().enumerate() {
            if let Some(channel) = feed.routing.channel(topic) {
                if let Some((_, first)) = owner {
                    return Err(SharedTopic(first));
                }
                owner = Some((index, channel));
            }
        }
        Ok(owner)
    }
}

impl cqrs_realtime::EventRouting for Feeds {
    fn channel(&self, topic: &Topic) -> Option<String> {
        match self.owner(topic) {
            Ok(owner) => owner.map(|(_, channel)| channel),
            // Known, so that a subscribe reaches the authorizer, which says why it refuses.
            Err(SharedTopic(first)) => Some(first),
        }
    }

    fn route(&self, record: &cqrs_core::EventRecord) -> Option<cqrs_realtime::Routed> {
        let mut chosen: Option<(usize, cqrs_realtime::Routed)> = None;
        for (index, (plugin, feed)) in self.feeds.iter().enumerate() {
            let Some(routed) = feed.routing.route(record) else {
                continue;
            };
            if let Some((first, _)) = chosen {
                let plugins = [self.feeds[first].0, plugin];
                self.warn_once(format!("both {plugins:?} {}", record.event_type), || {
                    tracing::warn!(
                        ?plugins,
                        event_type = %record.event_type.escape_debug(),
                        "not pushed: two plugins' realtime feeds route events of this type; a feed must route its own plugin's events alone (logged once per type and plugins)"
                    )
                });
                return None;
            }
            chosen = Some((index, routed));
        }
        let (index, routed) = chosen?;
        for topic in routed.topics() {
            if !matches!(self.owner(topic), Ok(Some((owner, _))) if owner == index) {
                let plugin = self.feeds[index].0;
                self.warn_once(format!("foreign {plugin} {}", record.event_type), || {
                    tracing::warn!(
                        plugin,
                        event_type = %record.event_type.escape_debug(),
                        %topic,
                        "not pushed: the plugin's realtime feed put the event on a topic that is not its own alone (logged once per type and plugin)"
                    )
                });
                return None;
            }
        }
        Some(routed)
    }
}

impl Feeds {
    /// Runs `warn` the first time `mistake` (its kind, the plugins and the event type) is made;
    /// at most 1,024 are remembered, so the names a store holds cannot grow the set without
    /// end, and reaching that is logged once.
    #[cold]
    fn warn_once(&self, mistake: String, warn: impl FnOnce()) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.len() < 1024 && warned.insert(mistake) {
            warn();
        } else if warned.len() == 1024 {
            // A mark of its own (no mistake is empty), so this is logged once.
            warned.insert(String::new());
            tracing::warn!(
                "realtime feeds made 1,024 different routing mistakes: further ones are not logged"
            );
        }
    }
}

#[async_trait::async_trait]
impl cqrs_realtime::Authorizer<User> for Feeds {
    async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
        match self.owner(topic) {
            Ok(Some((index, _))) => {
                self.feeds[index]
                    .1
                    .authorizer
                    .authorize_subscribe(user, topic)
                    .await
            }
            // The hub refuses a topic no routing carries before it asks.
            Ok(None) => Err(Refusal::forbidden("no feed carries this topic")),
            Err(SharedTopic(_)) => {
                tracing::warn!(%topic, "refused: two plugins' realtime feeds carry the topic");
                Err(Refusal::forbidden(
                    "two plugins' realtime feeds carry this topic: the server serves it to no one",
                ))
            }
        }
    }

    fn may_see(&self, user: &User, topic: &Topic, event: &PushedEvent) -> bool {
        // One feed (the usual case): its topics are all it serves; no lookup per subscriber.
        if let [(_, feed)] = self.feeds.as_slice() {
            return feed.authorizer.may_see(user, topic, event);
        }
        match self.owner(topic) {
            Ok(Some((index, _))) => self.feeds[index].1.authorizer.may_see(user, topic, event),
            _ => false,
        }
    }
}

#[async_trait::async_trait]
impl cqrs_realtime::Authorizer<Session> for HubRules {
    async fn authorize_subscribe(&self, session: &Session, topic: &Topic) -> Result<(), Refusal> {
        self.0.authorize_subscribe(&session.user, topic).await
    }

    fn may_see(&self, session: &Session, topic: &Topic, event: &PushedEvent) -> bool {
        self.0.may_see(&session.user, topic, event)
    }
}

/// The `Error` schema of the JSON error contract.
fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": { "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": { "type": "string" },
                "message": { "type": "string" },
                "details": {}
            }
        } }
    })
}

fn openapi_document(
    paths: serde_json::Map<String, Value>,
    schemas: serde_json::Map<String, Value>,
) -> Value {
    let mut schemas = schemas;
    schemas.insert("Error".into(), error_schema());
    let mut paths = paths;
    for (path, summary, extra) in [
        (
            "/health",
            "Liveness",
            json!({ "200": { "description": "alive" } }),
        ),
        (
            "/ready",
            "Readiness, with each backend's status",
            json!({ "200": { "description": "ready" }, "503": { "description": "not ready: the report's `status` is `unavailable` (a critical backend is down) or `stopping` (the server is stopping); not the error shape" } }),
        ),
        (
            "/metrics",
            "Prometheus metrics",
            json!({
                "200": { "description": "Prometheus text format" },
                "401": { "description": "with `--metrics-token` set, a request without that bearer token (`unauthorized`), with WWW-Authenticate", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }
            }),
        ),
        (
            "/openapi.json",
            "This document",
            json!({ "200": { "description": "OpenAPI 3" } }),
        ),
        (
            "/ws",
            "WebSocket for realtime ticket events (token in Authorization or ?token=)",
            json!({
                "101": { "description": "switching protocols" },
                "400": { "description": "not a WebSocket handshake, or one of another WebSocket version than 13 (`websocket_upgrade_required`)" },
                "426": { "description": "a handshake on a connection that cannot be upgraded (`websocket_upgrade_required`)" },
                "401": { "description": "a missing, malformed, refused or expired token (`unauthorized`), with WWW-Authenticate" },
                "429": { "description": "this user or this client address holds as many connections as it may (`too_many_connections`)" },
                "503": { "description": "the server holds as many connections as it may (`too_many_connections`), is shutting down (`shutting_down`), or cannot check the token now (`unavailable`), with Retry-After" }
            }),
        ),
    ] {
        let mut get = json!({ "summary": summary, "tags": ["operations"], "responses": extra });
        if path == "/ws" {
            // Or the token as `?token=`, which OpenAPI's bearer scheme cannot say: the
            // parameter says it.
            get["security"] = json!([{ "bearer": [] }]);
            get["parameters"] = json!([{
                "name": "token",
                "in": "query",
                "required": false,
                "schema": { "type": "string" },
                "description": "the bearer token, for clients that cannot set a header on the handshake (browsers); one `token`, percent-encoded, or the Authorization header, not both (`unauthorized`)"
            }]);
            // The hub's refusals have the gateway's error shape, and say when to come back.
            if let Some(responses) = get["responses"].as_object_mut() {
                for (status, response) in responses.iter_mut() {
                    if status.parse::<u16>().is_ok_and(|status| status >= 400) {
                        response["content"] = json!({ "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } });
                    }
                }
            }
            get["responses"]["401"]["headers"]["WWW-Authenticate"] = json!({
                "description": "`Bearer`, with `error=\"invalid_token\"` or `error=\"invalid_request\"`",
                "schema": { "type": "string" }
            });
            get["responses"]["503"]["headers"]["Retry-After"] = json!({
                "description": helpdesk_api::RETRY_AFTER,
                "schema": { "type": "string" }
            });
        }
        paths.insert(path.into(), json!({ "get": get }));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Helpdesk",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The helpdesk example of the cqrs framework: auth and tickets plugins behind one gateway."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } }
        }
    })
}

/// How many WebSocket resumes replay at once on Postgres, with a pool of `pool` connections of
/// which the background workers and one request may hold `needed`: half of what they leave,
/// at least 1, at most the hub's default (16).
pub(crate) fn concurrent_replays(pool: u32, needed: u32) -> usize {
    (pool.saturating_sub(needed) / 2).clamp(1, 16) as usize
}

#[cfg(test)]
mod tests {
    use super::concurrent_replays;

    /// Replays and the workers together leave requests connections of the pool: the hub's
    /// default of 16 replays took a default pool of 16 whole while the workers held 9.
    #[test]
    fn replays_leave_requests_part_of_the_pool() {
        // The helpdesk alone: 9 for its workers, 1 for a request.
        assert_eq!(concurrent_replays(16, 10), 3);
        assert_eq!(concurrent_replays(100, 10), 16, "the hub's default at most");
        // Two plugins' relays to their event handlers take 2 each, and the `event-bus` one 1.
        assert_eq!(concurrent_replays(16, 15), 1);
        for needed in [10, 15] {
            for pool in needed + 2..=60 {
                let replays = concurrent_replays(pool, needed) as u32;
                assert!(needed + replays < pool, "{pool}, {needed}: {replays}");
            }
            // A pool at what the workers need leaves one replay all the same: a resume waits
            // for a connection then, as requests do.
            assert_eq!(concurrent_replays(needed, needed), 1);
        }
    }
}
