//! Options: the connection, the stream transport and the pub/sub, each with documented
//! defaults, validated all at once by `connect`.

use crate::error::ConnectError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default server: a local Redis.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// The shortest watchdog ping interval: a shorter one pings back to back.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);
/// The TCP keepalive idle times the kernel takes (`TCP_KEEPIDLE`: Linux refuses more than
/// 32767 s with `EINVAL`); the probe interval, a third of it, is in range too.
const MIN_KEEPALIVE: Duration = Duration::from_secs(1);
const MAX_KEEPALIVE: Duration = Duration::from_secs(32767);

/// How the adapters connect to Redis and behave while it is unreachable.
///
/// ```
/// use cqrs_redis::ConnectionOptions;
/// use std::time::Duration;
///
/// let connection = ConnectionOptions::new("redis://127.0.0.1:6379/2")
///     .command_timeout(Duration::from_secs(1))
///     .reconnect_delays(Duration::from_millis(50), Duration::from_secs(2));
/// assert_eq!(connection.url(), "redis://127.0.0.1:6379/2");
/// ```
///
/// Its `Debug`, and every error that shows the URL, hide the password.
#[derive(Clone)]
pub struct ConnectionOptions {
    pub(crate) url: String,
    pub(crate) command_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min_delay: Duration,
    pub(crate) reconnect_max_delay: Duration,
    /// `None`: twice the command timeout.
    pub(crate) unresponsive_timeout: Option<Duration>,
    pub(crate) ping_interval: Duration,
    pub(crate) tcp_keepalive: Option<Duration>,
    pub(crate) tls_ca_file: Option<PathBuf>,
    /// The client's certificate chain and its private key, both PEM files.
    pub(crate) tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// The TLS configuration built from the files above, once, for every client made with
    /// these options (and their clones): a transport's consumers and a pub/sub's two clients
    /// do not read the files and the system's store again. A TLS setter starts a new one.
    #[cfg(feature = "tls")]
    pub(crate) tls_config: std::sync::Arc<std::sync::OnceLock<fred::types::config::TlsConfig>>,
}

impl fmt::Debug for ConnectionOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionOptions")
            .field("url", &redacted_url(&self.url))
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min_delay", &self.reconnect_min_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("unresponsive_timeout", &self.unresponsive_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("tcp_keepalive", &self.tcp_keepalive)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert", &self.tls_client_cert)
            .finish()
    }
}

/// The longest delay between reconnection attempts: clients resume at most this long after
/// Redis is back.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(300);

/// `url` as it may be shown: the password in the user info replaced (`user:***@`; a user
/// name without a password is hidden whole, as it may be a password put in the wrong place)
/// and in query parameters whose name holds `password` (`sentinelPassword=***`). A URL that
/// does not parse is not shown past its scheme: where its user info ends cannot be told (a
/// password may hold `/`, `@` or `:`), so no part of it is safe to show. Nor is one without
/// user info that holds an `@` further on, or one with an `@` in its path or (outside the
/// password parameters) its query. Nor one without `://` (`admin:s3cret@cache:6379` parses
/// with `admin` as its scheme and the rest as an opaque path).
pub(crate) fn redacted_url(url: &str) -> String {
    let parsed = match url::Url::parse(url) {
        Ok(parsed) if url.contains("://") => parsed,
        Ok(_) => {
            return "(not shown: not a URL of the form scheme://host, and may hold a password)"
                .to_owned();
        }
        Err(_) => {
            let scheme = url
                .split_once("://")
                .map_or(String::new(), |(scheme, _)| format!("{scheme}://"));
            return format!("{scheme}(not shown: it does not parse, and may hold a password)");
        }
    };
    if at_outside_user_info(url, &parsed) {
        return format!(
            "{}://(not shown: an `@` outside its user info may end a password)",
            parsed.scheme()
        );
    }
    let mut shown = format!("{}://", parsed.scheme());
    match (parsed.username(), parsed.password()) {
        ("", None) => {}
        (user, Some(_)) => shown.push_str(&format!("{user}:***@")),
        (_, None) => shown.push_str("***@"),
    }
    if let Some(host) = parsed.host_str() {
        shown.push_str(host);
    }
    if let Some(port) = parsed.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(parsed.path());
    if let Some(query) = parsed.query() {
        shown.push('?');
        shown.push_str(&redacted_query(query));
    }
    shown
}

/// Whether `url` (parsed as `parsed`) has an `@` where a password holding `/`, `?` or `#`
/// unencoded puts one: no user info but an `@` further on (`redis://app:20/24@host` parses as
/// host `app`, port 20, path `/24@host`), or an `@` in the path or, outside the password
/// parameters, the query (`redis://default:Xy@Z/9k@cache` parses as user info `default:Xy`,
/// host `Z`, path `/9k@cache`). Then neither the host nor the rest is safe to show.
pub(crate) fn at_outside_user_info(url: &str, parsed: &url::Url) -> bool {
    let after_scheme = url.split_once("://").map_or("", |(_, rest)| rest);
    (parsed.username().is_empty() && parsed.password().is_none() && after_scheme.contains('@'))
        || parsed.path().contains('@')
        || parsed
            .query()
            .is_some_and(|query| redacted_query(query).contains('@'))
}

/// `query` with the value of every parameter whose name holds `password` replaced.
fn redacted_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.to_ascii_lowercase().contains("password") => {
                format!("{key}=***")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The sentinel credential parameter `url` sets (`sentinelUsername`, `sentinelPassword`), if
/// any, when the fred this crate is linked with ignores them: built without its
/// `sentinel-auth` feature (cqrs-redis does not ask for it; another crate of the build may).
fn sentinel_credentials(url: &str) -> Option<&'static str> {
    let parsed = url::Url::parse(url).ok()?;
    let name = ["sentinelUsername", "sentinelPassword"]
        .into_iter()
        .find(|name| parsed.query_pairs().any(|(key, _)| key == *name))?;
    (!fred_takes_sentinel_credentials()).then_some(name)
}

/// Whether fred reads `sentinelUsername` from a URL (its `sentinel-auth` feature, which any
/// crate of the build may turn on): told by whether the parsed configuration holds it.
fn fred_takes_sentinel_credentials() -> bool {
    const PROBE: &str = "cqrs-redis-sentinel-probe";
    let url = format!("redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelUsername={PROBE}");
    fred::types::config::Config::from_url(&url)
        .is_ok_and(|config| format!("{:?}", config.server).contains(PROBE))
}

/// Whether `url` asks for TLS: `rediss://` or `valkeys://`, and their `-cluster` and
/// `-sentinel` forms (fred's URL schemes).
pub(crate) fn asks_for_tls(url: &str) -> bool {
    let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
    let scheme = scheme.to_ascii_lowercase();
    scheme.starts_with("rediss") || scheme.starts_with("valkeys")
}

/// Whether `url` is a cluster URL (`redis-cluster://`, ...) with a path naming a database
/// other than 0, the one a cluster has.
fn cluster_url_with_database(url: &str) -> bool {
    let cluster = url
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.to_ascii_lowercase().ends_with("-cluster"));
    cluster && url::Url::parse(url).is_ok_and(|parsed| !matches!(parsed.path(), "" | "/" | "/0"))
}

/// Why `url`'s scheme is not one fred connects with, if it is not: fred takes any scheme for
/// plain Redis, so `https://` (TLS expected) or `localhost:6379` (no scheme: parsed as scheme
/// `localhost`) would connect in plain text, or to a server other than the one meant.
fn scheme_problem(url: &str) -> Option<String> {
    let Some((scheme, _)) = url.split_once("://") else {
        // Not shown: without `scheme://`, where a password would end cannot be told.
        return Some(
            "url has no scheme: write it as `redis://host:port` (`rediss://` for TLS)".to_owned(),
        );
    };
    let lower = scheme.to_ascii_lowercase();
    let base = lower
        .strip_suffix("-cluster")
        .or_else(|| lower.strip_suffix("-sentinel"))
        .unwrap_or(&lower);
    if matches!(base, "redis" | "rediss" | "valkey" | "valkeys") {
        return None;
    }
    if matches!(base, "redis+unix" | "valkey+unix" | "unix") {
        return Some(
            "a Unix socket URL is not supported (this build of the Redis client has no Unix \
             socket support): connect over TCP with `redis://host:port` (a Redis on the same \
             machine listens on 127.0.0.1:6379 unless told otherwise)"
                .to_owned(),
        );
    }
    // Shown only when it is a scheme, not a pasted credential before a `://`.
    let named = if !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        format!("`{scheme}` ")
    } else {
        String::new()
    };
    Some(format!(
        "url scheme {named}is not a redis scheme: use `redis://` (`rediss://` for TLS; \
         `valkey://` and `valkeys://` work too, each also with `-cluster` or `-sentinel`)"
    ))
}

/// `url` with its TLS scheme made the plain one (`rediss-cluster://` becomes
/// `redis-cluster://`): what fred parses. The TLS configuration is built here instead of by
/// fred's URL parser, whose default asks rustls for the process-wide crypto provider, which
/// panics in a program that links a second one.
pub(crate) fn plain_scheme_url(url: &str) -> String {
    match url.split_once(':') {
        Some((scheme, rest)) if asks_for_tls(url) => {
            let lower = scheme.to_ascii_lowercase();
            let plain = lower
                .replacen("rediss", "redis", 1)
                .replacen("valkeys", "valkey", 1);
            format!("{plain}:{rest}")
        }
        _ => url.to_owned(),
    }
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        Self::new(DEFAULT_URL)
    }
}

impl ConnectionOptions {
    /// Options for the server at `url`: `redis://[user:password@]host[:port][/db]`, or
    /// `redis-cluster://host:port?node=host:port` for a cluster (fred's URL forms). Defaults:
    /// 2 s command timeout, 5 s connect timeout, reconnecting without end with delays growing
    /// from 100 ms to 5 s, a connection taken for dead after twice the command timeout
    /// without a reply, a watchdog `PING` every 5 s, TCP keepalive after 15 s idle.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            command_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            reconnect_min_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            unresponsive_timeout: None,
            ping_interval: Duration::from_secs(5),
            tcp_keepalive: Some(Duration::from_secs(15)),
            tls_ca_file: None,
            tls_client_cert: None,
            #[cfg(feature = "tls")]
            tls_config: Default::default(),
        }
    }

    /// The server's URL, as given (with its password: do not log it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How long a command may take before it fails with `TransportError::Timeout`. Default 2 s.
    ///
    /// fred's own default is no timeout, so that commands sent while it reconnects wait in a
    /// queue; with a timeout a caller learns within this time that Redis is away. A blocking
    /// read gets its block interval on top. Must be above zero; a value too long for the clock
    /// (up to `Duration::MAX`) is accepted and means no timeout.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How long each of the two steps of opening a connection may take: the TCP (and TLS)
    /// connect, then its handshake (`HELLO`, `AUTH`, `CLIENT SETNAME`; bounded by the command
    /// timeout instead, when that is shorter). So a server that accepts the connection and
    /// never answers fails `connect` within about twice this, naming the server. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The delays between reconnection attempts: exponential from `min` to `max`, without a
    /// limit on attempts, so consumers and subscriptions resume by themselves whenever Redis
    /// is back. Default 100 ms to 5 s; `min` at least 1 ms (fred counts whole milliseconds),
    /// `max` at most 5 minutes.
    pub fn reconnect_delays(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min_delay = min;
        self.reconnect_max_delay = max;
        self
    }

    /// How long a connection may leave a command unanswered before it is taken for dead and
    /// replaced: fred closes it and reconnects (its unresponsive-connection check), and the
    /// watchdog [`PING`](Self::ping_interval) forces a reconnect when its reply takes longer.
    /// On Linux it is also the connection's `TCP_USER_TIMEOUT` (a second at least): the
    /// kernel closes a connection whose written data stays unacknowledged that long, which
    /// covers a connection waiting in a write to a vanished host, where neither check runs;
    /// with TCP keepalive on, it also decides when unanswered probes end the connection.
    /// Default: twice the command timeout.
    ///
    /// This is what notices a connection that died silently, without a FIN or RST (a NAT or
    /// firewall dropped it, the host vanished): fred still takes it for connected, commands
    /// only time out, and the kernel gives up on it only after about 15 minutes. A server
    /// busy for longer (a slow script) also gets its connections replaced: fred sends the
    /// commands in flight that have not timed out again after the reconnect (publishes fail
    /// fast instead), and the pub/sub loses what is published meanwhile and counts possible
    /// losses in `Subscription::missed` (two per reconnect, three when messages arrive during the resubscription; see `RedisPubSub`). Raise it above the longest stall you expect. Must be
    /// above zero; a value too long for the clock (up to `Duration::MAX`) means never, and
    /// then a consumer's blocking read that times out does not replace its connection either.
    pub fn unresponsive_timeout(mut self, timeout: Duration) -> Self {
        self.unresponsive_timeout = Some(timeout);
        self
    }

    /// How often the watchdog sends a `PING` on the pub/sub's connections and on the stream
    /// transport's shared connection, whatever else they carry. Default 5 s.
    ///
    /// A subscriber connection sends nothing by itself, so without it a silently dead one
    /// would wait for messages for good; and fred's own check, timed from the last command
    /// written, is put off again by every new command on a busy connection. A ping not
    /// answered within the [unresponsive timeout](Self::unresponsive_timeout) forces a
    /// reconnect, after which the pub/sub subscribes again and counts possible losses. So a
    /// dead connection is replaced within about this interval plus that timeout. Must be at
    /// least 10 ms: a shorter one would ping back to back.
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// TCP keepalive on every connection: after `idle` without traffic the kernel probes the
    /// peer, every third of `idle` (at least 1 s), and closes the connection when the probes
    /// go unanswered (Linux sends 9, `net.ipv4.tcp_keepalive_probes`), so fred reconnects.
    /// Catches an idle connection to a vanished host at the TCP level, and keeps NAT and
    /// firewall entries from expiring. `None` turns it off. Default `Some(15 s)`. Must be from
    /// 1 s to 32767 s (about 9 hours): Linux refuses a longer idle time, and every connect
    /// would fail.
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.tcp_keepalive = idle;
        self
    }

    /// Trusts only the CA certificates in the PEM file at `path` for a TLS URL (`rediss://`),
    /// instead of the system's root certificates: for a server whose certificate a private CA
    /// signed (a self-hosted Redis, a test server). Read when connecting; a file that cannot be
    /// read or holds no certificate fails the connect as invalid options, naming the path.
    /// Needs the crate's `tls` feature and a TLS URL.
    ///
    /// ```
    /// use cqrs_redis::ConnectionOptions;
    ///
    /// let connection = ConnectionOptions::new("rediss://cache.internal:6380")
    ///     .tls_ca_file("/etc/ssl/private-ca.pem");
    /// # let _ = connection;
    /// ```
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self.tls_settings_changed();
        self
    }

    /// Whether the URL asks for TLS: `rediss://` or `valkeys://`, and their `-cluster` and
    /// `-sentinel` forms.
    ///
    /// ```
    /// use cqrs_redis::ConnectionOptions;
    ///
    /// assert!(ConnectionOptions::new("rediss://cache.internal:6380").uses_tls());
    /// assert!(!ConnectionOptions::new("redis://127.0.0.1:6379").uses_tls());
    /// ```
    pub fn uses_tls(&self) -> bool {
        asks_for_tls(&self.url)
    }

    /// The URL as this crate shows it in its logs and errors: a password (in the user info or
    /// a query parameter) replaced by `***`, a user name without a password hidden whole (it
    /// may be a password put in the wrong place), and nothing past the scheme of a URL that
    /// does not parse.
    ///
    /// ```
    /// use cqrs_redis::ConnectionOptions;
    ///
    /// let options = ConnectionOptions::new("redis://hunter2@cache.internal:6379/2");
    /// assert_eq!(options.redacted_url(), "redis://***@cache.internal:6379/2");
    /// ```
    pub fn redacted_url(&self) -> String {
        redacted_url(&self.url)
    }

    /// The CA file set with [`tls_ca_file`](Self::tls_ca_file), if any.
    pub fn tls_ca_path(&self) -> Option<&Path> {
        self.tls_ca_file.as_deref()
    }

    /// Presents a client certificate in the TLS handshake, for a server that asks for one
    /// (Redis's `tls-auth-clients`, on by default when Redis serves TLS): `cert` is a PEM file
    /// of the certificate and any intermediates, `key` a PEM file of its private key (PKCS#8,
    /// PKCS#1 or SEC1). Read when connecting; a file that cannot be read, or a key that does
    /// not match, fails the connect as invalid options naming the file. Needs the crate's
    /// `tls` feature and a TLS URL.
    ///
    /// ```
    /// use cqrs_redis::ConnectionOptions;
    ///
    /// let connection = ConnectionOptions::new("rediss://cache.internal:6380")
    ///     .tls_ca_file("/etc/ssl/private-ca.pem")
    ///     .tls_client_cert("/etc/app/redis-client.pem", "/etc/app/redis-client.key");
    /// # let _ = connection;
    /// ```
    pub fn tls_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_client_cert = Some((cert.into(), key.into()));
        self.tls_settings_changed();
        self
    }

    /// A TLS setting changed: the configuration built from the old ones (shared with clones
    /// made before) no longer applies to these options.
    fn tls_settings_changed(&mut self) {
        #[cfg(feature = "tls")]
        {
            self.tls_config = Default::default();
        }
    }

    /// The unresponsive timeout in force: the one set, or twice the command timeout.
    pub(crate) fn unresponsive(&self) -> Duration {
        self.unresponsive_timeout
            .unwrap_or_else(|| self.command_timeout.saturating_mul(2))
    }

    /// Whether unresponsive connections are replaced at all: a timeout too long for the clock
    /// (up to `Duration::MAX`) means never.
    pub(crate) fn replaces_unresponsive(&self) -> bool {
        tokio::time::Instant::now()
            .checked_add(self.unresponsive())
            .is_some()
    }

    /// Checks the options without connecting, listing every problem: what a `connect` of
    /// [`RedisStreamOptions`] or [`RedisPubSubOptions`] would refuse before dialing (a URL that
    /// is not a Redis URL, TLS asked of a build without the `tls` feature, a timeout of zero)
    /// and, for a `rediss://` URL, the TLS files, read and parsed as the connect would once
    /// the rest holds (their problems are listed then). For a
    /// server's start-up check, so that a typo is reported before anything else connects.
    ///
    /// ```
    /// use cqrs_redis::{ConnectError, ConnectionOptions};
    ///
    /// assert!(ConnectionOptions::new("redis://127.0.0.1:6379").validate().is_ok());
    /// let Err(ConnectError::Invalid { problems }) =
    ///     ConnectionOptions::new("redis://127.0.0.1:99999").validate()
    /// else {
    ///     panic!("not a redis url")
    /// };
    /// assert!(problems[0].contains("is not a redis url"), "{problems:?}");
    /// ```
    pub fn validate(&self) -> Result<(), ConnectError> {
        let mut problems = Vec::new();
        self.problems(&mut problems);
        // The files only once the rest holds: a URL that does not ask for TLS reads none.
        #[cfg(feature = "tls")]
        if problems.is_empty()
            && let Err(ConnectError::Invalid { problems: tls }) =
                crate::tls::applied(fred::types::config::Config::default(), self)
        {
            problems.extend(tls);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConnectError::Invalid { problems })
        }
    }

    pub(crate) fn problems(&self, problems: &mut Vec<String>) {
        self.problems_in_build(cfg!(feature = "tls"), problems);
    }

    /// Every problem, for a build with TLS (`tls_built`) or without: a parameter, so the tests
    /// of either build check both.
    fn problems_in_build(&self, tls_built: bool, problems: &mut Vec<String>) {
        if let Some(problem) = scheme_problem(&self.url) {
            problems.push(problem);
        } else if let Err(e) = fred::types::config::Config::from_url(&plain_scheme_url(&self.url)) {
            problems.push(format!(
                "url `{}` is not a redis url: {e}",
                redacted_url(&self.url)
            ));
        } else if cluster_url_with_database(&self.url) {
            // fred reads no database from a cluster URL: it would use 0, and two deployments
            // told apart by their database numbers would share their keys.
            problems.push(format!(
                "url `{}` names a database, which a cluster URL cannot (Redis Cluster has one, \
                 0): drop the path (or write `/0`), and tell deployments apart by `key_prefix`",
                redacted_url(&self.url)
            ));
        } else if let Some(name) = sentinel_credentials(&self.url) {
            // fred is built without `sentinel-auth`: it would ignore them, and authenticate
            // to the sentinels with the URL's own user and password.
            problems.push(format!(
                "url `{}` sets {name}, which this build ignores: the sentinels are asked with \
                 the URL's own user and password (give the sentinels those), so drop {name}",
                redacted_url(&self.url)
            ));
        } else if asks_for_tls(&self.url) && !tls_built {
            problems.push(format!(
                "url `{}` asks for TLS, but cqrs-redis is built without its `tls` feature: \
                 enable it (add `features = [\"tls\"]` to the cqrs-redis dependency in \
                 Cargo.toml), or connect with a plain `redis://` URL on a private network",
                redacted_url(&self.url),
            ));
        } else if !asks_for_tls(&self.url) {
            for (set, name) in [
                (self.tls_ca_file.is_some(), "tls_ca_file"),
                (self.tls_client_cert.is_some(), "tls_client_cert"),
            ] {
                if set {
                    problems.push(format!(
                        "{name} is set, but url `{}` does not ask for TLS: use `rediss://` (or \
                         `valkeys://`), or drop {name}",
                        redacted_url(&self.url)
                    ));
                }
            }
        }
        // At least 1 ms, as the Postgres crate's: under it is a wrong unit, and fails every
        // command (or, for the unresponsive timeout, drops every connection with a command in
        // flight and sends the commands again: a storm of reconnects and duplicates).
        const MIN_TIMEOUT: Duration = Duration::from_millis(1);
        if self.command_timeout < MIN_TIMEOUT {
            problems.push(format!(
                "command_timeout must be at least 1ms, got {:?}",
                self.command_timeout
            ));
        }
        if self.connect_timeout < MIN_TIMEOUT {
            problems.push(format!(
                "connect_timeout must be at least 1ms, got {:?}",
                self.connect_timeout
            ));
        }
        // fred counts the delays in whole milliseconds: a minimum under 1 ms would be 0, and
        // the delays would never grow (a retry every few milliseconds for a whole outage).
        if self.reconnect_min_delay < Duration::from_millis(1)
            || self.reconnect_min_delay > self.reconnect_max_delay
        {
            problems.push(format!(
                "reconnect_delays must satisfy 1ms <= min <= max, got min {:?} and max {:?}",
                self.reconnect_min_delay, self.reconnect_max_delay
            ));
        }
        // The delays double up to the maximum: one of hours (or `Duration::MAX`, which fred
        // reads as 49 days) comes back hours after Redis did, which is giving up in all but name.
        if self.reconnect_max_delay > MAX_RECONNECT_DELAY {
            problems.push(format!(
                "reconnect_delays' max must be at most {MAX_RECONNECT_DELAY:?} (clients resume \
                 within it once Redis is back), got {:?}",
                self.reconnect_max_delay
            ));
        }
        if self.unresponsive_timeout.is_some_and(|t| t < MIN_TIMEOUT) {
            problems.push(format!(
                "unresponsive_timeout must be at least 1ms, got {:?}",
                self.unresponsive()
            ));
        }
        if self.ping_interval < MIN_PING_INTERVAL {
            problems.push(format!(
                "ping_interval must be at least {MIN_PING_INTERVAL:?}, got {:?}",
                self.ping_interval
            ));
        }
        if let Some(idle) = self
            .tcp_keepalive
            .filter(|idle| !(MIN_KEEPALIVE..=MAX_KEEPALIVE).contains(idle))
        {
            problems.push(format!(
                "tcp_keepalive must be from {MIN_KEEPALIVE:?} to {MAX_KEEPALIVE:?} (or None), \
                 got {idle:?}"
            ));
        }
    }
}

/// How a topic keeps events with one partition key in order.
///
/// Events are chained in *lanes*: each entry records the previous entry of its lane, and a
/// consumer group hands an entry out only once it acknowledged that predecessor. Events without
/// a partition key are in no lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyOrdering {
    /// No order: every entry can be handed out at once. `ordered_per_key` is `false`.
    Unordered,
    /// One lane per partition key: the most parallelism, and Redis keeps one field per key
    /// ever published in the topic's lanes hash (the key's last entry id), without expiry.
    /// Groups keep no state per key.
    Exact,
    /// `n` lanes per topic; a key's lane is the FNV-1a hash of the key modulo `n`. Keys that
    /// share a lane also wait for each other, and the state Redis keeps is bounded by `n`.
    /// Every publisher of a topic must use the same `n`.
    Lanes(u32),
}

impl KeyOrdering {
    /// The setting as the topic records it: `unordered`, `exact` or `lanes/{n}`.
    pub(crate) fn name(&self) -> String {
        match *self {
            KeyOrdering::Unordered => "unordered".to_owned(),
            KeyOrdering::Exact => "exact".to_owned(),
            KeyOrdering::Lanes(n) => format!("lanes/{n}"),
        }
    }

    /// The lane of a partition key, or `None` when the event is in no lane.
    pub(crate) fn lane(&self, key: Option<&str>) -> Option<String> {
        let key = key?;
        match *self {
            KeyOrdering::Unordered => None,
            KeyOrdering::Exact => Some(format!("k:{key}")),
            KeyOrdering::Lanes(n) => Some(format!("{}/{n}", fnv1a(key.as_bytes()) % u64::from(n))),
        }
    }
}

/// FNV-1a, 64 bits: stable across processes, versions and languages.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The default [`RedisStreamOptions::trim_limit`].
const DEFAULT_TRIM_LIMIT: usize = 10_000;

/// The smallest [`RedisStreamOptions::trim_limit`]: Redis's default `stream-node-max-entries`.
const MIN_TRIM_LIMIT: usize = 100;

/// The most entries a consumer may hold back ([`RedisStreamOptions::max_held`]).
const MAX_HELD: usize = 10_000;

/// The shortest `gate_poll`: each poll runs a script on Redis, and a consumer waits at least
/// a millisecond between two anyway.
const MIN_GATE_POLL: Duration = Duration::from_millis(1);

/// Options of a [`RedisStreamTransport`](crate::RedisStreamTransport).
///
/// ```no_run
/// use cqrs_redis::{KeyOrdering, RedisStreamOptions};
///
/// # async fn run() -> Result<(), cqrs_redis::ConnectError> {
/// let transport = RedisStreamOptions::new("redis://127.0.0.1:6379")
///     .key_prefix("helpdesk")
///     .key_ordering(KeyOrdering::Lanes(4096))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RedisStreamOptions {
    pub(crate) connection: ConnectionOptions,
    pub(crate) key_prefix: String,
    pub(crate) key_ordering: KeyOrdering,
    pub(crate) max_held: usize,
    pub(crate) gate_poll: Duration,
    pub(crate) trim_approximate: bool,
    pub(crate) trim_limit: usize,
}

impl RedisStreamOptions {
    /// Options for the server at `url` (see [`ConnectionOptions::new`]), with the defaults: key
    /// prefix `cqrs`, [`KeyOrdering::Lanes(1024)`](KeyOrdering::Lanes), 256 held entries per
    /// consumer, a 50 ms gate poll, approximate trimming of at most 10,000 entries a call.
    pub fn new(url: impl Into<String>) -> Self {
        Self::with_connection(ConnectionOptions::new(url))
    }

    /// Options with the given connection options and the other defaults of [`new`](Self::new).
    pub fn with_connection(connection: ConnectionOptions) -> Self {
        Self {
            connection,
            key_prefix: "cqrs".into(),
            key_ordering: KeyOrdering::Lanes(1024),
            max_held: 256,
            gate_poll: Duration::from_millis(50),
            trim_approximate: true,
            trim_limit: DEFAULT_TRIM_LIMIT,
        }
    }

    /// Replaces the connection options.
    pub fn connection(mut self, connection: ConnectionOptions) -> Self {
        self.connection = connection;
        self
    }

    /// The first part of every key: `{prefix}:{{{topic}}}:stream` and so on. Default `cqrs`.
    /// It must not contain `{` or `}`, which would move the cluster hash tag.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// How events with one partition key keep their order. Default
    /// [`KeyOrdering::Lanes(1024)`](KeyOrdering::Lanes).
    ///
    /// Every publisher of a topic must use the same setting: a lane is named after it, so a
    /// change (another variant, or another `n`) starts new lanes, and a key's new events would
    /// no longer wait for its events still in flight. The topic records the setting of its
    /// first publisher, and a publish with another is refused with
    /// [`TransportError::Invalid`](cqrs_core::ports::TransportError::Invalid). To change it,
    /// drain the topic and delete the recorded setting, or use a new topic (`docs/redis.md`,
    /// "Changing `key_ordering`").
    pub fn key_ordering(mut self, ordering: KeyOrdering) -> Self {
        self.key_ordering = ordering;
        self
    }

    /// How many read entries a consumer may hold back while they wait for their predecessor in
    /// the lane (they stay pending to it). When that many are held it reads nothing new until
    /// some are handed out. Default 256; from 1 to 10,000: every
    /// [`gate_poll`](Self::gate_poll) the consumer checks each held entry in one script (an
    /// `XPENDING` per entry, and an `XCLAIM` once they are an eighth of the redelivery delay
    /// old), which blocks Redis for as long as it runs.
    pub fn max_held(mut self, max: usize) -> Self {
        self.max_held = max;
        self
    }

    /// How often a consumer that holds entries back looks whether their predecessors were
    /// acknowledged (by it or by another consumer of its group). Default 50 ms, at least 1 ms.
    pub fn gate_poll(mut self, interval: Duration) -> Self {
        self.gate_poll = interval;
        self
    }

    /// Whether [`trim`](crate::RedisStreamTransport::trim) uses `MINID ~` (cheaper: Redis
    /// removes whole nodes only, so a few entries below the bound may stay) or exact `MINID =`.
    /// Default `true`. Either way no entry at or above the bound is removed.
    pub fn trim_approximate(mut self, approximate: bool) -> Self {
        self.trim_approximate = approximate;
        self
    }

    /// The most entries one approximate [`trim`](crate::RedisStreamTransport::trim) removes
    /// (`XTRIM … MINID ~ … LIMIT`), so that a large backlog does not block Redis in one call;
    /// [`StreamMaintenance`](crate::StreamMaintenance) calls `trim` again while it removes
    /// entries. Default 10,000 (what Redis takes without a `LIMIT`, with its default stream
    /// nodes). Exact trimming (`trim_approximate(false)`) has no limit: Redis refuses one.
    ///
    /// At least 100: approximate trimming removes whole stream nodes only, and a node bigger
    /// than the limit is never removed, so the limit must be at least the server's
    /// `stream-node-max-entries` (100 by default; keep it at least that if you raise it).
    pub fn trim_limit(mut self, limit: usize) -> Self {
        self.trim_limit = limit;
        self
    }

    /// Every problem [`connect`](Self::connect) would refuse these options for, before connecting: for a server to check its
    /// configuration at start. The TLS files are read by
    /// [`ConnectionOptions::validate`](crate::ConnectionOptions::validate), not here.
    ///
    /// ```
    /// use cqrs_redis::{ConnectError, RedisStreamOptions};
    ///
    /// let options = RedisStreamOptions::new("redis://127.0.0.1:6379").trim_limit(1);
    /// let Err(ConnectError::Invalid { problems }) = options.validate() else { panic!() };
    /// assert!(problems[0].contains("trim_limit"), "{problems:?}");
    /// ```
    pub fn validate(&self) -> Result<(), ConnectError> {
        let mut problems = Vec::new();
        self.connection.problems(&mut problems);
        prefix_problems("key_prefix", &self.key_prefix, &mut problems);
        if self.key_ordering == KeyOrdering::Lanes(0) {
            problems.push(format!(
                "key_ordering must have at least one lane, got {:?}",
                self.key_ordering
            ));
        }
        if !(1..=MAX_HELD).contains(&self.max_held) {
            problems.push(format!(
                "max_held must be from 1 to {MAX_HELD}, got {}",
                self.max_held
            ));
        }
        if self.gate_poll < MIN_GATE_POLL {
            problems.push(format!(
                "gate_poll must be at least {MIN_GATE_POLL:?}, got {:?}",
                self.gate_poll
            ));
        }
        if self.trim_limit < MIN_TRIM_LIMIT {
            problems.push(format!(
                "trim_limit must be at least {MIN_TRIM_LIMIT} (a stream node of Redis's default \
                 size), got {}",
                self.trim_limit
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConnectError::Invalid { problems })
        }
    }
}

/// Options of a [`RedisPubSub`](crate::RedisPubSub).
///
/// ```no_run
/// use cqrs_redis::RedisPubSubOptions;
///
/// # async fn run() -> Result<(), cqrs_redis::ConnectError> {
/// let pubsub = RedisPubSubOptions::new("redis://127.0.0.1:6379")
///     .channel_prefix("helpdesk")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RedisPubSubOptions {
    pub(crate) connection: ConnectionOptions,
    pub(crate) channel_prefix: String,
    pub(crate) capacity: usize,
}

impl RedisPubSubOptions {
    /// Options for the server at `url` (see [`ConnectionOptions::new`]), with the defaults:
    /// channel prefix `cqrs`, 1024 buffered messages per subscriber.
    pub fn new(url: impl Into<String>) -> Self {
        Self::with_connection(ConnectionOptions::new(url))
    }

    /// Options with the given connection options and the other defaults of [`new`](Self::new).
    pub fn with_connection(connection: ConnectionOptions) -> Self {
        Self {
            connection,
            channel_prefix: "cqrs".into(),
            capacity: 1024,
        }
    }

    /// Replaces the connection options.
    pub fn connection(mut self, connection: ConnectionOptions) -> Self {
        self.connection = connection;
        self
    }

    /// The first part of every channel name: `{prefix}:{channel}`. Default `cqrs`. Pub/sub
    /// ignores the database number, so this prefix is what separates applications (and tests)
    /// sharing one server, as long as no application's prefix is another's followed by `:`
    /// (`app` with channel `realtime:x` and `app:realtime` with channel `x` are one channel).
    pub fn channel_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.channel_prefix = prefix.into();
        self
    }

    /// How many messages each local subscriber buffers; a subscriber further behind misses
    /// messages (counted in `Subscription::missed`). Default 1024; from 1 to
    /// [`Fanout::MAX_CAPACITY`](cqrs_core::ports::Fanout::MAX_CAPACITY) (2^20). Each
    /// subscribed channel allocates its buffer up front, about 56 bytes per message: 56 KiB
    /// per channel at the default, so lower it for thousands of channels per instance. The
    /// subscriber connection's own buffer, which the local ones are fed from, holds this many
    /// too, at most 65,536.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Every problem [`connect`](Self::connect) would refuse these options for, before connecting: for a server to check its configuration at start. The
    /// TLS files are read by [`ConnectionOptions::validate`](crate::ConnectionOptions::validate),
    /// not here.
    ///
    /// ```
    /// use cqrs_redis::RedisPubSubOptions;
    ///
    /// assert!(RedisPubSubOptions::new("redis://127.0.0.1:6379").validate().is_ok());
    /// assert!(RedisPubSubOptions::new("redis://127.0.0.1:6379").capacity(0).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), ConnectError> {
        let mut problems = Vec::new();
        self.connection.problems(&mut problems);
        prefix_problems("channel_prefix", &self.channel_prefix, &mut problems);
        if self.capacity == 0 {
            problems.push(format!(
                "capacity must be at least 1, got {}",
                self.capacity
            ));
        }
        if self.capacity > cqrs_core::ports::Fanout::MAX_CAPACITY {
            problems.push(format!(
                "capacity must be at most {}, got {}",
                cqrs_core::ports::Fanout::MAX_CAPACITY,
                self.capacity
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConnectError::Invalid { problems })
        }
    }
}

/// The problems of a key or channel prefix, named by its setter.
fn prefix_problems(setter: &str, prefix: &str, problems: &mut Vec<String>) {
    if prefix.is_empty() {
        problems.push(format!("{setter} must not be empty, got \"\""));
    }
    if prefix.contains(['{', '}']) {
        problems.push(format!(
            "{setter} must not contain `{{` or `}}` (they would move the hash tag), got \
             {prefix:?}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let options = RedisStreamOptions::new("http://nope")
            .key_prefix("a{b")
            .max_held(0)
            .connection(ConnectionOptions::new("not a url").command_timeout(Duration::ZERO));
        let Err(ConnectError::Invalid { problems }) = options.validate() else {
            panic!("invalid options pass");
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    /// Every `gate_poll` a consumer checks each entry it holds in one script that blocks
    /// Redis while it runs: `max_held` is bounded.
    #[test]
    fn max_held_is_bounded() {
        let held = |n| RedisStreamOptions::new(DEFAULT_URL).max_held(n).validate();
        assert!(held(MAX_HELD).is_ok());
        let Err(ConnectError::Invalid { problems }) = held(MAX_HELD + 1) else {
            panic!("max_held above the bound passes");
        };
        assert_eq!(problems, ["max_held must be from 1 to 10000, got 10001"]);
    }

    /// Each problem names the setter and the value it was given, as the Postgres and realtime
    /// options do ("max held must be at least 1" named neither).
    #[test]
    fn problems_name_the_setter_and_the_value() {
        let connection = ConnectionOptions::new(DEFAULT_URL)
            .command_timeout(Duration::ZERO)
            .connect_timeout(Duration::from_micros(999))
            .reconnect_delays(Duration::from_secs(2), Duration::from_secs(1))
            .unresponsive_timeout(Duration::from_micros(100))
            .ping_interval(Duration::ZERO)
            .tcp_keepalive(Some(Duration::from_millis(500)));
        let stream = RedisStreamOptions::with_connection(connection)
            .key_prefix("")
            .key_ordering(KeyOrdering::Lanes(0))
            .max_held(0)
            .gate_poll(Duration::from_micros(999))
            .trim_limit(99);
        let Err(ConnectError::Invalid { problems }) = stream.validate() else {
            panic!("invalid options pass");
        };
        assert_eq!(
            problems,
            [
                "command_timeout must be at least 1ms, got 0ns",
                "connect_timeout must be at least 1ms, got 999µs",
                "reconnect_delays must satisfy 1ms <= min <= max, got min 2s and max 1s",
                "unresponsive_timeout must be at least 1ms, got 100µs",
                "ping_interval must be at least 10ms, got 0ns",
                "tcp_keepalive must be from 1s to 32767s (or None), got 500ms",
                "key_prefix must not be empty, got \"\"",
                "key_ordering must have at least one lane, got Lanes(0)",
                "max_held must be from 1 to 10000, got 0",
                "gate_poll must be at least 1ms, got 999µs",
                "trim_limit must be at least 100 (a stream node of Redis's default size), got 99",
            ]
        );
        // Under a millisecond fred's delays are 0 and never grow.
        let sub_ms = ConnectionOptions::new(DEFAULT_URL)
            .reconnect_delays(Duration::from_micros(500), Duration::from_secs(5));
        let Err(ConnectError::Invalid { problems }) =
            RedisStreamOptions::with_connection(sub_ms).validate()
        else {
            panic!("a sub-millisecond reconnect delay passes");
        };
        assert_eq!(
            problems,
            ["reconnect_delays must satisfy 1ms <= min <= max, got min 500µs and max 5s"]
        );
        // A maximum of hours comes back hours after Redis did.
        for max in [Duration::from_secs(301), Duration::MAX] {
            let slow = ConnectionOptions::new(DEFAULT_URL)
                .reconnect_delays(Duration::from_millis(100), max);
            let Err(ConnectError::Invalid { problems }) =
                RedisStreamOptions::with_connection(slow).validate()
            else {
                panic!("a reconnect delay of {max:?} passes");
            };
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(
                problems[0].starts_with("reconnect_delays' max must be at most 300s"),
                "{problems:?}"
            );
        }
        let five_minutes = ConnectionOptions::new(DEFAULT_URL)
            .reconnect_delays(Duration::from_millis(100), Duration::from_secs(300));
        assert!(
            RedisStreamOptions::with_connection(five_minutes)
                .validate()
                .is_ok()
        );
        let pubsub = RedisPubSubOptions::new(DEFAULT_URL)
            .channel_prefix("a}b")
            .capacity(0);
        let Err(ConnectError::Invalid { problems }) = pubsub.validate() else {
            panic!("invalid options pass");
        };
        assert_eq!(
            problems,
            [
                "channel_prefix must not contain `{` or `}` (they would move the hash tag), got \
                 \"a}b\"",
                "capacity must be at least 1, got 0",
            ]
        );
    }

    /// A capacity past what a broadcast channel takes (it panicked when the first channel was
    /// subscribed) is refused, naming the setter and the value.
    #[test]
    fn a_capacity_past_the_maximum_is_refused() {
        for capacity in [usize::MAX, (1 << 20) + 1] {
            let options = RedisPubSubOptions::new(DEFAULT_URL).capacity(capacity);
            let Err(ConnectError::Invalid { problems }) = options.validate() else {
                panic!("capacity {capacity} passes");
            };
            assert_eq!(
                problems,
                [format!("capacity must be at most 1048576, got {capacity}")]
            );
        }
        let most = RedisPubSubOptions::new(DEFAULT_URL).capacity(1 << 20);
        assert!(most.validate().is_ok());
    }

    /// Linux refuses a keepalive idle time above 32767 s (every connect failed with `EINVAL`),
    /// and a ping interval of a few nanoseconds pings back to back: both refused up front.
    #[test]
    fn keepalive_and_ping_interval_stay_in_the_ranges_that_work() {
        let problems = |connection: ConnectionOptions| {
            let mut problems = Vec::new();
            connection.problems(&mut problems);
            problems
        };
        for idle in [
            Duration::from_secs(32768),
            Duration::from_secs(24 * 3600),
            Duration::MAX,
        ] {
            assert_eq!(
                problems(ConnectionOptions::new(DEFAULT_URL).tcp_keepalive(Some(idle))),
                [format!(
                    "tcp_keepalive must be from 1s to 32767s (or None), got {idle:?}"
                )]
            );
        }
        for interval in [Duration::from_nanos(1), Duration::from_micros(9_999)] {
            assert_eq!(
                problems(ConnectionOptions::new(DEFAULT_URL).ping_interval(interval)),
                [format!(
                    "ping_interval must be at least 10ms, got {interval:?}"
                )]
            );
        }
        let edges = ConnectionOptions::new(DEFAULT_URL)
            .tcp_keepalive(Some(Duration::from_secs(32767)))
            .ping_interval(Duration::from_millis(10));
        assert!(problems(edges).is_empty());
        let edges = ConnectionOptions::new(DEFAULT_URL).tcp_keepalive(Some(Duration::from_secs(1)));
        assert!(problems(edges).is_empty());
    }

    /// fred connects in plain text whatever the scheme: `https://` (TLS expected),
    /// `localhost:6379` (no `redis://`) and a typo were accepted. Only Redis's and Valkey's
    /// schemes pass, and a credential pasted before `://` is not shown.
    #[test]
    fn only_redis_schemes_are_accepted() {
        let problems = |url: &str| {
            let mut problems = Vec::new();
            ConnectionOptions::new(url).problems(&mut problems);
            problems
        };
        for (url, named) in [
            ("https://127.0.0.1:6379", "`https` "),
            ("http://127.0.0.1:6379", "`http` "),
            ("foo://127.0.0.1:6379", "`foo` "),
            ("redis-clustr://127.0.0.1:6379", "`redis-clustr` "),
            ("admin:s3cret@host://127.0.0.1", ""),
        ] {
            assert_eq!(
                problems(url),
                [format!(
                    "url scheme {named}is not a redis scheme: use `redis://` (`rediss://` for \
                     TLS; `valkey://` and `valkeys://` work too, each also with `-cluster` or \
                     `-sentinel`)"
                )],
                "{url}"
            );
        }
        for url in ["localhost:6379", "127.0.0.1:6379", "admin:s3cret@127.0.0.1"] {
            assert_eq!(
                problems(url),
                ["url has no scheme: write it as `redis://host:port` (`rediss://` for TLS)"],
                "{url}"
            );
        }
        for url in [
            "redis://127.0.0.1:6379",
            "REDIS://127.0.0.1:6379",
            "valkey://127.0.0.1:6379",
            "redis-cluster://127.0.0.1:30001",
            "redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=main",
        ] {
            assert!(problems(url).is_empty(), "{url}: {:?}", problems(url));
        }
    }

    /// A URL that is not valid, with a password in it, is reported without the password
    /// (the whole URL was in the message), wherever the URL breaks.
    #[test]
    fn an_invalid_url_is_reported_without_its_password() {
        for (url, shown) in [
            (
                "redis://admin:s3cret@127.0.0.1:notaport",
                "redis://(not shown: it does not parse, and may hold a password)",
            ),
            (
                "redis://admin:s3/cret@127.0.0.1:6379",
                "redis://(not shown: it does not parse, and may hold a password)",
            ),
            (
                "redis://admin:s3cret:127.0.0.1",
                "redis://(not shown: it does not parse, and may hold a password)",
            ),
            (
                "redis://:s3cret@127.0.0.1:6379/x/y",
                "redis://:***@127.0.0.1:6379/x/y",
            ),
        ] {
            let mut problems = Vec::new();
            ConnectionOptions::new(url).problems(&mut problems);
            let [problem] = problems.as_slice() else {
                panic!("{url}: {problems:?}");
            };
            assert!(!problem.contains("s3"), "{problem}");
            assert!(
                problem.starts_with(&format!("url `{shown}` is not a redis url: ")),
                "{problem}"
            );
        }
    }

    /// The `Debug` of every option type shows the URL without its password (it printed the
    /// URL as given).
    #[test]
    fn debug_hides_the_password() {
        let url = "redis://app:s3cret@cache.internal:6379/2";
        let connection = ConnectionOptions::new(url);
        let shown = [
            format!("{connection:?}"),
            format!("{:?}", RedisStreamOptions::new(url)),
            format!("{:?}", RedisPubSubOptions::new(url)),
            format!(
                "{:#?}",
                RedisPubSubOptions::with_connection(connection.clone())
            ),
        ];
        for debug in shown {
            assert!(!debug.contains("s3cret"), "{debug}");
            assert!(
                debug.contains("redis://app:***@cache.internal:6379/2"),
                "{debug}"
            );
        }
        assert_eq!(connection.url(), url, "the accessor keeps the URL as given");
    }

    /// fred is built without `sentinel-auth` here: sentinel credentials in the URL would be
    /// ignored (the sentinels asked with the URL's own), so they are refused, not shown.
    #[test]
    fn sentinel_credentials_are_refused_as_this_build_ignores_them() {
        assert!(
            !fred_takes_sentinel_credentials(),
            "this build's fred has `sentinel-auth`: the refusal below is off, as it should be"
        );
        for (url, name) in [
            (
                "redis-sentinel://:pw@s1:26379/0?sentinelServiceName=m&sentinelPassword=spw2",
                "sentinelPassword",
            ),
            (
                "redis-sentinel://s1:26379/0?sentinelServiceName=m&sentinelUsername=ops",
                "sentinelUsername",
            ),
        ] {
            let Err(ConnectError::Invalid { problems }) =
                RedisStreamOptions::with_connection(ConnectionOptions::new(url)).validate()
            else {
                panic!("{url} passes");
            };
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(&format!("sets {name}, which this build ignores")));
            assert!(!problems[0].contains("spw2"), "{problems:?}");
        }
        let shared = "redis-sentinel://:pw@s1:26379/0?sentinelServiceName=m";
        assert!(
            RedisStreamOptions::with_connection(ConnectionOptions::new(shared))
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn redaction_keeps_what_is_not_secret() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/2", "redis://127.0.0.1:6379/2"),
            ("redis://user@host:6379", "redis://***@host:6379"),
            (
                "redis-sentinel://:pw@a:26379/0?sentinelServiceName=m&sentinelPassword=pw2",
                "redis-sentinel://:***@a:26379/0?sentinelServiceName=m&sentinelPassword=***",
            ),
            (
                "redis-cluster://u:pw@a:30001?node=b:30002",
                "redis-cluster://u:***@a:30001?node=b:30002",
            ),
            (
                "redis-sentinel://:pw@a:26379/0?sentinelServiceName=m&sentinelPassword=pw2@yz",
                "redis-sentinel://:***@a:26379/0?sentinelServiceName=m&sentinelPassword=***",
            ),
            (
                "not a url",
                "(not shown: it does not parse, and may hold a password)",
            ),
            // A password holding `/` or `?` unencoded parses as a port and a path or query.
            (
                "redis://app:2024/xyz@host",
                "redis://(not shown: an `@` outside its user info may end a password)",
            ),
            (
                "redis://app:2024?xyz@host",
                "redis://(not shown: an `@` outside its user info may end a password)",
            ),
            // A password holding `@` and `/` unencoded after a user name: the host and path
            // parsed are parts of it.
            (
                "redis://default:Xy@Z/9k@cache:6379",
                "redis://(not shown: an `@` outside its user info may end a password)",
            ),
            (
                "redis://default:Xy@Z?9k@cache:6379",
                "redis://(not shown: an `@` outside its user info may end a password)",
            ),
            // No `://`: parsed with the user name as its scheme.
            (
                "admin:s3cret@cache:6379",
                "(not shown: not a URL of the form scheme://host, and may hold a password)",
            ),
        ] {
            assert_eq!(redacted_url(url), shown);
        }
    }

    /// A database in a cluster URL (fred reads none, and used 0) and a Unix socket URL (this
    /// build has no socket support; it was "not a redis scheme") are refused saying why.
    #[test]
    fn a_cluster_database_and_a_unix_socket_are_refused_saying_why() {
        for (url, says) in [
            (
                "redis-cluster://h:30001/2",
                "names a database, which a cluster URL cannot",
            ),
            (
                "rediss-cluster://u:pw@h:30001/1",
                "names a database, which a cluster URL cannot",
            ),
            (
                "redis+unix:///run/redis.sock",
                "a Unix socket URL is not supported",
            ),
            (
                "unix:///run/redis.sock",
                "a Unix socket URL is not supported",
            ),
        ] {
            let mut problems = Vec::new();
            ConnectionOptions::new(url).problems_in_build(true, &mut problems);
            assert!(
                problems.iter().any(|p| p.contains(says)),
                "{url}: {problems:?}"
            );
            assert!(problems.iter().all(|p| !p.contains("pw")), "{problems:?}");
        }
        for fine in [
            "redis-cluster://h:30001",
            "redis-cluster://h:30001/",
            "redis-cluster://h:30001/0",
            "redis://h:6379/2",
        ] {
            let mut problems = Vec::new();
            ConnectionOptions::new(fine).problems_in_build(true, &mut problems);
            assert!(problems.is_empty(), "{fine}: {problems:?}");
        }
    }

    /// Without the `tls` feature a TLS URL is refused as a configuration error saying how to
    /// turn TLS on (fred only logged a warning, and then connected without TLS or failed);
    /// with it, the URL is accepted.
    #[test]
    fn a_tls_url_needs_the_tls_feature_and_says_so() {
        for url in [
            "rediss://app:s3cret@cache.internal:6380",
            "rediss-cluster://cache.internal:30001",
            "valkeys://cache.internal:6380",
            "REDISS://cache.internal:6380",
        ] {
            let connection = ConnectionOptions::new(url);
            let mut with_tls = Vec::new();
            connection.problems_in_build(true, &mut with_tls);
            assert!(with_tls.is_empty(), "{url}: {with_tls:?}");
            let mut without_tls = Vec::new();
            connection.problems_in_build(false, &mut without_tls);
            let [message] = without_tls.as_slice() else {
                panic!("{url}: {without_tls:?}");
            };
            for part in [
                "asks for TLS, but cqrs-redis is built without its `tls` feature",
                "features = [\"tls\"]",
                "plain `redis://` URL on a private network",
            ] {
                assert!(message.contains(part), "{part:?} in {message}");
            }
            assert!(!message.contains("s3cret"), "{message}");
            // This build: the stream transport and the pub/sub check the same way.
            let built = cfg!(feature = "tls");
            let stream = RedisStreamOptions::new(url).validate();
            assert_eq!(stream.is_ok(), built, "{url}: {stream:?}");
            if let Err(error) = stream {
                assert!(matches!(error, ConnectError::Invalid { .. }), "{error:?}");
                assert_eq!(error.kind(), cqrs_core::ErrorKind::Invalid);
            }
            assert_eq!(RedisPubSubOptions::new(url).validate().is_ok(), built);
        }
        assert!(
            RedisStreamOptions::new("redis://cache.internal:6379")
                .validate()
                .is_ok()
        );
    }

    /// `ConnectionOptions::validate` reads the TLS files of a `rediss://` URL, as a connect
    /// would, and names the one it cannot read; with a plain URL it reads none.
    #[cfg(feature = "tls")]
    #[test]
    fn validate_reads_the_tls_files_a_connect_would() {
        let missing = "/nonexistent/cqrs-redis-test/ca.pem";
        let Err(ConnectError::Invalid { problems }) =
            ConnectionOptions::new("rediss://cache.internal:6380")
                .tls_ca_file(missing)
                .validate()
        else {
            panic!("an unreadable CA file passes");
        };
        assert!(
            problems.len() == 1
                && problems[0].contains(&format!("tls_ca_file `{missing}` cannot be read")),
            "{problems:?}"
        );
        assert!(
            ConnectionOptions::new("rediss://cache.internal:6380")
                .validate()
                .is_ok()
        );
        assert!(
            ConnectionOptions::new("redis://cache.internal:6379")
                .validate()
                .is_ok()
        );
    }

    /// A CA file or client certificate with a plain URL would silently go unused: refused,
    /// saying what to do.
    #[test]
    fn tls_files_with_a_plain_url_are_refused() {
        let plain = || ConnectionOptions::new("redis://app:s3cret@cache.internal:6379");
        for (connection, name) in [
            (plain().tls_ca_file("ca.pem"), "tls_ca_file"),
            (plain().tls_client_cert("c.pem", "c.key"), "tls_client_cert"),
        ] {
            let Err(error) = RedisStreamOptions::with_connection(connection).validate() else {
                panic!("{name} with a plain URL passes");
            };
            let message = error.to_string();
            assert!(
                message.contains(&format!("{name} is set, but url")),
                "{message}"
            );
            assert!(message.contains("use `rediss://`"), "{message}");
            assert!(!message.contains("s3cret"), "{message}");
        }
    }

    /// fred parses the plain form of every TLS scheme; the rest of the URL is kept as given.
    #[test]
    fn tls_schemes_are_handed_to_fred_in_their_plain_form() {
        for (tls, plain) in [
            ("rediss://u:p@h:1/2", "redis://u:p@h:1/2"),
            ("REDISS://h:1", "redis://h:1"),
            (
                "rediss-cluster://h:1?node=h:2",
                "redis-cluster://h:1?node=h:2",
            ),
            ("rediss-sentinel://h:1", "redis-sentinel://h:1"),
            ("valkeys://h:1", "valkey://h:1"),
            ("redis://h:1", "redis://h:1"),
        ] {
            assert_eq!(plain_scheme_url(tls), plain, "{tls}");
        }
    }

    #[test]
    fn lanes_are_stable_and_bounded() {
        let lanes = KeyOrdering::Lanes(8);
        assert_eq!(lanes.lane(Some("ticket-1")), lanes.lane(Some("ticket-1")));
        assert_eq!(lanes.lane(None), None);
        assert!(lanes.lane(Some("x")).is_some_and(|l| l.ends_with("/8")));
        // FNV-1a of the empty input is the offset basis.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(KeyOrdering::Unordered.lane(Some("k")), None);
        assert_eq!(KeyOrdering::Exact.lane(Some("k")).as_deref(), Some("k:k"));
    }
}
