//! The gateway's router: plugin routes, operations routes, JSON fallbacks and the layers.

use crate::body_deadline::BodyDeadlineLayer;
use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use cqrs_core::runtime::{Health, HealthReport, Runtime};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use helpdesk_api::{AfterTimeout, ApiError, Authenticator, TrustedProxies, idempotency};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tower::ServiceBuilder;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use helpdesk_api::BODY_LIMIT;

/// What the gateway's own routes need.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) plugin_router: Router,
    pub(crate) openapi: Arc<Value>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) authenticator: Arc<dyn Authenticator>,
    pub(crate) request_timeout: Duration,
    pub(crate) trusted_proxies: TrustedProxies,
    pub(crate) idempotent_routes: IdempotentRoutes,
    /// Whether `/ready` shows why a component is not healthy (`--ready-details`). Off by
    /// default: the reasons quote backends (a driver's error, a user name) and `/ready` is
    /// for anyone who can reach the server; they are logged instead.
    pub(crate) ready_details: bool,
    /// The reason last logged per component, so a load balancer polling `/ready` during an
    /// outage logs each reason once, not once a poll.
    pub(crate) ready_logged: Arc<Mutex<HashMap<String, String>>>,
    /// `/ready`'s checks, run one at a time and shared (see [`SharedRun`]).
    pub(crate) ready_checks: Arc<SharedRun<HealthReport>>,
    /// Set when a stop begins: `/ready` then answers 503 `stopping`, so that load balancers
    /// send new requests elsewhere while this instance still serves them.
    pub(crate) stopping: Arc<std::sync::atomic::AtomicBool>,
    /// The pages allowed to call the API from a browser (`--cors-origins`); none: no CORS.
    pub(crate) cors_origins: Vec<String>,
    /// The bearer token `/metrics` asks for (`--metrics-token`); none: it answers anyone.
    pub(crate) metrics_token: Option<Arc<str>>,
}

/// Takes the CORS headers off the answers of the gateway's own routes ([`GATEWAY_PATHS`]) but
/// `/ws` (a preflight's too): served to operators with no token asked, no page of another
/// origin may read them, whatever `--cors-origins` allows.
async fn no_cors_for_operations(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let operations = path != "/ws" && GATEWAY_PATHS.contains(&path);
    let mut response = next.run(request).await;
    if operations {
        for name in [
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            header::ACCESS_CONTROL_MAX_AGE,
        ] {
            response.headers_mut().remove(name);
        }
    }
    response
}

/// The CORS answers for `origins` (`*`, or origins as browsers send them); `None` for none.
/// Bearer tokens, not cookies: no credentials are allowed, so `*` is safe to give.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow_origin = match origins {
        [] => return None,
        [any] if any == "*" => AllowOrigin::any(),
        // Checked by the configuration: each is a valid header value.
        listed => AllowOrigin::list(
            listed
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                HeaderName::from_static(idempotency::HEADER),
                X_REQUEST_ID,
                // Trace context a page's tracing propagates (the API reads both).
                HeaderName::from_static("traceparent"),
                HeaderName::from_static("tracestate"),
            ])
            // What a page's script may read of an answer, besides the simple headers.
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                header::RETRY_AFTER,
                header::WWW_AUTHENTICATE,
                X_REQUEST_ID,
                HeaderName::from_static("idempotency-replayed"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// The routes that take an `Idempotency-Key`, as (method, route template): those whose
/// OpenAPI operation documents the header. A request that runs past its budget is told to
/// retry with the same key only on these; another route has no key to send.
#[derive(Clone, Debug, Default)]
pub(crate) struct IdempotentRoutes(Arc<HashMap<String, Vec<Method>>>);

impl IdempotentRoutes {
    /// The operations of the OpenAPI `paths` object that take the header.
    pub(crate) fn documented_in(paths: &serde_json::Map<String, Value>) -> Self {
        let takes_the_key = |operation: &Value| {
            operation["parameters"].as_array().is_some_and(|params| {
                params.iter().any(|p| {
                    p["in"] == "header"
                        && p["name"]
                            .as_str()
                            .is_some_and(|n| n.eq_ignore_ascii_case(idempotency::HEADER))
                })
            })
        };
        // Keyed by the route's template, so a request looks its route up by `&str` without
        // building an owned key.
        let mut routes: HashMap<String, Vec<Method>> = HashMap::new();
        for (path, operations) in paths
            .iter()
            .filter_map(|(path, operations)| Some((path, operations.as_object()?)))
        {
            let methods: Vec<Method> = operations
                .iter()
                .filter(|(_, operation)| takes_the_key(operation))
                .filter_map(|(method, _)| {
                    Method::from_bytes(method.to_ascii_uppercase().as_bytes()).ok()
                })
                .collect();
            if !methods.is_empty() {
                routes.insert(path.clone(), methods);
            }
        }
        Self(Arc::new(routes))
    }

    /// Whether `method` on the route `template` takes the key.
    fn take_a_key(&self, method: &Method, template: Option<&str>) -> bool {
        template
            .and_then(|t| self.0.get(t))
            .is_some_and(|methods| methods.contains(method))
    }
}

/// How long each of `/ready`'s checks may take: a third of the request timeout, so the report
/// is answered within the request's budget (whose generic 503 `timeout` would not say which
/// backend is down), however many backends hang, also by a request that first waited for
/// another's checks to end (see [`SharedRun`]).
pub(crate) fn check_budget(request_timeout: Duration) -> Duration {
    request_timeout / 3
}

/// How long the Postgres check waits for a pooled connection: cqrs-postgres's 2 s, or four
/// fifths of the check's budget when that is shorter, so that a pool kept busy by a load peak
/// is reported as degraded within the budget, rather than cut off by it as unhealthy (which
/// would take every loaded instance out of a load balancer at once).
pub(crate) fn postgres_health_wait(request_timeout: Duration) -> Duration {
    (check_budget(request_timeout) * 4 / 5).min(Duration::from_secs(2))
}

/// The process-wide Prometheus recorder: `metrics` has one global recorder, so every app built
/// in one process (tests build many) shares it.
pub(crate) fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // True histograms, not summaries: buckets add up across instances (a summary's
        // quantiles do not), and they do not fall to 0 when a minute passes without samples.
        let recorder = PrometheusBuilder::new()
            .set_buckets(DURATION_BUCKETS)
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; /metrics shows only this recorder's data"
            );
        } else {
            // Every family gets its `# HELP` line.
            cqrs_core::describe_metrics();
            cqrs_postgres::describe_metrics();
            cqrs_redis::describe_metrics();
            cqrs_realtime::describe_metrics();
            GATEWAY_METRICS
                .iter()
                .for_each(cqrs_core::MetricDescription::describe);
        }
        handle
    })
}

/// The gateway's own metrics.
pub(crate) const GATEWAY_METRICS: &[cqrs_core::MetricDescription] = {
    use cqrs_core::MetricDescription as M;
    &[
        M::gauge(
            "cqrs_component_status",
            "Health of each component, by component, status (starting, healthy, degraded, unhealthy, stopped) and critical (true, false): 1 for its status now, 0 for the others; as the last finished check found it.",
        ),
        M::counter(
            "http_requests_total",
            "HTTP requests answered, by method (other for an unusual one), route (the matched route's template, such as /tickets/{id}, or unmatched) and status.",
        ),
        M::histogram(
            "http_request_duration_seconds",
            "How long HTTP requests took until their answer's head, in seconds, by method and route.",
        ),
        M::counter(
            "http_accept_errors_total",
            "Errors accepting TCP connections (out of file descriptors, and the like).",
        ),
        M::counter(
            "http_connections_refused_total",
            "TCP connections closed at once, by reason (per_address: the client address held its share).",
        ),
        M::counter(
            "http_connections_stalled_total",
            "Connections given up on because their writes made no progress (a client that does not read its answers).",
        ),
    ]
};

/// The buckets, in seconds, of the duration histograms (`http_request_duration_seconds`,
/// `cqrs_dispatch_duration_seconds`): from 100 µs (a dispatch in memory takes microseconds,
/// which a first bucket of a millisecond would lump together) to the longest request budget
/// worth having.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The paths the gateway serves itself (`/ws` is the realtime hub's): no plugin may route
/// them.
pub(crate) const GATEWAY_PATHS: &[&str] =
    &["/", "/health", "/ready", "/metrics", "/openapi.json", "/ws"];

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub(crate) fn router(state: State) -> Router {
    let _ = prometheus();
    let cors_origins = state.cors_origins.clone();
    // Asked every few seconds by load balancers and Prometheus: their access lines at `debug`.
    let probes = Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route_layer(middleware::map_response(|mut response: Response| async {
            // Not a refused metrics token: someone guessing at it is for the log to tell.
            if response.status() != StatusCode::UNAUTHORIZED {
                response.extensions_mut().insert(QuietAccessLine);
            }
            response
        }));
    let ops = probes
        .route("/openapi.json", get(openapi))
        .route("/", get(index));
    let router = state
        .plugin_router
        .clone()
        .merge(ops)
        // Its own code: a typo in a path must not read as "that ticket is gone".
        .fallback(|| async { unknown_route() })
        // Naming the method refused, which only the fallback has at hand.
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            method_not_allowed(&method)
        })
        .layer(
            ServiceBuilder::new()
                .layer(SetSensitiveRequestHeadersLayer::new([
                    header::AUTHORIZATION,
                    header::COOKIE,
                ]))
                .layer(middleware::map_request(drop_unusable_request_id))
                .layer(SetRequestIdLayer::new(X_REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_response(AccessLine)
                        // The access line above has every status; a 5xx is logged where it is
                        // made, with its cause (an error, a refusal as a warning, a panic, a
                        // time-out), not once more here as an error without one: a failed
                        // readiness probe or a shed login is no error.
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
                .layer(middleware::from_fn_with_state(
                    state.idempotent_routes.clone(),
                    json_errors,
                ))
                // Inside the layers above, so that the request id, the access log line and the
                // metrics see the 500 it makes of a panic, as of any answer.
                .layer(middleware::from_fn(catch_panics))
                .layer(middleware::from_fn_with_state(
                    state.request_timeout,
                    within_budget,
                ))
                // A body not all arrived within half the budget from its first read (it
                // stopped, or trickles in), and in any case by nine tenths of the budget, is
                // answered 408 by the JSON extractor, before the budget's 503 (which tells
                // clients to retry).
                .layer(BodyDeadlineLayer::new(
                    state.request_timeout / 2,
                    state.request_timeout * 9 / 10,
                ))
                .layer(RequestBodyLimitLayer::new(BODY_LIMIT))
                .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
                .layer(Extension(state.authenticator.clone()))
                .layer(Extension(state.trusted_proxies.clone()))
                .layer(Extension(state.clone())),
        )
        // Outside the layers above, so the timeout's 503 and the body limit's 413 get it too.
        .layer(middleware::map_response(no_store_unless_set));
    // Outside the others too: a preflight is answered here, before any route or limit, and
    // every answer (an error's too) carries the headers a page needs to read it. Not the
    // operations routes': they take no user's token (`/metrics` may take the metrics token),
    // the network guards them, and a page
    // another site serves to someone inside it must not read `/metrics` or `/ready`.
    let router = match cors(&cors_origins) {
        Some(cors) => router
            .layer(cors)
            .layer(middleware::from_fn(no_cors_for_operations)),
        None => router,
    };
    // Outermost: it sees every answer, the timeout's 503 and the body limit's 413 too.
    router.layer(middleware::from_fn(record_metrics))
}

/// `Cache-Control: no-store` on every answer whose route set no policy of its own: a bearer
/// token (`/auth/login`), a user's own tickets and profile, a readiness state: none is for
/// a browser's cache or a proxy's to keep and serve again.
async fn no_store_unless_set(mut response: Response) -> Response {
    response
        .headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// The longest `X-Request-Id` a client's request keeps (a UUID takes 36).
const MAX_REQUEST_ID: usize = 128;

/// Takes away a client's `X-Request-Id` that is too long or holds anything but ASCII letters,
/// digits and `-._:/+=` (what UUIDs, ULIDs, trace ids and base64 use), so that the server
/// makes one: echoed on the response and written in each log line of the request, an 8 KB id
/// would make a response header a proxy refuses (nginx answers 502 past its 4 – 8 KB header
/// buffer), and its log lines as long; and `}` or `"` in it could pass for the structure of a
/// text log line.
async fn drop_unusable_request_id(mut request: Request) -> Request {
    let unusable = request.headers().get(X_REQUEST_ID).is_some_and(|id| {
        let id = id.as_bytes();
        id.is_empty()
            || id.len() > MAX_REQUEST_ID
            || !id
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:/+=".contains(b))
    });
    if unusable {
        request.headers_mut().remove(X_REQUEST_ID);
    }
    request
}

/// A run (`/ready`'s health checks) that callers share: runs go one at a time, and a caller
/// takes the result of the first run that began after it arrived, one under way or its own.
/// A flood of callers (`/ready` answers anyone) thus costs at most two runs in a row (the one
/// under way when they came, and the next), not a run (a pooled connection) each, and no
/// caller gets a result older than itself. A run is a task of its own: a caller that goes
/// away (a probe that gave up, a client gone) does not cut it short for the others.
pub(crate) struct SharedRun<T> {
    runs: Mutex<Runs<T>>,
}

/// A run under way, which any caller may await: `None` when its task panicked.
type Running<T> = Shared<BoxFuture<'static, Option<T>>>;

struct Runs<T> {
    /// The last run that ended, with when it began.
    last: Option<(Instant, T)>,
    /// The run under way, with when it began.
    running: Option<(Instant, Running<T>)>,
}

impl<T> Default for SharedRun<T> {
    fn default() -> Self {
        Self {
            runs: Mutex::new(Runs {
                last: None,
                running: None,
            }),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> SharedRun<T> {
    /// The result of a run that began after this call: one under way, or `run`'s; `None` when
    /// that run's task ended without one (it panicked, or the runtime is shutting down). Must
    /// be called in a tokio runtime (the run is spawned).
    pub(crate) async fn get<F>(&self, run: impl FnOnce() -> F) -> Option<T>
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        self.get_since(Instant::now(), run).await
    }

    /// The result of a run that began at `arrived` or later.
    async fn get_since<F>(&self, arrived: Instant, run: impl FnOnce() -> F) -> Option<T>
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let mut run = Some(run);
        loop {
            let (began, running) = {
                let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((began, result)) = &runs.last
                    && *began >= arrived
                {
                    return Some(result.clone());
                }
                match &runs.running {
                    Some((began, running)) => (*began, running.clone()),
                    None => {
                        // Taken at most once: the run this starts began after `arrived`, so
                        // the loop ends with it.
                        let run = run.take().expect("a caller starts one run at most");
                        let began = Instant::now();
                        let task = tokio::spawn(run());
                        let running = async move { task.await.ok() }.boxed().shared();
                        runs.running = Some((began, running.clone()));
                        (began, running)
                    }
                }
            };
            let result = running.await;
            {
                let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
                if runs.running.as_ref().is_some_and(|(b, _)| *b == began) {
                    runs.running = None;
                    if let Some(result) = &result {
                        runs.last = Some((began, result.clone()));
                    }
                }
            }
            match result {
                Some(result) if began >= arrived => return Some(result),
                // A run that began after this caller and ended without a result.
                None if began >= arrived => return None,
                // A run from before it, whatever its end: the next one is this caller's.
                Some(_) | None => {}
            }
        }
    }
}

/// `GET /metrics`: the Prometheus text, to the bearer of `--metrics-token` when one is set.
async fn metrics(Extension(state): Extension<State>, headers: axum::http::HeaderMap) -> Response {
    if let Some(token) = &state.metrics_token {
        // No bearer token (none, another scheme, a malformed header): compared as empty.
        let given = helpdesk_api::bearer_token(&headers).unwrap_or("");
        if !helpdesk_api::same_secret(token.as_bytes(), given.as_bytes()) {
            let refused = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "GET /metrics takes the server's metrics token: send `Authorization: Bearer \
                 <HELPDESK_METRICS_TOKEN>` (a Prometheus scrape's `authorization` setting)",
            );
            // RFC 6750: a token sent and refused says so; none sent, the bare challenge.
            let refused = if given.is_empty() {
                refused
            } else {
                refused.with_bearer_error("invalid_token")
            };
            return refused.into_response();
        }
    }
    // Health as series too, so an alert needs no JSON of `/ready`; and its reasons logged
    // with no prober around. The run of the checks (`/ready`'s, shared) is not waited for: a
    // hung backend holds it for its budget, and a scrape must not outlast Prometheus's
    // timeout just when it matters. So a scrape shows the last run that ended (a probe's, or
    // the one the scrape before started).
    if !state.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        let state = state.clone();
        tokio::spawn(async move {
            let budget = check_budget(state.request_timeout);
            let runtime = state.runtime.clone();
            if let Some(report) = state
                .ready_checks
                .get(move || async move { runtime.health_within(budget).await })
                .await
            {
                log_ready_reasons(&state, &report.components);
                record_health(&report.components);
            }
        });
    }
    prometheus().render().into_response()
}

/// `cqrs_component_status{component, status, critical}`: per component, 1 for its status and 0
/// for the others, so that `cqrs_component_status{status="unhealthy"} == 1` alerts.
fn record_health(components: &std::collections::BTreeMap<String, (Health, bool)>) {
    const STATUSES: [&str; 5] = ["starting", "healthy", "degraded", "unhealthy", "stopped"];
    for (name, (health, critical)) in components {
        for status in STATUSES {
            metrics::gauge!(
                "cqrs_component_status",
                "component" => name.clone(),
                "status" => status,
                "critical" => if *critical { "true" } else { "false" },
            )
            .set(if health.as_str() == status { 1.0 } else { 0.0 });
        }
    }
}

async fn ready(Extension(state): Extension<State>) -> Response {
    if state.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        let body = json!({ "status": "stopping", "components": {} });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let budget = check_budget(state.request_timeout);
    let runtime = state.runtime.clone();
    let Some(report) = state
        .ready_checks
        .get(move || async move { runtime.health_within(budget).await })
        .await
    else {
        // Each check is guarded: only a runtime shutting down ends the run without a report.
        let body = json!({ "status": "unavailable", "components": {} });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    };
    log_ready_reasons(&state, &report.components);
    record_health(&report.components);
    let components: serde_json::Map<String, Value> = report
        .components
        .iter()
        .map(|(name, (health, critical))| {
            let mut component = json!({ "status": health.as_str(), "critical": critical });
            if state.ready_details {
                component["reason"] = json!(health.reason());
            }
            (name.clone(), component)
        })
        .collect();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Ready, but a non-critical part (Redis, a worker retrying) is down: commands still commit
    // (into the outbox), events wait. Reported so operators see it; still 200.
    let degraded = report
        .components
        .values()
        .any(|(health, _)| matches!(health, Health::Degraded(_) | Health::Unhealthy(_)));
    let body = json!({
        "status": match (report.ready, degraded) {
            (false, _) => "unavailable",
            (true, true) => "degraded",
            (true, false) => "ready",
        },
        "components": components,
    });
    (status, Json(body)).into_response()
}

/// Logs why each component is not healthy, once per reason: when it first shows, and again
/// when it changes, or after the component was healthy in between; and, once, that it is
/// healthy again, so the end of an outage shows in the log as its start does.
fn log_ready_reasons(
    state: &State,
    components: &std::collections::BTreeMap<String, (Health, bool)>,
) {
    let mut logged = state
        .ready_logged
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (name, (health, critical)) in components {
        match health.reason() {
            Some(reason) if logged.get(name).map(String::as_str) != Some(reason) => {
                tracing::warn!(component = %name, status = health.as_str(), critical, %reason, "not healthy");
                logged.insert(name.clone(), reason.to_owned());
            }
            Some(_) => {}
            // Starting (a worker restarting after a failure) is no recovery: the outage goes
            // on, and its next reason is logged only if it changed.
            None if matches!(health, Health::Healthy) && logged.remove(name).is_some() => {
                tracing::info!(component = %name, critical, "healthy again");
            }
            None => {}
        }
    }
}

async fn openapi(Extension(state): Extension<State>) -> Json<Value> {
    Json(state.openapi.as_ref().clone())
}

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// Counts requests by route template (never the raw path, so ids do not become labels).
async fn record_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Answers a panic of what runs inside it (a handler, an extractor, the authenticator, a
/// plugin's middleware) with the contract's 500 `internal`, logging the panic's message at
/// `error` unless [`log_panics`](crate::log_panics)'s hook logged it where it happened (in
/// the request's span), so a panic is one error line; without it the panic would end the
/// connection's task, and the client would get a reset connection, with no answer, log line
/// or metric.
async fn catch_panics(request: Request, next: Next) -> Response {
    match cqrs_core::CatchUnwind::new(next.run(request)).await {
        Ok(response) => response,
        Err(panic) => {
            if !crate::logging::panics_logged() {
                tracing::error!(panic, "a request handler panicked");
            }
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the server failed; the error is logged",
            )
            .into_response()
        }
    }
}

/// Gives every error response of the router the JSON body of the contract, whoever made it
/// (axum's rejections, tower-http's 413, the handlers), and words the 503 of a request past
/// its time budget ([`within_budget`]'s) as the contract's `timeout`. Not
/// hyper's own refusals (431 for too many or too large headers, 414, 400 for an unparsable
/// request): hyper writes those before any request reaches the router, bodiless.
async fn json_errors(
    axum::extract::State(idempotent): axum::extract::State<IdempotentRoutes>,
    request: Request,
    next: Next,
) -> Response {
    let matched = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    // A 404 of a route that matched is the route's own ("no such widget"), not an unknown path.
    let routed = matched.is_some();
    let after_timeout = if !idempotent.take_a_key(request.method(), matched) {
        AfterTimeout::TryAgain
    } else if request.headers().contains_key(idempotency::HEADER) {
        AfterTimeout::RetrySameKey
    } else {
        AfterTimeout::CheckFirst
    };
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    if response.extensions().get::<BudgetSpent>().is_some() {
        tracing::warn!("the request ran past its time budget");
        return with_parts(response, ApiError::timeout(after_timeout));
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", helpdesk_api::BODY_TOO_LARGE),
        // The client's body too slow (as `ApiJson` answers it): its 408 stays, with no line
        // and no retry advice.
        StatusCode::REQUEST_TIMEOUT => ("request_timeout", helpdesk_api::BODY_TOO_SLOW),
        StatusCode::NOT_FOUND if !routed => return with_parts(response, unknown_route()),
        // A plugin's own bare 405 (the router's fallback names the method itself).
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "this route does not take that method")
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "send JSON with `Content-Type: application/json`",
        ),
        _ => return plain_error(response).await,
    };
    with_parts(response, ApiError::new(status, code, message))
}

/// 405 `method_not_allowed`, naming the method refused. (axum sets `Allow` on the answer
/// after the fallback has run, so it is not here to quote.)
fn method_not_allowed(method: &axum::http::Method) -> ApiError {
    // An extension method is the client's text: quoted no longer than a real one.
    let method: String = method.as_str().chars().take(32).collect();
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this route does not take {method}: `Allow` lists the methods it takes"),
    )
}

/// Marks the 503 of a request that ran past its time budget ([`within_budget`]), so that
/// [`json_errors`] tells it from a 503 something else answered without a JSON body.
#[derive(Clone, Copy)]
struct BudgetSpent;

/// Answers 503, marked [`BudgetSpent`], a request not answered within `budget`.
async fn within_budget(
    axum::extract::State(budget): axum::extract::State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(budget, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
            response.extensions_mut().insert(BudgetSpent);
            response
        }
    }
}

/// The longest plain-text body of an error [`plain_error`] reads.
const MAX_PLAIN_ERROR: usize = 4096;

/// The contract's JSON for an error answered in plain text (or bodiless) by something the
/// gateway does not know: axum's rejections in a plugin's own extractors (`axum::Json`), a
/// plugin's bare status. A client error keeps its text, which axum writes for clients, and
/// gets a code of its status; a server error's text is logged, not sent.
async fn plain_error(response: Response) -> Response {
    let status = response.status();
    let (parts, body) = response.into_parts();
    // Only a body whole in memory, as error texts are: a stream could hold the answer open.
    let text = match axum::body::HttpBody::size_hint(&body).upper() {
        Some(len) if len <= MAX_PLAIN_ERROR as u64 => axum::body::to_bytes(body, MAX_PLAIN_ERROR)
            .await
            .ok()
            .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
            .filter(|text| !text.is_empty()),
        _ => None,
    };
    let response = Response::from_parts(parts, Body::empty());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // A refusal (a plugin's load shedding, say), as the gateway's own 503s: a warning,
        // and `Retry-After` as the contract promises, unless the route set one.
        tracing::warn!(
            body = text.as_deref().unwrap_or("(none read)"),
            "a route answered 503 without the JSON body of the contract"
        );
        let error = ApiError::new(
            status,
            "unavailable",
            "the service is unavailable for now; try again shortly",
        );
        let error = if response.headers().contains_key(header::RETRY_AFTER) {
            error
        } else {
            error.with_retry_after(1)
        };
        return with_parts(response, error);
    }
    if status.is_server_error() {
        tracing::error!(
            status = status.as_u16(),
            body = text.as_deref().unwrap_or("(none read)"),
            "a route answered a server error without the JSON body of the contract"
        );
        let error = ApiError::new(status, "internal", "the server failed; the error is logged");
        return with_parts(response, error);
    }
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::CONFLICT => "conflict",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        _ => "bad_request",
    };
    // A plugin's text may quote the client's input: sent back no longer than a line or two.
    let message: String = text
        .map(|text| text.chars().take(300).collect())
        .unwrap_or_else(|| {
            if status == StatusCode::BAD_REQUEST {
                "the request is malformed".into()
            } else {
                "the request was refused".into()
            }
        });
    with_parts(response, ApiError::new(status, code, message))
}

/// 404 `unknown_route`: no route has this path.
fn unknown_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_route",
        "no route has this path: /openapi.json lists them",
    )
}

/// `error`'s answer, with the headers of `response` it does not set itself.
fn with_parts(response: Response, error: ApiError) -> Response {
    let (mut parts, _) = response.into_parts();
    let mut fresh = error.into_response();
    // Keep headers such as `Allow` and the request id; replace the body and its type.
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in fresh.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    parts.status = fresh.status();
    let body = std::mem::replace(fresh.body_mut(), Body::empty());
    Response::from_parts(parts, body)
}

/// Marks an answer whose access line is logged at `debug`: a probe's (`/health`, `/ready`) or
/// a scrape's (`/metrics`), which come every few seconds from every load balancer and would
/// drown the log. Readiness changes are logged on their own, once each.
#[derive(Clone, Copy)]
struct QuietAccessLine;

/// The access line of an answered request: tower-http's, at `info`, or at `debug` for an
/// answer marked [`QuietAccessLine`].
#[derive(Clone, Copy)]
struct AccessLine;

impl<B> tower_http::trace::OnResponse<B> for AccessLine {
    fn on_response(self, response: &Response<B>, latency: Duration, span: &tracing::Span) {
        let level = match response.extensions().get::<QuietAccessLine>() {
            Some(QuietAccessLine) => Level::DEBUG,
            None => Level::INFO,
        };
        DefaultOnResponse::new()
            .level(level)
            .on_response(response, latency, span);
    }
}

/// The span of a request: tower-http's default fields, with the `token` query parameter (the
/// bearer token a WebSocket client may send as `/ws?token=`) redacted, as the
/// `Authorization` header is, so debug logs never hold a live token; and the request's
/// `x-request-id` (the client's, or the one made for it), so every line a request logs can be
/// told from its retry's.
fn request_span(request: &Request) -> tracing::Span {
    // At `info`, so the one line per answered request carries the method and the path. Both
    // are the client's, and hyper takes a method of hundreds of KiB and a URI of 64 KiB: cut
    // to what a log line should hold (log shippers split lines past 16 KiB).
    tracing::info_span!(
        "request",
        method = %for_the_log(request.method().as_str(), MAX_LOGGED_METHOD),
        uri = %for_the_log(&redacted_uri(request.uri()), MAX_LOGGED_URI),
        version = ?request.version(),
        // As it is: `drop_unusable_request_id` kept only ids of a safe character set.
        request_id = %request
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(|id| id.to_str().ok())
            .unwrap_or_default(),
    )
}

/// The most bytes of a request's method and URI the request's log line holds.
const MAX_LOGGED_METHOD: usize = 32;
const MAX_LOGGED_URI: usize = 1024;

/// `text` cut to at most `max` bytes (on a character boundary), saying how long it was.
fn for_the_log(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}[… {} bytes in all]", &text[..end], text.len()).into()
}

/// The path and query of `uri`, each `token=` value replaced by `[redacted]`; so is the value
/// of any other key that names a token (`TOKEN`, `access_token`, `;token`: a client's slip,
/// which the hub refuses, still carries its live token) or that holds one (a JWT, under any
/// key, or as a key). A path segment that holds a JWT or a `token=` (a slip: `/ws&token=…`,
/// `/ws;token=…`, which the router answers 404, but logs) is replaced whole.
fn redacted_uri(uri: &Uri) -> String {
    use std::borrow::Cow;
    // Rebuilt only when a segment is redacted: most paths are logged as they came.
    let redacted_segment = |segment: &str| {
        let decoded = percent_decoded(segment);
        // `token` then an `=`, whatever comes between (`token+=`, `token%20=`).
        holds_a_jwt(&decoded) || find_token(&decoded).is_some_and(|at| decoded[at..].contains('='))
    };
    let path: Cow<'_, str> = if uri.path().split('/').any(redacted_segment) {
        let segments: Vec<&str> = uri
            .path()
            .split('/')
            .map(|segment| {
                if redacted_segment(segment) {
                    "[redacted]"
                } else {
                    segment
                }
            })
            .collect();
        segments.join("/").into()
    } else {
        uri.path().into()
    };
    let Some(query) = uri.query() else {
        return path.into_owned();
    };
    let query: Vec<Cow<'_, str>> = query
        .split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decoded(name);
            if key == "token" {
                "token=[redacted]".into()
            } else if holds_a_jwt(&key) {
                "[redacted]".into()
            } else if find_token(&key).is_some() || holds_a_jwt(&percent_decoded(value)) {
                if pair.contains('=') {
                    format!("{name}=[redacted]").into()
                } else {
                    "[redacted]".into()
                }
            } else {
                pair.into()
            }
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

/// Where `token` starts in `text`, in any case (`TOKEN`, `access_Token`).
fn find_token(text: &str) -> Option<usize> {
    text.as_bytes()
        .windows(5)
        .position(|w| w.eq_ignore_ascii_case(b"token"))
}

/// Whether `text` holds something shaped like a JWT: in a run of base64url and dots, `eyJ` (the
/// encoding of `{"`, every JWT header's start) with a dot after it, wherever it starts in the
/// run (`a.eyJ...`, `xxeyJ...` hold one too). Checked after percent-decoding `text` up to three
/// times, so a token encoded twice (`%252E` for its dots) is found as well.
fn holds_a_jwt(text: &str) -> bool {
    let shaped = |text: &str| {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .any(|run| run.find("eyJ").is_some_and(|at| run[at..].contains('.')))
    };
    let mut text: std::borrow::Cow<'_, str> = text.into();
    for _ in 0..3 {
        if shaped(&text) {
            return true;
        }
        let decoded = percent_decoded(&text).into_owned();
        if decoded == *text {
            return false;
        }
        text = decoded.into();
    }
    shaped(&text)
}

/// `text` with its `%XX` escapes and `+` decoded (enough to compare a query key); borrowed when
/// it has none.
fn percent_decoded(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return text.into();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

#[cfg(test)]
mod tests {
    /// The gateway's catalogue lists every metric its code records, once, and nothing else
    /// (but the core's, which the core describes).
    #[test]
    fn every_gateway_metric_is_described() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        // With a series of the core's own, which the core describes (`metered.rs`).
        cqrs_core::testing::assert_metrics_listed(
            &src,
            &["http_", "cqrs_"],
            super::GATEWAY_METRICS,
            cqrs_core::METRICS,
        );
    }

    use super::{SharedRun, redacted_uri};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// A caller that goes away while its run is under way (a probe that gave up) does not cut
    /// the run short: a caller waiting for it gets its result, and no second run starts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_outlives_the_caller_that_started_it() {
        let shared = Arc::new(SharedRun::<Instant>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let go = Arc::new(tokio::sync::Notify::new());
        let run = |runs: Arc<AtomicUsize>, go: Arc<tokio::sync::Notify>| {
            move || async move {
                let began = Instant::now();
                runs.fetch_add(1, Ordering::SeqCst);
                go.notified().await;
                began
            }
        };
        let waiter_arrived = Instant::now();
        let starter = {
            let (shared, run) = (shared.clone(), run(runs.clone(), go.clone()));
            tokio::spawn(async move { shared.get(run).await })
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while runs.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the run starts");
        let waiter = {
            let (shared, run) = (shared.clone(), run(runs.clone(), go.clone()));
            tokio::spawn(async move { shared.get_since(waiter_arrived, run).await })
        };
        starter.abort();
        assert!(starter.await.unwrap_err().is_cancelled());
        go.notify_waiters();
        go.notify_one();
        let began = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter is answered")
            .unwrap()
            .expect("a result");
        assert!(began >= waiter_arrived);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the run went on; no second one"
        );
    }

    /// A run whose task panics answers `None` (`/ready` then says unavailable, where it
    /// panicked into a 500), and the next caller starts a run of its own.
    #[tokio::test]
    async fn a_run_that_panics_answers_none_and_the_next_caller_runs_again() {
        let shared = SharedRun::<u32>::default();
        let panicked = shared
            .get(|| async { std::panic::panic_any("a check's bug") as u32 })
            .await;
        assert_eq!(panicked, None);
        assert_eq!(shared.get(|| async { 7 }).await, Some(7));
    }

    /// A caller that came while an earlier run was under way, a run that then panics, is
    /// answered by a run of its own, not by that run's `None` (which is for the caller that
    /// started it, or came before it began).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_after_an_earlier_run_that_panics_gets_a_run_of_its_own() {
        let shared = Arc::new(SharedRun::<u32>::default());
        let (go, started) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(AtomicUsize::new(0)),
        );
        let first = {
            let (shared, go, started) = (shared.clone(), go.clone(), started.clone());
            tokio::spawn(async move {
                shared
                    .get(move || async move {
                        started.fetch_add(1, Ordering::SeqCst);
                        go.notified().await;
                        std::panic::panic_any("a check's bug") as u32
                    })
                    .await
            })
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while started.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first run starts");
        let second = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.get(|| async { 7 }).await })
        };
        // Time for the second caller to wait on the first run (nothing shows it waits; were
        // it late, it would start its own run, as asked, and the test would pass untested).
        tokio::time::sleep(Duration::from_millis(100)).await;
        go.notify_one();
        let within = Duration::from_secs(10);
        assert_eq!(
            tokio::time::timeout(within, first).await.unwrap().unwrap(),
            None
        );
        assert_eq!(
            tokio::time::timeout(within, second).await.unwrap().unwrap(),
            Some(7)
        );
    }

    /// Twenty callers at once share the runs: two, one after the other (the one under way
    /// when they came, and the next), and each caller's result began after it arrived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_at_once_share_runs_that_began_after_them() {
        let shared = Arc::new(SharedRun::<Instant>::default());
        let (runs, arrived) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        // The first run ends once all twenty have arrived, so that they all wait for it.
        let first = {
            let (shared, runs, arrived) = (shared.clone(), runs.clone(), arrived.clone());
            tokio::spawn(async move {
                shared
                    .get(|| async move {
                        let began = Instant::now();
                        runs.fetch_add(1, Ordering::SeqCst);
                        while arrived.load(Ordering::SeqCst) < 20 {
                            tokio::task::yield_now().await;
                        }
                        began
                    })
                    .await
                    .expect("a result")
            })
        };
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (shared, runs, arrived) = (shared.clone(), runs.clone(), arrived.clone());
                tokio::spawn(async move {
                    let at = Instant::now();
                    arrived.fetch_add(1, Ordering::SeqCst);
                    let began = shared
                        .get_since(at, || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Instant::now()
                        })
                        .await
                        .expect("a result");
                    (at, began)
                })
            })
            .collect();
        tokio::time::timeout(Duration::from_secs(10), async {
            first.await.unwrap();
            for caller in callers {
                let (arrived, began) = caller.await.unwrap();
                assert!(began >= arrived, "a result older than its caller");
            }
        })
        .await
        .expect("every caller is answered");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "the first run and one shared by the rest"
        );
    }

    #[test]
    fn a_token_in_the_query_is_redacted() {
        let redacted = |uri: &str| redacted_uri(&uri.parse().unwrap());
        assert_eq!(redacted("/ws?token=eyJ.secret.sig"), "/ws?token=[redacted]");
        assert_eq!(
            redacted("/ws?a=1&token=eyJ.secret.sig&b=2"),
            "/ws?a=1&token=[redacted]&b=2"
        );
        assert_eq!(redacted("/tickets?status=open"), "/tickets?status=open");
        assert_eq!(redacted("/tickets"), "/tickets");
        // The hub decodes the key, so an encoded one is a token too.
        assert_eq!(
            redacted("/ws?%74oken=eyJ.secret.sig"),
            "/ws?token=[redacted]"
        );
        assert_eq!(
            redacted("/ws?tok%65n=eyJ.secret.sig&x=1"),
            "/ws?token=[redacted]&x=1"
        );
        // A token under a key the hub does not take (so it refuses the handshake) was logged
        // in clear.
        for (uri, logged) in [
            ("/ws?TOKEN=eyJ.secret.sig", "/ws?TOKEN=[redacted]"),
            ("/ws?;token=eyJ.secret.sig", "/ws?;token=[redacted]"),
            ("/ws?token+=eyJ.secret.sig", "/ws?token+=[redacted]"),
            ("/ws?access_token=abc", "/ws?access_token=[redacted]"),
            ("/ws?jwt=eyJhbGc.eyJzdWI.c2ln&x=1", "/ws?jwt=[redacted]&x=1"),
            (
                "/ws?auth=Bearer%20eyJhbGc.eyJzdWI.c2ln",
                "/ws?auth=[redacted]",
            ),
            ("/ws?eyJhbGc.eyJzdWI.c2ln", "/ws?[redacted]"),
            ("/ws?eyJhbGc.eyJzdWI.c2ln=1", "/ws?[redacted]"),
            // Not at the start of its run, or encoded twice.
            ("/ws?q=xxeyJhbGc.eyJzdWI.c2ln", "/ws?q=[redacted]"),
            ("/ws?q=a.eyJhbGc.eyJzdWI.c2ln&x=1", "/ws?q=[redacted]&x=1"),
            ("/ws?q=eyJhbGc%252EeyJzdWI%252Ec2ln", "/ws?q=[redacted]"),
            ("/ws/a.eyJhbGc.eyJzdWI.c2ln", "/ws/[redacted]"),
        ] {
            assert_eq!(redacted(uri), logged, "{uri}");
        }
        // A slip that puts the token in the path.
        for (uri, logged) in [
            ("/ws&token=eyJ.secret.sig", "/[redacted]"),
            ("/ws;token=abc", "/[redacted]"),
            ("/ws;token+=abc", "/[redacted]"),
            ("/ws&token%20=abc", "/[redacted]"),
            ("/ws/eyJhbGc.eyJzdWI.c2ln", "/ws/[redacted]"),
            ("/ws/eyJhbGc.eyJzdWI.c2ln?x=1", "/ws/[redacted]?x=1"),
        ] {
            assert_eq!(redacted(uri), logged, "{uri}");
        }
        // Cursors, ticket ids and other values are left alone.
        assert_eq!(
            redacted("/tickets/0193a5e4-7b2c-7d3e-8f4a-123456789abc/comments"),
            "/tickets/0193a5e4-7b2c-7d3e-8f4a-123456789abc/comments"
        );
        assert_eq!(
            redacted("/tickets?cursor=eyJpZCI6MX0&limit=5"),
            "/tickets?cursor=eyJpZCI6MX0&limit=5"
        );
    }

    /// A plain 408 (a body-timeout layer's, say) gets the contract's JSON and keeps its
    /// status: the client's doing, with no retry advice; it is no 503 `timeout`.
    #[tokio::test]
    async fn a_plain_408_stays_a_408_request_timeout() {
        use axum::body::Body;
        use axum::http::{Request, StatusCode};
        use tower::ServiceExt;

        let app = axum::Router::new()
            .route(
                "/slow",
                axum::routing::post(|| async { (StatusCode::REQUEST_TIMEOUT, "too slow") }),
            )
            .layer(axum::middleware::from_fn_with_state(
                super::IdempotentRoutes::default(),
                super::json_errors,
            ));
        let request = Request::post("/slow").body(Body::empty()).unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(response.headers().get("retry-after").is_none());
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "request_timeout", "{body}");
        assert_eq!(body["error"]["message"], helpdesk_api::BODY_TOO_SLOW);
    }

    /// An error a plugin's route answers in plain text gets the contract's JSON: a client
    /// error keeps its text (axum's rejections are written for clients) and a code of its
    /// status (a route's own 404 too); a server error's text is not sent, and a bare 503 is
    /// no time-out (it was told as the request's budget spent, with that advice) but
    /// `unavailable` with `Retry-After`.
    #[tokio::test]
    async fn plain_errors_get_the_contracts_json_by_their_status() {
        use axum::body::Body;
        use axum::http::{Request, StatusCode};
        use tower::ServiceExt;

        let app = axum::Router::new()
            .route(
                "/{status}",
                axum::routing::post(
                    |axum::extract::Path(status): axum::extract::Path<u16>| async move {
                        let status = StatusCode::from_u16(status).unwrap();
                        (
                            status,
                            format!("plain text of {status} from /srv/secret.rs"),
                        )
                    },
                ),
            )
            .route(
                "/spent",
                axum::routing::post(|| async {
                    let mut response = axum::response::IntoResponse::into_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                    );
                    response.extensions_mut().insert(super::BudgetSpent);
                    response
                }),
            )
            .layer(axum::middleware::from_fn_with_state(
                super::IdempotentRoutes::default(),
                super::json_errors,
            ));
        for (path, status, code, sent) in [
            ("/422", 422, "unprocessable", true),
            ("/403", 403, "forbidden", true),
            ("/400", 400, "bad_request", true),
            ("/418", 418, "bad_request", true),
            // A route's own 404 ("no such widget"), not an unknown path.
            ("/404", 404, "not_found", true),
            ("/500", 500, "internal", false),
            ("/503", 503, "unavailable", false),
            ("/spent", 503, "timeout", false),
        ] {
            let request = Request::post(path).body(Body::empty()).unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status().as_u16(), status, "{path}");
            if path == "/503" {
                assert_eq!(
                    response.headers()["retry-after"],
                    "1",
                    "as the contract says"
                );
            }
            let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"]["code"], code, "{path}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert_eq!(message.contains("plain text of"), sent, "{path}: {body}");
        }
    }

    /// The gateway's consumers never get a redelivery delay the Redis transport refuses.
    #[test]
    fn consumers_get_a_redelivery_delay_redis_accepts() {
        assert_eq!(
            helpdesk_api::MIN_REDELIVERY_DELAY,
            cqrs_redis::MIN_REDELIVERY_DELAY
        );
    }
}
