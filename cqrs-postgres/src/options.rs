//! Connection options: a URL, a schema, and pool bounds.

use crate::database::Retirement;
use crate::error::PgError;
use crate::{PgDatabase, sql};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// The URL used when none is given: a local server with trust authentication.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The longest timeout the options take: `i32::MAX` milliseconds, the most Postgres takes for
/// its timeout settings.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// The pool's `before_acquire` under [`PgOptions::ping_after_idle`]: pings a connection idle
/// for `after` or longer, waiting at most `patience`; `Ok(false)` replaces one that fails.
async fn ping_if_idle(
    conn: &mut sqlx::PgConnection,
    meta: sqlx::pool::PoolConnectionMetadata,
    after: Duration,
    patience: Duration,
) -> Result<bool, sqlx::Error> {
    if meta.idle_for < after {
        return Ok(true);
    }
    let error = match tokio::time::timeout(patience, sqlx::Connection::ping(conn)).await {
        Ok(Ok(())) => return Ok(true),
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer within {patience:?}"),
    };
    // A server restart ends every idle connection: expected, not a warning (`Ok(false)`
    // replaces the connection without sqlx's).
    tracing::info!(
        %error,
        idle_for = ?meta.idle_for,
        "a pooled connection failed its ping after sitting idle; it is replaced"
    );
    Ok(false)
}

/// The pool's `after_release`: waits, at most `patience`, for the answers still owed to a
/// connection given back to the pool (statements dropped in flight: a request its client left,
/// a timeout; the `ROLLBACK` sqlx queues for a dropped transaction). A connection with nothing
/// owed costs nothing here (no round trip: sqlx's own check, a ping, follows).
///
/// Without the bound, sqlx's check waited for those answers for as long as TCP kept the
/// connection: on a network that drops packets silently (a failover, a NAT that forgot the
/// connection), about 15 minutes, each such connection out of the pool all that time, and a
/// pool under load full within seconds. Past `patience`, the connection is closed instead
/// (`Ok(false)`: a graceful close, which writes and, in plain text, does not wait; over TLS
/// sqlx's close waits to read, so the pool keeps the connection's place until TCP gives up).
/// The connections this crate holds itself (its transactions, its reads) are settled before
/// they reach this hook, and closed without a close handshake when they do not answer
/// (`transaction.rs`): what reaches it owing answers is a statement run straight on
/// [`PgDatabase::pool`](crate::PgDatabase::pool).
///
/// The errors of statements dropped in flight that the server then failed are read here too:
/// sqlx's check would read such an error, take the connection for broken and close it hard,
/// and over TLS that close can hang for good (seen with sqlx 0.9 and rustls:
/// `a_statement_dropped_in_flight_that_fails_gives_its_connection_back`). Read here, the error
/// is dropped like its statement's caller, and the connection goes back to the pool.
async fn settle_released(
    conn: &mut sqlx::PgConnection,
    patience: Duration,
) -> Result<bool, sqlx::Error> {
    match tokio::time::timeout(patience, crate::transaction::read_owed_answers(conn)).await {
        Ok(kept) => Ok(kept),
        Err(_) => {
            crate::transaction::no_answer_in_time(patience, "to what it had sent");
            Ok(false)
        }
    }
}

/// How often a server backend running a statement checks that its client is still there.
const CLIENT_CHECK_INTERVAL: &str = "SET client_connection_check_interval = '5s'";

/// The pool's `after_connect` under [`PgOptions::session_settings`]: has the server check,
/// while a statement runs, that this client is still connected (PostgreSQL 14 and later; an
/// older server does not know the setting, which as a startup parameter would refuse the
/// connection). A connection the pool closes with a statement unanswered
/// ([`settle_released`]) is replaced by a new one; without the check, the server would run
/// the old statement on (or wait on for its lock: an append queued behind a stalled commit),
/// one more server process each time, until it ended.
///
/// A server that refuses the setting (one that cannot tell a closed client: PostgreSQL on
/// Windows, 14 on macOS) keeps the connection without it, with a warning: failing here would
/// fail every connection the pool opens, and so every operation.
async fn check_for_a_closed_client(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    if conn.server_version_num().is_some_and(|v| v >= 140_000) {
        match sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(CLIENT_CHECK_INTERVAL)).await {
            Ok(_) => {}
            Err(sqlx::Error::Database(refused)) => {
                tracing::warn!(
                    error = %refused,
                    "the server refuses client_connection_check_interval: a statement whose \
                     connection this client closes runs on until it ends"
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`PgOptions::answer_timeout`]'s default.
pub(crate) const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// [`PgOptions::ping_after_idle`]'s default.
const DEFAULT_PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// How to reach Postgres and where this crate's tables live. Build it, then
/// [`connect`](PgOptions::connect).
///
/// The defaults suit a small machine (2 cores, one or a few server instances sharing one
/// database): at most 10 connections per instance, none kept open when idle.
///
/// ```
/// use cqrs_postgres::PgOptions;
/// use std::time::Duration;
///
/// let options = PgOptions::new("postgres://app@db.internal:5432/app")
///     .schema("cqrs")
///     .max_connections(8)
///     .acquire_timeout(Duration::from_secs(2));
/// assert!(options.validate().is_ok());
///
/// let err = PgOptions::new("mysql://nope").schema("Bad-Name").max_connections(0).validate();
/// // Every problem at once.
/// assert!(matches!(err, Err(cqrs_postgres::PgError::InvalidOptions(problems)) if problems.len() == 3));
/// ```
#[derive(Clone)]
pub struct PgOptions {
    url: String,
    schema: String,
    max_connections: u32,
    min_connections: u32,
    acquire_timeout: Duration,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
    statement_timeout: Option<Duration>,
    idle_in_transaction_timeout: Option<Duration>,
    session_settings: bool,
    /// `None`: the URL's `application_name`, else `PGAPPNAME`, else the fallback.
    application_name: Option<String>,
    /// The name when neither this, the URL nor `PGAPPNAME` gives one.
    fallback_application_name: String,
    test_before_acquire: bool,
    ping_after_idle: Option<Duration>,
    answer_timeout: Duration,
    /// Whether [`from_env`](PgOptions::from_env) fell back to [`DEFAULT_URL`] because
    /// `DATABASE_URL` was unset: a failed connect says so.
    default_url: bool,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: leave it out.
        f.debug_struct("PgOptions")
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("answer_timeout", &self.answer_timeout)
            .field("default_url", &self.default_url)
            .finish_non_exhaustive()
    }
}

/// The most connections a pool may open: PostgreSQL's own bound on `max_connections`.
const MAX_CONNECTIONS: u32 = 262_143;

impl PgOptions {
    /// Options for the server at `url` (`postgres://user:password@host:port/database`), with
    /// every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "cqrs".to_owned(),
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(60)),
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            statement_timeout: None,
            idle_in_transaction_timeout: Some(Duration::from_secs(60)),
            session_settings: true,
            application_name: None,
            fallback_application_name: "cqrs".to_owned(),
            test_before_acquire: false,
            ping_after_idle: Some(DEFAULT_PING_AFTER_IDLE),
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            default_url: false,
        }
    }

    /// Options from the `DATABASE_URL` environment variable, or [`DEFAULT_URL`] when it is
    /// unset (or not Unicode): a convenience for local development. A failed
    /// [`connect`](Self::connect) then says that the default was used.
    pub fn from_env() -> Self {
        match std::env::var("DATABASE_URL") {
            Ok(url) => Self::new(url),
            Err(_) => Self {
                default_url: true,
                ..Self::new(DEFAULT_URL)
            },
        }
    }

    /// The Postgres schema that holds this crate's tables. Default `cqrs`. Lower-case ASCII
    /// letters, digits and `_`, starting with a letter or `_` and not with `pg_`, at most 56
    /// bytes. Instances that share a schema share one
    /// event store; tests use one schema each. Keep it apart from the schema your own sqlx
    /// migrations record their history in (`public`, usually): both histories are a
    /// `_sqlx_migrations` table, and each migrator would find the other's versions there.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The most connections the pool opens. Default 10. Each command holds one for its
    /// transaction, each claim of the idempotency store one until it completes (beside its
    /// command's) and each duplicate waiting on it one, each relay one per batch plus one for
    /// `LISTEN`, each projection batch one and each projection rebuild two.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// Connections kept open when idle. Default 0.
    pub fn min_connections(mut self, min: u32) -> Self {
        self.min_connections = min;
        self
    }

    /// How long taking a connection from the pool may wait before the operation fails as
    /// unavailable. Default 5 s; at least 1 ms and at most `i32::MAX` milliseconds (about 24.8
    /// days: sqlx adds it to the current `Instant`, which `Duration::MAX` overflows).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long an idle connection stays open. Default 60 s; `None` keeps it. At least 1 ms (zero
    /// would close every connection on release, and sqlx's reaper would run without pause)
    /// and at most `i32::MAX` milliseconds (about 24.8 days).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long a connection lives before it is replaced. Default 30 min; `None` keeps it.
    /// At least 1 ms (zero would replace every connection on release, and sqlx's reaper would
    /// run without pause) and at most `i32::MAX` milliseconds (about 24.8 days).
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// The server-side `statement_timeout` of every connection; a statement that runs longer
    /// fails as a timeout. Default none. At least 1 ms and at most `i32::MAX` milliseconds
    /// (about 24.8 days), the largest the server takes.
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// The server-side `idle_in_transaction_session_timeout` of every connection: a session
    /// that sits in an open transaction without sending anything for longer is ended by the
    /// server, and its locks released. Default 60 s, well above what a command or a relay
    /// batch holds its transaction idle (the relay's `publish_timeout` is 30 s by default);
    /// `None` leaves the server's setting. At least 1 ms and at most `i32::MAX` milliseconds
    /// (about 24.8 days), the largest the server takes.
    ///
    /// It matters when an instance dies, or its network is cut, between an append and its
    /// commit: the append's lock would otherwise stop every append in the schema until TCP
    /// notices the dead peer. The server's TCP keepalives are also set (probes after 30 s
    /// idle, every 10 s, 3 of them), so a session whose client vanished mid-statement ends
    /// within about a minute.
    pub fn idle_in_transaction_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_in_transaction_timeout = timeout;
        self
    }

    /// Whether each connection sets, through the startup `options` parameter, the server
    /// settings this crate relies on: `default_transaction_isolation = 'read committed'`, the
    /// TCP keepalives and [`idle_in_transaction_timeout`](Self::idle_in_transaction_timeout);
    /// and, on PostgreSQL 14 or later, `client_connection_check_interval = 5s` (once
    /// connected, one statement): a statement whose connection this client closed (given
    /// up past [`answer_timeout`](Self::answer_timeout)) is cancelled within 5 s instead of
    /// running on, or waiting for a lock, while a new connection replaces it. Default `true`.
    ///
    /// Turn it off behind a connection pooler that refuses startup parameters (PgBouncer
    /// does unless told to ignore them), and set the same on the database or role instead
    /// (`ALTER ROLE app SET default_transaction_isolation = 'read committed'`, ...):
    /// [`PgDatabase::migrate`](crate::PgDatabase::migrate) refuses sessions that are not READ
    /// COMMITTED either way. A [`statement_timeout`](Self::statement_timeout) you set is still
    /// sent.
    pub fn session_settings(mut self, on: bool) -> Self {
        self.session_settings = on;
        self
    }

    /// The `application_name` the server shows in `pg_stat_activity`, whatever the URL says.
    /// Default: the URL's `application_name` parameter, else the `PGAPPNAME` environment
    /// variable (as libpq reads it), else the
    /// [`fallback_application_name`](Self::fallback_application_name).
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// The `application_name` when neither [`application_name`](Self::application_name), the
    /// URL's `application_name` nor `PGAPPNAME` gives one, as libpq's parameter of that name.
    /// Default `cqrs`. Name your service here, and operators can still tell its instances
    /// apart in `pg_stat_activity` through the URL or `PGAPPNAME`.
    ///
    /// ```
    /// use cqrs_postgres::PgOptions;
    /// let options = PgOptions::new("postgres://app@db/helpdesk").fallback_application_name("helpdesk");
    /// # let _ = options;
    /// ```
    pub fn fallback_application_name(mut self, name: impl Into<String>) -> Self {
        self.fallback_application_name = name.into();
        self
    }

    /// Whether the pool pings every connection before handing it out. Default `false`: it
    /// saves a round trip per command; a connection that sat idle for
    /// [`ping_after_idle`](Self::ping_after_idle) is pinged anyway. Turn it on where the
    /// network drops connections silently within seconds.
    pub fn test_before_acquire(mut self, test: bool) -> Self {
        self.test_before_acquire = test;
        self
    }

    /// A connection idle for at least this long is pinged before it is handed out, and
    /// replaced when the ping fails or gets no answer within a quarter of `acquire_timeout`.
    /// Default 1 s; `None` never pings; no effect under
    /// [`test_before_acquire(true)`](Self::test_before_acquire), which pings every connection.
    ///
    /// Why: when the server restarts (or fails over), every pooled connection is dead, and a
    /// command's first statement on one fails. When that statement is the command's whole
    /// transaction (an [`EventStore::append`](cqrs_core::ports::EventStore::append), the
    /// commit of a unit that only recorded events), the error cannot tell whether the server
    /// committed it, so it is a [`Timeout`](cqrs_core::ports::StoreError::Timeout) ("outcome
    /// unknown"), not a retryable [`Unavailable`](cqrs_core::ports::StoreError::Unavailable).
    /// The ping finds those connections first. A busy pool reuses its connections within
    /// the second and pays nothing; a quiet one pays a round trip per command.
    pub fn ping_after_idle(mut self, idle: Option<Duration>) -> Self {
        self.ping_after_idle = idle;
        self
    }

    /// How long this crate waits for the server's answer to work that goes on whether or not
    /// its caller still waits: a command's commit (after its handler succeeded, the commit
    /// finishes even when the request's time budget runs out), a projection unit's commit, an
    /// idempotency key's claim and completion, a [`PgTransaction`](crate::PgTransaction)'s
    /// commit and rollback; how long the caller of a `BEGIN` waits for it; and how long a
    /// connection given back with an answer still owed (a statement whose caller is gone, a
    /// dropped transaction's `ROLLBACK`, a `BEGIN` given up) may take to get it. Past it, the
    /// work is given up and its connection closed. Default 30 s; at least 1 ms.
    ///
    /// Why: on a network that drops packets silently (a failover, a NAT or firewall that
    /// forgot the connection), nothing but TCP's retransmissions, about 15 minutes on Linux,
    /// ends a wait for an answer, and sqlx sets no keepalive or timeout on its sockets.
    /// Without this bound, each connection caught so stayed out of the pool that long, and a
    /// pool under load was full within seconds, failing every command after the network or
    /// the new primary was back. A commit cut off so fails as
    /// [`Timeout`](cqrs_core::ports::StoreError::Timeout) (it may have taken effect), a
    /// claim or a `BEGIN` as [`Unavailable`](cqrs_core::ports::StoreError::Unavailable)
    /// (nothing was done; a `BEGIN` answered later is rolled back before its connection goes
    /// back). The bound includes a commit's wait for the schema's append lock: make it longer
    /// than the slowest commit you tolerate (one queued behind a synchronous standby that
    /// lags). The connections this crate holds are closed without a close handshake, over TLS
    /// too; a statement run straight on [`PgDatabase::pool`] goes through the pool's release
    /// hook, whose close over TLS does not end on a silent network (sqlx 0.9; docs/postgres.md,
    /// "A network that drops packets"). A pool made elsewhere ([`PgDatabase::from_pool`])
    /// bounds this crate's work with [`PgDatabase::with_answer_timeout`] but has no hook for
    /// statements run straight on it.
    pub fn answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout;
        self
    }

    /// The schema these options name.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// The URL as a log line may show it: the password, and the value of every parameter
    /// whose name holds `password` once decoded (`sslpassword`, `pass%77ord`), as `***`. A
    /// URL that does not parse, or that has no user info but an `@` anywhere after its
    /// scheme (a password holding `/`, `?` or `#` unencoded, whose parts would show as the
    /// host, port, database or a parameter; so `postgres://db/app?user=app@tenant` too, where
    /// the two cannot be told apart), is not shown past its scheme.
    ///
    /// ```
    /// use cqrs_postgres::PgOptions;
    ///
    /// let shown = PgOptions::new("postgres://app:hunter2@db:5432/helpdesk?sslpassword=x&sslmode=require");
    /// assert_eq!(shown.redacted_url(), "postgres://app:***@db:5432/helpdesk?sslpassword=***&sslmode=require");
    /// let slashed = PgOptions::new("postgres://app:20/24@db/helpdesk");
    /// assert!(!slashed.redacted_url().contains("24"));
    /// ```
    pub fn redacted_url(&self) -> String {
        let url = self.url.as_str();
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        let Ok(parsed) = url::Url::parse(url) else {
            return format!("{scheme}://(not shown: it does not parse, and may hold a password)");
        };
        let no_user_info = parsed.username().is_empty() && parsed.password().is_none();
        let after_scheme = url.split_once("://").map_or("", |(_, rest)| rest);
        // Without user info, any `@` (in a parameter's value too: `app:2024?x=pw@db` parses
        // as host `app`, port 2024), whose surroundings would be printed whole here.
        if (no_user_info && after_scheme.contains('@')) || at_outside_user_info(url) {
            return format!(
                "{scheme}://(not shown: an `@` outside its user info may end a password)"
            );
        }
        let mut shown = format!("{}://", parsed.scheme());
        match (parsed.username(), parsed.password()) {
            ("", None) => {}
            (user, Some(_)) => shown.push_str(&format!("{user}:***@")),
            (user, None) => shown.push_str(&format!("{user}@")),
        }
        if let Some(host) = parsed.host_str() {
            shown.push_str(host);
        }
        if let Some(port) = parsed.port() {
            shown.push_str(&format!(":{port}"));
        }
        shown.push_str(parsed.path());
        if let Some(query) = parsed.query() {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if names_a_password(key) => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            shown.push('?');
            shown.push_str(&pairs.join("&"));
        }
        shown
    }

    /// Checks the options, listing every problem.
    pub fn validate(&self) -> Result<(), PgError> {
        self.checked().map(|_| ())
    }

    fn checked(&self) -> Result<PgConnectOptions, PgError> {
        let mut problems = Vec::new();
        let scheme_ok = ["postgres://", "postgresql://"]
            .iter()
            .any(|scheme| self.url.starts_with(scheme));
        // sqlx logs a parameter it does not know with its value, at `warn` (a misspelt
        // `password`, libpq's `sslpassword`), then ignores it: such parameters are taken out
        // before sqlx sees the URL, and named (never their values) in a warning of ours.
        let unknown = unknown_parameters(&self.url);
        let parsed = if unknown.is_empty() {
            PgConnectOptions::from_str(&self.url)
        } else {
            warn_ignored(&self.url, &unknown);
            PgConnectOptions::from_str(&without_parameters(&self.url, &unknown))
        };
        let connect = match parsed {
            Ok(_) if !scheme_ok => {
                problems.push(
                    "the database URL must start with `postgres://` or `postgresql://`".to_owned(),
                );
                None
            }
            Ok(o) => match tls_support_problem(o.get_ssl_mode(), TLS_BUILT) {
                Some(problem) => {
                    problems.push(problem);
                    None
                }
                None => {
                    #[cfg(feature = "tls")]
                    tls_file_problems(&self.url, o.get_ssl_mode(), &mut problems);
                    Some(o)
                }
            },
            Err(e) => {
                // sqlx's message does not repeat the URL, which may hold a password.
                problems.push(format!("the database URL is not a postgres URL: {e}"));
                None
            }
        };
        if let Err(problem) = sql::valid_schema(&self.schema) {
            problems.push(problem);
        }
        if self.max_connections == 0 {
            problems.push("max_connections must be at least 1".to_owned());
        }
        // sqlx allocates a slot per connection when the pool is made: a huge bound (a stray
        // environment variable) would abort the process instead of failing here. PostgreSQL
        // itself takes at most this many.
        if self.max_connections > MAX_CONNECTIONS {
            problems.push(format!(
                "max_connections must be at most {MAX_CONNECTIONS} (PostgreSQL's own limit), got {}",
                self.max_connections
            ));
        }
        if self.min_connections > self.max_connections {
            problems.push(format!(
                "min_connections ({}) is more than max_connections ({})",
                self.min_connections, self.max_connections
            ));
        }
        // A few microseconds (a wrong unit) would fail nearly every acquire and connect.
        for (name, timeout) in [
            ("acquire_timeout", self.acquire_timeout),
            ("answer_timeout", self.answer_timeout),
        ] {
            if timeout < Duration::from_millis(1) {
                problems.push(format!("{name} must be at least 1 ms, got {timeout:?}"));
            }
        }
        let mut at_most = |name: &str, timeout: Option<Duration>| {
            if let Some(timeout) = timeout.filter(|t| *t > MAX_TIMEOUT) {
                problems.push(format!(
                    "{name} must be at most {} ms (about 24.8 days), got {timeout:?}",
                    MAX_TIMEOUT.as_millis()
                ));
            }
        };
        // sqlx adds these to `Instant`s (`Duration::MAX` overflows), and the server refuses
        // settings above `i32::MAX` ms at connect.
        at_most("acquire_timeout", Some(self.acquire_timeout));
        at_most("answer_timeout", Some(self.answer_timeout));
        at_most("idle_timeout", self.idle_timeout);
        at_most("ping_after_idle", self.ping_after_idle);
        at_most("max_lifetime", self.max_lifetime);
        at_most("statement_timeout", self.statement_timeout);
        at_most(
            "idle_in_transaction_timeout",
            self.idle_in_transaction_timeout,
        );
        // Under a millisecond (zero included) is refused: the two reaper intervals would have
        // sqlx's reaper check the pool without pause (and zero close every connection on
        // release); the two session timeouts go to the server in whole milliseconds, at least
        // 1, so they would end every transaction or statement almost at once (zero means "no
        // limit" to Postgres, and would be sent as 1 ms).
        let under_a_millisecond =
            |t: Option<Duration>| t.is_some_and(|t| t < Duration::from_millis(1));
        for (name, value, none) in [
            ("idle_timeout", self.idle_timeout, "keeps idle connections"),
            (
                "max_lifetime",
                self.max_lifetime,
                "keeps connections without limit",
            ),
            (
                "idle_in_transaction_timeout",
                self.idle_in_transaction_timeout,
                "leaves the server's setting",
            ),
            ("statement_timeout", self.statement_timeout, "sets no limit"),
        ] {
            if under_a_millisecond(value) {
                problems.push(format!(
                    "{name} must be at least 1 ms, got {:?} (`None` {none})",
                    value.unwrap_or_default()
                ));
            }
        }
        match connect {
            Some(connect) if problems.is_empty() => {
                // The store's guarantees rest on READ COMMITTED (see `PgDatabase::migrate`):
                // set it for the session, whatever the database's or role's default.
                let millis = |timeout: Duration| timeout.as_millis().max(1).to_string();
                let mut settings = Vec::new();
                if self.session_settings {
                    settings.extend([
                        ("default_transaction_isolation", "read committed".to_owned()),
                        ("tcp_keepalives_idle", "30".to_owned()),
                        ("tcp_keepalives_interval", "10".to_owned()),
                        ("tcp_keepalives_count", "3".to_owned()),
                    ]);
                    if let Some(timeout) = self.idle_in_transaction_timeout {
                        settings.push(("idle_in_transaction_session_timeout", millis(timeout)));
                    }
                }
                if let Some(timeout) = self.statement_timeout {
                    settings.push(("statement_timeout", millis(timeout)));
                }
                let name = match (&self.application_name, connect.get_application_name()) {
                    (Some(name), _) => name.clone(),
                    (None, Some(from_url)) => from_url.to_owned(),
                    (None, None) => self.fallback_application_name.clone(),
                };
                let connect = connect.application_name(&name);
                // No `options` parameter at all when there is nothing to set: some poolers
                // refuse it outright.
                Ok(if settings.is_empty() {
                    connect
                } else {
                    connect.options(settings)
                })
            }
            _ => Err(PgError::InvalidOptions(problems)),
        }
    }

    fn pool_options(&self, retirement: &Arc<Retirement>) -> PgPoolOptions {
        let mut pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(self.min_connections)
            .acquire_timeout(self.acquire_timeout)
            .idle_timeout(self.idle_timeout)
            .max_lifetime(self.max_lifetime)
            .test_before_acquire(self.test_before_acquire);
        let patience = self.answer_timeout;
        pool = pool.after_release(move |conn, _| Box::pin(settle_released(conn, patience)));
        if self.session_settings {
            pool = pool.after_connect(|conn, _| Box::pin(check_for_a_closed_client(conn)));
        }
        let ping = match self.ping_after_idle {
            // sqlx already pings every connection.
            _ if self.test_before_acquire => None,
            None => None,
            // A connection that died silently (a network that drops packets) would spend the
            // whole acquire on its ping: past a quarter of it, the ping failed.
            Some(after) => Some((
                after,
                (self.acquire_timeout / 4).max(Duration::from_millis(1)),
            )),
        };
        let retirement = retirement.clone();
        pool.before_acquire(move |conn, meta| {
            let retired = retirement.retired(meta.age);
            Box::pin(async move {
                if retired {
                    // Opened before the server was found to take no writes.
                    return Ok(false);
                }
                match ping {
                    Some((after, patience)) => ping_if_idle(conn, meta, after, patience).await,
                    None => Ok(true),
                }
            })
        })
    }

    /// Opens the pool and checks that the server answers. Does not migrate: call
    /// [`PgDatabase::migrate`] once at start-up.
    ///
    /// Fails with [`PgError::InvalidOptions`]; with an unavailable (retryable)
    /// [`StoreError`](cqrs_core::ports::StoreError) when the server cannot be reached in
    /// `acquire_timeout`, with the cause (a refused port says so, not only that the pool
    /// timed out: finding it takes one more connect, of at most 2 s); and with a backend error (kind `internal`, not retryable) when the server
    /// answers and refuses the connection: an unknown role, a wrong password, no such
    /// database.
    ///
    /// A connect error names the host, port and database it tried (never the password), and
    /// says when [`from_env`](Self::from_env) used [`DEFAULT_URL`] because `DATABASE_URL`
    /// was unset.
    pub async fn connect(self) -> Result<PgDatabase, PgError> {
        let connect = self.checked()?;
        let target = self.target(&connect);
        let retirement = Retirement::new();
        let pool = match self
            .pool_options(&retirement)
            .connect_with(connect.clone())
            .await
        {
            Ok(pool) => pool,
            // sqlx's pool retries a connect that fails on the way (a refused port) until its
            // acquire timeout, then says only that it timed out: one connect of our own, of
            // at most 2 s more, tells why. Should it succeed (the server just came up), the
            // pool is made without connecting, and opens its connections as they are needed.
            Err(sqlx::Error::PoolTimedOut) => {
                use sqlx::{ConnectOptions, Connection};
                let wait = self.acquire_timeout.min(Duration::from_secs(2));
                match tokio::time::timeout(wait, connect.connect()).await {
                    Ok(Err(cause)) => {
                        return Err(crate::error::connect_error(cause, target).into());
                    }
                    Ok(Ok(probe)) => {
                        let _ = probe.close().await;
                        self.pool_options(&retirement).connect_lazy_with(connect)
                    }
                    Err(_) => {
                        let timed_out = sqlx::Error::PoolTimedOut;
                        return Err(crate::error::connect_error(timed_out, target).into());
                    }
                }
            }
            Err(e) => return Err(crate::error::connect_error(e, target).into()),
        };
        Ok(
            PgDatabase::new(pool, &self.schema, target, Some(retirement))
                .with_answer_timeout(self.answer_timeout),
        )
    }

    /// Where `connect` goes, for its error: host and port (or socket) and database, and
    /// whether the URL was the default one.
    fn target(&self, connect: &PgConnectOptions) -> String {
        let mut target = if at_outside_user_info(&self.url) {
            // The host, port and database parsed from such a URL may be parts of the password.
            "postgres at a place not shown: the URL has an `@` after its host, which may end a \
             password holding `@`, `/`, `?` or `#`; percent-encode those in a password \
             (`%40`, `%2F`, `%3F`, `%23`)"
                .to_owned()
        } else {
            target_of(connect)
        };
        if self.default_url {
            target.push_str(&format!(
                " (DATABASE_URL is unset, so the default URL {DEFAULT_URL} was used: set \
                 DATABASE_URL to your server's URL)"
            ));
        }
        target
    }

    /// Makes the pool without connecting: the first operation connects.
    pub fn connect_lazy(self) -> Result<PgDatabase, PgError> {
        let connect = self.checked()?;
        let target = self.target(&connect);
        let retirement = Retirement::new();
        let pool = self.pool_options(&retirement).connect_lazy_with(connect);
        Ok(
            PgDatabase::new(pool, &self.schema, target, Some(retirement))
                .with_answer_timeout(self.answer_timeout),
        )
    }
}

/// The certificate and key files TLS would read (`sslrootcert`, `sslcert`, `sslkey`, from the
/// URL, else `PGSSLROOTCERT` / `PGSSLCERT` / `PGSSLKEY`, as sqlx takes them) that cannot be
/// read, and a certificate without its key or the other way round: sqlx finds these only at
/// connect, and reports a missing file as an I/O error that reads like an unreachable server.
/// Nothing is read with `sslmode=disable` or `allow` (sqlx never uses TLS then).
#[cfg(feature = "tls")]
fn tls_file_problems(url: &str, mode: PgSslMode, problems: &mut Vec<String>) {
    if matches!(mode, PgSslMode::Disable | PgSslMode::Allow) {
        return;
    }
    // The URL's parameters (sqlx's spellings), else the environment.
    let in_url: Vec<(String, String)> = url::Url::parse(url)
        .map(|parsed| {
            parsed
                .query_pairs()
                .map(|(key, value)| (key.into_owned(), value.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    // With whether the value came from the environment.
    let setting = |names: &[&str], variable: &str| -> Option<(String, String, bool)> {
        let from_url = in_url
            .iter()
            .rev()
            .find(|(key, _)| names.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone(), false));
        from_url.or_else(|| {
            std::env::var(variable)
                .ok()
                .map(|value| (variable.to_owned(), value, true))
        })
    };
    let root = setting(&["sslrootcert", "ssl-root-cert", "ssl-ca"], "PGSSLROOTCERT");
    let cert = setting(&["sslcert", "ssl-cert"], "PGSSLCERT");
    let key = setting(&["sslkey", "ssl-key"], "PGSSLKEY");
    if cert.is_some() != key.is_some() {
        problems.push(
            "a client certificate (sslcert / PGSSLCERT) and its key (sslkey / PGSSLKEY) go \
             together: give both, or neither"
                .to_owned(),
        );
    }
    for (name, value, from_env) in [root, cert, key].into_iter().flatten() {
        let trimmed = value.trim();
        if trimmed.starts_with("-----BEGIN") {
            // sqlx takes an inline PEM in place of a path from the environment only, one that
            // also ends in `-----`; any other it opens as a file, and fails at connect as if
            // the server were away. Never shown: it may be a private key.
            if !from_env {
                problems.push(format!(
                    "{name} in the database URL holds a PEM, which sqlx would open as a file \
                     name: give the file's path, or the PEM in {}",
                    match name.as_str() {
                        "sslcert" | "ssl-cert" => "PGSSLCERT",
                        "sslkey" | "ssl-key" => "PGSSLKEY",
                        _ => "PGSSLROOTCERT",
                    }
                ));
            } else if !trimmed.ends_with("-----") {
                problems.push(format!(
                    "{name} holds a PEM that does not end in `-----`, which sqlx would open as \
                     a file name: give the whole PEM, or a file's path"
                ));
            }
            continue;
        }
        if let Err(e) = std::fs::File::open(&value) {
            problems.push(format!("{name} `{value}` cannot be read: {e}"));
        }
    }
}

/// Whether this build has TLS (the `tls` feature).
const TLS_BUILT: bool = cfg!(feature = "tls");

/// Why `mode` cannot be had in a build with TLS (`tls_built`) or without: a parameter, so the
/// tests of either build check both.
fn tls_support_problem(mode: PgSslMode, tls_built: bool) -> Option<String> {
    (wants_tls(mode) && !tls_built).then(|| {
        format!(
            "the database URL (or PGSSLMODE) asks for TLS with sslmode={}, but cqrs-postgres is \
             built without its `tls` feature: enable it (add `features = [\"tls\"]` to the \
             cqrs-postgres dependency in Cargo.toml), or connect without TLS on a private \
             network (sslmode=disable or prefer, or no sslmode)",
            ssl_mode_name(mode)
        )
    })
}

/// Whether `mode` insists on TLS, which a build without the `tls` feature cannot do
/// (`prefer` and `allow` fall back to a plain connection).
fn wants_tls(mode: PgSslMode) -> bool {
    matches!(
        mode,
        PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
    )
}

fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// The URL's parameter names that sqlx does not take (it ignores them, after logging them
/// with their values): none when the URL does not parse (sqlx then says why, without it).
fn unknown_parameters(url: &str) -> Vec<String> {
    const KNOWN: &[&str] = &[
        "sslmode",
        "ssl-mode",
        "sslrootcert",
        "ssl-root-cert",
        "ssl-ca",
        "sslcert",
        "ssl-cert",
        "sslkey",
        "ssl-key",
        "statement-cache-capacity",
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "application_name",
        "options",
    ];
    let Ok(parsed) = url::Url::parse(url) else {
        return Vec::new();
    };
    let mut unknown: Vec<String> = parsed
        .query_pairs()
        .map(|(key, _)| key.into_owned())
        .filter(|key| {
            let options_entry = key.starts_with("options[") && key.ends_with(']');
            !(KNOWN.contains(&key.as_str()) || options_entry)
        })
        .collect();
    unknown.sort();
    unknown.dedup();
    unknown
}

/// Warns that the URL's `unknown` parameters are ignored, naming them, never their values. A
/// name that is no plain name, or any in a URL with an `@` after its host, may be part of a
/// password (`postgres://u:20?pw@h` parses as host `u`, port 20, parameter `pw@h`): not shown.
fn warn_ignored(url: &str, unknown: &[String]) {
    let plain = |key: &&String| {
        key.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let mut named: Vec<String> = if at_outside_user_info(url) {
        Vec::new()
    } else {
        unknown
            .iter()
            .filter(plain)
            .map(|key| format!("`{key}`"))
            .collect()
    };
    if named.len() < unknown.len() {
        named.push(format!(
            "{} not shown (it may be part of a password holding `?` or `/` unencoded: \
             percent-encode those as `%3F`, `%2F`)",
            unknown.len() - named.len()
        ));
    }
    tracing::warn!(
        parameters = %named.join(", "),
        "the database URL has parameters sqlx does not take: ignored (set timeouts with \
         PgOptions's own methods)"
    );
}

/// `url` without the query parameters named in `unknown`.
fn without_parameters(url: &str, unknown: &[String]) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(key, _)| !unknown.iter().any(|u| u == key))
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    parsed.set_query(None);
    if !kept.is_empty() {
        parsed.query_pairs_mut().extend_pairs(kept);
    }
    parsed.into()
}

/// Whether a URL parameter's name, decoded as sqlx decodes it (`form_urlencoded`), names a
/// password (`password`, `sslpassword`, `pass%77ord`).
fn names_a_password(key: &str) -> bool {
    url::form_urlencoded::parse(key.as_bytes())
        .any(|(name, _)| name.to_ascii_lowercase().contains("password"))
}

/// Whether `url` has an `@` past its user info: a password holding `/`, `?` or `#`
/// unencoded, before which the URL's user info ends (`postgres://app:20/24@db/app` parses
/// as host `app`, port 20, database `24@db/app`), or holding `@` and one of them
/// (`postgres://app:p@ss/word@db/app` parses as password `p`, host `ss`, database
/// `word@db/app`), whose parts would show as the host, port, database or a parameter's name.
/// An `@` in a parameter's value is none of these (`?user=app@tenant`).
fn at_outside_user_info(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    let after_scheme = url.split_once("://").map_or("", |(_, rest)| rest);
    let (before_fragment, fragment) = after_scheme.split_once('#').unwrap_or((after_scheme, ""));
    let (before_query, query) = before_fragment
        .split_once('?')
        .unwrap_or((before_fragment, ""));
    let no_user_info = parsed.username().is_empty() && parsed.password().is_none();
    let in_a_key = query
        .split('&')
        .any(|pair| pair.split('=').next().unwrap_or_default().contains('@'));
    if no_user_info {
        before_query.contains('@') || fragment.contains('@') || in_a_key
    } else if parsed.password().is_some() {
        // Its user info ends at the password's first `@`: any `@` after it, a parameter's
        // value included (`app:p@ss?k=v@db`), may be the rest of the password.
        parsed.path().contains('@') || query.contains('@') || fragment.contains('@')
    } else {
        // A user without a password: nothing after it can be one.
        parsed.path().contains('@') || fragment.contains('@') || in_a_key
    }
}

/// Where a pool connects, for errors: host and port (or socket) and database, never the
/// password.
pub(crate) fn target_of(connect: &PgConnectOptions) -> String {
    let place = match connect.get_socket() {
        Some(socket) => format!("socket {}", socket.display()),
        None => format!("{}:{}", connect.get_host(), connect.get_port()),
    };
    let database = match connect.get_database() {
        Some(database) => format!("database `{database}`"),
        None => format!("database `{}` (the user's name)", connect.get_username()),
    };
    format!("postgres at {place}, {database}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By default every connection asks for the settings the crate relies on; turned off, it
    /// sends no `options` startup parameter at all, unless a statement timeout was asked for.
    #[test]
    fn session_settings_go_in_the_startup_options_unless_turned_off() {
        let url = "postgres://postgres@127.0.0.1:5432/test";
        let on = PgOptions::new(url).checked().unwrap();
        let sent = on.get_options().unwrap();
        for setting in [
            "default_transaction_isolation=read\\ committed",
            "tcp_keepalives_idle=30",
            "idle_in_transaction_session_timeout=60000",
        ] {
            assert!(sent.contains(setting), "{setting} in {sent}");
        }
        assert!(
            PgOptions::new(url)
                .idle_in_transaction_timeout(Some(Duration::ZERO))
                .validate()
                .is_err(),
            "zero would end every transaction after 1 ms"
        );
        assert!(
            PgOptions::new(url)
                .statement_timeout(Some(Duration::ZERO))
                .validate()
                .is_err(),
            "zero would fail every statement after 1 ms"
        );
        let off = PgOptions::new(url)
            .session_settings(false)
            .checked()
            .unwrap();
        assert_eq!(off.get_options(), None);
        let timed = PgOptions::new(url)
            .session_settings(false)
            .statement_timeout(Some(Duration::from_secs(5)))
            .checked()
            .unwrap();
        assert_eq!(timed.get_options(), Some("-c statement_timeout=5000"));
    }

    /// Durations under a millisecond acted as the zero that is refused (sent as 1 ms, or a
    /// reaper without pause), and a huge pool bound made sqlx allocate a slot per connection
    /// and abort the process: all refused, each named.
    #[test]
    fn sub_millisecond_durations_and_huge_pools_are_refused() {
        let url = "postgres://postgres@127.0.0.1:5432/test";
        let tiny = Some(Duration::from_micros(500));
        let err = PgOptions::new(url)
            .acquire_timeout(Duration::from_micros(500))
            .idle_timeout(tiny)
            .max_lifetime(tiny)
            .idle_in_transaction_timeout(tiny)
            .statement_timeout(tiny)
            .max_connections(u32::MAX)
            .validate()
            .unwrap_err()
            .to_string();
        for name in [
            "acquire_timeout must be at least 1 ms",
            "idle_timeout must be at least 1 ms",
            "max_lifetime must be at least 1 ms",
            "idle_in_transaction_timeout must be at least 1 ms",
            "statement_timeout must be at least 1 ms",
            "max_connections must be at most 262143",
        ] {
            assert!(err.contains(name), "{name} in {err}");
        }
        let ms = Some(Duration::from_millis(1));
        assert!(
            PgOptions::new(url)
                .acquire_timeout(Duration::from_millis(1))
                .idle_timeout(ms)
                .max_lifetime(ms)
                .idle_in_transaction_timeout(ms)
                .statement_timeout(ms)
                .max_connections(MAX_CONNECTIONS)
                .validate()
                .is_ok()
        );
    }

    /// Without the `tls` feature a URL that insists on TLS is refused as invalid options (it
    /// failed at connect as a retryable `Unavailable`), saying how to turn TLS on; with it,
    /// every mode is accepted. The modes that fall back to a plain connection are accepted
    /// either way.
    #[test]
    fn an_sslmode_that_insists_on_tls_needs_the_tls_feature() {
        for (mode, parsed) in [
            ("require", PgSslMode::Require),
            ("verify-ca", PgSslMode::VerifyCa),
            ("verify-full", PgSslMode::VerifyFull),
        ] {
            assert_eq!(tls_support_problem(parsed, true), None, "sslmode={mode}");
            let message = tls_support_problem(parsed, false).expect("refused without TLS");
            for part in [
                &format!("asks for TLS with sslmode={mode}"),
                "built without its `tls` feature",
                "features = [\"tls\"]",
                "sslmode=disable or prefer",
            ] {
                assert!(message.contains(part), "{part:?} in {message}");
            }
        }
        for mode in [PgSslMode::Prefer, PgSslMode::Allow, PgSslMode::Disable] {
            assert_eq!(tls_support_problem(mode, false), None);
        }
        // This build, through `validate`: the URL's mode (any case) is what counts, and the
        // message never shows the password.
        let url = "postgres://app:s3cret@db.internal:5432/app";
        for mode in ["require", "verify-ca", "verify-full", "REQUIRE"] {
            let result = PgOptions::new(format!("{url}?sslmode={mode}")).validate();
            assert_eq!(result.is_ok(), TLS_BUILT, "sslmode={mode}: {result:?}");
            if let Err(error) = result {
                assert_eq!(error.kind(), cqrs_core::ErrorKind::Invalid, "{error}");
                let message = error.to_string();
                assert!(message.contains("without its `tls` feature"), "{message}");
                assert!(!message.contains("s3cret"), "{message}");
            }
        }
        for mode in ["prefer", "allow", "disable"] {
            let options = PgOptions::new(format!("{url}?sslmode={mode}"));
            assert!(options.validate().is_ok(), "sslmode={mode}");
        }
        // No sslmode: sqlx's default, `prefer` (unless PGSSLMODE says otherwise).
        if std::env::var_os("PGSSLMODE").is_none() {
            assert!(PgOptions::new(url).validate().is_ok());
        }
    }

    /// A certificate file TLS would read that is not there is invalid options naming it
    /// (sqlx reported it only at connect, as an I/O error like an unreachable server's); with
    /// `sslmode=disable` nothing is read, so nothing is checked.
    #[cfg(feature = "tls")]
    #[test]
    fn a_tls_file_that_cannot_be_read_is_invalid_options_naming_it() {
        let url = "postgres://app:s3cret@db.internal:5432/app";
        for (key, mode) in [
            ("sslrootcert", "verify-full"),
            ("sslcert", "require"),
            ("sslkey", "prefer"),
        ] {
            let error =
                PgOptions::new(format!("{url}?sslmode={mode}&{key}=/nonexistent/{key}.pem"))
                    .validate()
                    .unwrap_err();
            assert_eq!(error.kind(), cqrs_core::ErrorKind::Invalid, "{error}");
            let message = error.to_string();
            assert!(
                message.contains(&format!("{key} `/nonexistent/{key}.pem` cannot be read")),
                "{message}"
            );
            assert!(message.contains("cannot be read"), "{message}");
            assert!(!message.contains("s3cret"), "{message}");
        }
        for mode in ["disable", "allow"] {
            let unused = format!("{url}?sslmode={mode}&sslrootcert=/nonexistent/ca.pem");
            assert!(PgOptions::new(unused).validate().is_ok(), "sslmode={mode}");
        }
        // A client certificate needs its key.
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/tls/ca.pem");
        let error = PgOptions::new(format!("{url}?sslmode=require&sslcert={ca}"))
            .validate()
            .unwrap_err();
        assert!(error.to_string().contains("go together"), "{error}");
        // A host sqlx cannot write back into a URL (an IPv6 address in `host=`) is checked
        // without building one (sqlx's URL form panicked on it).
        let ipv6 = "postgres://app@localhost/app?host=::1&sslmode=prefer";
        assert!(PgOptions::new(ipv6).validate().is_ok());
    }

    /// A PEM in the URL is refused: sqlx opens it as a file name (only the environment's
    /// `PGSSL*` may hold one), and the connect failed as if the server were away. The PEM is
    /// never shown.
    #[cfg(feature = "tls")]
    #[test]
    fn a_pem_in_the_url_is_refused_without_showing_it() {
        let pem = "-----BEGIN%20PRIVATE%20KEY-----s3cretkey-----END%20PRIVATE%20KEY-----";
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/tls/ca.pem");
        let url =
            format!("postgres://app@db.internal/app?sslmode=require&sslcert={ca}&sslkey={pem}");
        let error = PgOptions::new(url).validate().unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("sslkey in the database URL holds a PEM"),
            "{message}"
        );
        assert!(message.contains("PGSSLKEY"), "{message}");
        assert!(!message.contains("s3cretkey"), "{message}");
    }

    /// A parameter sqlx does not take is taken out before sqlx sees the URL, and named in a
    /// warning of ours: sqlx logged it with its value at `warn` (a misspelt `password`,
    /// libpq's `sslpassword`). URLs that carry one (a provider's `channel_binding=require`)
    /// still connect, as with sqlx alone. A "name" that may be part of a password (a `?` in
    /// it, unencoded) is not shown.
    #[test]
    fn a_parameter_sqlx_does_not_take_is_named_without_its_value_and_ignored() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Logged(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Logged {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let logged = Logged::default();
        let writer = logged.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        let typo = "postgres://app@db/app?sslpassword=hunter2&application_name=svc&pasword=hunter3";
        // Else a warning another test reached first on its own thread could be lost here.
        cqrs_core::testing::scoped_subscribers_see_every_callsite();
        let (kept, question) = tracing::subscriber::with_default(subscriber, || {
            let kept = PgOptions::new(typo).checked().unwrap();
            let question = PgOptions::new("postgres://app:20?24hunter4@db/app").checked();
            (kept, question)
        });
        let logs = String::from_utf8(logged.0.lock().unwrap().clone()).unwrap();
        assert!(!logs.contains("hunter"), "{logs}");
        assert!(logs.contains("`pasword`, `sslpassword`"), "{logs}");
        assert!(logs.contains("1 not shown"), "{logs}");
        assert_eq!(
            kept.get_application_name(),
            Some("svc"),
            "the others are kept"
        );
        assert_eq!(kept.get_database(), Some("app"));
        assert!(question.is_ok(), "ignored, as sqlx would");
        let known = "postgres://app@db/app?sslmode=disable&application_name=a@b\
                     &options[search_path]=x&statement-cache-capacity=10";
        assert!(unknown_parameters(known).is_empty());
        assert_eq!(
            unknown_parameters("postgres://db/app?b=1&a=2&b=3"),
            ["a", "b"],
            "each once"
        );
    }

    /// A password holding `/` unencoded makes the URL parse with parts of it as the host, port
    /// and database, which errors showed: the target is not shown then, and says why.
    #[test]
    fn a_password_that_ends_the_host_early_is_not_shown_as_the_target() {
        let options = PgOptions::new("postgres://app:2024/s3cret@db.internal:5432/app");
        let target = options.target(&options.checked().unwrap());
        assert!(!target.contains("s3cret"), "{target}");
        assert!(target.contains("percent-encode"), "{target}");
        for shown in [
            "postgres://app@db.internal:5432/app?application_name=a@b",
            "postgres://db.internal:5432/app?user=app@tenant",
        ] {
            let plain = PgOptions::new(shown);
            let target = plain.target(&plain.checked().unwrap());
            assert!(
                target.contains("db.internal:5432, database `app`"),
                "{target}"
            );
        }
        for hidden in [
            "postgres://app:20#s3cret@db.internal/app",
            "postgres://app:20?s3cret@db.internal/app",
            // A password holding `@` and `/`: the user info ends at its first `@`.
            "postgres://app:Xy@Z/s3cret@db.internal/app",
            "postgres://app:Xy@Z/9?s3cret@db.internal/app",
            "postgres://app:Xy@Z?k=s3cret@db.internal/app",
            "postgres://app:Xy@Z?s3cret=v@db.internal/app",
        ] {
            let options = PgOptions::new(hidden);
            let target = options.target(&options.checked().unwrap());
            assert!(!target.contains("s3cret"), "{target}");
            let redacted = options.redacted_url();
            assert!(!redacted.contains("s3cret"), "{redacted}");
        }
    }

    /// A failed connect names the host, port and database it tried, never the password, and
    /// says when the default URL was used because DATABASE_URL was unset (it reported only
    /// the I/O error).
    #[tokio::test]
    async fn a_failed_connect_says_where_it_went() {
        // `sslmode=disable`: a `PGSSLMODE` in the environment would otherwise apply.
        let url = "postgres://app:s3cret@127.0.0.1:1/orders?sslmode=disable";
        let message = |options: PgOptions| async move {
            match options
                .acquire_timeout(Duration::from_millis(300))
                .connect()
                .await
            {
                Ok(_) => panic!("nothing listens on port 1"),
                Err(error) => {
                    assert_eq!(error.kind(), cqrs_core::ErrorKind::Unavailable, "{error}");
                    error.to_string()
                }
            }
        };
        let given = message(PgOptions::new(url)).await;
        assert!(
            given.contains("could not connect to postgres at 127.0.0.1:1, database `orders`"),
            "{given}"
        );
        assert!(
            given.contains("check that the server runs there"),
            "{given}"
        );
        assert!(!given.contains("s3cret"), "{given}");
        assert!(!given.contains("DATABASE_URL"), "{given}");
        let defaulted = message(PgOptions {
            default_url: true,
            ..PgOptions::new(url)
        })
        .await;
        assert!(
            defaulted.contains(
                "(DATABASE_URL is unset, so the default URL \
                 postgres://postgres@127.0.0.1:5432/postgres was used: set DATABASE_URL"
            ),
            "{defaulted}"
        );
        let no_database = PgOptions::new("postgres://app@127.0.0.1:1");
        let target = no_database.target(&no_database.checked().unwrap());
        if std::env::var_os("PGDATABASE").is_none() {
            assert_eq!(
                target,
                "postgres at 127.0.0.1:1, database `app` (the user's name)"
            );
        }
    }

    /// Timeouts past what sqlx or the server take are refused, naming the setter and the
    /// value: `acquire_timeout(Duration::MAX)` made sqlx panic on `Instant` overflow, and the
    /// server refused `statement_timeout` or `idle_in_transaction_session_timeout` above
    /// `i32::MAX` ms only at connect, as a backend error.
    #[test]
    fn timeouts_past_the_maximum_are_refused() {
        let url = "postgres://postgres@127.0.0.1:5432/test";
        let max = Duration::from_millis(i32::MAX as u64);
        let past = max + Duration::from_millis(1);
        let problems = |options: PgOptions| match options.validate() {
            Err(PgError::InvalidOptions(problems)) => problems,
            other => panic!("expected InvalidOptions, got {other:?}"),
        };
        assert_eq!(
            problems(
                PgOptions::new(url)
                    .acquire_timeout(Duration::MAX)
                    .idle_timeout(Some(past))
                    .max_lifetime(Some(Duration::MAX))
                    .statement_timeout(Some(past))
                    .idle_in_transaction_timeout(Some(past))
            ),
            [
                format!(
                    "acquire_timeout must be at most 2147483647 ms (about 24.8 days), got {:?}",
                    Duration::MAX
                ),
                format!(
                    "idle_timeout must be at most 2147483647 ms (about 24.8 days), got {past:?}"
                ),
                format!(
                    "max_lifetime must be at most 2147483647 ms (about 24.8 days), got {:?}",
                    Duration::MAX
                ),
                format!(
                    "statement_timeout must be at most 2147483647 ms (about 24.8 days), got \
                     {past:?}"
                ),
                format!(
                    "idle_in_transaction_timeout must be at most 2147483647 ms (about 24.8 \
                     days), got {past:?}"
                ),
            ]
        );
        let at_most = PgOptions::new(url)
            .acquire_timeout(max)
            .idle_timeout(Some(max))
            .max_lifetime(Some(max))
            .statement_timeout(Some(max))
            .idle_in_transaction_timeout(Some(max))
            .checked()
            .unwrap();
        assert!(
            at_most
                .get_options()
                .unwrap()
                .contains("statement_timeout=2147483647"),
            "the largest value is sent as is"
        );
    }

    /// A zero idle timeout or lifetime closed every connection on release while sqlx's reaper
    /// spun a core; `None` is how to keep connections.
    #[test]
    fn a_zero_idle_timeout_or_lifetime_is_refused() {
        let url = "postgres://postgres@127.0.0.1:5432/test";
        let Err(PgError::InvalidOptions(problems)) = PgOptions::new(url)
            .idle_timeout(Some(Duration::ZERO))
            .max_lifetime(Some(Duration::ZERO))
            .validate()
        else {
            panic!("zero passes");
        };
        assert_eq!(
            problems,
            [
                "idle_timeout must be at least 1 ms, got 0ns (`None` keeps idle connections)",
                "max_lifetime must be at least 1 ms, got 0ns (`None` keeps connections without limit)",
            ]
        );
        assert!(
            PgOptions::new(url)
                .idle_timeout(None)
                .max_lifetime(None)
                .validate()
                .is_ok()
        );
    }

    /// The URL's `application_name` is kept unless one is set; without either, the fallback
    /// (`cqrs` unless given), which never overrides the URL's.
    #[test]
    fn the_urls_application_name_is_kept_unless_one_is_set() {
        let name = |options: PgOptions| {
            options
                .checked()
                .unwrap()
                .get_application_name()
                .map(str::to_owned)
        };
        let url = "postgres://u@h/db?application_name=billing";
        assert_eq!(name(PgOptions::new(url)).as_deref(), Some("billing"));
        assert_eq!(
            name(PgOptions::new(url).application_name("set")).as_deref(),
            Some("set")
        );
        assert_eq!(
            name(PgOptions::new(url).fallback_application_name("svc")).as_deref(),
            Some("billing")
        );
        // Unless `PGAPPNAME` names one, as libpq and sqlx read it.
        if std::env::var_os("PGAPPNAME").is_none() {
            let bare = "postgres://u@h/db";
            assert_eq!(name(PgOptions::new(bare)).as_deref(), Some("cqrs"));
            assert_eq!(
                name(PgOptions::new(bare).fallback_application_name("svc")).as_deref(),
                Some("svc")
            );
        }
    }
}
