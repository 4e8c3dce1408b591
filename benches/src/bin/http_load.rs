//! End-to-end HTTP load on the helpdesk server, beside a hand-written axum service.
//!
//! Opens tickets (`POST /tickets` with a bearer token and a JSON body) from N concurrent
//! keep-alive clients for a few seconds, through two servers in turn, in the same process and
//! on the same load:
//!
//! - **framework**: the helpdesk example server, started as `helpdesk::Server` starts it: the
//!   gateway, the auth and tickets plugins found through `inventory`, the command bus, the
//!   event store, the list index, the stats and realtime relays. In memory, or on Postgres
//!   alone (`--backend postgres`, `DATABASE_URL`, a schema of its own).
//! - **baseline**: what a hand-written axum service needs at the least for that route: verify
//!   the HS256 token, parse and check the body, store the ticket (a map behind a mutex, or one
//!   `INSERT` through a sqlx pool into a table of its own schema), answer 201 with it as JSON.
//!   No event, no history, no index, no idempotency, no realtime.
//!
//! So the ratio is what the framework's server costs over the least a route can do, for a
//! ticket the framework also keeps the history, events and list entry of: not a like-for-like
//! comparison of two frameworks. Each server first gets an untimed warm-up second (lazily
//! opened pool connections, first allocations). Rounds then alternate in ABBA order
//! (framework then baseline, baseline then framework, ...) so a machine that changes speed
//! during the run weighs on both, and after each framework turn the harness waits until the
//! helpdesk's stats projection counted every ticket opened (its relay and projection work
//! done), so the framework's background work does not run in the baseline's turn. Each round
//! reports requests per second and latency percentiles, and the summary the median of the
//! per-round ratios. Neither server logs (no tracing subscriber is installed).
//!
//! The load generator runs in the same process, on the same cores: its cost per request is
//! added to both sides, which pulls the ratio towards 1 (the framework's server work alone is
//! a larger multiple of the baseline's than the throughput ratio shows). Its latencies are
//! those of a closed loop (each client waits for its answer before the next request): service
//! times at a fixed concurrency, not latencies under a fixed offered load.
//!
//! ```text
//! cargo run --release -p cqrs-benches --bin http_load -- --connections 16 --seconds 5 --rounds 3
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run --release -p cqrs-benches --bin http_load -- --backend postgres
//! ```
//!
//! Options (defaults): `--backend memory` (or `postgres`), `--connections 16`, `--seconds 5`
//! (per round and server), `--rounds 3`, `--threads 2` (the servers' tokio worker threads;
//! the clients get as many).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The baseline's Postgres pool.
const BASELINE_POOL: u32 = 10;

/// The secret both servers sign with: 32 bytes, as the helpdesk requires on Postgres.
const SECRET: &str = "http-load-secret-0123456789abcdef";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Memory,
    Postgres,
}

struct Args {
    backend: Backend,
    connections: usize,
    seconds: u64,
    rounds: usize,
    threads: usize,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        backend: Backend::Memory,
        connections: 16,
        seconds: 5,
        rounds: 3,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => {
                args.backend = match value()?.as_str() {
                    "memory" => Backend::Memory,
                    "postgres" => Backend::Postgres,
                    other => return Err(format!("--backend memory|postgres, not {other}").into()),
                }
            }
            "--connections" => args.connections = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse()?,
            "--threads" => args.threads = value()?.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if args.connections == 0 || args.seconds == 0 || args.rounds == 0 || args.threads == 0 {
        return Err("--connections, --seconds, --rounds and --threads must be above zero".into());
    }
    Ok(args)
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    // The servers on a runtime of their own, so the clients' work is not scheduled among
    // theirs (the operating system shares the cores between the two).
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let schema = format!("http_load_{}", std::process::id());
    let measured = measure(&args, &servers, &clients, &schema);
    // Also after a failure (a server that did not start, a request that failed): the schemas
    // stayed in the shared database.
    if args.backend == Backend::Postgres {
        servers.block_on(async {
            drop_schema(&schema).await;
            drop_schema(&format!("{schema}_baseline")).await;
        });
    }
    measured
}

/// Starts the framework's server, runs the rounds, and stops it, also after a failure: its
/// background work must not hold the schema while it is dropped.
fn measure(
    args: &Args,
    servers: &tokio::runtime::Runtime,
    clients: &tokio::runtime::Runtime,
    schema: &str,
) -> Result<(), BoxError> {
    let (framework, stop) = servers.block_on(start_framework(args.backend, schema))?;
    let measured = rounds(args, servers, clients, schema, framework);
    servers.block_on(stop);
    measured
}

/// Starts the baseline, runs the rounds against both servers and prints the figures.
fn rounds(
    args: &Args,
    servers: &tokio::runtime::Runtime,
    clients: &tokio::runtime::Runtime,
    schema: &str,
    framework: SocketAddr,
) -> Result<(), BoxError> {
    let (framework_tokens, baseline) = servers.block_on(async {
        let tokens = framework_tokens(framework).await?;
        let baseline = start_baseline(args.backend, schema).await?;
        Ok::<_, BoxError>((tokens, baseline))
    })?;
    let baseline_token = baseline_token()?;
    eprintln!(
        "backend {:?}, {} connections, {} s a round, {} rounds",
        args.backend, args.connections, args.seconds, args.rounds
    );
    // Every ticket the framework answered 201 for (a failed request opened none, or one the
    // wait need not count): its stats count at least these once its background work is done.
    let mut opened = 0;
    let mut framework_turn = |seconds: Duration| -> Result<Outcome, BoxError> {
        let outcome =
            clients.block_on(load(framework, &framework_tokens.customer, args, seconds))?;
        let mut outcome = outcome;
        opened += outcome.created;
        // The work the round left queued (relays, the stats projection) is the framework's
        // too: its wait counts in the round's time, so a backlog does not flatter the rate.
        let settling = std::time::Instant::now();
        clients.block_on(settled(framework, &framework_tokens.agent, opened))?;
        outcome.settling = settling.elapsed();
        outcome.elapsed += outcome.settling;
        Ok(outcome)
    };
    let warm_up = Duration::from_secs(1);
    framework_turn(warm_up)?;
    clients.block_on(load(baseline, &baseline_token, args, warm_up))?;
    let round_time = Duration::from_secs(args.seconds);
    let mut ratios = Vec::new();
    for round in 1..=args.rounds {
        let (ours, theirs) = if round % 2 == 1 {
            let ours = framework_turn(round_time)?;
            (
                ours,
                clients.block_on(load(baseline, &baseline_token, args, round_time))?,
            )
        } else {
            let theirs = clients.block_on(load(baseline, &baseline_token, args, round_time))?;
            (framework_turn(round_time)?, theirs)
        };
        println!("round {round} framework: {ours}");
        println!("round {round} baseline:  {theirs}");
        let ratio = ours.per_second() / theirs.per_second();
        println!("round {round} framework / baseline throughput: {ratio:.3}");
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median framework / baseline throughput over {} rounds: {:.3} (rounds: {})",
        ratios.len(),
        ratios[ratios.len() / 2],
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Starts the helpdesk server on a free loopback port; returns its address and what stops it.
async fn start_framework(
    backend: Backend,
    schema: &str,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>), BoxError> {
    let mut config = helpdesk::Config {
        bind: "127.0.0.1:0".parse()?,
        agent_emails: vec![AGENT_EMAIL.to_owned()],
        agent_code: Some(AGENT_CODE.to_owned()),
        // One customer opens every ticket of the load, thousands a second: the per-user limit
        // would measure its 429s. The hand-written baseline has none either.
        user_requests_per_second: 0,
        ..helpdesk::Config::default()
    };
    if backend == Backend::Postgres {
        config.database_url = Some(database_url());
        config.database_schema = schema.to_owned();
        config.jwt_secret = Some(SECRET.to_owned());
        // The baseline's pool serves requests alone: the framework's gets as many for its
        // requests, and on top the most its background workers hold at once (see
        // `helpdesk::Config::database_max_connections`).
        config.database_max_connections = BASELINE_POOL + 8;
    }
    let server = helpdesk::Server::start(config, helpdesk::Hooks::default())
        .await
        .map_err(|e| format!("the helpdesk server did not start: {e:#}"))?;
    let addr = server.addr();
    Ok((addr, async move {
        if let Err(e) = server.shutdown().await {
            eprintln!("the helpdesk server did not stop cleanly: {e:#}");
        }
    }))
}

/// The helpdesk's agent, who reads the stats to know the framework's background work is done.
const AGENT_EMAIL: &str = "agent@example.com";
const AGENT_CODE: &str = "http-load-agent-code";

/// Bearer tokens on the helpdesk: the customer who opens the tickets, the agent who reads
/// the stats.
struct FrameworkTokens {
    customer: String,
    agent: String,
}

async fn framework_tokens(addr: SocketAddr) -> Result<FrameworkTokens, BoxError> {
    let customer = serde_json::json!({
        "email": "load@example.com",
        "password": "correct horse battery",
    });
    let agent = serde_json::json!({
        "email": AGENT_EMAIL,
        "password": "correct horse battery",
        "agent_code": AGENT_CODE,
    });
    Ok(FrameworkTokens {
        customer: framework_token(addr, customer).await?,
        agent: framework_token(addr, agent).await?,
    })
}

/// Registers a user on the helpdesk and logs in: its bearer token.
async fn framework_token(addr: SocketAddr, user: serde_json::Value) -> Result<String, BoxError> {
    let http = reqwest::Client::new();
    let registered = http
        .post(format!("http://{addr}/auth/register"))
        .json(&user)
        .send()
        .await?;
    if !registered.status().is_success() {
        return Err(format!("register: {}", registered.text().await?).into());
    }
    let login = serde_json::json!({ "email": user["email"], "password": user["password"] });
    let logged_in: serde_json::Value = http
        .post(format!("http://{addr}/auth/login"))
        .json(&login)
        .send()
        .await?
        .json()
        .await?;
    logged_in["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no token in {logged_in}").into())
}

/// Waits until the helpdesk's stats count at least `opened` open tickets (those it answered
/// 201 for): the relays and the stats projection caught up.
/// Gives up with a warning after 60 s, so a run with failures still ends.
async fn settled(addr: SocketAddr, agent: &str, opened: usize) -> Result<(), BoxError> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats: serde_json::Value = http
            .get(format!("http://{addr}/tickets/stats"))
            .bearer_auth(agent)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let open = stats["open"].as_u64().unwrap_or(0);
        if open >= opened as u64 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            eprintln!("the helpdesk's stats count {open} of {opened} tickets after 60 s; going on");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn drop_schema(schema: &str) {
    let dropped = async {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url())
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&pool)
        .await?;
        Ok::<_, sqlx::Error>(())
    };
    if let Err(e) = dropped.await {
        eprintln!("could not drop schema {schema}: {e}");
    }
}

// The baseline: a hand-written axum service.

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    role: String,
    exp: i64,
    iat: i64,
}

fn baseline_token() -> Result<String, BoxError> {
    let now = Utc::now().timestamp();
    let claims = Claims {
        sub: Uuid::now_v7(),
        role: "customer".to_owned(),
        exp: now + 3600,
        iat: now,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes())?,
    )?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenBody {
    title: String,
    description: Option<String>,
    priority: Option<String>,
}

#[derive(Clone, Serialize)]
struct Ticket {
    id: Uuid,
    title: String,
    description: String,
    priority: String,
    status: &'static str,
    reporter_id: Uuid,
    assignee_id: Option<Uuid>,
    version: u64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Clone)]
enum Store {
    Memory(Arc<Mutex<HashMap<Uuid, Ticket>>>),
    Postgres(sqlx::PgPool, String),
}

#[derive(Clone)]
struct Baseline {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
    store: Store,
}

async fn start_baseline(backend: Backend, schema: &str) -> Result<SocketAddr, BoxError> {
    let store = match backend {
        Backend::Memory => Store::Memory(Arc::default()),
        Backend::Postgres => {
            let schema = format!("{schema}_baseline");
            let pool = PgPoolOptions::new()
                .max_connections(BASELINE_POOL)
                .connect(&database_url())
                .await?;
            for statement in [
                format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
                format!(
                    "CREATE TABLE \"{schema}\".tickets (id uuid PRIMARY KEY, title text NOT NULL, \
                     description text NOT NULL, priority text NOT NULL, status text NOT NULL, \
                     reporter_id uuid NOT NULL, assignee_id uuid, version bigint NOT NULL, \
                     created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)"
                ),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&pool)
                    .await?;
            }
            Store::Postgres(pool, schema)
        }
    };
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    let state = Baseline {
        key: Arc::new(DecodingKey::from_secret(SECRET.as_bytes())?),
        validation: Arc::new(validation),
        store,
    };
    let app = Router::new()
        .route("/tickets", post(open_ticket))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("the baseline server stopped: {e}");
        }
    });
    Ok(addr)
}

fn refused(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": { "code": code } })),
    )
        .into_response()
}

async fn open_ticket(
    State(state): State<Baseline>,
    headers: HeaderMap,
    body: Result<Json<OpenBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(claims) = token.and_then(|t| {
        jsonwebtoken::decode::<Claims>(t, &state.key, &state.validation)
            .ok()
            .map(|data| data.claims)
    }) else {
        return refused(StatusCode::UNAUTHORIZED, "unauthorized");
    };
    let Ok(Json(body)) = body else {
        return refused(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    };
    let title = body.title.trim().to_owned();
    let description = body.description.unwrap_or_default();
    let priority = body.priority.unwrap_or_else(|| "normal".to_owned());
    if title.is_empty() || title.chars().count() > 200 || description.chars().count() > 10_000 {
        return refused(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    }
    if !["low", "normal", "high", "urgent"].contains(&priority.as_str()) {
        return refused(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    }
    let now = Utc::now();
    let ticket = Ticket {
        id: Uuid::now_v7(),
        title,
        description,
        priority,
        status: "open",
        reporter_id: claims.sub,
        assignee_id: None,
        version: 1,
        created_at: now,
        updated_at: now,
    };
    match &state.store {
        Store::Memory(tickets) => {
            tickets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ticket.id, ticket.clone());
        }
        Store::Postgres(pool, schema) => {
            let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO \"{schema}\".tickets (id, title, description, priority, status, \
                 reporter_id, assignee_id, version, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            )))
            .bind(ticket.id)
            .bind(&ticket.title)
            .bind(&ticket.description)
            .bind(&ticket.priority)
            .bind(ticket.status)
            .bind(ticket.reporter_id)
            .bind(ticket.assignee_id)
            .bind(1_i64)
            .bind(ticket.created_at)
            .bind(ticket.updated_at)
            .execute(pool)
            .await;
            if inserted.is_err() {
                return refused(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
            }
        }
    }
    (StatusCode::CREATED, Json(ticket)).into_response()
}

// The load.

/// One round against one server.
struct Outcome {
    created: usize,
    failed: usize,
    elapsed: Duration,
    /// Of `elapsed`, the wait after the load for the server's background work to catch up.
    settling: Duration,
    /// Latencies of the created tickets, microseconds, sorted.
    latencies: Vec<u64>,
}

impl Outcome {
    fn per_second(&self) -> f64 {
        self.created as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let at = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[at] as f64 / 1000.0
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} tickets/s ({} in {:.2} s, {:.3} s of it catching up, {} failed), latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.per_second(),
            self.created,
            self.elapsed.as_secs_f64(),
            self.settling.as_secs_f64(),
            self.failed,
            self.percentile(0.5),
            self.percentile(0.99),
            self.percentile(1.0),
        )
    }
}

/// `args.connections` clients opening tickets on `addr` for `seconds`, each on a keep-alive
/// connection of its own, one request at a time.
async fn load(
    addr: SocketAddr,
    token: &str,
    args: &Args,
    seconds: Duration,
) -> Result<Outcome, BoxError> {
    let url = format!("http://{addr}/tickets");
    let started = Instant::now();
    let deadline = started + seconds;
    let mut clients = Vec::new();
    for n in 0..args.connections {
        // A client each: one connection each, as many browsers or services would hold.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()?;
        let (url, token) = (url.clone(), token.to_owned());
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0;
            let mut i = 0_u64;
            while Instant::now() < deadline {
                i += 1;
                let body = serde_json::json!({
                    "title": format!("Printer {n}-{i} on fire"),
                    "description": "It was fine yesterday.",
                    "priority": "high",
                });
                let sent = Instant::now();
                let answer = http.post(&url).bearer_auth(&token).json(&body).send().await;
                match answer {
                    Ok(answer) if answer.status() == reqwest::StatusCode::CREATED => {
                        // Read whole, as a client would; a body cut off is a failure.
                        match answer.bytes().await {
                            Ok(_) => latencies.push(sent.elapsed().as_micros() as u64),
                            Err(e) => {
                                if failed == 0 {
                                    eprintln!("reading an answer failed: {e}");
                                }
                                failed += 1;
                            }
                        }
                    }
                    Ok(answer) => {
                        if failed == 0 {
                            let status = answer.status();
                            eprintln!("{status}: {}", answer.text().await.unwrap_or_default());
                        }
                        failed += 1;
                    }
                    Err(e) => {
                        if failed == 0 {
                            eprintln!("request failed: {e}");
                        }
                        failed += 1;
                    }
                }
            }
            (latencies, failed)
        }));
    }
    let mut outcome = Outcome {
        created: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        settling: Duration::ZERO,
        latencies: Vec::new(),
    };
    for client in clients {
        let (latencies, failed) = client.await?;
        outcome.created += latencies.len();
        outcome.failed += failed;
        outcome.latencies.extend(latencies);
    }
    outcome.elapsed = started.elapsed();
    outcome.latencies.sort_unstable();
    Ok(outcome)
}
