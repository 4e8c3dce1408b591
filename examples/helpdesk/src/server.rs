//! Serving: bind, build, listen, serve with graceful shutdown, stop the workers.

use crate::{Config, Hooks, build};
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::ServiceExt;

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: watch::Sender<u32>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Builds the app and serves it on `config.bind` (port 0 picks a free port).
    pub async fn start(config: Config, hooks: Hooks) -> anyhow::Result<Self> {
        crate::app::validated(&config)?;
        let taken = |e: std::io::Error| {
            anyhow::anyhow!(
                "cannot listen on {}: {e} (set --bind / HELPDESK_BIND to another address)",
                config.bind
            )
        };
        // The port before anything else: when it is taken, nothing has connected, migrated or
        // started a worker only to be killed mid-run. Bound, not listened on: until the app is
        // built, a client (a health probe, a load balancer) is refused at once and goes
        // elsewhere, instead of waiting in the backlog of a server that does not answer yet.
        let socket = bound(config.bind).map_err(taken)?;
        let addr = socket.local_addr()?;
        // The address bound (a port of 0 got one), for what the app records of itself.
        let config = Config {
            bind: addr,
            ..config
        };
        let app = build(&config, hooks).await?;
        let listener = match socket.listen(BACKLOG) {
            Ok(listener) => listener,
            // Another process bound the port too meanwhile (SO_REUSEADDR lets two bind it as
            // long as neither listens) and listened first.
            Err(e) => {
                stop_runtime(app.runtime, config.shutdown_grace()).await;
                return Err(taken(e));
            }
        };
        // How many stops were asked for: the first begins the stop, a second cuts its delay.
        let (stop, stopped) = watch::channel(0_u32);
        let runtime = app.runtime.clone();
        let hub = app.hub.clone();
        let closing = app.hub.clone();
        let stopping = app.stopping.clone();
        let delay = config.shutdown_delay();
        let grace = config.shutdown_grace();
        let header_timeout = config.header_timeout();
        let max_connections = connection_limit(&config);
        let share = share_of(max_connections);
        if config.http_connections_per_address > share {
            tracing::info!(
                http_connections_per_address = config.http_connections_per_address,
                max_connections,
                share,
                "one client address holds at most {share} connections: all but a tenth of \
                 max_connections, kept for everyone else (HELPDESK_HTTP_CONNECTIONS_PER_ADDRESS \
                 is more)"
            );
        }
        let per_address = PerAddress::new(
            connections_per_address(&config, max_connections),
            share,
            config.trusted_proxies.iter().copied(),
        );
        let router = app.router;
        let task = tokio::spawn(async move {
            let mut stop_seen = stopped;
            // Serving stops at `close`: at the stop, or once its delay is over.
            let (close, closing_signal) = watch::channel(false);
            let connections = serve(
                listener,
                router,
                closing_signal,
                stopping.clone(),
                header_timeout,
                max_connections,
                per_address,
            );
            let mut serve = tokio::spawn(connections);
            // Biased, the stop first: when both were ready, an unbiased pick sometimes took
            // the other branch, and WebSockets got no 1001 at a stop.
            let (deadline, served) = tokio::select! {
                biased;
                _ = async { let _ = stop_seen.wait_for(|n| *n >= 1).await; } => {
                    // Told unready first; serving on meanwhile, for the delay (see the
                    // setting), while load balancers move new requests elsewhere.
                    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
                    let mut served_early = None;
                    if !delay.is_zero() {
                        tracing::info!(?delay, "stopping: /ready answers 503; serving on until the delay is over");
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            // A second stop (or the handle gone) cuts the delay short.
                            _ = stop_seen.wait_for(|n| *n >= 2) => {
                                tracing::info!("stopping now, before the delay is over");
                            }
                            // Serving ended by itself (a panic): nothing left to wait for.
                            served = &mut serve => served_early = Some(served),
                        }
                    }
                    let _ = close.send(true);
                    // One deadline for the whole stop, as the setting promises: requests,
                    // WebSocket close frames and workers share the grace period, not one each.
                    let deadline = deadline_after(grace);
                    // WebSockets are not in-flight requests: close them now, with 1001.
                    hub.shutdown();
                    // In-flight requests get until the workers' share is all that is left,
                    // then are cut off.
                    if let Some(served) = served_early {
                        (deadline, served)
                    } else {
                        match tokio::time::timeout_at(requests_by(deadline, grace), &mut serve).await {
                            Ok(served) => (deadline, served),
                            Err(_) => {
                                tracing::warn!(?grace, "in-flight requests did not finish in time; closing them");
                                serve.abort();
                                (deadline, Ok(Ok(())))
                            }
                        }
                    }
                }
                // Serving ended on its own (it only does by panicking): its error is returned
                // once the WebSockets and the workers are stopped as gracefully as on a stop,
                // not by dropping the runtime, which would cut the relay and the consumers off
                // mid-batch.
                served = &mut serve => {
                    hub.shutdown();
                    (deadline_after(grace), served)
                }
            };
            // The WebSockets' close frames (1001) go out before the process may exit, also
            // within what the workers' share leaves.
            if tokio::time::timeout_at(requests_by(deadline, grace), closing.closed())
                .await
                .is_err()
            {
                tracing::warn!(?grace, "WebSocket connections did not close in time");
            }
            stop_runtime(runtime, deadline.saturating_duration_since(Instant::now())).await;
            served??;
            Ok(())
        });
        tracing::info!(%addr, "helpdesk listening");
        Ok(Self { addr, stop, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops: `/ready` answers 503 at once and requests are still served for the shutdown
    /// delay (none by default); then it stops accepting, lets in-flight requests finish and
    /// stops the workers, all within the grace period, past which what still runs is cut off.
    /// Called after a [`stopper`](Self::stopper) began a stop, it cuts that stop's delay short.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop
            .send_modify(|asked| *asked = asked.saturating_add(1));
        self.task.await?
    }

    /// Waits until the server stops by itself (it does not, short of an error).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }

    /// A handle that triggers shutdown, as [`shutdown`](Self::shutdown) does without waiting
    /// for it; called again, it cuts the shutdown delay short.
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let stop = self.stop.clone();
        move || stop.send_modify(|asked| *asked = asked.saturating_add(1))
    }
}

/// What a server keeps of its open-file limit for itself, besides the database pool (on
/// Postgres): Redis, the listener, logs and files it opens.
const RESERVED_FILES: u64 = 256;

/// The most connections served at once: `HELPDESK_MAX_CONNECTIONS`, or the open-file limit
/// (raised to its hard limit first) less what the server keeps for itself; logged.
fn connection_limit(config: &Config) -> usize {
    let (files, limit) = files_and_limit(config, true);
    if config.max_connections.is_some() && limit.saturating_add(kept_files(config)) > files {
        tracing::warn!(
            open_files = files,
            max_connections = limit,
            "HELPDESK_MAX_CONNECTIONS is more than the open-file limit leaves for clients \
             ({} of {files}, the rest kept for the server's own files and its Postgres pool): \
             once the files run out, accepting fails, and so do new Postgres and Redis \
             connections; lower it, or raise the limit (ulimit -n)",
            files.saturating_sub(kept_files(config))
        );
    }
    tracing::info!(
        open_files = files,
        max_connections = limit,
        "serving at most max_connections client connections at once (HELPDESK_MAX_CONNECTIONS)"
    );
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// [`connection_limit`], without a word: for the realtime hub's share of it.
pub(crate) fn client_connections(config: &Config) -> usize {
    usize::try_from(files_and_limit(config, false).1).unwrap_or(usize::MAX)
}

/// The most connections one client address (a trusted proxy's aside) holds, and the most
/// WebSockets held altogether, under a limit of `limit` connections: all but a tenth of it
/// (at least one), kept for everyone else, so a health probe or another client finds a place
/// however many one address, or the WebSockets together, hold (several addresses together
/// may still take them all). At least one.
pub(crate) fn share_of(limit: usize) -> usize {
    limit.saturating_sub((limit / 10).max(1)).max(1)
}

/// The most connections one client address (a trusted proxy's aside) holds under a limit of
/// `limit` connections: `--http-connections-per-address`, at most [`share_of`] the limit.
pub(crate) fn connections_per_address(config: &Config, limit: usize) -> usize {
    config.http_connections_per_address.min(share_of(limit))
}

/// The files the server keeps for itself: its own, and the Postgres pool's on Postgres.
fn kept_files(config: &Config) -> u64 {
    // The pool's connections only on Postgres: in memory the setting is unused (and
    // unchecked), and must not shrink the clients' share.
    let pool = config
        .database_url
        .as_ref()
        .map_or(0, |_| u64::from(config.database_max_connections));
    RESERVED_FILES + pool
}

/// The open-file limit (raised to its hard limit) and the connection limit under it.
fn files_and_limit(config: &Config, warn: bool) -> (u64, u64) {
    let files = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(files) => files,
        Err(error) => {
            if warn {
                tracing::warn!(%error, "cannot read the open-file limit; assuming 1024");
            }
            1024
        }
    };
    let limit = match config.max_connections {
        Some(limit) => u64::from(limit),
        None => files.saturating_sub(kept_files(config)).max(16),
    };
    (files, limit)
}

/// Counts a recurring failure and says when to log it: the first time, then at most once a
/// minute, with how many there were since the last line.
#[derive(Default)]
struct EveryMinute {
    since_logged: u64,
    logged_at: Option<Instant>,
}

impl EveryMinute {
    /// Counts one at `now`; the count to log when a line is due.
    fn due(&mut self, now: Instant) -> Option<u64> {
        self.since_logged += 1;
        if self
            .logged_at
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(60))
        {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.since_logged))
    }
}

/// Accepts connections until `stopped`, at most `max_connections` open at once (the others
/// wait in the backlog), serving each with HTTP/1.1 (upgrades included, for WebSockets) and a
/// header-read timeout; then asks every open connection to finish its in-flight request and
/// close, and returns once they all have.
async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stopped: watch::Receiver<bool>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    header_timeout: Duration,
    max_connections: usize,
    per_address: PerAddress,
) -> anyhow::Result<()> {
    let mut connections = tokio::task::JoinSet::new();
    let mut refused = EveryMinute::default();
    let mut accept_failures = EveryMinute::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(
        max_connections.min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let mut full_since: Option<Instant> = None;
    loop {
        // A slot before the accept: at the limit, new clients wait in the backlog (and time
        // out there, or fail over) instead of taking the file descriptors the pool needs.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_since.is_none() {
                    tracing::warn!(
                        max_connections,
                        "at the connection limit: new connections wait until one closes"
                    );
                    full_since = Some(Instant::now());
                }
                tokio::select! {
                    () = async { let _ = stopped.wait_for(|s| *s).await; } => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                }
            }
        };
        if let Some(since) = full_since.take() {
            tracing::info!(waited = ?since.elapsed(), "below the connection limit again");
        }
        let (tcp, remote) = tokio::select! {
            () = async { let _ = stopped.wait_for(|s| *s).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait a moment rather than spin, and log
                    // once a minute rather than 20 lines a second while it lasts.
                    metrics::counter!("http_accept_errors_total").increment(1);
                    if let Some(failed) = accept_failures.due(Instant::now()) {
                        tracing::warn!(
                            %error,
                            failed,
                            "could not accept connections (out of file descriptors?); \
                             counted in http_accept_errors_total, logged at most once a minute"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Closed at once past the address's share (its slot freed with it): a client that
        // holds connections open must not take the others' places.
        let Some(held) = per_address.take(remote.ip()) else {
            metrics::counter!("http_connections_refused_total", "reason" => "per_address")
                .increment(1);
            if let Some(refused) = refused.due(Instant::now()) {
                tracing::warn!(
                    client = %helpdesk_api::client_key(Some(remote.ip())),
                    refused,
                    limit = per_address.limit,
                    "closed connections of a client address past its share \
                     (HELPDESK_HTTP_CONNECTIONS_PER_ADDRESS); logged at most once a minute"
                );
            }
            continue;
        };
        // Small frames (WebSocket events, JSON answers) go out at once instead of waiting
        // for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        // The client's address, for the login throttle, as `into_make_service_with_connect_info`
        // would give it.
        let stopping = stopping.clone();
        let service = router
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(remote));
                request
            })
            // During the shutdown delay, each answer closes its connection: a client on a
            // kept-alive one (a proxy's pool) connects again, and the load balancer sends it
            // elsewhere, instead of sending its next request here until the listener closes.
            // Not an upgrade's 101, which the connection lives on.
            .map_response(move |mut response: axum::response::Response| {
                if stopping.load(std::sync::atomic::Ordering::Relaxed)
                    && response.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS
                {
                    response.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                response
            });
        let mut stop = stopped.clone();
        connections.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let connection = http
                .serve_connection(
                    // The connection's place is held by its socket: through an upgrade too.
                    // The address's count goes down when the socket closes, upgraded or not
                    // (hyper's connection future ends at an upgrade; the socket lives on).
                    TokioIo::new(crate::stalled::StalledWrites::new(
                        tcp,
                        header_timeout,
                        slot,
                        held,
                    )),
                    TowerToHyperService::new(service),
                )
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, %remote, "connection ended with an error");
            }
        });
        // Reap finished connections as we go, so the set holds only open ones.
        while connections.try_join_next().is_some() {}
    }
    // Closed now, not once the open connections are done: new clients are refused at once
    // (and fail over) instead of waiting in the backlog of a server that will not answer.
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// The connections each client address holds open, against a limit (trusted proxies have
/// none: every client behind one shares its address).
#[derive(Clone)]
struct PerAddress {
    limit: usize,
    /// What the /64s of one IPv6 /48 hold together: [`SITE_SHARE_FACTOR`] times `limit`, at
    /// most the share one party may hold of the whole.
    site_limit: usize,
    unlimited: helpdesk_api::TrustedProxies,
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// One connection counted against its address (and, for IPv6, its /48), until dropped.
pub(crate) struct AddressHeld {
    keys: Vec<String>,
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// How many times an address's share of connections one IPv6 site (a /48) may hold across
/// all its /64s, as the login throttles count a site: a party given a /48 (a provider's
/// customer, a tunnel broker's user, for free) would otherwise hold 65,536 addresses' shares.
const SITE_SHARE_FACTOR: usize = 4;

impl PerAddress {
    fn new(
        limit: usize,
        share: usize,
        unlimited: impl IntoIterator<Item = helpdesk_api::AddressRange>,
    ) -> Self {
        Self {
            limit,
            site_limit: limit
                .saturating_mul(SITE_SHARE_FACTOR)
                .min(share)
                .max(limit),
            // Compared as the XFF check compares them (an IPv4 proxy reaching a dual-stack
            // listener shows as `::ffff:a.b.c.d`, and matches as its IPv4 form).
            unlimited: helpdesk_api::TrustedProxies::new(unlimited),
            open: Arc::default(),
        }
    }

    /// A place for a connection from `ip`, or `None` when its address holds its share.
    /// `Some(None)`: an unlimited address, not counted.
    fn take(&self, ip: std::net::IpAddr) -> Option<Option<AddressHeld>> {
        if self.unlimited.trusts(ip) {
            return Some(None);
        }
        let mut keys = vec![(helpdesk_api::client_key(Some(ip)), self.limit)];
        if let Some(site) = helpdesk_api::site_key(Some(ip)) {
            keys.push((site, self.site_limit));
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if keys
            .iter()
            .any(|(key, limit)| open.get(key).is_some_and(|count| count >= limit))
        {
            return None;
        }
        for (key, _) in &keys {
            *open.entry(key.clone()).or_insert(0) += 1;
        }
        Some(Some(AddressHeld {
            keys: keys.into_iter().map(|(key, _)| key).collect(),
            open: self.open.clone(),
        }))
    }
}

impl Drop for AddressHeld {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(count) = open.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    open.remove(key);
                }
            }
        }
    }
}

/// `grace` from now; a grace too long for the clock is as good as forever (30 years).
fn deadline_after(grace: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(grace)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600))
}

/// The listen backlog: connections the kernel holds until they are accepted.
const BACKLOG: u32 = 1024;

/// A socket bound to `addr` (a port of 0 gets a free one), not listening yet. Bound as
/// `TcpListener::bind` binds: with `SO_REUSEADDR` (on Unix), so a restart is not refused while
/// the old process's closed connections linger in `TIME_WAIT`.
fn bound(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// The workers' share of the grace period: a quarter, at most 2 s.
pub(crate) fn workers_share(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(2))
}

/// When in-flight requests and WebSocket close frames must be done: the workers' share before
/// the deadline, so that the workers are asked to stop and get time to (a Redis consumer
/// releasing its messages, the relay finishing a publish), rather than being aborted with
/// nothing left, however slow a request.
fn requests_by(deadline: Instant, grace: Duration) -> Instant {
    deadline
        .checked_sub(workers_share(grace))
        .unwrap_or(deadline)
}

/// Stops the workers, giving them what is left of the grace period.
async fn stop_runtime(runtime: Arc<cqrs_core::runtime::Runtime>, left: Duration) {
    if let Err(e) = runtime.shutdown(left).await {
        tracing::warn!(error = %e, "workers did not stop in time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure that recurs is logged the first time, then once a minute with the count since
    /// the last line (accept failing out of file descriptors came 20 times a second).
    #[test]
    fn a_recurring_failure_is_logged_once_a_minute_with_its_count() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut failures = EveryMinute::default();
        assert_eq!(failures.due(at(0)), Some(1), "the first is logged");
        let quiet: Vec<_> = (1..1200).filter_map(|n| failures.due(at(n * 50))).collect();
        assert!(quiet.is_empty(), "then nothing for a minute: {quiet:?}");
        assert_eq!(failures.due(at(60_000)), Some(1200), "then the count since");
        assert_eq!(failures.due(at(60_050)), None);
    }

    /// An IPv6 /64 holds the address's share; the /64s of one /48 hold four shares together,
    /// and a closed connection gives its place back to both. IPv4 addresses have no site.
    #[test]
    fn the_64s_of_one_48_hold_four_shares_together() {
        let per_address = PerAddress::new(2, 1000, []);
        let in_site =
            |n: u16| std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, n, 0, 0, 0, 1));
        let mut held = Vec::new();
        for n in 0..4 {
            for _ in 0..2 {
                held.push(
                    per_address
                        .take(in_site(n))
                        .expect("within the shares")
                        .expect("counted"),
                );
            }
            assert!(
                per_address.take(in_site(n)).is_none(),
                "the /64's share is 2"
            );
        }
        assert!(
            per_address.take(in_site(4)).is_none(),
            "the /48's four shares are taken"
        );
        let elsewhere =
            std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1));
        assert!(per_address.take(elsewhere).is_some(), "another /48");
        held.pop();
        assert!(
            per_address.take(in_site(4)).is_some(),
            "a place given back to the /48"
        );
        for n in 0..20u8 {
            let v4 = std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, n));
            held.push(
                per_address
                    .take(v4)
                    .expect("IPv4 addresses have no site")
                    .expect("counted"),
            );
        }
        // The /48's shares are at most the share one party may hold of the whole.
        let capped = PerAddress::new(2, 5, []);
        let mut kept = Vec::new();
        for n in 0..5 {
            kept.push(
                capped
                    .take(in_site(n))
                    .expect("within the share")
                    .expect("counted"),
            );
        }
        assert!(
            capped.take(in_site(5)).is_none(),
            "the share of the whole is 5"
        );
    }

    /// One address, or the WebSockets together, hold all but a tenth of the limit, at least
    /// one connection each way.
    #[test]
    fn a_tenth_of_the_connections_is_kept_for_everyone_else() {
        assert_eq!(share_of(1), 1);
        assert_eq!(share_of(2), 1);
        assert_eq!(share_of(10), 9);
        assert_eq!(share_of(20), 18);
        assert_eq!(share_of(500), 450);
        assert_eq!(share_of(usize::MAX), usize::MAX - usize::MAX / 10);
    }

    /// In memory the Postgres pool's size is unused: it does not shrink the clients' share of
    /// the open files; on Postgres it does.
    #[test]
    fn the_pool_size_counts_against_the_files_on_postgres_only() {
        let files = rlimit::increase_nofile_limit(u64::MAX).unwrap();
        let memory = Config {
            database_max_connections: 1_000_000,
            max_connections: None,
            ..Config::default()
        };
        let expected = files.saturating_sub(RESERVED_FILES).max(16);
        assert_eq!(connection_limit(&memory) as u64, expected);
        let postgres = Config {
            database_url: Some("postgres://app@db/helpdesk".into()),
            database_max_connections: 100,
            ..memory
        };
        let expected = files.saturating_sub(RESERVED_FILES + 100).max(16);
        assert_eq!(connection_limit(&postgres) as u64, expected);
    }
}
