//! A server per test, and a small client.

use cqrs_core::clock::ManualClock;
use helpdesk::{Config, Hooks, Server};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const PASSWORD: &str = "correct horse battery";

/// The agent code of every test server (`HELPDESK_AGENT_CODE`).
pub const AGENT_CODE: &str = "the-test-agent-code";

pub struct TestServer {
    pub server: Option<Server>,
    /// The Postgres schema and Redis prefix of this server, in Postgres mode.
    pub backend: Backend,
    pub base: String,
    pub clock: ManualClock,
    pub http: reqwest::Client,
    pub emails: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// Which backends a test server runs on: `HELPDESK_TEST_BACKEND=postgres` runs every test on
/// Postgres (`DATABASE_URL`) and Redis (`REDIS_URL`), each server in its own schema and with
/// its own Redis prefix, unless a test shares them on purpose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Postgres {
        database_url: String,
        redis_url: String,
        /// The schema, also the Redis prefix.
        namespace: String,
        /// Whether stopping this server drops the schema (the last of a shared set does).
        owner: bool,
    },
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

impl Backend {
    /// The backend the environment asks for, with a fresh namespace.
    pub async fn from_env() -> Self {
        if std::env::var("HELPDESK_TEST_BACKEND").as_deref() != Ok("postgres") {
            return Backend::Memory;
        }
        // Asked for by name: a run that silently fell back to memory would pass for a run on
        // Postgres.
        Self::postgres().await.unwrap_or_else(|| {
            panic!(
                "HELPDESK_TEST_BACKEND=postgres, but Postgres or Redis is down: start them \
                 (scripts/test.sh does), or unset HELPDESK_TEST_BACKEND to run in memory"
            )
        })
    }

    /// Postgres + Redis with a fresh namespace, or `None` when the services are down (a
    /// failure under `CQRS_REQUIRE_SERVICES=1`).
    pub async fn postgres() -> Option<Self> {
        let database_url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into());
        let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.into());
        let pg = reachable(&database_url, 5432).await;
        let redis = reachable(&redis_url, 6379).await;
        if !cqrs_core::testing::require_services("postgres", &database_url, pg)
            || !cqrs_core::testing::require_services("redis", &redis_url, redis)
        {
            return None;
        }
        Some(Backend::Postgres {
            database_url,
            redis_url,
            namespace: cqrs_core::testing::test_id("helpdesk"),
            owner: true,
        })
    }

    /// The same namespace, for a second instance that does not drop it.
    pub fn shared(&self) -> Self {
        match self {
            Backend::Memory => Backend::Memory,
            Backend::Postgres {
                database_url,
                redis_url,
                namespace,
                ..
            } => Backend::Postgres {
                database_url: database_url.clone(),
                redis_url: redis_url.clone(),
                namespace: namespace.clone(),
                owner: false,
            },
        }
    }

    /// The database URL and the schema (also the Redis prefix) of a Postgres backend; `None`
    /// in memory.
    pub fn database(&self) -> Option<(String, String)> {
        match self {
            Backend::Memory => None,
            Backend::Postgres {
                database_url,
                namespace,
                ..
            } => Some((database_url.clone(), namespace.clone())),
        }
    }

    /// The health component that decides readiness.
    pub fn critical_component(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Postgres { .. } => "postgres",
        }
    }

    fn configure(&self, config: &mut Config) {
        if let Backend::Postgres {
            database_url,
            redis_url,
            namespace,
            ..
        } = self
        {
            config.database_url = Some(database_url.clone());
            config.redis_url = Some(redis_url.clone());
            config.database_schema = namespace.clone();
            config.redis_prefix = namespace.clone();
        }
    }

    /// Drops the schema and the Redis keys of an owning Postgres backend.
    pub async fn clean_up(&self) {
        let Backend::Postgres {
            database_url,
            redis_url,
            namespace,
            owner: true,
        } = self
        else {
            return;
        };
        if let Ok(db) = cqrs_postgres::PgOptions::new(database_url.clone())
            .schema(namespace.clone())
            .connect()
            .await
        {
            let _ = db.drop_schema().await;
        }
        delete_redis_keys(redis_url, &format!("{namespace}:*")).await;
    }
}

/// Deletes the keys matching `pattern`.
async fn delete_redis_keys(url: &str, pattern: &str) {
    let script =
        "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 0";
    redis_command(url, &["EVAL", script, "0", pattern]).await;
}

/// Sends one command to the Redis at `url` (after `AUTH` and `SELECT` when the URL names a
/// password or a database), speaking RESP directly (the tests have no Redis client, and need
/// only a few commands); the start of the command's reply as text (`:1` for an integer, `$-1`
/// for nil, `$5\r\nvalue` for a bulk string), or `None` when Redis could not be reached within
/// 5 s or refused the `AUTH` or `SELECT`.
pub async fn redis_command(url: &str, args: &[&str]) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn resp(args: &[&str]) -> String {
        let mut command = format!("*{}\r\n", args.len());
        for arg in args {
            command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        command
    }
    let parsed = url::Url::parse(url).ok()?;
    let mut setup = Vec::new();
    if let Some(password) = parsed.password() {
        let user = parsed.username();
        setup.push(match user {
            "" => resp(&["AUTH", password]),
            user => resp(&["AUTH", user, password]),
        });
    }
    let database = parsed.path().trim_matches('/');
    if !database.is_empty() && database != "0" {
        setup.push(resp(&["SELECT", database]));
    }
    let addr = host_port(url, 6379)?;
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut reply = vec![0u8; 512];
        for command in setup {
            stream.write_all(command.as_bytes()).await.ok()?;
            let read = stream.read(&mut reply).await.ok()?;
            if !reply[..read].starts_with(b"+OK") {
                return None;
            }
        }
        stream.write_all(resp(args).as_bytes()).await.ok()?;
        let read = stream.read(&mut reply).await.ok()?;
        Some(String::from_utf8_lossy(&reply[..read]).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .ok()
        .flatten()
}

/// The `host:port` a URL names, `default_port` when it names none.
pub fn host_port(url: &str, default_port: u16) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split(['/', '?']).next()?;
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    Some(if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    })
}

/// Whether something listens at the URL's host and port.
async fn reachable(url: &str, default_port: u16) -> bool {
    let Some(addr) = host_port(url, default_port) else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A unique email per call, so tests never share users.
pub fn email(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}@example.com",
        NEXT.fetch_add(1, Ordering::SeqCst),
        std::process::id()
    )
}

/// The ticket ids of a list page, in its order.
pub fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The configuration a test server runs with on `backend`, on a free loopback port.
pub fn test_config(backend: &Backend) -> Config {
    let mut config = Config {
        bind: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: Some("a-test-secret-that-is-at-least-32-bytes-long".into()),
        agent_emails: vec!["agent@example.com".into(), "agent2@example.com".into()],
        agent_code: Some(AGENT_CODE.into()),
        poll_ms: 10,
        shutdown_grace_ms: 2_000,
        // Tests send hundreds of requests as one user within a second; the limit has a test
        // of its own (`each_user_is_held_to_its_request_rate`).
        user_requests_per_second: 0,
        ..Config::default()
    };
    backend.configure(&mut config);
    config
}

/// Waits until `condition` holds, checking every few milliseconds; panics with `what` after
/// `deadline`.
pub async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + deadline;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < until,
            "not within {deadline:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl TestServer {
    /// Sends `method path` declaring a body 1 KiB over the limit the way careful clients do
    /// (curl among them), with `Expect: 100-continue`, and returns the status and body of the
    /// answer: the server refuses from the `Content-Length` alone, before the body is sent.
    pub async fn oversize(
        &self,
        method: &Method,
        path: &str,
        token: Option<&str>,
    ) -> (u16, String) {
        let answer = self.oversize_answer(method, path, token).await;
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    /// The whole answer, status line and headers included, to a request announcing a body
    /// over the limit and waiting (`Expect: 100-continue`) before sending it.
    pub async fn oversize_answer(
        &self,
        method: &Method,
        path: &str,
        token: Option<&str>,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            helpdesk::BODY_LIMIT + 1024
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(Backend::from_env().await, configure).await
    }

    /// A server on `backend` (two servers on one Postgres backend share its schema and prefix).
    pub async fn start_on(backend: Backend, configure: impl FnOnce(&mut Config)) -> Self {
        Self::launch(backend, Hooks::default(), configure).await
    }

    /// A server on `backend` with `hooks` (its clock is replaced by the test's).
    pub async fn start_with_hooks(
        backend: Backend,
        hooks: Hooks,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        Self::launch(backend, hooks, configure).await
    }

    /// A server on `backend` that runs neither relay: not the outbox relay to the event
    /// transport, nor the realtime relay to the WebSocket hubs. What it commits is shipped only
    /// by another instance's relays (sharing their checkpoints through the schema), or by
    /// nothing.
    pub async fn start_without_relay(backend: Backend) -> Self {
        Self::start_without_relay_with(backend, |_| {}).await
    }

    /// [`start_without_relay`](Self::start_without_relay), configured.
    pub async fn start_without_relay_with(
        backend: Backend,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let hooks = Hooks {
            without_relay: true,
            ..Hooks::default()
        };
        Self::launch(backend, hooks, configure).await
    }

    async fn launch(backend: Backend, hooks: Hooks, configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(&backend);
        configure(&mut config);
        let clock = ManualClock::new();
        let server = Server::start(
            config,
            Hooks {
                clock: Some(Arc::new(clock.clone())),
                ..hooks
            },
        )
        .await
        .expect("the server starts");
        let base = format!("http://{}", server.addr());
        Self {
            server: Some(server),
            backend,
            base,
            clock,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            emails: Default::default(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request; returns the status, the headers and the JSON body (`Null` when empty
    /// or not JSON).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        Response::from(request.send().await.expect("the request is answered")).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.send(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.send(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn register(&self, email: &str) -> Response {
        self.send(
            Method::POST,
            "/auth/register",
            None,
            Some(json!({ "email": email, "password": PASSWORD })),
        )
        .await
    }

    /// Registers an email of the agent list, with the agent code.
    pub async fn register_agent(&self, email: &str) -> Response {
        self.send(
            Method::POST,
            "/auth/register",
            None,
            Some(json!({ "email": email, "password": PASSWORD, "agent_code": AGENT_CODE })),
        )
        .await
    }

    /// Logs in with [`PASSWORD`].
    pub async fn login(&self, email: &str) -> Response {
        self.send(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({ "email": email, "password": PASSWORD })),
        )
        .await
    }

    /// Registers and logs in; returns (token, user id).
    pub async fn user(&self, email: &str) -> (String, String) {
        let registered = self.register(email).await;
        assert_eq!(registered.status, StatusCode::CREATED, "{registered:?}");
        let login = self
            .send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": email, "password": PASSWORD })),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        let id = login.body["user_id"].as_str().unwrap().to_owned();
        self.emails
            .lock()
            .unwrap()
            .insert(id.clone(), email.to_owned());
        (login.body["token"].as_str().unwrap().to_owned(), id)
    }

    /// Logs a known user in again (after the clock moved past their token's expiry).
    pub async fn token_of(&self, user_id: &str) -> String {
        let email = self
            .emails
            .lock()
            .unwrap()
            .get(user_id)
            .cloned()
            .expect("a user this server registered");
        let login = self
            .send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": email, "password": PASSWORD })),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "logging in again: {login:?}");
        login.body["token"].as_str().unwrap().to_owned()
    }

    /// A fresh customer.
    pub async fn customer(&self) -> (String, String) {
        self.user(&email("customer")).await
    }

    /// The agent (registered on first use).
    pub async fn agent(&self) -> (String, String) {
        self.agent_named("agent@example.com").await
    }

    pub async fn agent_named(&self, email: &str) -> (String, String) {
        let _ = self.register_agent(email).await;
        let login = self
            .send(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": email, "password": PASSWORD })),
            )
            .await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        assert_eq!(login.body["role"], "agent");
        (
            login.body["token"].as_str().unwrap().to_owned(),
            login.body["user_id"].as_str().unwrap().to_owned(),
        )
    }

    /// Opens a ticket; returns its JSON.
    pub async fn ticket(&self, token: &str, title: &str) -> Value {
        let r = self
            .post("/tickets", token, json!({ "title": title }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        r.body
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("a clean shutdown");
        }
        let backend = std::mem::replace(&mut self.backend, Backend::Memory);
        backend.clean_up().await;
    }
}

impl Drop for TestServer {
    /// A server the test did not stop still gets its schema and keys dropped, from a thread
    /// with its own runtime (this may run inside the test's runtime).
    fn drop(&mut self) {
        if matches!(self.backend, Backend::Postgres { owner: true, .. }) {
            let backend = std::mem::replace(&mut self.backend, Backend::Memory);
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(async {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), backend.clean_up()).await;
                    });
                }
            })
            .join();
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Response {
    pub async fn from(r: reqwest::Response) -> Self {
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            body,
        }
    }

    /// Asserts the status and the error code, and that the body has the contract's shape.
    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["error"]["code"], code, "{self:?}");
        assert!(self.body["error"]["message"].is_string(), "{self:?}");
        let content_type = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
    }
}

/// Runs a test body under a deadline.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    within_for(Duration::from_secs(60), f).await
}

/// Runs a test body under a deadline of `limit`: for a test whose waits, each wide enough
/// for a loaded machine, add up to more than [`within`]'s minute.
pub async fn within_for<F: std::future::Future>(limit: Duration, f: F) -> F::Output {
    cqrs_core::testing::with_timeout(limit, f).await
}

/// Sends a request whose handler then waits for a body that never comes, and returns once the
/// server is in that handler (it asked for the body with `100 Continue`): the request is in
/// flight until the connection is dropped or cut off.
pub fn held_request(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).expect("the server accepts");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(
        b"POST /auth/register HTTP/1.1\r\nHost: helpdesk\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        let read = tcp.read(&mut byte).expect("an answer within 20 s");
        assert_eq!(read, 1, "the connection closed: {answer:?}");
        answer.push(byte[0]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    tcp
}

/// The `helpdesk` binary, with an empty environment but for `env`, its output captured.
pub fn helpdesk_command(args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_helpdesk"));
    command
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// The `helpdesk` binary on a free port of 127.0.0.1, logging JSON, with `args` after those and
/// `env` (see [`helpdesk_command`]): the process, its standard output's lines from after its
/// `helpdesk listening` line, and the address it listens on.
pub fn serving(
    args: &[&str],
    env: &[(&str, &str)],
) -> (
    Running,
    std::sync::mpsc::Receiver<String>,
    std::net::SocketAddr,
) {
    let mut all = vec!["--bind", "127.0.0.1:0", "--log-format", "json"];
    all.extend_from_slice(args);
    let mut child = Running(helpdesk_command(&all, env).spawn().unwrap());
    let lines = stdout_lines(&mut child);
    let listening: Value = serde_json::from_str(&line_with(&lines, "helpdesk listening")).unwrap();
    let addr = listening["fields"]["addr"]
        .as_str()
        .expect("the listening line names its address")
        .parse()
        .unwrap();
    (child, lines, addr)
}

/// The lines `child` writes to standard output, as they come.
pub fn stdout_lines(child: &mut Running) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (sender, lines) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().expect("standard output is piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// Waits for a line holding `needle`, returning it; panics after 30 s.
pub fn line_with(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no log line with {needle:?}: {e}"),
        }
    }
}

/// A child process, killed if the test ends (a failed assertion, say) while it still runs.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for `child` to exit, killing it (and panicking) after `deadline`; returns its exit
/// status and what it wrote to stderr.
pub fn exit_of(child: &mut Running, deadline: Duration) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let until = std::time::Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < until,
            "helpdesk did not exit within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.0.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status, stderr)
}

/// `url` with its host and port replaced by `addr` (the URL of a proxy in front of the
/// service it names, found with [`host_port`]).
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let user = authority
        .rsplit_once('@')
        .map_or(String::new(), |(user, _)| format!("{user}@"));
    format!("{scheme}://{user}{addr}{path}")
}

/// A TCP proxy a test owns, in front of a service: [`cut`](Self::cut) ends every connection
/// through it and closes new ones at once, as a service that went down, until
/// [`forward`](Self::forward) points it at a service again. The port stays the test's all
/// along: a service restarted on a port of its own could find it taken meanwhile (every
/// client connection of a parallel test takes a port from the same range).
pub struct Switch {
    pub addr: std::net::SocketAddr,
    /// Where new connections go (`None`: closed at once); each change ends those forwarded
    /// before it.
    upstream: tokio::sync::watch::Sender<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Switch {
    /// A switch forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (upstream, _) = tokio::sync::watch::channel(Some(upstream));
        let task = {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let mut changes = upstream.subscribe();
                    let Some(target) = changes.borrow_and_update().clone() else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = changes.changed() => {}
                        }
                    });
                }
            })
        };
        Self {
            addr,
            upstream,
            task,
        }
    }

    /// Ends every connection and closes new ones until [`forward`](Self::forward).
    pub fn cut(&self) {
        self.upstream.send_replace(None);
    }

    /// Forwards new connections to `upstream` (`host:port`).
    pub fn forward(&self, upstream: String) {
        self.upstream.send_replace(Some(upstream));
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
        self.upstream.send_replace(None);
    }
}
