//! The hub: the handshake, and what every connection shares.

use crate::connection;
use crate::connections::Connections;
use crate::metrics::{HubStats, Metrics};
use crate::registry::Registry;
use crate::revocation::Listening;
use crate::signal::Ending;
use crate::upstream::Upstreams;
use crate::{
    Authenticator, Authorizer, ClientKey, EventRouting, HubOptions, Publisher, Unauthenticated,
};
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use cqrs_core::clock::{Clock, SystemClock};
use cqrs_core::ports::{EventStore, PubSub, TransportError};
use cqrs_core::runtime::{Shutdown, ShutdownTrigger};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::Notify;

/// A WebSocket hub: mount [`route`](Hub::route) in an axum router, and events published
/// through the [`Publisher`] (in this process or another) reach the clients subscribed to
/// their topics.
///
/// `P` is the principal the [`Authenticator`] makes of a token. Cloning is cheap: clones share
/// one hub.
///
/// Each pub/sub channel's events are pushed in the order the channel delivers them. The hub
/// remembers the positions each channel delivered last (1,024 of them) and drops a message at
/// one of those positions: a relay that ships a batch again (after a crash, or a failed
/// publish) does not make clients see its events twice. Events without a position are always
/// pushed.
///
/// A hub for tickets: a principal made of the bearer token, rules for who sees which ticket,
/// and a routing from event records to topics.
///
/// ```
/// use axum::Router;
/// use cqrs_core::EventRecord;
/// use cqrs_core::memory::{InMemoryEventStore, InMemoryPubSub};
/// use cqrs_realtime::{
///     AuthenticateFn, Authorizer, BuildError, EventRouting, Hub, HubOptions, PushedEvent,
///     Refusal, Routed, Topic, Unauthenticated,
/// };
/// use std::sync::Arc;
///
/// /// The principal: who is connected.
/// #[derive(Clone, Debug)]
/// struct User { id: String, agent: bool }
///
/// /// Tokens `agent-<id>` and `user-<id>`; a real server checks a JWT or a session here.
/// async fn authenticate(token: String) -> Result<User, Unauthenticated> {
///     if let Some(id) = token.strip_prefix("agent-") {
///         Ok(User { id: id.to_owned(), agent: true })
///     } else if let Some(id) = token.strip_prefix("user-") {
///         Ok(User { id: id.to_owned(), agent: false })
///     } else {
///         Err(Unauthenticated::new("invalid token"))
///     }
/// }
///
/// /// Anyone may follow `tickets` and sees the tickets they reported there; agents may follow
/// /// one ticket (`ticket:<id>`) and see everything.
/// struct TicketRules;
///
/// #[cqrs_realtime::async_trait]
/// impl Authorizer<User> for TicketRules {
///     async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
///         match topic.family() {
///             "tickets" => Ok(()),
///             _ if user.agent => Ok(()),
///             _ => Err(Refusal::forbidden("only agents may follow one ticket")),
///         }
///     }
///
///     fn may_see(&self, user: &User, _topic: &Topic, event: &PushedEvent) -> bool {
///         user.agent || event.routing_str("reporter_id") == Some(user.id.as_str())
///     }
/// }
///
/// /// Topics `tickets` and `ticket:<id>`, both carried on one pub/sub channel, `tickets`; the
/// /// routing field `reporter_id` is what `may_see` reads.
/// struct TicketRouting;
///
/// impl EventRouting for TicketRouting {
///     fn channel(&self, topic: &Topic) -> Option<String> {
///         matches!((topic.family(), topic.key()), ("tickets", None) | ("ticket", Some(_)))
///             .then(|| "tickets".to_owned())
///     }
///
///     fn route(&self, record: &EventRecord) -> Option<Routed> {
///         let id = record.payload["ticket_id"].as_str()?;
///         Some(
///             Routed::new(serde_json::json!({ "type": record.event_type, "ticket_id": id }))
///                 .topic(Topic::parse("tickets").ok()?)
///                 .topic(Topic::with_key("ticket", id).ok()?)
///                 .routing("reporter_id", record.payload["reporter_id"].clone()),
///         )
///     }
/// }
///
/// fn main() -> Result<(), BuildError> {
///     let hub = Hub::builder(AuthenticateFn::new(authenticate))
///         .authorizer(TicketRules)
///         .routing(TicketRouting)
///         .pubsub(Arc::new(InMemoryPubSub::new()))
///         .event_store(Arc::new(InMemoryEventStore::new()))
///         .options(HubOptions::new().max_subscriptions(8))
///         .build()?;
///     let app: Router = Router::new().route("/ws", hub.route());
///     # let _ = app;
///     Ok(())
/// }
/// ```
pub struct Hub<P> {
    pub(crate) inner: Arc<HubInner<P>>,
}

impl<P> Clone for Hub<P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// A handle on a [`Hub`] that does not keep it alive: [`upgrade`](Self::upgrade) gives the hub
/// while it lives (a [`Hub`] clone is held, the router's or the server's, or one of its
/// connections is still open or closing), and `None` after.
///
/// Hold one where a `Hub` clone would make a cycle: in a bus handler that closes connections
/// (a logout) when the hub's own [`Authorizer`](crate::Authorizer) or
/// [`Authenticator`](crate::Authenticator) reaches that bus. The cycle would keep the hub,
/// and everything it holds (its pub/sub, its event store's connection pool), alive after the
/// server stopped.
///
/// ```
/// # use cqrs_realtime::doc::{tokens, TicketRules, TicketRouting};
/// # use cqrs_core::memory::InMemoryPubSub;
/// # use std::sync::Arc;
/// use cqrs_realtime::Hub;
///
/// let hub = Hub::builder(tokens()).authorizer(TicketRules).routing(TicketRouting)
///     .pubsub(Arc::new(InMemoryPubSub::new())).build().unwrap();
/// let weak = hub.downgrade();
/// assert_eq!(weak.upgrade().map(|hub| hub.close_connections_of("user-7")), Some(0));
/// drop(hub);
/// assert!(weak.upgrade().is_none(), "gone with the last Hub");
/// ```
pub struct WeakHub<P> {
    inner: std::sync::Weak<HubInner<P>>,
}

impl<P> WeakHub<P> {
    /// The hub, unless every [`Hub`] clone was dropped.
    pub fn upgrade(&self) -> Option<Hub<P>> {
        self.inner.upgrade().map(|inner| Hub { inner })
    }
}

impl<P> Clone for WeakHub<P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<P> fmt::Debug for WeakHub<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakHub")
            .field("alive", &(self.inner.strong_count() > 0))
            .finish()
    }
}

impl<P> fmt::Debug for Hub<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("options", &self.inner.options)
            .field("stats", &self.inner.metrics.snapshot())
            .finish_non_exhaustive()
    }
}

/// What every connection of a hub shares.
pub(crate) struct HubInner<P> {
    pub(crate) options: HubOptions,
    pub(crate) authenticator: Arc<dyn Authenticator<Principal = P>>,
    pub(crate) routing: Arc<dyn EventRouting>,
    pub(crate) pubsub: Arc<dyn PubSub>,
    pub(crate) store: Option<Arc<dyn EventStore>>,
    pub(crate) registry: Arc<Registry<P>>,
    pub(crate) upstreams: Upstreams<P>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) connections: Arc<Connections>,
    /// What credential expiry is measured against.
    pub(crate) clock: Arc<dyn Clock>,
    stop: ShutdownTrigger,
    stopped: Shutdown,
    external: Option<Shutdown>,
    /// Set by the first handshake, which starts the hub's background tasks (building a hub
    /// needs no runtime).
    started: OnceLock<()>,
    next_id: AtomicU64,
    /// This hub's id in the revocations it publishes (a v7 UUID), so its listener skips them.
    id: Arc<str>,
    open: AtomicUsize,
    /// Open connections per principal key (`Authenticator::connection_key`).
    per_principal: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Open connections per client key ([`ClientKey`]).
    per_client: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Resume budgets per principal key: reconnecting does not refill one.
    resume_budgets: std::sync::Mutex<ResumeBudgets>,
    /// One permit per replay that may run at once (`max_concurrent_replays`).
    pub(crate) replays: Arc<tokio::sync::Semaphore>,
    all_closed: Notify,
    /// Where the listener for revocations from other instances stands.
    revocations: tokio::sync::watch::Sender<Listening>,
}

impl<P> Drop for HubInner<P> {
    /// The hub's own stop, so its background tasks end with it: the watch on the server's
    /// signal waits on both, and that signal may outlive the hub (one replaced at run time).
    fn drop(&mut self) {
        self.stop.trigger();
    }
}

impl<P> HubInner<P> {
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopped.is_requested() || self.external.as_ref().is_some_and(|s| s.is_requested())
    }

    /// One of the hub's `max_concurrent_replays` permits to read the store for a replay, or
    /// `None` when none came free within `operation_timeout`.
    pub(crate) async fn replay_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.replays.clone().acquire_owned();
        // `Err` from the semaphore: closed, which the hub never does.
        tokio::time::timeout(self.options.operation_timeout, permit)
            .await
            .ok()?
            .ok()
    }

    /// Refuses new handshakes and closes every connection with 1001.
    pub(crate) fn shut_down(&self) {
        self.stop.trigger();
        self.connections.close_all(Ending::SHUTDOWN);
    }

    /// The resume budget of a new connection: its principal's (by `connection_key`), shared
    /// with the principal's other connections and kept after they close until it is full
    /// again, so closing and reconnecting does not refill it; a connection of its own without
    /// a key.
    pub(crate) fn resume_budget(
        &self,
        key: Option<&str>,
    ) -> Arc<std::sync::Mutex<crate::connection::ResumeBudget>> {
        let fresh = || {
            Arc::new(std::sync::Mutex::new(
                crate::connection::ResumeBudget::per_minute(self.options.resumes_per_minute),
            ))
        };
        let Some(key) = key else {
            return fresh();
        };
        let mut budgets = self
            .resume_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let budgets = &mut *budgets;
        // Forget budgets no connection holds once they are full again; a pass over the map
        // only when it has doubled since the last, so a handshake costs O(1) on average.
        if budgets.map.len() >= budgets.next_prune {
            budgets.map.retain(|_, budget| {
                Arc::strong_count(budget) > 1
                    || !budget.lock().unwrap_or_else(|p| p.into_inner()).is_full()
            });
            budgets.next_prune = (budgets.map.len() * 2).max(64);
        }
        budgets
            .map
            .entry(key.to_owned())
            .or_insert_with(fresh)
            .clone()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Resume budgets by principal key, and when to prune them next.
#[derive(Default)]
pub(crate) struct ResumeBudgets {
    map: std::collections::HashMap<String, Arc<std::sync::Mutex<crate::connection::ResumeBudget>>>,
    next_prune: usize,
}

/// Counts a connection from its accepted handshake until its task ends (or the upgrade
/// fails, which drops the callback holding it).
pub(crate) struct ConnectionSlot<P> {
    hub: Arc<HubInner<P>>,
    /// The principal's key, counted in `per_principal`.
    pub(crate) key: Option<String>,
    /// The client's key, counted in `per_client`.
    client: Option<String>,
    /// Whether the connection holds a place in the hub (`open`).
    placed: bool,
    /// The connection's id in `connections`, where it is listed from its accepted handshake
    /// on, before its upgrade completes: a shutdown, an expiry tick or a revocation
    /// ([`Hub::close_connections_of`]) in between closes it too, through its signal.
    listed: Option<u64>,
}

/// Counts one more connection under `key` unless it holds `limit` already.
fn count_in(counts: &std::sync::Mutex<HashMap<String, usize>>, key: &str, limit: usize) -> bool {
    let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
    let open = counts.entry(key.to_owned()).or_insert(0);
    if *open >= limit {
        // A key refused before it held any connection (a limit of zero) leaves no entry.
        if *open == 0 {
            counts.remove(key);
        }
        return false;
    }
    *open += 1;
    true
}

/// Counts one connection under `key` less; a key with none left leaves the map.
fn count_out(counts: &std::sync::Mutex<HashMap<String, usize>>, key: &str) {
    let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

impl<P> Drop for ConnectionSlot<P> {
    fn drop(&mut self) {
        if let Some(id) = self.listed.take() {
            self.hub.connections.remove(id);
        }
        if let Some(key) = self.key.take() {
            count_out(&self.hub.per_principal, &key);
        }
        if let Some(client) = self.client.take() {
            count_out(&self.hub.per_client, &client);
        }
        if !self.placed {
            return;
        }
        // The place is given back before the recorder is called: a recorder that panics (a
        // bug in the metrics set-up) must not keep `closed()` from completing.
        if self.hub.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.hub.all_closed.notify_waiters();
        }
        // Maybe dropped while unwinding already: a second panic would abort.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.hub.metrics.connection_closed();
        }))
        .is_err()
        {
            tracing::error!("the metrics recorder panicked counting a closed realtime connection");
        }
    }
}

impl<P: Send + Sync + 'static> HubInner<P> {
    /// Starts the keepalive (pings, and closes of expired credentials), the listener for
    /// revocations from other instances, and the watch on the external shutdown signal, once.
    fn start(self: &Arc<Self>) {
        if self.started.set(()).is_err() {
            return;
        }
        tokio::spawn(
            crate::revocation::Listener {
                connections: Arc::downgrade(&self.connections),
                metrics: self.metrics.clone(),
                pubsub: self.pubsub.clone(),
                channel: crate::revocation::channel(&self.options.channel_prefix),
                hub: self.id.clone(),
                subscribe_timeout: self.options.operation_timeout,
                state: self.revocations.clone(),
                stopped: self.stopped.clone(),
            }
            .run(),
        );
        tokio::spawn(crate::connections::keepalive(
            Arc::downgrade(&self.connections),
            self.options.ping_interval,
            self.clock.clone(),
            self.metrics.clone(),
            self.stopped.clone(),
        ));
        if let Some(external) = self.external.clone() {
            let hub = Arc::downgrade(self);
            let stopped = self.stopped.clone();
            // Ends with the hub's own stop too: a hub stopped before the server's signal
            // (tests, a hub replaced at run time) leaves no task behind.
            tokio::spawn(async move {
                tokio::select! {
                    _ = external.requested() => {
                        if let Some(hub) = hub.upgrade() {
                            hub.shut_down();
                        }
                    }
                    _ = stopped.requested() => {}
                }
            });
        }
    }
}

impl<P: Send + Sync + 'static> Hub<P> {
    /// Starts building a hub whose handshakes `authenticator` checks.
    pub fn builder<A>(authenticator: A) -> HubBuilder<P>
    where
        A: Authenticator<Principal = P>,
    {
        HubBuilder {
            authenticator: Arc::new(authenticator),
            authorizer: None,
            routing: None,
            pubsub: None,
            store: None,
            options: HubOptions::default(),
            shutdown: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// The route to mount, at any path: `Router::new().route("/ws", hub.route())`. Answers
    /// `GET` (other methods get the router's 405); a `HEAD`, which the router takes as a `GET`
    /// without its body, is answered as a `GET` that is no handshake would be (see
    /// [`handle`](Self::handle)). A [`ClientKey`] in the request's extensions
    /// (put there by the server's middleware) counts the connection against
    /// [`max_connections_per_client`](HubOptions::max_connections_per_client).
    pub fn route<S>(&self) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let hub = self.clone();
        axum::routing::get(
            move |upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
                  headers: HeaderMap,
                  uri: Uri,
                  client: Option<axum::Extension<ClientKey>>| {
                let client = client.map(|axum::Extension(client)| client);
                let hub = hub.clone();
                async move { hub.handle_for_client(upgrade, &headers, &uri, client).await }
            },
        )
    }

    /// The handshake, for a server that writes its own handler: authenticates the bearer
    /// token (`Authorization` header, else the `token` query parameter) and upgrades.
    ///
    /// Refusals have a JSON body `{"error": {"code", "message"}}`: 503 `shutting_down` once
    /// the hub is stopping (`Retry-After: 1`: another instance may take it), then 401
    /// `unauthorized` (no, malformed or refused token, or credentials already expired, before
    /// the request is looked at as a handshake) or 503 `unavailable` with `Retry-After: 1`
    /// (credentials that cannot be checked now), 400/426 from axum's upgrade checks as
    /// `websocket_upgrade_required` (not a WebSocket handshake), 503 `too_many_connections`
    /// past `max_connections` (`Retry-After: 5`), and 429 `too_many_connections` past
    /// `max_connections_per_principal` (or, by [`handle_for_client`](Self::handle_for_client),
    /// `max_connections_per_client`); last, 401 `unauthorized` when the principal was revoked
    /// while its credentials were checked, or 503 `unavailable` (`Retry-After: 1`) when the hub
    /// can no longer tell (see [`close_connections_of`](Self::close_connections_of)).
    pub async fn handle(
        &self,
        upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
        headers: &HeaderMap,
        uri: &Uri,
    ) -> Response {
        self.handle_for_client(upgrade, headers, uri, None).await
    }

    /// [`handle`](Self::handle) for a connection from `client`: past
    /// [`max_connections_per_client`](HubOptions::max_connections_per_client) of its
    /// connections, the handshake gets 429 `too_many_connections`.
    pub async fn handle_for_client(
        &self,
        upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
        headers: &HeaderMap,
        uri: &Uri,
        client: Option<ClientKey>,
    ) -> Response {
        if let Some(refused) = self.open_for_handshakes() {
            return refused;
        }
        // Before the credentials are checked: a revocation made between the check and the
        // listing of the connection would miss it.
        self.revocations_heard().await;
        let inner = &self.inner;
        // Noted before the check too: a revocation of this principal made while it runs (the
        // credentials read before they were refused) refuses the handshake at its listing.
        let revocations_before = inner.connections.revocations();
        let token = match bearer_token(headers, uri) {
            Ok(token) => token,
            Err((challenge, message)) => {
                inner.metrics.refused("unauthorized");
                return unauthorized(message, challenge);
            }
        };
        // Bounded: a hook whose backend hangs would hold every handshake, uncounted by
        // `max_connections` (a handshake has no place yet), and past a shutdown.
        let authenticated = tokio::time::timeout(
            inner.options.operation_timeout,
            inner.authenticator.authenticate(&token),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Unauthenticated::unavailable(
                "the credentials could not be checked in time; try again",
            ))
        });
        let principal = match authenticated {
            Ok(principal) => principal,
            Err(refusal) if refusal.is_unavailable() => {
                inner.metrics.refused("unavailable");
                return retry_after(
                    error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        refusal.message(),
                    ),
                    "1",
                );
            }
            Err(refusal) => {
                inner.metrics.refused("unauthorized");
                return unauthorized(refusal.message(), Challenge::InvalidToken);
            }
        };
        self.admit(upgrade, principal, client, revocations_before)
    }

    /// The handshake of a principal the server authenticated itself (a session cookie, an
    /// auth middleware whose extension holds the user): no token is read, and the
    /// [`Authenticator`]'s `authenticate` is not asked; its
    /// [`connection_key`](Authenticator::connection_key) and
    /// [`expires_at`](Authenticator::expires_at) are, and every limit applies as for
    /// [`handle_for_client`](Self::handle_for_client), with its refusals (401 for credentials
    /// already expired, 429 and 503 past the limits, 503 once stopping).
    ///
    /// Browsers send cookies with a WebSocket handshake from any site, and the hub checks no
    /// `Origin` (a bearer token cannot be sent by another site's page): a server that
    /// authenticates by cookie must refuse handshakes whose `Origin` is not its own before it
    /// calls this, or another site's page can open a connection as its visitor
    /// (cross-site WebSocket hijacking).
    ///
    /// ```
    /// # use cqrs_realtime::doc::{tokens, TicketRules, TicketRouting, User};
    /// use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
    /// use axum::http::{HeaderMap, StatusCode};
    /// use axum::response::{IntoResponse, Response};
    /// use axum::{Extension, Router, routing::get};
    /// use cqrs_realtime::Hub;
    ///
    /// /// What the server's own session middleware put in the request.
    /// #[derive(Clone)]
    /// struct Session(User);
    ///
    /// async fn ws(
    ///     Extension(hub): Extension<Hub<User>>,
    ///     session: Option<Extension<Session>>,
    ///     headers: HeaderMap,
    ///     upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    /// ) -> Response {
    ///     // Cookies ride along from any site's page: only our own may open a connection.
    ///     if headers.get("origin").and_then(|o| o.to_str().ok()) != Some("https://helpdesk.example") {
    ///         return StatusCode::FORBIDDEN.into_response();
    ///     }
    ///     let Some(Extension(Session(user))) = session else {
    ///         return StatusCode::UNAUTHORIZED.into_response();
    ///     };
    ///     hub.handle_authenticated(upgrade, user, None).await
    /// }
    ///
    /// # fn app(hub: Hub<User>) -> Router {
    /// Router::new().route("/ws", get(ws)).layer(Extension(hub))
    /// # }
    /// ```
    pub async fn handle_authenticated(
        &self,
        upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
        principal: P,
        client: Option<ClientKey>,
    ) -> Response {
        // First: a revocation made while the listener starts is one this handshake may have
        // been let in before.
        let revocations_before = self.inner.connections.revocations();
        if let Some(refused) = self.open_for_handshakes() {
            return refused;
        }
        self.revocations_heard().await;
        self.admit(upgrade, principal, client, revocations_before)
    }

    /// Waits, while the hub's listener for revocations from other instances makes its first
    /// subscribe, until it has (so a revocation published once this handshake is admitted
    /// reaches it), or until the hub stops. That subscribe counts as failed after
    /// [`operation_timeout`](HubOptions::operation_timeout), which bounds the wait. Once it
    /// is done, whether it succeeded or not, nothing waits: a listener retrying (its pub/sub
    /// unreachable, which it logs) does not hold handshakes.
    async fn revocations_heard(&self) {
        // Every handshake asks; all but the first few find it done.
        if *self.inner.revocations.borrow() != Listening::Starting {
            return;
        }
        let mut listening = self.inner.revocations.subscribe();
        let heard = listening.wait_for(|state| *state != Listening::Starting);
        tokio::select! {
            _ = tokio::time::timeout(self.inner.options.operation_timeout, heard) => {}
            () = self.inner.stopped.requested() => {}
        }
    }

    /// Starts the hub's background tasks on its first handshake; the refusal of a handshake
    /// once it is stopping (503 `shutting_down`).
    fn open_for_handshakes(&self) -> Option<Response> {
        self.inner.start();
        if self.inner.is_stopping() {
            self.inner.metrics.refused("shutting_down");
            return Some(shutting_down());
        }
        None
    }

    /// The handshake from an authenticated principal on: its expiry, the upgrade's checks,
    /// the limits, the upgrade.
    fn admit(
        &self,
        upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
        principal: P,
        client: Option<ClientKey>,
        revocations_before: u64,
    ) -> Response {
        let inner = &self.inner;
        // Asked once; the connection is closed then. Credentials already expired would be
        // closed at the first tick: refuse them here.
        let expires_at = inner.authenticator.expires_at(&principal);
        if expires_at.is_some_and(|at| at <= inner.clock.now()) {
            inner.metrics.refused("unauthorized");
            return unauthorized("the credentials have expired", Challenge::InvalidToken);
        }
        let upgrade = match upgrade {
            Ok(upgrade) => upgrade,
            // Not the handshake's method (GET on HTTP/1.1, CONNECT on HTTP/2): a HEAD, which
            // axum routes to a GET route, or, in a handler of the server's own mounted for
            // more methods, another. No handshake, as a GET without its headers is: axum's 405
            // would need an `Allow` naming GET alone, where the route's own says `GET,HEAD`.
            Err(
                WebSocketUpgradeRejection::MethodNotGet(_)
                | WebSocketUpgradeRejection::MethodNotConnect(_),
            ) => {
                inner.metrics.refused("not_websocket");
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "websocket_upgrade_required",
                    "this method cannot open a WebSocket: send the handshake as a GET \
                     (HTTP/1.1) or an extended CONNECT (HTTP/2)",
                );
            }
            Err(rejection) => {
                inner.metrics.refused("not_websocket");
                return error_response(
                    rejection.status(),
                    "websocket_upgrade_required",
                    &rejection.body_text(),
                );
            }
        };
        // Counted before the hub-wide limit, so a principal past its own limit does not take a
        // place in the hub's.
        // From here the slot owns what it counted (and, once taken, the hub's place).
        let mut slot = ConnectionSlot {
            hub: inner.clone(),
            key: None,
            client: None,
            placed: false,
            listed: None,
        };
        if let Some(key) = inner.authenticator.connection_key(&principal) {
            let per_principal = inner.options.max_connections_per_principal;
            if !count_in(&inner.per_principal, &key, per_principal) {
                inner.metrics.refused("too_many_connections_for_principal");
                return error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections",
                    &format!(
                        "this user holds {per_principal} WebSocket connections, as many as one may; close one first"
                    ),
                );
            }
            slot.key = Some(key);
        }
        // Principals are cheap to make where accounts are (a registration each): one client
        // holding many of them is bounded here.
        if let Some(ClientKey(client)) = client {
            let per_client = inner.options.max_connections_per_client;
            if !count_in(&inner.per_client, &client, per_client) {
                drop(slot);
                inner.metrics.refused("too_many_connections_for_client");
                return error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections",
                    &format!(
                        "this client address holds {per_client} WebSocket connections, as many as one may; close one first"
                    ),
                );
            }
            slot.client = Some(client);
        }
        let max = inner.options.max_connections;
        if inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .is_err()
        {
            drop(slot);
            inner.metrics.refused("too_many_connections");
            // Not at once: every client refused here would come back together.
            return retry_after(
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too_many_connections",
                    "the server holds as many WebSocket connections as it may; try again later",
                ),
                "5",
            );
        }
        slot.placed = true;
        inner.metrics.connection_opened();
        // Checked again now that the place is taken: a shutdown that came while the
        // authenticator ran has seen no open connection, and `closed()` may have completed.
        // The fence pairs with the one in `closed()`: either that one sees this place, or this
        // check sees the shutdown (then the place is given back, waking `closed()` again).
        std::sync::atomic::fence(Ordering::SeqCst);
        if inner.is_stopping() {
            drop(slot);
            inner.metrics.refused("shutting_down");
            return shutting_down();
        }
        // Listed now, not once the upgrade completes: a revocation between the two would
        // find nothing to close. (A shutdown in between is seen by the connection's own check
        // after it starts, too.)
        let conn = Arc::new(crate::registry::Conn {
            id: inner.next_id(),
            principal,
            queue: Arc::new(crate::queue::SendQueue::new(inner.options.send_queue)),
            close: Default::default(),
            metrics: inner.metrics.clone(),
        });
        let listed = inner.connections.insert(
            conn.id,
            conn.close.clone(),
            conn.queue.clone(),
            expires_at,
            slot.key.clone(),
            revocations_before,
        );
        match listed {
            Ok(()) => slot.listed = Some(conn.id),
            Err(crate::connections::NotListed::Revoked) => {
                drop(slot);
                inner.metrics.refused("revoked");
                return unauthorized(
                    "the credentials were revoked while they were checked",
                    Challenge::InvalidToken,
                );
            }
            Err(crate::connections::NotListed::Unknown) => {
                drop(slot);
                inner.metrics.refused("unavailable");
                return retry_after(
                    error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "the handshake took too long to tell whether its credentials were \
                         revoked meanwhile; try again",
                    ),
                    "1",
                );
            }
        }
        let hub = inner.clone();
        // The connection's lines carry its id (the task axum spawns for the upgrade has no
        // span), at `error` level so a `warn` filter keeps it. Not inside the request's span,
        // which would then stay open as long as the connection (hours-long request spans in
        // a trace): linked to it, and the line below, in the request's span, says which
        // connection it opened.
        let span = tracing::error_span!(parent: None, "ws_connection", connection = conn.id);
        span.follows_from(tracing::Span::current());
        tracing::debug!(connection = conn.id, "WebSocket handshake accepted");
        let o = &inner.options;
        upgrade
            .read_buffer_size(o.read_buffer_size)
            .write_buffer_size(o.write_buffer_size)
            .max_write_buffer_size(o.max_write_buffer_size)
            .max_message_size(o.max_message_size)
            .max_frame_size(o.max_frame_size)
            .on_failed_upgrade(|error| tracing::debug!(%error, "WebSocket upgrade failed"))
            .on_upgrade(move |socket| {
                tracing::Instrument::instrument(
                    connection::run(hub, conn, socket, slot, expires_at),
                    span,
                )
            })
    }

    /// A publisher on this hub's pub/sub, routing and channel prefix.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.inner.pubsub.clone(), self.inner.routing.clone())
            .channel_prefix(&self.inner.options.channel_prefix)
    }

    /// Counters since the hub was built.
    pub fn stats(&self) -> HubStats {
        self.inner.metrics.snapshot()
    }

    /// How many topics' pub/sub channels the hub is subscribed to now, including those kept for
    /// [`upstream_linger`](HubOptions::upstream_linger) after their last subscription went.
    /// Not counted: the revocation channel every hub listens on from its first handshake on
    /// ([`close_connections_everywhere`](Self::close_connections_everywhere)).
    pub async fn upstream_channels(&self) -> usize {
        self.inner.upstreams.len().await
    }

    /// A [`WeakHub`]: a handle that does not keep this hub alive.
    pub fn downgrade(&self) -> WeakHub<P> {
        WeakHub {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Closes with code 1008 and reason `credentials revoked` every open connection of the
    /// principal whose [`connection_key`](Authenticator::connection_key) is `key`, and returns
    /// how many it closed: for a user who logged out, was locked out, or lost a role the
    /// [`Authorizer`] grants topics by (a principal is fixed at the handshake, so its
    /// connections would otherwise keep what it was granted until its credentials expire, or
    /// for ever without [`expires_at`](Authenticator::expires_at)). Principals without a key
    /// are never matched.
    ///
    /// It closes the connections listed now: every handshake past its authentication is,
    /// before its client gets the answer, so also one whose upgrade has not completed. Make
    /// the [`Authenticator`] refuse the revoked credentials first, then call this. A handshake
    /// of the principal whose authentication was still running then (it may take up to
    /// [`operation_timeout`](HubOptions::operation_timeout)), and may have read the
    /// credentials before they were refused, is refused when it ends (401, counted as
    /// `revoked` in `realtime_handshakes_refused_total`): the hub remembers the revocations of
    /// the last twice that time (at least 1 s, and at most the last 100,000), and refuses a
    /// handshake whose principal was revoked since the handshake began, as it lists it, under
    /// the lock revocations take. A handshake that began before revocations the hub has
    /// forgotten since (a burst past 100,000, or a check longer than the memory) cannot be
    /// told: 503 `unavailable`, try again. For
    /// [`handle_authenticated`](Self::handle_authenticated), the hub's part begins when it is
    /// called: a revocation made while the server's own check of the session ran is not seen,
    /// so refuse revoked sessions in that check, and call this again once such a check's time
    /// has passed if a handshake may be in flight. One pass over the open connections, under
    /// the lock their opening and closing take; nothing on the path of an event.
    ///
    /// Only this hub's connections: a principal connected to the hub of another instance
    /// keeps its connections there. [`close_connections_everywhere`](Self::close_connections_everywhere)
    /// closes them on every instance.
    ///
    /// ```
    /// # use cqrs_realtime::doc::{tokens, TicketRules, TicketRouting};
    /// # use cqrs_core::memory::InMemoryPubSub;
    /// # use std::sync::Arc;
    /// use cqrs_realtime::Hub;
    ///
    /// # let hub = Hub::builder(tokens()).authorizer(TicketRules).routing(TicketRouting)
    /// #     .pubsub(Arc::new(InMemoryPubSub::new())).build().unwrap();
    /// // Once user-7's sessions are revoked in the user store:
    /// let closed = hub.close_connections_of("user-7");
    /// assert_eq!(closed, 0, "none open in this example");
    /// ```
    pub fn close_connections_of(&self, key: &str) -> usize {
        let closed = self.inner.connections.close_keyed(key, Ending::REVOKED);
        if closed > 0 {
            self.inner.metrics.revoked(closed as u64, false);
            tracing::debug!(connections = closed, "closed a principal's connections");
        }
        closed
    }

    /// [`close_connections_of`](Self::close_connections_of) on every hub that shares this
    /// one's pub/sub and [`channel_prefix`](HubOptions::channel_prefix): closes `key`'s
    /// connections here, then publishes the revocation on the prefix's channel for them,
    /// which every hub listens on (from its first handshake on). Returns how many connections
    /// it closed here; the other instances close theirs as the message reaches them.
    ///
    /// An `Err` is the publish failing (the pub/sub unreachable): this hub's connections are
    /// closed all the same ([`RevocationError::closed_here`] says how many), the others' are
    /// not. Call it again: closing is idempotent.
    ///
    /// Pub/sub is at-most-once: an instance cut off from Redis when the revocation was
    /// published misses it (and logs that it could not subscribe, or that it missed
    /// messages), and keeps that principal's connections until their credentials expire. Give
    /// credentials a lifetime ([`Authenticator::expires_at`]) that bounds how long that may
    /// be, and refuse the revoked credentials in the [`Authenticator`] first, as for
    /// `close_connections_of`.
    ///
    /// ```
    /// # use cqrs_realtime::doc::{tokens, TicketRules, TicketRouting};
    /// # use cqrs_core::memory::InMemoryPubSub;
    /// # use std::sync::Arc;
    /// use cqrs_realtime::Hub;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), cqrs_realtime::RevocationError> {
    /// // Two instances' hubs on one pub/sub (Redis's `RedisPubSub` across processes).
    /// let pubsub = Arc::new(InMemoryPubSub::new());
    /// let hub = |pubsub: Arc<InMemoryPubSub>| {
    ///     Hub::builder(tokens()).authorizer(TicketRules).routing(TicketRouting)
    ///         .pubsub(pubsub).build().unwrap()
    /// };
    /// let (here, _there) = (hub(pubsub.clone()), hub(pubsub));
    /// // Once user-7's sessions are revoked in the user store:
    /// let closed_here = here.close_connections_everywhere("user-7").await?;
    /// assert_eq!(closed_here, 0, "none open in this example");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn close_connections_everywhere(&self, key: &str) -> Result<usize, RevocationError> {
        let closed = self.close_connections_of(key);
        match self.publish_revocation(key).await {
            Ok(()) => Ok(closed),
            Err(e) => Err(RevocationError {
                closed_here: closed,
                ..e
            }),
        }
    }

    /// The other half of [`close_connections_everywhere`](Self::close_connections_everywhere):
    /// publishes the revocation of `key`'s connections for the other hubs, without closing
    /// this hub's. For trying again after that call failed to publish: this hub's connections
    /// were closed then, and any the principal opened since (with new credentials) stay open
    /// here. The other hubs close every connection of `key` they hold when it reaches them,
    /// new ones too.
    pub async fn publish_revocation(&self, key: &str) -> Result<(), RevocationError> {
        let channel = crate::revocation::channel(&self.inner.options.channel_prefix);
        self.inner
            .pubsub
            .publish(&channel, crate::revocation::message(key, &self.inner.id))
            .await
            .map_err(|source| RevocationError {
                closed_here: 0,
                channel,
                source,
            })
    }

    /// Closes every connection with code 1001 and refuses new handshakes with 503. The
    /// [`Shutdown`] given to [`HubBuilder::shutdown_on`] does the same.
    pub fn shutdown(&self) {
        self.inner.shut_down();
    }

    /// Completes once no connection is open (immediately when none is). After
    /// [`shutdown`](Self::shutdown), wait on this (with a deadline) so clients get their
    /// close frames before the process exits; once the hub is stopping, it also ends the
    /// upstream subscriptions kept for [`upstream_linger`](HubOptions::upstream_linger), and
    /// waits until every channel's upstream subscription is gone (those the closing
    /// connections released too), so none is left behind. Any number of callers wait alike.
    pub async fn closed(&self) {
        self.connections_closed().await;
        if self.inner.is_stopping() {
            self.inner.upstreams.end_lingering().await;
            if self.inner.started.get().is_some() {
                // The revocation listener's subscription too: it ends once the hub's own stop
                // (which a stopping hub triggers) reaches it.
                let mut listening = self.inner.revocations.subscribe();
                // The sender lives in the hub: this wait ends with the listener's `Stopped`.
                let _ = listening
                    .wait_for(|state| *state == Listening::Stopped)
                    .await;
            }
        }
    }

    async fn connections_closed(&self) {
        loop {
            let notified = self.inner.all_closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Pairs with the handshake's fence: a handshake that took a place after the
            // shutdown either is seen here, or sees the shutdown and gives the place back.
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.inner.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Builds a [`Hub`]: [`Hub::builder`] with an [`Authenticator`], then an
/// [`authorizer`](Self::authorizer), a [`routing`](Self::routing) and a
/// [`pubsub`](Self::pubsub), which are required, and whichever of the other settings apply.
/// [`build`](Self::build) lists every problem at once. The [`Hub`] example builds one
/// completely, with its authenticate function, authorizer and routing.
pub struct HubBuilder<P> {
    authenticator: Arc<dyn Authenticator<Principal = P>>,
    authorizer: Option<Arc<dyn Authorizer<P>>>,
    routing: Option<Arc<dyn EventRouting>>,
    pubsub: Option<Arc<dyn PubSub>>,
    store: Option<Arc<dyn EventStore>>,
    options: HubOptions,
    shutdown: Option<Shutdown>,
    clock: Arc<dyn Clock>,
}

impl<P> fmt::Debug for HubBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubBuilder")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// [`Hub::close_connections_everywhere`] closed this hub's connections of the principal, but
/// could not publish the revocation for the other instances.
#[derive(Debug, thiserror::Error)]
#[error(
    "closed {closed_here} connection(s) of the principal here, but could not publish the revocation on `{channel}` for the other instances: {source}; call it again (closing is idempotent)"
)]
#[non_exhaustive]
pub struct RevocationError {
    /// How many connections it closed on this hub.
    pub closed_here: usize,
    /// The pub/sub channel it published on.
    pub channel: String,
    /// The pub/sub's error.
    #[source]
    pub source: TransportError,
}

/// The hub could not be built; every problem is listed.
#[derive(Debug, thiserror::Error)]
#[error("invalid realtime hub configuration: {}", problems.join("; "))]
#[non_exhaustive]
pub struct BuildError {
    /// What is wrong, one item a problem.
    pub problems: Vec<String>,
}

impl<P: Send + Sync + 'static> HubBuilder<P> {
    /// Who may subscribe to what and see which event. Required; [`AllowAll`](crate::AllowAll)
    /// for public feeds.
    pub fn authorizer(mut self, authorizer: impl Authorizer<P>) -> Self {
        self.authorizer = Some(Arc::new(authorizer));
        self
    }

    /// The authorizer, shared with other code (a plugin that contributes it, for instance).
    pub fn authorizer_arc(mut self, authorizer: Arc<dyn Authorizer<P>>) -> Self {
        self.authorizer = Some(authorizer);
        self
    }

    /// The topics served and how events map to them. Required.
    pub fn routing(mut self, routing: impl EventRouting) -> Self {
        self.routing = Some(Arc::new(routing));
        self
    }

    /// The routing, shared with a [`Publisher`] built elsewhere.
    pub fn routing_arc(mut self, routing: Arc<dyn EventRouting>) -> Self {
        self.routing = Some(routing);
        self
    }

    /// Where events arrive from. Required: an
    /// [`InMemoryPubSub`](cqrs_core::memory::InMemoryPubSub) for one process, a Redis one
    /// across instances.
    pub fn pubsub(mut self, pubsub: Arc<dyn PubSub>) -> Self {
        self.pubsub = Some(pubsub);
        self
    }

    /// The durable log that `since` replays from. Optional: without it, `since` gets
    /// `resume_unavailable`.
    pub fn event_store(mut self, store: Arc<dyn EventStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Limits, buffers and intervals; [`HubOptions::default`] when not set.
    pub fn options(mut self, options: HubOptions) -> Self {
        self.options = options;
        self
    }

    /// Shuts the hub down (as [`Hub::shutdown`]) when `shutdown` is requested: pass the
    /// runtime's [`shutdown_signal`](cqrs_core::runtime::Runtime::shutdown_signal).
    pub fn shutdown_on(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// The clock that [`Authenticator::expires_at`] is compared with, at each keepalive tick
    /// and each `subscribe`. Default [`SystemClock`]; tests pass a
    /// [`ManualClock`](cqrs_core::clock::ManualClock) to expire credentials without waiting.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The hub, or every problem with its configuration.
    pub fn build(self) -> Result<Hub<P>, BuildError> {
        let mut problems = self.options.problems();
        if self.authorizer.is_none() {
            problems.push(
                "an authorizer is required: call `.authorizer(..)` (AllowAll for public feeds)"
                    .to_owned(),
            );
        }
        if self.routing.is_none() {
            problems.push("an event routing is required: call `.routing(..)`".to_owned());
        }
        if self.pubsub.is_none() {
            problems.push("a pub/sub is required: call `.pubsub(..)` (an InMemoryPubSub in one process, RedisPubSub across instances)".to_owned());
        }
        let (Some(authorizer), Some(routing), Some(pubsub), true) = (
            self.authorizer,
            self.routing,
            self.pubsub,
            problems.is_empty(),
        ) else {
            return Err(BuildError { problems });
        };
        let metrics = Arc::new(Metrics::new());
        // What the write buffer takes besides the buffered bytes, less a frame header, and less
        // room for a control frame tungstenite may have left in it (its automatic pong to a
        // client's ping, when the socket was full: 2 + 125 bytes at most), which would make an
        // event frame at the limit fail to buffer and drop the connection without a close.
        // Longer than a handshake's credentials check may take (`operation_timeout`).
        let remember_revocations = self
            .options
            .operation_timeout
            .saturating_mul(2)
            .max(std::time::Duration::from_secs(1));
        let max_event_frame = (self.options.max_write_buffer_size - self.options.write_buffer_size)
            .saturating_sub(14 + 2 + 125);
        let registry = Arc::new(Registry::new(authorizer, max_event_frame));
        let (stop, stopped) = Shutdown::new();
        let upstreams = Upstreams::new(
            pubsub.clone(),
            self.options.channel_prefix.clone(),
            registry.clone(),
            metrics.clone(),
            self.options.upstream_linger,
            self.options.max_lingering_channels,
            stopped.clone(),
        );
        // Past tokio's most permits, the limit is as good as none.
        let replays =
            (self.options.max_concurrent_replays).min(tokio::sync::Semaphore::MAX_PERMITS);
        let replays = Arc::new(tokio::sync::Semaphore::new(replays));
        Ok(Hub {
            inner: Arc::new(HubInner {
                options: self.options,
                authenticator: self.authenticator,
                routing,
                pubsub,
                store: self.store,
                registry,
                upstreams,
                metrics,
                connections: Arc::new(Connections::new(remember_revocations)),
                clock: self.clock,
                stop,
                stopped,
                external: self.shutdown,
                started: OnceLock::new(),
                next_id: AtomicU64::new(1),
                id: Arc::from(uuid::Uuid::now_v7().to_string()),
                open: AtomicUsize::new(0),
                per_principal: std::sync::Mutex::default(),
                per_client: std::sync::Mutex::default(),
                resume_budgets: std::sync::Mutex::default(),
                replays,
                all_closed: Notify::new(),
                revocations: tokio::sync::watch::Sender::new(Listening::Starting),
            }),
        })
    }
}

#[derive(Deserialize)]
struct TokenParam {
    token: Option<String>,
}

/// The bearer token of a handshake: the `Authorization` header when present (a malformed one
/// is refused, not skipped, and so are two: a proxy in front that reads the other would take
/// the connection for someone else's; and so is one beside a `token` query parameter, for the
/// same reason, as RFC 6750 allows one way per request), else the `token` query parameter. A
/// refusal comes with its challenge: bare when no token was sent, `invalid_request` for one in
/// the wrong shape.
fn bearer_token(headers: &HeaderMap, uri: &Uri) -> Result<String, (Challenge, &'static str)> {
    let malformed = |message| (Challenge::InvalidRequest, message);
    let mut authorizations = headers.get_all(header::AUTHORIZATION).iter();
    if let Some(value) = authorizations.next() {
        if authorizations.next().is_some() {
            return Err(malformed("send one Authorization header, not several"));
        }
        // A query that does not parse holds `token` twice: a token there too.
        if !matches!(
            axum::extract::Query::<TokenParam>::try_from_uri(uri),
            Ok(axum::extract::Query(TokenParam { token: None }))
        ) {
            return Err(malformed(
                "send the token in the Authorization header or the `token` query parameter, not both",
            ));
        }
        let value = value
            .to_str()
            .map_err(|_| malformed("the Authorization header is not valid text"))?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(malformed(
            "the Authorization header must be `Bearer <token>`",
        ))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(malformed(
                "the Authorization header must be `Bearer <token>`",
            ));
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(malformed("the bearer token is empty"));
        }
        return Ok(token.to_owned());
    }
    // A query that does not parse holds a token in a wrong shape (`?token=a&token=b`): say
    // so, instead of that no token was sent.
    let from_query = axum::extract::Query::<TokenParam>::try_from_uri(uri)
        .map_err(|_| malformed("send one `token` query parameter, percent-encoded"))?
        .0
        .token;
    match from_query {
        Some(token) if !token.trim().is_empty() => Ok(token.trim().to_owned()),
        Some(_) => Err(malformed("the token query parameter is empty")),
        None => Err((
            Challenge::Bare,
            "a bearer token is required: send `Authorization: Bearer <token>` or `?token=<token>`",
        )),
    }
}

/// The `WWW-Authenticate` challenge of a 401 (RFC 6750, section 3.1).
#[derive(Clone, Copy)]
enum Challenge {
    /// No token was sent.
    Bare,
    /// A token was sent in the wrong shape (not `Bearer`, empty).
    InvalidRequest,
    /// A token was sent and refused, or has expired.
    InvalidToken,
}

/// 401 with its `WWW-Authenticate: Bearer` challenge (RFC 6750).
fn unauthorized(message: &str, challenge: Challenge) -> Response {
    let mut response = error_response(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let challenge = HeaderValue::from_static(match challenge {
        Challenge::Bare => "Bearer",
        Challenge::InvalidRequest => "Bearer error=\"invalid_request\"",
        Challenge::InvalidToken => "Bearer error=\"invalid_token\"",
    });
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge);
    response
}

/// 503 `shutting_down`, with `Retry-After: 1`: another instance may take the client.
fn shutting_down() -> Response {
    retry_after(
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ),
        "1",
    )
}

/// `response` with `Retry-After: seconds`.
fn retry_after(mut response: Response, seconds: &'static str) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
    response
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}
