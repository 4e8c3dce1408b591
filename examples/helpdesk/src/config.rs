//! Configuration: flags, each with its environment variable.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use cqrs_postgres::{PgError, PgOptions};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The helpdesk server: an HTTP + WebSocket gateway over the auth and tickets plugins.
///
/// With no DATABASE_URL it runs on in-memory backends: nothing to set up, nothing survives a
/// restart, one instance only. With DATABASE_URL and REDIS_URL, any number of instances share
/// one Postgres schema and one Redis prefix.
///
/// Read it with [`Config::try_parse_with_env`]: clap's own parsing would read the process's
/// environment and take a variable set to the empty string as a value.
#[derive(Clone, Parser)]
#[command(
    name = "helpdesk",
    version,
    about,
    long_about = None,
    after_help = "Each flag's environment variable is read when the flag is not given; one set to the empty string (or only whitespace) counts as unset."
)]
pub struct Config {
    /// The address to listen on: an IP address and a port (`0.0.0.0:8080` for every IPv4
    /// interface, `[::]:8080` for every IPv6 one); host names are not resolved.
    #[arg(long, env = "HELPDESK_BIND", default_value = "127.0.0.1:8080", value_parser = bind_address)]
    pub bind: SocketAddr,

    /// Postgres for state, events, outbox and idempotency (for example
    /// postgres://postgres@127.0.0.1:5432/helpdesk). Without it, everything is in memory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Redis for durable event delivery (Streams) and realtime fan-out (pub/sub). Needs
    /// DATABASE_URL.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// A PEM file of the CA certificates to trust for a `rediss://` REDIS_URL, instead of the
    /// system's root certificates (a private CA). Postgres takes its CA in the URL
    /// (`sslrootcert=`).
    #[arg(long, env = "REDIS_TLS_CA_FILE")]
    pub redis_tls_ca_file: Option<String>,

    /// A PEM file of the client certificate to present to a `rediss://` server that asks for
    /// one (Redis's `tls-auth-clients`). Needs REDIS_TLS_KEY_FILE.
    #[arg(long, env = "REDIS_TLS_CERT_FILE")]
    pub redis_tls_cert_file: Option<String>,

    /// A PEM file of the private key of REDIS_TLS_CERT_FILE.
    #[arg(long, env = "REDIS_TLS_KEY_FILE")]
    pub redis_tls_key_file: Option<String>,

    /// The Postgres schema holding every table (the framework's and the plugins'). Instances
    /// serving one helpdesk share it; another schema is another, independent helpdesk.
    #[arg(long, env = "HELPDESK_DATABASE_SCHEMA", default_value = "helpdesk")]
    pub database_schema: String,

    /// The most Postgres connections this instance opens, 10 to 10000 (commands, queries,
    /// /ready and the background workers share them; the helpdesk's workers hold up to 9 at
    /// once, plus the plugins' workers, and 2 for each relay to event handlers when plugins
    /// registered some, one plugin's each). Mind the server's `max_connections` across
    /// instances. Unused in memory.
    #[arg(long, env = "HELPDESK_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// How long a request waits for a Postgres connection before it is answered 503
    /// `unavailable`, in milliseconds (1 to 600000): while Postgres refuses connections, every
    /// request waits this long; under load, a wait shorter than a busy moment sheds requests.
    /// Unused in memory.
    #[arg(
        long,
        env = "HELPDESK_DATABASE_ACQUIRE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub database_acquire_timeout_ms: u64,

    /// The prefix of every Redis key and pub/sub channel. Instances serving one helpdesk share
    /// it.
    #[arg(long, env = "HELPDESK_REDIS_PREFIX", default_value = "helpdesk")]
    pub redis_prefix: String,

    /// The HS256 secret that signs bearer tokens: at least 32 bytes. Without it the in-memory
    /// mode makes a random one (tokens then die with the process).
    #[arg(long, env = "HELPDESK_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// A bearer token `GET /metrics` asks for (`Authorization: Bearer <token>`, as a
    /// Prometheus scrape's `authorization` setting sends it): at least 16 bytes. Without it
    /// `/metrics` answers whoever reaches the server, which is warned about at start when the
    /// server listens beyond this host.
    #[arg(long, env = "HELPDESK_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Comma-separated emails that register as agents, each with the agent code; everyone else
    /// is a customer. An agent whose email is taken off the list is a customer from their next
    /// request on.
    #[arg(
        long,
        env = "HELPDESK_AGENT_EMAILS",
        default_value = "",
        value_delimiter = ','
    )]
    pub agent_emails: Vec<String>,

    /// The secret an agent sends (`agent_code`) to register an email of HELPDESK_AGENT_EMAILS:
    /// at least 16 bytes. Needed with agent emails on Postgres; without it the in-memory mode
    /// makes a random one and logs it.
    #[arg(long, env = "HELPDESK_AGENT_CODE", hide_env_values = true)]
    pub agent_code: Option<String>,

    /// How long a token lives, in seconds.
    #[arg(long, env = "HELPDESK_TOKEN_TTL", default_value_t = 3600)]
    pub token_ttl_seconds: u64,

    /// Log format.
    #[arg(long, env = "HELPDESK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The time budget of one request, in milliseconds; past it the answer is 503.
    #[arg(long, env = "HELPDESK_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// How long a graceful stop (SIGINT or SIGTERM) may take once its delay
    /// (`HELPDESK_SHUTDOWN_DELAY_MS`) is over, in milliseconds: in-flight
    /// requests and WebSocket close frames get all of it but the background workers' share (a
    /// quarter, at most 2 s), which is kept for the workers to stop in; what still runs at the
    /// end is cut off. A second signal exits at once, with code 130 after SIGINT (Ctrl-C), 143
    /// after SIGTERM.
    #[arg(long, env = "HELPDESK_SHUTDOWN_GRACE_MS", default_value_t = 15_000)]
    pub shutdown_grace_ms: u64,

    /// How long a stop keeps serving before it begins, in milliseconds (at most 600000):
    /// `/ready` answers 503 `stopping` at once, and every request is still served meanwhile,
    /// so that a load balancer that polls `/ready` (or a Kubernetes endpoint update) stops
    /// sending new requests before the listener closes. The grace period counts from its end.
    /// 0 (the default) stops at once.
    #[arg(long, env = "HELPDESK_SHUTDOWN_DELAY_MS", default_value_t = 0)]
    pub shutdown_delay_ms: u64,

    /// Failed logins per email and client address before 429.
    #[arg(long, env = "HELPDESK_LOGIN_ATTEMPTS", default_value_t = 10)]
    pub login_attempts: u32,

    /// The window for counting failed logins, in seconds.
    #[arg(long, env = "HELPDESK_LOGIN_WINDOW", default_value_t = 900)]
    pub login_window_seconds: u64,

    /// Requests a signed-in user may make per second, on average, counted in the commands and
    /// queries they dispatch (a route is one, each further attempt of a change that met
    /// another writer one more, a WebSocket subscribe to a ticket one), each instance counting
    /// its own; past it a request gets 429 with `Retry-After`. Any one user can otherwise keep
    /// the server reading a large ticket again and again. 0 turns the limit off.
    #[arg(long, env = "HELPDESK_USER_REQUESTS_PER_SECOND", default_value_t = 50)]
    pub user_requests_per_second: u32,

    /// Requests a signed-in user may make at once, above the rate (a page that loads several
    /// things, a client reconnecting); at least 1.
    #[arg(long, env = "HELPDESK_USER_REQUEST_BURST", default_value_t = 100)]
    pub user_request_burst: u32,

    /// Comma-separated addresses or ranges of reverse proxies in front of the server (for
    /// example 127.0.0.1 for an nginx on the same host, 10.0.0.0/8 for a load balancer whose
    /// nodes change addresses within a subnet). For requests from them, the client address
    /// (login throttling, connection limits) is taken from X-Forwarded-For; from anyone else
    /// that header is ignored, and the first such request is logged.
    #[arg(long, env = "HELPDESK_TRUSTED_PROXIES", value_delimiter = ',', value_parser = proxy_address)]
    pub trusted_proxies: Vec<helpdesk_api::AddressRange>,

    /// Comma-separated origins of web pages allowed to call the API from a browser (CORS),
    /// like `https://app.example.com`, or `*` for any page. None by default: a browser then
    /// lets only pages served from the API's own origin read its answers.
    #[arg(long, env = "HELPDESK_CORS_ORIGINS", value_delimiter = ',', value_parser = cors_origin)]
    pub cors_origins: Vec<String>,

    /// How often background consumers poll, in milliseconds.
    #[arg(long, env = "HELPDESK_POLL_MS", default_value_t = 100)]
    pub poll_ms: u64,

    /// How long a client may take to send a request's line and headers, in milliseconds. A
    /// connection that takes longer (a slowloris trickling a byte a minute, or a keep-alive
    /// connection left idle) is closed, so such clients cannot hold sockets without end. Also
    /// how long a connection's writes may make no progress (a client that sends requests and
    /// never reads the answers) before it is closed. At least 100, at most 86400000 (a day).
    #[arg(long, env = "HELPDESK_HEADER_TIMEOUT_MS", default_value_t = 30_000)]
    pub header_timeout_ms: u64,

    /// The most client connections (HTTP and WebSocket) served at once; past it, new ones wait
    /// in the listen backlog until one closes, instead of the process running out of file
    /// descriptors (which would also stop it reaching Postgres and Redis). Default: the
    /// open-file limit, raised to its hard limit at start, less 256 and the database pool.
    #[arg(long, env = "HELPDESK_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,

    /// The most passwords hashed or checked at once (logins and registrations); past it a
    /// request waits up to 2 s for a turn, then gets 503 `busy`. Each takes ~19 MiB for tens
    /// of milliseconds of a core. Default: two per core, at most 16; set it lower in a
    /// container with little memory, higher on a large machine.
    #[arg(long, env = "HELPDESK_MAX_CONCURRENT_HASHES")]
    pub max_concurrent_hashes: Option<u32>,

    /// The most WebSocket connections one client address (an IPv4 address or an IPv6 /64)
    /// holds at once, whatever accounts they belong to; past it a handshake gets 429. Anyone
    /// may register accounts, so the limit per user alone would let one client fill the hub.
    /// At most all but a tenth of the WebSockets the hub holds, and of
    /// --http-connections-per-address (a WebSocket holds its connection's place), whatever
    /// this says.
    #[arg(
        long,
        env = "HELPDESK_WS_CONNECTIONS_PER_ADDRESS",
        default_value_t = 1_000
    )]
    pub ws_connections_per_address: usize,

    /// The most connections (HTTP and WebSocket alike) one client address (an IPv4 address or
    /// an IPv6 /64) holds open at once; past it a new connection is closed as soon as it is
    /// accepted, so one client cannot take every connection the server serves (idle or
    /// half-sent requests, say). Addresses in --trusted-proxies are not limited: every client
    /// behind a proxy shares its address. At most all but a tenth of --max-connections,
    /// whatever this says, so that one address alone cannot take every place (several
    /// addresses together still can: --max-connections bounds them all).
    #[arg(
        long,
        env = "HELPDESK_HTTP_CONNECTIONS_PER_ADDRESS",
        default_value_t = 1_000
    )]
    pub http_connections_per_address: usize,

    /// How often expired idempotency records (kept 24 hours) and the stats projection's inbox
    /// entries older than 7 days are deleted and, on Redis, the event stream is trimmed of
    /// what every consumer group acknowledged, in milliseconds.
    #[arg(long, env = "HELPDESK_PURGE_INTERVAL_MS", default_value_t = 3_600_000)]
    pub purge_interval_ms: u64,

    /// Show in /ready why a component is not healthy. Off by default: the reasons quote the
    /// backends (a driver's error, a user name) and /ready answers anyone; they are logged
    /// instead. For a server whose /ready only operators can reach.
    /// `--ready-details` alone turns it on, as do `true`, `yes`, `on` or `1` (or `y`, `t`) as
    /// its value (or its variable's); `false`, `no`, `off` or `0` (or `n`, `f`) leave it off;
    /// anything else is refused.
    #[arg(
        long,
        env = "HELPDESK_READY_DETAILS",
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub ready_details: bool,

    /// The secret-bearing flags given on the command line rather than in their variables, as
    /// [`Config::try_parse_with_env`] found them: other users of the machine can read a
    /// process's arguments (`ps`), so the server warns about each at start.
    #[arg(skip)]
    pub secrets_on_command_line: Vec<&'static str>,
}

/// `HELPDESK_BIND`: an IP address and a port, with what is expected in the error.
fn bind_address(value: &str) -> Result<SocketAddr, String> {
    value.trim().parse().map_err(|_| {
        "expected an IP address and a port, like 127.0.0.1:8080, 0.0.0.0:8080 or [::]:8080 \
         (host names such as localhost are not resolved)"
            .to_owned()
    })
}

/// One origin of `HELPDESK_CORS_ORIGINS`, spaces around it allowed: `*`, or
/// `scheme://host[:port]` as a browser sends it in `Origin` (no path, no trailing slash),
/// which a browser compares byte for byte.
fn cors_origin(value: &str) -> Result<String, String> {
    let origin = value.trim();
    let explain = |why: &str| {
        format!(
            "`{}` is not an origin ({why}): expected origins separated by commas, each \
             scheme://host[:port] as a browser sends it (https://app.example.com, \
             http://localhost:3000), or `*` for any",
            origin.chars().take(80).collect::<String>()
        )
    };
    if origin == "*" {
        return Ok(origin.to_owned());
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Err(explain("no scheme"));
    };
    if scheme != "http" && scheme != "https" {
        return Err(explain("only http and https pages send requests"));
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.ends_with(':') {
        return Err(explain(
            "an origin has a host and perhaps a port, nothing after them",
        ));
    }
    if !origin.bytes().all(|b| b.is_ascii_graphic())
        || origin.bytes().any(|b| b.is_ascii_uppercase())
    {
        return Err(explain("browsers send origins in lower-case ASCII"));
    }
    // As a browser serializes it: no default port, an IDN host in punycode. One written
    // otherwise would never match the `Origin` a browser sends.
    let parsed = url::Url::parse(origin).map_err(|e| explain(&e.to_string()))?;
    let serialized = parsed.origin().ascii_serialization();
    if serialized != origin {
        return Err(explain(&format!("a browser sends it as `{serialized}`")));
    }
    Ok(origin.to_owned())
}

/// One address or range of `HELPDESK_TRUSTED_PROXIES`, spaces around it allowed
/// (`127.0.0.1, 10.0.0.0/8`).
fn proxy_address(value: &str) -> Result<helpdesk_api::AddressRange, String> {
    value.trim().parse().map_err(|why: String| {
        format!("{why} (list addresses and ranges separated by commas, like 127.0.0.1,10.0.0.0/8)")
    })
}

/// The fewest Postgres connections a server works with: the background workers hold up to
/// nine at once (docs/helpdesk.md counts them), and requests need some too. Plugins' workers
/// and the relay to their event handlers (two) come on top: the start warns when the pool
/// leaves requests fewer than one with them.
const MIN_DATABASE_CONNECTIONS: u32 = 10;

/// A flag, its variable, and whether the configuration holds a secret there.
type SecretFlag = (&'static str, &'static str, fn(&Config) -> bool);

/// The flags whose values are secrets, or URLs that may hold one (a secret only with a
/// password).
const SECRET_FLAGS: [SecretFlag; 5] = [
    ("database_url", "DATABASE_URL", |c| {
        holds_password(c.database_url.as_deref())
    }),
    ("redis_url", "REDIS_URL", |c| {
        c.redis_url
            .as_deref()
            .is_some_and(|url| redacted_redis_url(url) != url)
    }),
    ("jwt_secret", "HELPDESK_JWT_SECRET", |c| {
        c.jwt_secret.is_some()
    }),
    ("agent_code", "HELPDESK_AGENT_CODE", |c| {
        c.agent_code.is_some()
    }),
    ("metrics_token", "HELPDESK_METRICS_TOKEN", |c| {
        c.metrics_token.is_some()
    }),
];

/// Why `secret`, the value of the setting `name`, cannot be used: shorter than `min_len`
/// bytes, or made of fewer than `min_len / 4` distinct bytes, like a placeholder or a word
/// repeated (`aaaa…`, `abcabc…`), which a dictionary finds. `None` when it can. A random
/// value of the minimum length in hex digits falls short of that less than once in 10^7 (32
/// digits, 8 distinct) or 10^8 (16 digits, 4 distinct).
fn weak_secret(name: &str, secret: &str, min_len: usize) -> Option<String> {
    let advice = format!("try `openssl rand -hex {min_len}`");
    if secret.len() < min_len {
        return Some(format!(
            "{name} is {} bytes; it must be at least {min_len} ({advice})",
            secret.len()
        ));
    }
    let mut seen = [false; 256];
    secret.bytes().for_each(|b| seen[usize::from(b)] = true);
    let distinct = seen.iter().filter(|&&s| s).count();
    (distinct < min_len / 4).then(|| {
        format!(
            "{name} is made of only {distinct} distinct characters, like a placeholder or a \
             repeated word; use a random value ({advice})"
        )
    })
}

/// Whether the shown form hides anything: a URL without a password may still be reshaped by
/// parsing (an empty password dropped, a space encoded), which is no secret.
fn holds_password(url: Option<&str>) -> bool {
    url.is_some_and(|url| {
        let shown = redacted_url(url);
        shown.contains("***") || shown.contains("(not shown")
    })
}

/// Empty or only whitespace (`REDIS_URL=" "`): as good as unset.
fn is_blank(value: &std::ffi::OsStr) -> bool {
    value
        .to_str()
        .map_or(value.is_empty(), |v| v.trim().is_empty())
}

/// What cqrs-postgres finds wrong with `options`, if anything, as one line.
fn postgres_problems(options: PgOptions) -> Result<(), String> {
    match options.validate() {
        Ok(()) => Ok(()),
        Err(PgError::InvalidOptions(problems)) => Err(problems.join("; ")),
        Err(other) => Err(other.to_string()),
    }
}

/// The built-in defaults: `helpdesk` with no flags and an empty environment. The process's
/// environment is not read: a stray `HELPDESK_TOKEN_TTL=abc` cannot change them, nor end the
/// process as clap's `parse_from` would.
impl Default for Config {
    fn default() -> Self {
        Self::try_parse_with_env(["helpdesk"], std::iter::empty::<(OsString, OsString)>())
            .expect("the built-in defaults parse")
    }
}

/// A Redis URL as cqrs-redis shows it, which hides a lone user name too:
/// `redis://secret@host` is a common slip for `redis://:secret@host`.
pub(crate) fn redacted_redis_url(url: &str) -> String {
    cqrs_redis::ConnectionOptions::new(url).redacted_url()
}

/// A database URL as cqrs-postgres shows it: its password and any parameter naming one
/// (`sslpassword=`, `pass%77ord=`) as `***`, and nothing past its scheme when it does not
/// parse or holds an `@` outside its user info (a password with `/`, `?` or `#` unencoded,
/// which the host, port or database would show).
pub(crate) fn redacted_url(url: &str) -> String {
    cqrs_postgres::PgOptions::new(url).redacted_url()
}

// Written out: a derived `Debug` would print the JWT secret, the agent code and the database
// password wherever the configuration is logged.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redacted_url),
            )
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(redacted_redis_url),
            )
            .field("redis_tls_ca_file", &self.redis_tls_ca_file)
            .field("redis_tls_cert_file", &self.redis_tls_cert_file)
            .field("redis_tls_key_file", &self.redis_tls_key_file)
            .field("database_schema", &self.database_schema)
            .field("redis_prefix", &self.redis_prefix)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "metrics_token",
                &self.metrics_token.as_ref().map(|_| "<redacted>"),
            )
            .field("agent_emails", &self.agent_emails)
            .field(
                "agent_code",
                &self.agent_code.as_ref().map(|_| "<redacted>"),
            )
            .field("token_ttl_seconds", &self.token_ttl_seconds)
            .field("log_format", &self.log_format)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("shutdown_delay_ms", &self.shutdown_delay_ms)
            .field("login_attempts", &self.login_attempts)
            .field("login_window_seconds", &self.login_window_seconds)
            .field("user_requests_per_second", &self.user_requests_per_second)
            .field("user_request_burst", &self.user_request_burst)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("cors_origins", &self.cors_origins)
            .field("poll_ms", &self.poll_ms)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("max_concurrent_hashes", &self.max_concurrent_hashes)
            .field(
                "ws_connections_per_address",
                &self.ws_connections_per_address,
            )
            .field(
                "http_connections_per_address",
                &self.http_connections_per_address,
            )
            .field("purge_interval_ms", &self.purge_interval_ms)
            .field("ready_details", &self.ready_details)
            .field("database_max_connections", &self.database_max_connections)
            .field(
                "database_acquire_timeout_ms",
                &self.database_acquire_timeout_ms,
            )
            .field("secrets_on_command_line", &self.secrets_on_command_line)
            .finish()
    }
}

/// `problem` with the flag of the setting it opens with beside its variable
/// (`HELPDESK_TOKEN_TTL (--token-ttl-seconds) must be ...`): the problems name settings by
/// their variables, and whoever passed the flag may not know its variable.
fn with_flag(command: &clap::Command, problem: String) -> String {
    let setting = command.get_arguments().find_map(|arg| {
        let variable = arg.get_env()?.to_str()?;
        let long = arg.get_long()?;
        let rest = problem.strip_prefix(variable)?;
        rest.starts_with(' ').then_some((variable.len(), long))
    });
    match setting {
        Some((len, long)) => format!("{} (--{long}){}", &problem[..len], &problem[len..]),
        None => problem,
    }
}

/// The longest of the millisecond settings but `HELPDESK_SHUTDOWN_DELAY_MS`: a day.
const DAY_MS: u64 = 86_400_000;

/// The longest `HELPDESK_SHUTDOWN_DELAY_MS` taken.
const MAX_SHUTDOWN_DELAY_MS: u64 = 600_000;

impl Config {
    /// The limit on each signed-in user's commands and queries, unless it is off.
    pub(crate) fn user_rate_limit(&self) -> Option<cqrs_core::middleware::RateLimitLayer> {
        (self.user_requests_per_second > 0).then(|| {
            cqrs_core::middleware::RateLimitLayer::per_actor(
                f64::from(self.user_requests_per_second),
                self.user_request_burst.max(1),
            )
        })
    }

    /// Reads the flags in `args` (the first is the program's name) and, for each flag not
    /// given, its variable in `env`; a variable set to the empty string, or to only
    /// whitespace, counts as unset (as `DATABASE_URL=` in a compose file or a shell means). The binary passes
    /// `std::env::args_os()` and `std::env::vars_os()`; tests pass their own, leaving the
    /// process's environment alone. `--help` and `--version` come back as errors to
    /// [`exit`](clap::Error::exit) with, as clap's `try_parse_from` does.
    pub fn try_parse_with_env<A, T, E, K, V>(args: A, env: E) -> Result<Self, clap::Error>
    where
        A: IntoIterator<Item = T>,
        T: Into<OsString>,
        E: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        if args.is_empty() {
            args.push("helpdesk".into());
        }
        let env: HashMap<OsString, OsString> = env
            .into_iter()
            .map(|(name, value)| (name.into(), value.into()))
            .filter(|(_, value)| !is_blank(value))
            .collect();
        let with_env = Self::command();
        let variables: Vec<(clap::Id, String, OsString)> = with_env
            .get_arguments()
            .filter_map(|arg| {
                Some((
                    arg.get_id().clone(),
                    arg.get_long()?.to_owned(),
                    arg.get_env()?.to_owned(),
                ))
            })
            .collect();
        // clap read the process's variables into the arguments when it built them: dropped
        // here, so only `env` counts.
        let mut command = with_env.clone().mut_args(|arg| arg.env(None::<&str>));
        // First the flags alone, to learn which were given.
        let given = match command.try_get_matches_from_mut(&args) {
            Ok(given) => given,
            // The help with each flag's variable, as clap shows it.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::DisplayHelp
                        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                        | ErrorKind::DisplayVersion
                ) =>
            {
                return Err(with_env.try_get_matches_from(&args).err().unwrap_or(e));
            }
            Err(e) => return Err(e),
        };
        // Then each variable of a flag not given, as that flag, ahead of the given ones (a
        // variable never overrides a flag; a list in a variable splits as on the command line).
        let mut full = vec![args[0].clone()];
        let mut from_env: Vec<(&str, &OsString)> = Vec::new();
        for (id, long, name) in &variables {
            if given.value_source(id.as_str()) == Some(ValueSource::CommandLine) {
                continue;
            }
            if let Some(value) = env.get(name) {
                let mut flag = OsString::from(format!("--{long}="));
                flag.push(value);
                full.push(flag);
                from_env.push((long, name));
            }
        }
        full.extend(args.into_iter().skip(1));
        // An error about a value that came from a variable names the variable: whoever set
        // only `HELPDESK_TOKEN_TTL` (in a compose file, say) never typed the flag.
        let name_the_variable = |mut error: clap::Error| {
            let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
                return error;
            };
            let Some((_, name)) = from_env.iter().find(|(long, _)| {
                arg.strip_prefix("--")
                    .and_then(|rest| rest.strip_prefix(long))
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '=', '[']))
            }) else {
                return error;
            };
            // A `tip:` line beside clap's own (the allowed values, a similar one), all kept.
            let tip = format!(
                "the value comes from the environment variable {}",
                name.to_string_lossy()
            );
            let mut tips = match error.get(ContextKind::Suggested) {
                Some(ContextValue::StyledStrs(tips)) => tips.clone(),
                _ => Vec::new(),
            };
            tips.push(tip.into());
            error.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
            error
        };
        let matches = command
            .try_get_matches_from_mut(full)
            .map_err(name_the_variable)?;
        let mut config = Self::from_arg_matches(&matches)
            .map_err(|e| name_the_variable(e.format(&mut command)))?;
        // `--database-url ""` (a script passing an empty variable along) is unset too, and so
        // is one of only whitespace.
        for value in [
            &mut config.database_url,
            &mut config.redis_url,
            &mut config.redis_tls_ca_file,
            &mut config.redis_tls_cert_file,
            &mut config.redis_tls_key_file,
            &mut config.jwt_secret,
            &mut config.agent_code,
            &mut config.metrics_token,
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *value = None;
            }
        }
        // A URL holds no meaningful space at either end: one pasted with a leading space was
        // refused as "not a redis scheme", while a trailing one passed (the URL parser drops
        // it). Secrets are left as given.
        for url in [&mut config.database_url, &mut config.redis_url] {
            if let Some(value) = url.as_mut() {
                let trimmed = value.trim();
                if trimmed.len() != value.len() {
                    *value = trimmed.to_owned();
                }
            }
        }
        for (id, variable, holds_secret) in SECRET_FLAGS {
            if holds_secret(&config) && given.value_source(id) == Some(ValueSource::CommandLine) {
                config.secrets_on_command_line.push(variable);
            }
        }
        Ok(config)
    }

    /// What is allowed but likely a mistake, in words, for the server to log at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (id, variable, _) in SECRET_FLAGS {
            if !self.secrets_on_command_line.contains(&variable) {
                continue;
            }
            let flag = format!("--{}", id.replace('_', "-"));
            warnings.push(format!(
                "{flag} was given on the command line, where other users of this machine can \
                 read it (ps, /proc); set the environment variable {variable} instead"
            ));
        }
        if self.database_url.is_none() {
            // Not the agent code with agent emails: that is how an in-memory run chooses its
            // code (the docs' own walk-through), not a sign of a lost DATABASE_URL.
            let chosen_code = self.agent_code.is_some() && !self.agent_email_set().is_empty();
            for (set, name) in [
                (self.jwt_secret.is_some(), "HELPDESK_JWT_SECRET"),
                (
                    self.agent_code.is_some() && !chosen_code,
                    "HELPDESK_AGENT_CODE",
                ),
                (!self.trusted_proxies.is_empty(), "HELPDESK_TRUSTED_PROXIES"),
            ] {
                if set {
                    warnings.push(format!(
                        "{name} is set, but DATABASE_URL is not (or is empty): the server runs \
                         in memory, and nothing it is told survives a restart; set DATABASE_URL \
                         for durable state"
                    ));
                }
            }
        }
        // Its series tell who signs in and fails, and the business's volume, as they happen.
        if self.metrics_token.is_none() && !self.bind.ip().is_loopback() {
            warnings.push(format!(
                "the server listens on {} and GET /metrics answers anyone who reaches it (its \
                 series count sign-ins and their failures, requests by route and status): set \
                 HELPDESK_METRICS_TOKEN for Prometheus to send as a bearer token, or keep \
                 /metrics from the network (a proxy that refuses it)",
                self.bind
            ));
        }
        // `0.0.0.0/0` (a Kubernetes habit) believes every peer's `X-Forwarded-For`: fine only
        // where nothing but the proxies can reach the server.
        let broad: Vec<String> = self
            .trusted_proxies
            .iter()
            .filter(|range| range.is_broad())
            .map(ToString::to_string)
            .collect();
        if !broad.is_empty() {
            warnings.push(format!(
                "HELPDESK_TRUSTED_PROXIES trusts {}: a client in that range that can reach the \
                 server directly (not through the proxies) picks its own address with \
                 X-Forwarded-For, and so gets past the login throttles and the per-address \
                 connection limits; list the proxies' own addresses or subnets, unless the \
                 network lets nothing else reach the server",
                broad.join(", ")
            ));
        }
        // A value meant as seconds (15) leaves `/ready`'s Postgres check milliseconds, within
        // which a remote server never answers: unready for good, and most requests 503. In
        // memory too, every login and registration hashes a password for tens of milliseconds
        // (more while others wait for a hashing slot): each would 503 for good.
        if self.request_timeout() < Duration::from_secs(1) {
            let checks = if self.database_url.is_some() {
                let wait = crate::http::postgres_health_wait(self.request_timeout());
                format!(
                    ", and each of /ready's checks ({} ms for Postgres to hand out a \
                     connection), must finish within it, which a Postgres server across a \
                     network may never do",
                    wait.as_millis()
                )
            } else {
                ", a login or a registration with its password hashing (tens of milliseconds \
                 each, more while others wait for a slot) among them, must finish within it"
                    .to_owned()
            };
            warnings.push(format!(
                "HELPDESK_REQUEST_TIMEOUT_MS is {} ms (milliseconds): each request{checks}; \
                 give at least 1000",
                self.request_timeout_ms,
            ));
        }
        // While Postgres refuses connections, a request then runs out of its own budget before
        // the pool gives up: 503 `timeout` (to a POST without a key: "check first, it may have
        // been applied") for what never reached the database, instead of 503 `unavailable`
        // with `Retry-After`.
        if self.database_url.is_some()
            && self.database_acquire_timeout_ms >= self.request_timeout_ms
        {
            warnings.push(format!(
                "HELPDESK_DATABASE_ACQUIRE_TIMEOUT_MS ({} ms) is not below \
                 HELPDESK_REQUEST_TIMEOUT_MS ({} ms): while Postgres cannot be reached, \
                 requests run out of their time budget before the pool gives up, and are told \
                 503 `timeout` (a change may have been made: check first) instead of 503 \
                 `unavailable` with Retry-After; keep it well below, half of it say",
                self.database_acquire_timeout_ms, self.request_timeout_ms,
            ));
        }
        let grace = self.shutdown_grace();
        // Past the deadline orchestrators give by default, the process is killed mid-stop
        // with nothing said: workers cut off, WebSockets without their 1001.
        let whole_stop = self.shutdown_delay().saturating_add(grace);
        if !self.shutdown_delay().is_zero() && whole_stop > Duration::from_secs(30) {
            warnings.push(format!(
                "a stop takes up to {} ms (HELPDESK_SHUTDOWN_DELAY_MS {} and \
                 HELPDESK_SHUTDOWN_GRACE_MS {}), more than the 30 s Kubernetes gives a pod by \
                 default: raise terminationGracePeriodSeconds (or your orchestrator's stop \
                 timeout) above it",
                whole_stop.as_millis(),
                self.shutdown_delay_ms,
                self.shutdown_grace_ms,
            ));
        }
        let for_requests = grace.saturating_sub(crate::server::workers_share(grace));
        if for_requests < self.request_timeout() {
            warnings.push(format!(
                "HELPDESK_SHUTDOWN_GRACE_MS ({} ms) leaves in-flight requests {} ms at a stop \
                 (the background workers keep the rest), less than HELPDESK_REQUEST_TIMEOUT_MS \
                 ({} ms): a slow request still running at a stop is cut off without an \
                 answer; give the grace period at least {} ms",
                grace.as_millis(),
                for_requests.as_millis(),
                self.request_timeout_ms,
                self.request_timeout_ms.saturating_add(2_000),
            ));
        }
        warnings
    }

    /// Checks the configuration, listing every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Some(secret) = &self.jwt_secret {
            problems.extend(weak_secret("HELPDESK_JWT_SECRET", secret, 32));
        }
        if let Some(code) = &self.agent_code {
            problems.extend(weak_secret("HELPDESK_AGENT_CODE", code, 16));
        }
        if let Some(token) = &self.metrics_token {
            problems.extend(weak_secret("HELPDESK_METRICS_TOKEN", token, 16));
            // What a scrape sends in a header it can: a space at either end (a secret file's
            // newline) or a character past ASCII would never match, and every scrape fail.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push(
                    "HELPDESK_METRICS_TOKEN holds a space, a line break or a character past ASCII, \
                     which a bearer token cannot carry (a secret file's trailing newline?): use \
                     visible ASCII only (try `openssl rand -hex 16`)"
                        .into(),
                );
            }
        }
        if self.cors_origins.len() > 1 && self.cors_origins.iter().any(|o| o == "*") {
            problems.push(
                "HELPDESK_CORS_ORIGINS lists `*` with other origins: `*` already allows every \
                 page; give either `*` alone or the origins alone"
                    .into(),
            );
        }
        let mut agents: Vec<String> = self.agent_email_set().into_iter().collect();
        agents.sort();
        for email in agents {
            if let Err(why) = helpdesk_auth::normalize_email(&email) {
                problems.push(format!(
                    "HELPDESK_AGENT_EMAILS lists `{}`, which is not an email address ({why}): \
                     no account could ever match it; fix or remove the entry",
                    email.chars().take(80).collect::<String>()
                ));
            }
        }
        if self.database_url.is_some()
            && !self.agent_email_set().is_empty()
            && self.agent_code.is_none()
        {
            problems.push("HELPDESK_AGENT_EMAILS is set without HELPDESK_AGENT_CODE: the list alone proves nothing, as anyone may register any address; set HELPDESK_AGENT_CODE to a secret of at least 16 bytes (try `openssl rand -hex 16`) and give it to the agents, who send it as `agent_code` when they register".into());
        }
        for (set, name) in [
            (self.redis_tls_ca_file.is_some(), "REDIS_TLS_CA_FILE"),
            (self.redis_tls_cert_file.is_some(), "REDIS_TLS_CERT_FILE"),
            (self.redis_tls_key_file.is_some(), "REDIS_TLS_KEY_FILE"),
        ] {
            let tls_url = self
                .redis_url
                .as_deref()
                .map(|url| cqrs_redis::ConnectionOptions::new(url).uses_tls());
            match tls_url {
                _ if !set => {}
                None => problems.push(format!("{name} is set without REDIS_URL: set REDIS_URL to a rediss:// URL, or unset {name}")),
                Some(false) => problems.push(format!("{name} is set, but REDIS_URL does not ask for TLS: use a rediss:// URL, or unset {name}")),
                Some(true) => {}
            }
        }
        if self.redis_tls_cert_file.is_some() != self.redis_tls_key_file.is_some() {
            problems.push(
                "REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE go together: set both, or neither"
                    .into(),
            );
        }
        if self.redis_url.is_some() && self.database_url.is_none() {
            problems.push("REDIS_URL is set without DATABASE_URL: durable events need durable state; set DATABASE_URL too, or unset REDIS_URL".into());
        }
        if self.database_url.is_some() && self.jwt_secret.is_none() {
            problems.push("DATABASE_URL is set without HELPDESK_JWT_SECRET: every instance needs the same secret; set one of at least 32 bytes, or unset DATABASE_URL to run in memory".into());
        }
        // cqrs-postgres's own checks, so that what it would refuse at connect (a schema
        // `pg_x`, a URL it cannot parse) is listed here with the rest, before anything binds.
        // Each checked with a known-good other half, so every problem names its setting.
        // The other half names no TLS (`sslmode=disable`): a `PGSSLROOTCERT` left in the shell
        // is DATABASE_URL's business, not the schema's.
        if let Err(problem) = postgres_problems(
            PgOptions::new("postgres://localhost/helpdesk?sslmode=disable")
                .schema(self.database_schema.clone()),
        ) {
            problems.push(format!(
                "HELPDESK_DATABASE_SCHEMA {:?} is refused: {problem}",
                self.database_schema.chars().take(80).collect::<String>()
            ));
        }
        if let Some(url) = &self.database_url
            && let Err(problem) = postgres_problems(PgOptions::new(url.clone()))
        {
            // cqrs-postgres's messages never quote the URL (it may hold a password).
            problems.push(format!("DATABASE_URL is refused: {problem}"));
        }
        if self.redis_prefix.is_empty()
            || self.redis_prefix.len() > 100
            || !self
                .redis_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        {
            problems.push(format!(
                "HELPDESK_REDIS_PREFIX {:?} must be 1 to 100 ASCII letters, digits, `_`, `-`, `.` or `:`",
                self.redis_prefix
            ));
        }
        // Upper bounds too: past them, token expiry and throttle windows overflow the
        // calendar (tokens born expired, a panic on the second login).
        const YEAR: u64 = 365 * 24 * 3600;
        if !(1..=10 * YEAR).contains(&self.token_ttl_seconds) {
            problems.push(format!(
                "HELPDESK_TOKEN_TTL must be 1 second to 10 years ({}); it is {}",
                10 * YEAR,
                self.token_ttl_seconds
            ));
        }
        if !(1..=YEAR).contains(&self.login_window_seconds) {
            problems.push(format!(
                "HELPDESK_LOGIN_WINDOW must be 1 second to a year ({YEAR}); it is {}",
                self.login_window_seconds
            ));
        }
        // Only Postgres uses the pool: in memory the setting is unused.
        if self.database_url.is_some()
            && !(MIN_DATABASE_CONNECTIONS..=10_000).contains(&self.database_max_connections)
        {
            problems.push(format!(
                "HELPDESK_DATABASE_MAX_CONNECTIONS must be {MIN_DATABASE_CONNECTIONS} to 10000 \
                 (the background workers hold up to 9 connections at once: each of the two \
                 relays its batch and its LISTEN, the stats projection its batch, three while \
                 it rebuilds, and its inbox purge, and the idempotency purge; requests need \
                 the rest); it is {}",
                self.database_max_connections
            ));
        }
        if self.database_url.is_some() && !(1..=600_000).contains(&self.database_acquire_timeout_ms)
        {
            problems.push(format!(
                "HELPDESK_DATABASE_ACQUIRE_TIMEOUT_MS must be 1 to 600000 (milliseconds); it is {}",
                self.database_acquire_timeout_ms
            ));
        }
        // cqrs-redis's own checks (the URL, the TLS files read as a connect would), before
        // Postgres is connected and migrated. The TLS settings without a `rediss://` URL are
        // reported above, by their variables.
        if let Some(connection) = self.redis_connection()
            && let Err(e) = connection.validate()
        {
            problems.push(format!(
                "REDIS_URL (with its REDIS_TLS_* files) is refused: {e}"
            ));
        }
        if self.login_attempts == 0 {
            problems.push("HELPDESK_LOGIN_ATTEMPTS must be at least 1".into());
        }
        if self
            .max_concurrent_hashes
            .is_some_and(|n| !(1..=1024).contains(&n))
        {
            problems.push(format!(
                "HELPDESK_MAX_CONCURRENT_HASHES must be 1 to 1024 (each hash takes ~19 MiB); \
                 it is {}",
                self.max_concurrent_hashes.unwrap_or_default()
            ));
        }
        if self.user_requests_per_second > 0 && self.user_request_burst == 0 {
            problems.push(
                "HELPDESK_USER_REQUEST_BURST must be at least 1 (to turn the limit off, set \
                 HELPDESK_USER_REQUESTS_PER_SECOND to 0)"
                    .into(),
            );
        }
        if self.ws_connections_per_address == 0 {
            problems.push("HELPDESK_WS_CONNECTIONS_PER_ADDRESS must be at least 1".into());
        }
        if self.http_connections_per_address == 0 {
            problems.push("HELPDESK_HTTP_CONNECTIONS_PER_ADDRESS must be at least 1".into());
        }
        if self.max_connections == Some(0) {
            problems.push(
                "HELPDESK_MAX_CONNECTIONS must be at least 1 (unset, it follows the open-file \
                 limit)"
                    .into(),
            );
        }
        // Zero is no "off" for these: each would become a millisecond, closing every
        // connection at once, or running housekeeping and polls a thousand times a second.
        // More than a day is a slip (seconds or minutes taken for milliseconds, extra zeros),
        // and near u64::MAX a deadline past what the clock holds.
        for (name, value, least) in [
            ("HELPDESK_REQUEST_TIMEOUT_MS", self.request_timeout_ms, 1),
            ("HELPDESK_HEADER_TIMEOUT_MS", self.header_timeout_ms, 100),
            ("HELPDESK_PURGE_INTERVAL_MS", self.purge_interval_ms, 10),
            ("HELPDESK_POLL_MS", self.poll_ms, 1),
            ("HELPDESK_SHUTDOWN_GRACE_MS", self.shutdown_grace_ms, 1),
        ] {
            if value < least {
                problems.push(format!("{name} must be at least {least}; it is {value}"));
            } else if value > DAY_MS {
                problems.push(format!(
                    "{name} must be at most {DAY_MS} (a day, in milliseconds); it is {value}"
                ));
            }
        }
        // Ten minutes is far past any load balancer's update: more is a slip (seconds meant
        // as minutes, an extra zero), and a stop that long would look hung.
        if self.shutdown_delay_ms > MAX_SHUTDOWN_DELAY_MS {
            problems.push(format!(
                "HELPDESK_SHUTDOWN_DELAY_MS must be at most {MAX_SHUTDOWN_DELAY_MS} (ten \
                 minutes); it is {}",
                self.shutdown_delay_ms
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            let command = Config::command();
            Err(problems
                .into_iter()
                .map(|problem| with_flag(&command, problem))
                .collect())
        }
    }

    /// The Redis connection REDIS_URL and the REDIS_TLS_* files describe, when REDIS_URL is set.
    /// The TLS files count only with a `rediss://` URL (otherwise `validate` refuses them).
    pub(crate) fn redis_connection(&self) -> Option<cqrs_redis::ConnectionOptions> {
        let mut connection = cqrs_redis::ConnectionOptions::new(self.redis_url.clone()?);
        if !connection.uses_tls() {
            return Some(connection);
        }
        if let Some(ca) = &self.redis_tls_ca_file {
            connection = connection.tls_ca_file(ca);
        }
        if let (Some(cert), Some(key)) = (&self.redis_tls_cert_file, &self.redis_tls_key_file) {
            connection = connection.tls_client_cert(cert, key);
        }
        Some(connection)
    }

    /// The agent emails, trimmed, without empty entries (the auth plugin's `AgentList` keys
    /// them as accounts: lower-cased, NFC).
    pub fn agent_email_set(&self) -> HashSet<String> {
        self.agent_emails
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect()
    }

    /// The request time budget.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// How long a stop keeps serving, `/ready` answering 503, before it begins.
    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_millis(self.shutdown_delay_ms)
    }

    /// How often housekeeping runs (idempotency purge, stream trimming).
    pub fn purge_interval(&self) -> Duration {
        Duration::from_millis(self.purge_interval_ms)
    }

    /// The time a client has to send a request's line and headers (at least 1 ms).
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Redis URL counts as holding a secret when cqrs-redis's redaction changes it: only for
    /// a password or a lone user name, never by reshaping a URL without one.
    #[test]
    fn a_redis_url_holds_a_secret_only_with_a_password_or_a_lone_user() {
        for plain in [
            "redis://127.0.0.1:6379",
            "redis://localhost:6379/0",
            "rediss://Cache.Internal:6380",
            "redis://default:***@cache:6379",
        ] {
            assert_eq!(redacted_redis_url(plain), plain);
        }
        for secret in ["redis://:hunter2@cache:6379", "redis://hunter2@cache:6379"] {
            assert!(!redacted_redis_url(secret).contains("hunter2"), "{secret}");
        }
    }

    /// A database URL holds a secret only with a password (in its user info or a parameter
    /// naming one), and its shown form never holds it: also when a password with `/` or `?`
    /// unencoded makes it parse with no user info (`app:2024/pa?ss@db`), which showed it
    /// whole, as no password, and so raised no warning either.
    #[test]
    fn a_database_url_is_shown_without_its_password_however_it_is_written() {
        for plain in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgres://localhost/helpdesk",
            "postgres:///helpdesk?host=/var/run/postgresql",
            "postgres://app@db/helpdesk?sslmode=require&user=app@tenant",
        ] {
            assert_eq!(redacted_url(plain), plain);
            assert!(!holds_password(Some(plain)), "{plain}");
        }
        // Reshaped by parsing, and still no secret.
        for plain in [
            "postgres://app:@db/helpdesk",
            "postgres://app@db/helpdesk?application_name=a b",
        ] {
            assert!(!holds_password(Some(plain)), "{plain}");
        }
        for secret in [
            "postgres://app:hunter2@db/helpdesk",
            "postgres://app@db/helpdesk?password=hunter2",
            "postgres://app@db/helpdesk?pass%77ord=hunter2",
            "postgres://app:2024/hunter2@db/helpdesk",
            "postgres://app:2024/pa?hunter2@db/helpdesk",
            "postgres://app:20#hunter2@db/helpdesk",
            "postgres://app:2024?x=hunter2@db/helpdesk",
            "postgres://app:Xy@Z/hunter2@db/helpdesk",
            "postgres://app:Xy@Z?k=hunter2@db/helpdesk",
            "postgres://app:hun ter2@db:not-a-port/helpdesk",
        ] {
            let shown = redacted_url(secret);
            assert!(
                !shown.contains("hunter2") && !shown.contains("ter2"),
                "{secret}: {shown}"
            );
            assert!(holds_password(Some(secret)), "{secret}");
        }
    }
}
