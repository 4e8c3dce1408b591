//! Building fred clients with a reconnect policy and a command timeout, and the start-up
//! checks of the server (its version, its eviction policy).

use crate::entry;
use crate::error::{ConnectError, transport_error};
use crate::options::ConnectionOptions;
use cqrs_core::ports::TransportError;
use fred::clients::{Client, SubscriberClient};
use fred::error::ErrorKind as FredKind;
use fred::interfaces::{ClientLike, EventInterface};
use fred::prelude::{Builder, Options, ReconnectPolicy};
use fred::socket2::TcpKeepalive;
use fred::types::config::{Config, ReconnectError, UnresponsiveConfig};
use fred::types::{ClusterHash, CustomCommand, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::TryRecvError;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The oldest server whose commands every script and call here needs (`XAUTOCLAIM` is 6.2,
/// `XINFO GROUPS` lag and entries-read are 7.0).
pub(crate) const REQUIRED_VERSION: (u32, u32) = (7, 0);

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// A builder for clients that reconnect without end and time commands out.
pub(crate) fn builder(
    options: &ConnectionOptions,
    broadcast_capacity: usize,
) -> Result<Builder, ConnectError> {
    let url = crate::options::plain_scheme_url(&options.url);
    let config = Config::from_url(&url).map_err(|e| ConnectError::Invalid {
        problems: vec![format!(
            "url `{}` is not a redis url: {e}",
            crate::options::redacted_url(&options.url)
        )],
    })?;
    // Without the feature, `connect` refused the TLS URL before this.
    #[cfg(feature = "tls")]
    let config = crate::tls::applied(config, options)?;
    let mut builder = Builder::from_config(config);
    builder
        .with_config(|config| {
            // The first connection's failure is reported by `connect`, not retried.
            config.fail_fast = true;
        })
        .with_connection_config(|config| {
            config.connection_timeout = options.connect_timeout;
            // fred's `connection_timeout` ends with the TCP (and TLS) connect; the handshake
            // (`HELLO`, `AUTH`, `CLIENT SETNAME`) is bounded by the internal command timeout.
            // Bounded by the connect timeout too, a server that accepts and never answers
            // fails the connect within it, not after a command timeout (which may be
            // unbounded).
            config.internal_command_timeout = options.command_timeout.min(options.connect_timeout);
            // `CLIENT SETNAME` with fred's client id, so `CLIENT LIST` shows whose each
            // connection is (and `client_ids` finds them).
            config.auto_client_setname = true;
            // Both off in fred by default: a connection that dies without a FIN or RST would
            // look connected until the kernel gives up on it (~15 min).
            config.tcp.keepalive = options.tcp_keepalive.map(keepalive);
            config.unresponsive = unresponsive(options.unresponsive());
            // Data written and never acknowledged (the peer vanished while this side had
            // commands to send, a busy publisher's): fred's router waits in the write once
            // the socket's send buffer is full, where neither its unresponsive check (run as
            // it reads) nor the watchdog's forced reconnect (a command queued behind the
            // write) can act. The kernel closes such a connection after the unresponsive
            // timeout instead of its ~15 minutes of retransmissions; after a second at least,
            // so one lost packet (retransmitted after 200 ms at the soonest) never does.
            #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
            {
                config.tcp.user_timeout = options
                    .replaces_unresponsive()
                    .then(|| options.unresponsive().max(MIN_TCP_USER_TIMEOUT));
            }
            // Replies that say this connection's server cannot serve it any more, though the
            // connection is up: a primary demoted to replica under its clients by a failover
            // (`READONLY`: the DNS name now leads to the new primary, which a new connection
            // reaches), a server loading its data, a cluster that is down. fred reconnects on
            // them and retries the command; without this every write would fail for good.
            config.reconnect_errors = vec![
                ReconnectError::ReadOnly,
                ReconnectError::Loading,
                ReconnectError::ClusterDown,
            ];
        })
        .with_performance_config(|config| {
            // fred's default of 0 queues commands for as long as a reconnect takes.
            config.default_command_timeout = options.command_timeout;
            config.broadcast_channel_capacity = broadcast_capacity;
        })
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            millis(options.reconnect_min_delay),
            millis(options.reconnect_max_delay),
            2,
        ));
    Ok(builder)
}

/// The shortest `TCP_USER_TIMEOUT` a connection gets, whatever its unresponsive timeout.
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
const MIN_TCP_USER_TIMEOUT: Duration = Duration::from_secs(1);

/// The kernel's keepalive: probes after `idle` without traffic, then every third of it.
fn keepalive(idle: Duration) -> TcpKeepalive {
    let keepalive = TcpKeepalive::new().with_time(idle);
    #[cfg(any(
        target_os = "android",
        target_os = "freebsd",
        target_os = "ios",
        target_os = "linux",
        target_os = "macos",
        target_os = "windows",
    ))]
    let keepalive = keepalive.with_interval((idle / 3).max(Duration::from_secs(1)));
    keepalive
}

/// fred's unresponsive-connection check: a connection that leaves a command unanswered for
/// `timeout` is closed and replaced, looked at every quarter of it (from 10 ms to 1 s). fred
/// skips a connection waiting in a blocking command, and times from the last command written,
/// so steady traffic puts it off: the watchdog (see [`watchdog`]) covers those.
fn unresponsive(timeout: Duration) -> UnresponsiveConfig {
    UnresponsiveConfig {
        // A timeout too long for the clock means never.
        max_timeout: Instant::now().checked_add(timeout).map(|_| timeout),
        interval: (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
    }
}

/// Pings `client` every `ping_interval` while it is connected, and forces a reconnect when a
/// ping is not answered within the unresponsive timeout. A connection that died silently
/// looks connected to fred; a subscriber connection sends nothing by itself, so it would wait
/// for messages for good, and on a busy connection every new command puts fred's own check
/// off again. Each ping holds `exclusive`, if given: the pub/sub's subscribe takes the next
/// reply on its connection for its own (see `confirmed_subscribe`), so a ping must not come
/// between. Runs until aborted.
pub(crate) fn watchdog<C>(
    client: C,
    options: &ConnectionOptions,
    exclusive: Option<Arc<tokio::sync::Mutex<()>>>,
) -> JoinHandle<()>
where
    C: EventInterface + Clone + 'static,
{
    let interval = options.ping_interval;
    let timeout = options.unresponsive();
    let held_for = options.command_timeout.min(timeout);
    tokio::spawn(async move {
        let ping = Options {
            timeout: Some(timeout),
            ..Options::default()
        };
        loop {
            tokio::time::sleep(interval).await;
            if !client.is_connected() {
                // Reconnecting already.
                continue;
            }
            // Before the ping: a reconnect while it waits (fred's unresponsive check timing
            // out the same silence) already replaced the connection.
            let mut reconnects = client.reconnect_rx();
            let pinger = client.with_options(&ping);
            let reply = pinger.ping::<Value>(None);
            tokio::pin!(reply);
            let reply = match &exclusive {
                // The lock only has to keep the ping from being queued between a SUBSCRIBE
                // and its confirming PING (fred queues it on the first poll, below, and
                // matches replies in order): held for at most a command timeout, then let go,
                // so a dead connection holds a subscribe up for one command timeout more than
                // its own at most, not for the whole unresponsive timeout.
                Some(lock) => {
                    let guard = lock.lock().await;
                    match tokio::time::timeout(held_for, &mut reply).await {
                        Ok(reply) => reply,
                        Err(_) => {
                            drop(guard);
                            reply.await
                        }
                    }
                }
                None => reply.await,
            };
            match reply {
                Err(e) if *e.kind() == FredKind::Timeout && client.is_connected() => {
                    if !matches!(reconnects.try_recv(), Err(TryRecvError::Empty)) {
                        // Forcing another would count a second loss on the pub/sub.
                        tracing::debug!(client = %client.id(), "watchdog ping timed out across a reconnect");
                        continue;
                    }
                    tracing::warn!(
                        client = %client.id(),
                        ?timeout,
                        "redis connection unresponsive: reconnecting"
                    );
                    // Not awaited to the end: the reconnect goes on for as long as the server
                    // is away, and the next round skips a client that is not connected.
                    let forced = client.force_reconnection();
                    let _ = tokio::time::timeout(interval.max(timeout), forced).await;
                }
                Err(e) => {
                    tracing::debug!(client = %client.id(), error = %e, "watchdog ping failed")
                }
                Ok(_) => {}
            }
        }
    })
}

/// A connected client, which quits when dropped until kept: a connect given up (a caller's
/// timeout, an error in a later step) leaves no connection behind.
pub(crate) async fn client(
    options: &ConnectionOptions,
) -> Result<QuitUnlessKept<Client>, ConnectError> {
    let client = QuitUnlessKept::new(builder(options, 32)?.build().map_err(transport_error)?);
    client.init().await.map_err(|e| init_error(options, e))?;
    Ok(client)
}

/// A client that quits when dropped, unless [`keep`](Self::keep) took it out first. fred's
/// `init` starts a task that connects, and reconnects for as long as the client runs, and a
/// dropped handle does not end it: a connect whose future was dropped (a caller's timeout)
/// used to leave a connection open, replaced whenever the server closed it, for the life of
/// the process.
pub(crate) struct QuitUnlessKept<C: ClientLike + 'static>(Option<C>);

impl<C: ClientLike + 'static> QuitUnlessKept<C> {
    pub(crate) fn new(client: C) -> Self {
        Self(Some(client))
    }

    /// The client, no longer quit on drop.
    pub(crate) fn keep(mut self) -> C {
        match self.0.take() {
            Some(client) => client,
            // `keep` takes `self`: the option is only emptied here or in `Drop`.
            None => unreachable!("a client kept twice"),
        }
    }
}

impl<C: ClientLike + 'static> std::ops::Deref for QuitUnlessKept<C> {
    type Target = C;

    fn deref(&self) -> &C {
        match &self.0 {
            Some(client) => client,
            None => unreachable!("a kept client used through its guard"),
        }
    }
}

impl<C: ClientLike + 'static> Drop for QuitUnlessKept<C> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            quit_later(client);
        }
    }
}

/// Why the first connection failed: a refused TLS handshake says so and what to check (fred
/// reports it as an I/O error, which would read as a server that is away), anything else
/// maps as usual.
#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
fn init_error(options: &ConnectionOptions, error: fred::error::Error) -> ConnectError {
    #[cfg(feature = "tls")]
    if let Some(reason) = crate::tls::failure(&error)
        && crate::options::asks_for_tls(&options.url)
    {
        return ConnectError::Tls {
            server: server_of(&options.url),
            reason,
        };
    }
    match transport_error(error) {
        // Name the server, as a failed Postgres connect does: "connection refused" alone does
        // not say which URL was tried, nor what to check.
        TransportError::Unavailable { backend, source } => TransportError::Unavailable {
            backend,
            source: format!(
                "could not connect to {} ({source}); check that Redis runs there and that the URL \
                 names it",
                server_of(&options.url)
            )
            .into(),
        },
        // The connect or its handshake went unanswered: something else may listen there (or
        // a TLS server, to a plain connection), or packets are dropped on the way.
        TransportError::Timeout { backend } => TransportError::Unavailable {
            backend,
            source: format!(
                "could not connect to {}: no answer (the connect waits at most {:?}, its \
                 handshake {:?}); check that Redis, not another service, listens there{} and \
                 that no firewall drops the packets",
                server_of(&options.url),
                options.connect_timeout,
                options.command_timeout.min(options.connect_timeout),
                if crate::options::asks_for_tls(&options.url) {
                    // A plain-text Redis reads the TLS hello as the start of a command and
                    // waits for its end: no answer, rather than a refused handshake.
                    " and speaks TLS there (a plain-text Redis needs `redis://`)"
                } else {
                    " (a TLS server needs `rediss://`)"
                }
            )
            .into(),
        },
        other => other,
    }
    .into()
}

/// `host:port` of `url`, for messages (never the credentials): the server the first
/// connection goes to (a sentinel's default port is 26379).
fn server_of(url: &str) -> String {
    match url::Url::parse(url) {
        // A password holding `/`, `?` or `#` unencoded: the host and port parsed may be parts
        // of it (`redis://app:2024?s3cret@cache` goes to `app:2024`), so not shown.
        Ok(parsed) if crate::options::at_outside_user_info(url, &parsed) => {
            "(the URL's server, not shown: an `@` after its host may end a password holding \
             `/`, `?` or `#`, which must be percent-encoded: `%2F`, `%3F`, `%23`)"
                .to_owned()
        }
        Ok(parsed) => {
            let default_port = if parsed.scheme().ends_with("-sentinel") {
                26379
            } else {
                6379
            };
            format!(
                "{}:{}",
                parsed.host_str().unwrap_or("?"),
                parsed.port().unwrap_or(default_port)
            )
        }
        Err(_) => "(the URL's server)".to_owned(),
    }
}

/// The most messages the subscriber client's own channels buffer, whatever the local
/// subscribers' `capacity`: fred sizes eight broadcast channels (messages, errors, reconnects,
/// ...) with it and allocates them at connect, so `capacity`'s maximum (2^20) would cost
/// hundreds of MiB up front. The reader drains the message channel into the per-channel
/// buffers without waiting, so it needs no more.
const MAX_SUBSCRIBER_BUFFER: usize = 65_536;

/// A connected subscriber client, whose message channel buffers `capacity` messages (at least
/// 32, at most [`MAX_SUBSCRIBER_BUFFER`]).
pub(crate) async fn subscriber(
    options: &ConnectionOptions,
    capacity: usize,
) -> Result<QuitUnlessKept<SubscriberClient>, ConnectError> {
    let client = QuitUnlessKept::new(
        builder(options, capacity.clamp(32, MAX_SUBSCRIBER_BUFFER))?
            .build_subscriber_client()
            .map_err(transport_error)?,
    );
    client.init().await.map_err(|e| init_error(options, e))?;
    Ok(client)
}

/// What the server says it is: from `INFO server`, or `HELLO` for a user who may not run
/// `INFO`.
struct ServerInfo {
    /// `None` when the server does not say (an `INFO` without `redis_version`).
    version: Option<String>,
    /// `standalone`, `cluster` or `sentinel`, if told.
    mode: Option<String>,
}

/// Fails unless the server is Redis 7.0 or later; with `keyed`, also when it is a cluster node
/// reached through a URL that is not a cluster one: fred follows no redirect then, and every
/// command for a key of another node's slots would get `MOVED`, for good, which reads like a
/// server away. (Pub/sub is not keyed: a cluster carries a channel's messages to every node.)
pub(crate) async fn check_version(client: &Client, keyed: bool) -> Result<(), ConnectError> {
    let info: Result<String, _> = client
        .custom(
            CustomCommand::new("INFO", ClusterHash::Random, false),
            vec!["server"],
        )
        .await;
    let server = match info {
        Ok(info) => {
            let field = |name: &str| {
                info.lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(|value| value.trim().to_owned())
            };
            ServerInfo {
                version: field("redis_version:"),
                mode: field("redis_mode:"),
            }
        }
        // `INFO` is `@dangerous`: a least-privilege user (`+@all -@dangerous`) may not run
        // it. `HELLO` without arguments (which keeps the protocol) tells the version and the
        // mode too.
        Err(e) if e.details().starts_with("NOPERM") => match hello_info(client).await {
            Some(server) => server,
            None => {
                tracing::warn!(
                    "cannot check the Redis server's version: the user may run neither INFO \
                     nor HELLO; Redis 7.0 or later is required (older servers fail later, at \
                     the first command they lack)"
                );
                return Ok(());
            }
        },
        Err(e) => return Err(transport_error(e).into()),
    };
    if keyed && server.mode.as_deref() == Some("cluster") && !client.is_clustered() {
        return Err(ConnectError::Invalid {
            problems: vec![
                "the server is a Redis Cluster node, and the URL is not a cluster one: use \
                 `redis-cluster://` (`rediss-cluster://` with TLS), so commands follow the \
                 cluster's slots"
                    .to_owned(),
            ],
        });
    }
    let Some(version) = server.version else {
        // Not learnt, so not refused: as for a user who may not ask.
        tracing::warn!(
            "cannot check the Redis server's version: its INFO names no `redis_version`; Redis \
             7.0 or later is required (older servers fail later, at the first command they lack)"
        );
        return Ok(());
    };
    if version_at_least(&version, REQUIRED_VERSION) {
        Ok(())
    } else {
        Err(ConnectError::UnsupportedServer {
            found: version,
            required: "7.0",
        })
    }
}

/// The server's version and mode from `HELLO` (no arguments: the connection's protocol stays
/// as it is), if the user may run it and it names a version.
async fn hello_info(client: &Client) -> Option<ServerInfo> {
    let reply: Value = client
        .custom(
            CustomCommand::new("HELLO", ClusterHash::Random, false),
            Vec::<Value>::new(),
        )
        .await
        .ok()?;
    let items = entry::array(reply);
    Some(ServerInfo {
        version: Some(entry::info_field(&items, "version").and_then(Value::as_string)?),
        mode: entry::info_field(&items, "mode").and_then(Value::as_string),
    })
}

/// Warns when the server may evict any key to free memory (`maxmemory-policy` `allkeys-*`):
/// the stream transport's keys must never be evicted. A stream evicted loses its entries; a
/// lanes hash evicted (a quiet topic's, the least recently used) starts every lane over, and
/// the next event of each key is handed out without waiting for the ones before it. The
/// `volatile-*` policies evict only keys with a TTL, and these have none. Best effort: a
/// server that refuses `CONFIG GET` (managed Redis often does, or the user's ACL) is only
/// logged at debug level; on a cluster one node is asked.
pub(crate) async fn check_eviction(client: &Client) {
    let reply: Result<Value, _> = client
        .custom(
            CustomCommand::new("CONFIG", ClusterHash::Random, false),
            vec!["GET", "maxmemory-policy"],
        )
        .await;
    let items = match reply {
        Ok(reply) => entry::array(reply),
        Err(error) => {
            tracing::debug!(%error, "could not read the server's maxmemory-policy");
            return;
        }
    };
    let policy = entry::info_field(&items, "maxmemory-policy").and_then(Value::as_string);
    match policy {
        Some(policy) if evicts_any_key(&policy) => tracing::warn!(
            %policy,
            "Redis may evict any key to free memory (maxmemory-policy {policy}): a stream or \
             lanes hash of the stream transport evicted loses entries or breaks per-key \
             order; set maxmemory-policy noeviction (or a volatile-* policy)"
        ),
        Some(_) => {}
        None => tracing::debug!("the server did not report its maxmemory-policy"),
    }
}

/// Whether a `maxmemory-policy` may evict keys without a TTL (`allkeys-lru`, `allkeys-lfu`,
/// `allkeys-random`, and any later `allkeys-*`).
fn evicts_any_key(policy: &str) -> bool {
    policy.trim().to_ascii_lowercase().starts_with("allkeys-")
}

fn version_at_least(version: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// The server-side ids (`CLIENT ID`) of the connections of `clients`, found by their names in
/// `CLIENT LIST` (asked on `admin`, so it works while a client waits in a blocking read or is
/// subscribed). On a cluster ids are per node: `route` picks the node asked.
pub(crate) async fn client_ids(
    admin: &Client,
    clients: &[&str],
    route: ClusterHash,
) -> Result<Vec<i64>, TransportError> {
    Ok(client_field(admin, clients, "id", route)
        .await?
        .iter()
        .filter_map(|id| id.parse().ok())
        .collect())
}

/// One field (`id`, `sub`, ...) of each connection of `clients`, found by their names in
/// `CLIENT LIST` asked on `admin`, on the node `route` picks; the newest connection first
/// (the highest id: a client's connection that died silently may still be listed, older).
pub(crate) async fn client_field(
    admin: &Client,
    clients: &[&str],
    field: &str,
    route: ClusterHash,
) -> Result<Vec<String>, TransportError> {
    let list: String = admin
        .custom(
            CustomCommand::new("CLIENT", route, false),
            vec![Value::from("LIST")],
        )
        .await
        .map_err(transport_error)?;
    let prefix = format!("{field}=");
    let mut found: Vec<(i64, String)> = list
        .lines()
        .filter_map(|line| {
            let (mut value, mut name, mut id) = (None, None, None);
            for part in line.split(' ') {
                if let Some(v) = part.strip_prefix(prefix.as_str()) {
                    value = Some(v);
                }
                if let Some(v) = part.strip_prefix("name=") {
                    name = Some(v);
                } else if let Some(v) = part.strip_prefix("id=") {
                    id = v.parse::<i64>().ok();
                }
            }
            value
                .filter(|_| name.is_some_and(|n| clients.contains(&n)))
                .map(|v| (id.unwrap_or(0), v.to_owned()))
        })
        .collect();
    found.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
    Ok(found.into_iter().map(|(_, value)| value).collect())
}

/// Closes a client in the background, where a runtime is running (drop cannot await).
pub(crate) fn quit_later<C: ClientLike + 'static>(client: C) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = client.quit().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A password holding `?` or `/` unencoded makes its first part the port, or its rest
    /// the path: the server is not shown then, and the message says how to write it.
    #[test]
    fn a_server_parsed_out_of_a_password_is_not_shown() {
        for url in [
            "redis://app:2024?s3cret@cache.internal:6379",
            "redis://app:2024/s3cret@cache.internal:6379",
        ] {
            let shown = server_of(url);
            assert!(
                !shown.contains("2024") && !shown.contains("s3cret"),
                "{shown}"
            );
            assert!(shown.contains("percent-encoded"), "{shown}");
        }
        assert_eq!(
            server_of("redis://app:pw@cache.internal"),
            "cache.internal:6379"
        );
        assert_eq!(
            server_of("redis-sentinel://s1/0?sentinelServiceName=m"),
            "s1:26379"
        );
    }

    #[test]
    fn versions_before_7_0_are_refused() {
        assert!(version_at_least("7.0.15", REQUIRED_VERSION));
        assert!(version_at_least("7.2.4", REQUIRED_VERSION));
        assert!(version_at_least("8.0.0", REQUIRED_VERSION));
        assert!(!version_at_least("6.2.14", REQUIRED_VERSION));
        assert!(!version_at_least("unknown", REQUIRED_VERSION));
    }

    #[test]
    fn only_allkeys_policies_may_evict_the_transports_keys() {
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "ALLKEYS-LRU",
        ] {
            assert!(evicts_any_key(policy), "{policy}");
        }
        for policy in [
            "noeviction",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
            "",
        ] {
            assert!(!evicts_any_key(policy), "{policy}");
        }
    }

    /// Both are off in fred by default, and without them a connection that dies silently is
    /// noticed only when the kernel gives up on it.
    #[test]
    fn clients_use_tcp_keepalive_and_the_unresponsive_check() {
        let options =
            ConnectionOptions::new(crate::DEFAULT_URL).command_timeout(Duration::from_millis(300));
        let built = builder(&options, 32).unwrap();
        let config = built.get_connection_config();
        assert!(config.tcp.keepalive.is_some(), "keepalive on by default");
        assert_eq!(
            config.unresponsive.max_timeout,
            Some(Duration::from_millis(600)),
            "twice the command timeout by default"
        );
        assert_eq!(config.unresponsive.interval, Duration::from_millis(150));
        #[cfg(target_os = "linux")]
        assert_eq!(
            config.tcp.user_timeout,
            Some(Duration::from_secs(1)),
            "unacknowledged writes close the connection after the unresponsive timeout, a \
             second at least"
        );
        #[cfg(target_os = "linux")]
        {
            let longer = options.clone().unresponsive_timeout(Duration::from_secs(7));
            let built = builder(&longer, 32).unwrap();
            assert_eq!(
                built.get_connection_config().tcp.user_timeout,
                Some(Duration::from_secs(7))
            );
        }

        let options = options
            .tcp_keepalive(None)
            .unresponsive_timeout(Duration::MAX);
        let built = builder(&options, 32).unwrap();
        let config = built.get_connection_config();
        assert!(config.tcp.keepalive.is_none(), "keepalive turned off");
        assert_eq!(
            config.unresponsive.max_timeout, None,
            "Duration::MAX: never"
        );
        #[cfg(target_os = "linux")]
        assert_eq!(config.tcp.user_timeout, None, "Duration::MAX: never");
    }
}
