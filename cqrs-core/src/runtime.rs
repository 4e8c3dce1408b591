//! A small runtime for a server's background workers (outbox relays, consumers, projections,
//! realtime hubs): starts them, restarts a failed one with backoff, reports health for a
//! readiness endpoint, and stops them gracefully.

use crate::BoxError;
use async_trait::async_trait;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

/// How a worker or a backend is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Not ready yet.
    Starting,
    /// Working.
    Healthy,
    /// Working with reduced guarantees (a non-critical backend is down); still ready.
    Degraded(String),
    /// Not working.
    Unhealthy(String),
    /// Stopped (after shutdown).
    Stopped,
}

impl Health {
    /// A short name: `starting`, `healthy`, `degraded`, `unhealthy`, `stopped`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Degraded(_) => "degraded",
            Health::Unhealthy(_) => "unhealthy",
            Health::Stopped => "stopped",
        }
    }

    /// The reason, for degraded and unhealthy.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Health::Degraded(r) | Health::Unhealthy(r) => Some(r),
            _ => None,
        }
    }

    fn is_ok(&self) -> bool {
        matches!(self, Health::Healthy | Health::Degraded(_))
    }
}

/// Tells workers to stop. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// A signal and its trigger, for code that runs workers itself (tests).
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx: Arc::new(tx) }, Shutdown { rx })
    }

    /// Whether shutdown was requested.
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes when shutdown is requested. Use it in `tokio::select!` around the wait for
    /// new work, never around in-flight work, so a worker finishes and acknowledges what it
    /// has.
    pub async fn requested(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|stop| *stop).await.is_err() {
            // Every trigger is gone without a request: shutdown can no longer come.
            std::future::pending::<()>().await;
        }
    }
}

/// Triggers a [`Shutdown`].
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    tx: Arc<watch::Sender<bool>>,
}

impl ShutdownTrigger {
    /// Requests shutdown.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

type HealthMap = Arc<Mutex<BTreeMap<String, (Health, bool)>>>;

/// A named backend check and whether it is critical.
type Check = (String, Arc<dyn HealthCheck>, bool);

/// Where a worker reports its health.
#[derive(Clone)]
pub struct HealthReporter {
    name: String,
    map: HealthMap,
}

impl fmt::Debug for HealthReporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthReporter")
            .field("name", &self.name)
            .finish()
    }
}

impl HealthReporter {
    /// A reporter not attached to a runtime (tests).
    pub fn detached(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            map: HealthMap::default(),
        }
    }

    /// Sets this worker's health.
    pub fn set(&self, health: Health) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.name) {
            entry.0 = health;
        } else {
            map.insert(self.name.clone(), (health, false));
        }
    }

    /// The health last set.
    pub fn get(&self) -> Health {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&self.name)
            .map_or(Health::Starting, |e| e.0.clone())
    }
}

/// What a worker gets when it runs.
///
/// The runtime makes one for each run; a test that runs a worker by hand makes its own:
///
/// ```
/// use cqrs_core::runtime::{HealthReporter, Shutdown, WorkerContext};
///
/// let (trigger, shutdown) = Shutdown::new();
/// let ctx = WorkerContext::new(shutdown, HealthReporter::detached("relay"));
/// trigger.trigger();
/// assert!(ctx.shutdown.is_requested());
/// ```
///
/// Non-exhaustive: later versions may give a worker more (made with [`new`](Self::new)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerContext {
    /// Requested when the runtime stops.
    pub shutdown: Shutdown,
    /// Where to report health.
    pub health: HealthReporter,
}

impl WorkerContext {
    /// The context of a worker that stops when `shutdown` is requested and reports its
    /// health to `health`.
    pub fn new(shutdown: Shutdown, health: HealthReporter) -> Self {
        Self { shutdown, health }
    }
}

/// A background task of a server.
///
/// `run` loops until `ctx.shutdown` is requested, then finishes the work it has in flight
/// (acknowledging it) and returns `Ok`. An `Err` is logged, and the runtime runs the worker
/// again after a backoff; so is a return of `Ok` before shutdown (reported `Unhealthy`,
/// "returned before shutdown"), since a worker runs as long as the server: do one-shot work
/// (a cache warm-up) before [`RuntimeBuilder::start`], or as a [`Periodic`] job.
///
/// A panic in `run` is caught and handled as an `Err`, and `run` is called again on the same
/// value, left as the panic found it: a worker whose fields hold work in progress (a buffer
/// half drained) starts its next run by putting them right, or keeps such state in locals of
/// `run`.
#[async_trait]
pub trait Worker: Send + 'static {
    /// A stable name, for logs and health.
    fn name(&self) -> &str;

    /// Runs until shutdown.
    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError>;
}

/// A boxed worker is a worker: workers collected as `Box<dyn Worker>` (contributed by plugins,
/// say) go to [`RuntimeBuilder::worker`] as they are.
#[async_trait]
impl<W: Worker + ?Sized> Worker for Box<W> {
    fn name(&self) -> &str {
        (**self).name()
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        (**self).run(ctx).await
    }
}

/// A job run at start and then again one interval after each run ends (a fixed delay, not a
/// fixed rate), until shutdown: housekeeping such as
/// [`IdempotencyStore::purge_expired`](crate::ports::IdempotencyStore::purge_expired).
///
/// A failed run is logged and reported as [`Health::Degraded`] (housekeeping that fails does
/// not make a server unready); the next run tries again, and a run that succeeds reports
/// [`Health::Healthy`]. A run still going after [`stall_after`](Self::stall_after) is reported
/// as degraded too, instead of the last run's health standing for a job that hangs; with a
/// [`timeout`](Self::timeout) it is cancelled and counts as failed, and so does a run that
/// panics. Shutdown waits for a run in progress.
///
/// ```
/// use cqrs_core::memory::InMemoryIdempotencyStore;
/// use cqrs_core::ports::IdempotencyStore;
/// use cqrs_core::runtime::{Periodic, Runtime};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = Arc::new(InMemoryIdempotencyStore::new());
/// let purge = Periodic::new("idempotency-purge", Duration::from_secs(3600), move || {
///     let store = store.clone();
///     async move { store.purge_expired().await.map(drop).map_err(Into::into) }
/// })
/// // A purge cut short loses nothing: the next one deletes the rest.
/// .timeout(Duration::from_secs(600));
/// let runtime = Runtime::builder().worker(purge).start();
/// runtime.shutdown(Duration::from_secs(5)).await.unwrap();
/// # });
/// ```
pub struct Periodic<F> {
    name: String,
    every: Duration,
    stall_after: Option<Duration>,
    timeout: Option<Duration>,
    job: F,
}

/// The shortest time a run goes on before [`Periodic`] reports it by default, so that a job run
/// every few milliseconds does not flap to degraded whenever one run is slower than the rest.
const MIN_PERIODIC_STALL: Duration = Duration::from_secs(60);

impl<F, Fut> Periodic<F>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    /// `job`, run at start and then again `every` (at least 1 ms) after each run ends.
    pub fn new(name: impl Into<String>, every: Duration, job: F) -> Self {
        Self {
            name: name.into(),
            every: every.max(Duration::from_millis(1)),
            stall_after: None,
            timeout: None,
            job,
        }
    }

    /// After how long a run still going is reported ([`Health::Degraded`], and a warning);
    /// it goes on, and its outcome is reported when it ends. By default the longer of the
    /// interval and one minute; at least 1 ms.
    pub fn stall_after(mut self, after: Duration) -> Self {
        self.stall_after = Some(after.max(Duration::from_millis(1)));
        self
    }

    /// Cancels a run that takes longer than `limit` (at least 1 ms); it counts as a failed
    /// run. No limit by default: set one for a job that is safe to cut short, one that a
    /// lock or a silent network could otherwise hold for good.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit.max(Duration::from_millis(1)));
        self
    }

    /// One run, reported as stalled once it goes on past `stall_after`, cancelled at the
    /// timeout. A panic in the job (making its future, or running it) is a failed run: the
    /// next one comes at the next interval, not at the runtime's restart pace.
    async fn run_once(&mut self, health: &HealthReporter) -> Result<(), BoxError> {
        let job = &mut self.job;
        let run = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
            Ok(run) => run,
            Err(payload) => return Err(panicked(crate::panic::into_message(payload))),
        };
        let limit = self.timeout;
        let run = async move {
            let run = crate::CatchUnwind::new(run);
            let Some(outcome) = crate::panic::within(limit, run).await else {
                return Err(format!(
                    "the run did not finish within {:?} and was cancelled",
                    limit.unwrap_or_default()
                )
                .into());
            };
            outcome.unwrap_or_else(|message| Err(panicked(message)))
        };
        let mut run = std::pin::pin!(run);
        let stall_after = self
            .stall_after
            .unwrap_or_else(|| self.every.max(MIN_PERIODIC_STALL));
        tokio::select! {
            biased;
            outcome = &mut run => return outcome,
            () = tokio::time::sleep(stall_after) => {}
        }
        let reason = format!("a run has been going for over {stall_after:?}");
        tracing::warn!(worker = %self.name, "{reason}; still waiting for it");
        health.set(Health::Degraded(reason));
        run.await
    }
}

/// A job's panic as a failed run's error.
fn panicked(message: String) -> BoxError {
    format!("the run panicked: {message}").into()
}

impl<F> fmt::Debug for Periodic<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Periodic")
            .field("name", &self.name)
            .field("every", &self.every)
            .field("stall_after", &self.stall_after)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<F, Fut> Worker for Periodic<F>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        loop {
            // A shutdown asked for before a run (before the first: the runtime stopped as it
            // started, or a restart's) starts none: it could hold the grace, or be cut off.
            if ctx.shutdown.is_requested() {
                return Ok(());
            }
            match self.run_once(&ctx.health).await {
                Ok(()) => ctx.health.set(Health::Healthy),
                Err(error) => {
                    let error = crate::error::with_causes(&*error);
                    tracing::warn!(worker = %self.name, %error, "periodic job failed; trying again at the next interval");
                    ctx.health.set(Health::Degraded(error));
                }
            }
            tokio::select! {
                () = ctx.shutdown.requested() => return Ok(()),
                () = tokio::time::sleep(self.every) => {}
            }
        }
    }
}

/// A backend whose health the runtime reports: the database, the broker.
#[async_trait]
pub trait HealthCheck: Send + Sync + 'static {
    /// Checks the backend now.
    async fn check(&self) -> Health;
}

/// The health of everything a runtime runs and checks.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthReport {
    /// Whether the server can do its work: every critical component (the backend checks
    /// marked critical) is healthy or degraded. Workers are reported, and do not gate
    /// readiness: a lagging consumer does not stop the server from taking commands.
    pub ready: bool,
    /// Each worker and check, by name, with whether it is critical.
    pub components: BTreeMap<String, (Health, bool)>,
}

/// How long [`Runtime::health`] gives each check.
pub const DEFAULT_CHECK_BUDGET: Duration = Duration::from_secs(5);

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    workers: Vec<Box<dyn Worker>>,
    checks: Vec<Check>,
    min_backoff: Duration,
    max_backoff: Duration,
}

impl fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field(
                "workers",
                &self
                    .workers
                    .iter()
                    .map(|w| w.name().to_owned())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl RuntimeBuilder {
    /// Adds a worker.
    pub fn worker(mut self, worker: impl Worker) -> Self {
        self.workers.push(Box::new(worker));
        self
    }

    /// Adds a backend check. A critical one makes the server unready when it fails (the
    /// database); a non-critical one only shows as degraded (a broker the outbox can wait
    /// for).
    pub fn check(mut self, name: &str, check: Arc<dyn HealthCheck>, critical: bool) -> Self {
        self.checks.push((name.to_owned(), check, critical));
        self
    }

    /// The backoff before a failed worker runs again: doubles from `min` up to `max` while the
    /// worker keeps failing, and starts from `min` again after a run that lasted at least
    /// `max`.
    /// Defaults: 100 ms to 30 s.
    pub fn restart_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// Starts every worker on the current tokio runtime. Keep the [`Runtime`] and call
    /// [`shutdown`](Runtime::shutdown): dropping it aborts every worker where it is.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, when there is a worker to start (as `tokio::spawn` does):
    /// call it from `#[tokio::main]`, or inside `Runtime::block_on`.
    #[must_use = "dropping the Runtime aborts every worker at once; keep it and call `shutdown`"]
    pub fn start(self) -> Runtime {
        let (trigger, shutdown) = Shutdown::new();
        let health = HealthMap::default();
        let mut tasks = JoinSet::new();
        let running = Running::default();
        // Health is kept by name: two workers of one name (two consumers of one topic and
        // group, say) would overwrite each other's, so the second is `name#2`, and so on.
        let mut taken: HashSet<String> = HashSet::new();
        for worker in self.workers {
            let mut name = worker.name().to_owned();
            if taken.contains(&name) {
                let renamed = free_name(&taken, (2..).map(|n| format!("{name}#{n}")));
                tracing::warn!(worker = %name, health = %renamed, "two workers share a name; reporting this one's health under another");
                name = renamed;
            }
            taken.insert(name.clone());
            let reporter = HealthReporter {
                name: name.clone(),
                map: health.clone(),
            };
            reporter.set(Health::Starting);
            let ctx = WorkerContext::new(shutdown.clone(), reporter);
            let (min, max) = (self.min_backoff, self.max_backoff);
            let still_running = running.enter(&name);
            // Every line a worker logs names it (a consume loop's, a stalled batch's), and
            // carries no span of whoever started the runtime. At `error` level, so that a
            // filter of `warn` (common in production) keeps it for the warnings it names.
            let span = tracing::error_span!(parent: None, "worker", worker = %name);
            tasks.spawn(
                async move {
                    let mut still_running = still_running;
                    supervise(worker, ctx, (min, max)).await;
                    // Every way out of it is the worker's own end, not an abort.
                    still_running.finished = true;
                }
                .instrument(span),
            );
        }
        // A check under a worker's name (or another check's) would hide it in the report.
        let checks = self
            .checks
            .into_iter()
            .map(|(name, check, critical)| {
                let mut reported = name.clone();
                if taken.contains(&reported) {
                    reported = free_name(
                        &taken,
                        std::iter::once(format!("{name} (check)"))
                            .chain((2..).map(|n| format!("{name} (check #{n})"))),
                    );
                    tracing::warn!(check = %name, health = %reported, "a health check shares a name with a worker or another check; reporting it under another");
                }
                taken.insert(reported.clone());
                (reported, check, critical)
            })
            .collect();
        Runtime {
            trigger,
            shutdown,
            health,
            checks: Arc::new(checks),
            tasks: tokio::sync::Mutex::new(tasks),
            running,
            aborted: std::sync::Mutex::default(),
        }
    }
}

/// Runs `worker` until shutdown, restarting it after a failure with a backoff from `min`
/// doubling up to `max`, and reports its health under `ctx`'s name.
async fn supervise(
    mut worker: Box<dyn Worker>,
    ctx: WorkerContext,
    (min, max): (Duration, Duration),
) {
    let reporter = &ctx.health;
    let name = &reporter.name;
    let mut backoff = min;
    loop {
        let started = tokio::time::Instant::now();
        // The call inside the guard: a hand-written `run` may panic before it
        // returns its future. (`Box<dyn Worker>`'s own impl defers the call into
        // its future today; the guard should not rest on that.)
        let result = crate::panic::CatchUnwind::new(async { worker.run(ctx.clone()).await }).await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(crate::error::with_causes(&*e)),
            Err(panic) => Some(format!("panicked: {panic}")),
        };
        if ctx.shutdown.is_requested() {
            // A run that failed while it stopped (its last acknowledgements, its
            // last commit) is not stopped quietly: what it had in flight may come
            // back (redelivered) or be missing: the log and its health say so.
            match failure {
                Some(reason) => {
                    tracing::error!(worker = %name, %reason, "worker failed while stopping; its in-flight work may not be finished");
                    reporter.set(Health::Unhealthy(format!(
                        "failed while stopping: {reason}"
                    )));
                }
                None => reporter.set(Health::Stopped),
            }
            return;
        }
        let failed = failure.is_some();
        let reason = failure.unwrap_or_else(|| "returned before shutdown".to_owned());
        // A run that lasted longer than the longest backoff was a recovery: the
        // next failure is a new incident, not the next of a streak.
        if started.elapsed() >= max {
            backoff = min;
        }
        tracing::error!(worker = %name, %reason, ?backoff, "worker stopped; restarting");
        metrics::counter!("cqrs_worker_restarts_total", "worker" => name.clone()).increment(1);
        reporter.set(Health::Unhealthy(reason.clone()));
        // At least 1 ms, whatever the settings (a `max` of zero resets the backoff
        // to `min` after every run): a zero one restarts a failing worker in a
        // tight loop.
        tokio::select! {
            _ = tokio::time::sleep(backoff.max(Duration::from_millis(1))) => {}
            _ = ctx.shutdown.requested() => {
                // Its last run failed and none came after: what it had in flight may not
                // be finished, as for one failing while it stops. One that returned `Ok`
                // (a one-shot job) stopped cleanly.
                reporter.set(if failed {
                    Health::Unhealthy(format!("failed, and stopped before its restart: {reason}"))
                } else {
                    Health::Stopped
                });
                return;
            }
        }
        // At least 1 ms to double from: a zero start would never grow.
        backoff = backoff
            .saturating_mul(2)
            .max(Duration::from_millis(1))
            .min(max);
        // A new run: the last one's failure no longer describes it (a worker that
        // reports nothing itself would stay unhealthy for good after recovering).
        reporter.set(Health::Starting);
    }
}

/// The workers whose task has not ended, by name, and those whose task was dropped before it
/// ended (aborted): what a shutdown past its grace names. Not read from their health: a worker
/// that returned an error while stopping has ended, `Unhealthy` ("failed while stopping"), and
/// stays so.
#[derive(Clone, Default)]
struct Running(Arc<std::sync::Mutex<RunningNames>>);

#[derive(Default)]
struct RunningNames {
    running: std::collections::BTreeSet<String>,
    cut: Vec<String>,
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunningNames> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `name` as running until the returned guard, held by its task, is dropped.
    fn enter(&self, name: &str) -> RunningGuard {
        self.lock().running.insert(name.to_owned());
        RunningGuard {
            running: self.clone(),
            name: name.to_owned(),
            finished: false,
        }
    }

    /// The workers whose task was dropped before it ended, and those still running: what an
    /// abort cut off. Kept (see [`forget_cut`](Self::forget_cut)) until the caller recorded
    /// them, so another `shutdown` looking meanwhile does not find nothing to name.
    fn cut_off(&self) -> Vec<String> {
        let names = self.lock();
        let mut cut = names.cut.clone();
        cut.extend(names.running.iter().cloned());
        cut.sort_unstable();
        cut.dedup();
        cut
    }

    /// Forgets the workers [`cut_off`](Self::cut_off) named, once they are recorded.
    fn forget_cut(&self) {
        self.lock().cut.clear();
    }

    /// The workers still running, and those whose task was dropped before it ended that no
    /// `shutdown` has recorded yet.
    fn running_and_cut(&self) -> (Vec<String>, Vec<String>) {
        let names = self.lock();
        (names.running.iter().cloned().collect(), names.cut.clone())
    }
}

/// Takes its worker out of [`Running`] when its task ends: it sets `finished` at its own end;
/// dropped without it, the task was aborted.
struct RunningGuard {
    running: Running,
    name: String,
    finished: bool,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let mut names = self.running.lock();
        names.running.remove(&self.name);
        // Unwinding, the task panicked: it ended by itself, as any other end.
        if !self.finished && !std::thread::panicking() {
            names.cut.push(self.name.clone());
        }
    }
}

/// The first of `candidates` not in `taken`: a health report's name for a component whose
/// own name another one has.
fn free_name(taken: &HashSet<String>, candidates: impl Iterator<Item = String>) -> String {
    candidates
        .into_iter()
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or_default()
}

/// Running workers and checks. See [`RuntimeBuilder`].
///
/// ```
/// use cqrs_core::async_trait;
/// use cqrs_core::BoxError;
/// use cqrs_core::runtime::{Health, Runtime, Worker, WorkerContext};
/// use std::time::Duration;
///
/// struct Ticker;
///
/// #[async_trait]
/// impl Worker for Ticker {
///     fn name(&self) -> &str { "ticker" }
///     async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
///         ctx.health.set(Health::Healthy);
///         ctx.shutdown.requested().await;
///         Ok(())
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let runtime = Runtime::builder().worker(Ticker).start();
/// # while !runtime.health().await.ready { tokio::task::yield_now().await; }
/// assert!(runtime.health().await.ready);
/// runtime.shutdown(Duration::from_secs(5)).await.unwrap();
/// # });
/// ```
///
/// Keep it for as long as the workers should run, and end it with
/// [`shutdown`](Self::shutdown): dropping it aborts every worker where it is (mid-batch, no
/// grace period), with a warning in the log, and fires its
/// [`shutdown_signal`](Self::shutdown_signal) for whatever else follows it.
#[must_use = "dropping the Runtime aborts every worker at once; keep it and call `shutdown`"]
pub struct Runtime {
    trigger: ShutdownTrigger,
    shutdown: Shutdown,
    health: HealthMap,
    checks: Arc<Vec<Check>>,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
    running: Running,
    /// The workers a `shutdown` aborted, so that a later call does not report a clean stop.
    aborted: std::sync::Mutex<Vec<String>>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // The task set aborts every worker as it is dropped: mid-batch, no grace period.
        if !self.shutdown.is_requested() {
            tracing::warn!(
                "a Runtime was dropped without `shutdown`: its workers were aborted where they were, with no grace period"
            );
        }
        // What follows the signal outside the workers (a realtime hub, an HTTP server's
        // graceful shutdown) stops too: with the only trigger gone, it would wait for ever.
        // The workers are aborted first: signalled, those on other threads would begin a
        // graceful stop (a consumer releasing what it holds) only to be cut off halfway.
        self.tasks.get_mut().abort_all();
        self.trigger.trigger();
    }
}

/// Some workers did not stop within the grace period and were aborted (or, when another
/// [`shutdown`](Runtime::shutdown) call was stopping them, are left to that call).
#[derive(Debug, thiserror::Error)]
#[error(
    "{} worker(s) did not stop within {:?} and {}: {}",
    workers.len(),
    to_the_millisecond(*grace),
    if *aborted { "were aborted" } else { "are left to the shutdown already stopping them" },
    workers.join(", ")
)]
#[non_exhaustive]
pub struct ShutdownError {
    /// The grace period.
    pub grace: Duration,
    /// The workers that were still running.
    pub workers: Vec<String>,
    /// Whether this call aborted them (`false`: another `shutdown` call was stopping them and
    /// aborts them at its own deadline).
    pub aborted: bool,
}

/// `d` to the nearest millisecond, so that a grace period computed as what was left of a
/// deadline reads as a person would write it (3.9995 s as 4 s).
fn to_the_millisecond(d: Duration) -> Duration {
    let millis = (d.subsec_nanos() + 500_000) / 1_000_000;
    Duration::from_secs(d.as_secs()).saturating_add(Duration::from_millis(u64::from(millis)))
}

impl Runtime {
    /// Starts building a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            workers: Vec::new(),
            checks: Vec::new(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// The shutdown signal the workers get (an HTTP server can stop on it too). It fires at
    /// [`shutdown`](Self::shutdown), and when the runtime is dropped.
    pub fn shutdown_signal(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Every worker's health and every check's result, now. The checks run at once, each
    /// given at most [`DEFAULT_CHECK_BUDGET`]; see [`health_within`](Self::health_within).
    pub async fn health(&self) -> HealthReport {
        self.health_within(DEFAULT_CHECK_BUDGET).await
    }

    /// Every worker's health and every check's result, with the checks run at once and each
    /// given at most `budget`: one that takes longer (a database that accepts connections and
    /// answers nothing) is [`Health::Unhealthy`], as is one that panics. The report is ready
    /// within about `budget` however many backends hang, so a readiness endpoint can answer
    /// inside its own request timeout (give it a budget below that timeout).
    pub async fn health_within(&self, budget: Duration) -> HealthReport {
        let mut components = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let results = futures_util::future::join_all(self.checks.iter().map(
            |(name, check, critical)| async move {
                // The call inside the guard: a hand-written `check` may panic before it
                // returns its future.
                let checked = crate::panic::CatchUnwind::new(async { check.check().await });
                let health = match crate::panic::within(Some(budget), checked).await {
                    Some(Ok(health)) => health,
                    Some(Err(panic)) => {
                        tracing::error!(check = %name, panic, "a health check panicked");
                        Health::Unhealthy(format!("the check panicked: {panic}"))
                    }
                    None => {
                        Health::Unhealthy(format!("no answer within {} ms", budget.as_millis()))
                    }
                };
                (name.clone(), (health, *critical))
            },
        ))
        .await;
        components.extend(results);
        let ready = !self.shutdown.is_requested()
            && components
                .values()
                .all(|(health, critical)| health.is_ok() || !critical);
        HealthReport { ready, components }
    }

    /// Asks every worker to stop and returns within `grace`, all told: the workers get most
    /// of it to finish their in-flight work and return; those still running then are aborted,
    /// and the rest of it (a quarter, at most 1 s) goes to waiting until their runs are
    /// dropped, so what their `Drop`s do in place has happened when this returns. Clean-up a
    /// `Drop` hands to a task of its own (a Redis consumer releasing what it holds, a pooled
    /// connection settling) is started, not finished: ending `main` right after this returns
    /// drops the tokio runtime, and the task with it. Workers that stop within the grace
    /// close in their own time (a consumer's `close`) and leave nothing to such tasks. A run
    /// that blocks its thread cannot be
    /// dropped until it gives the thread back: this returns without waiting for it past
    /// `grace`. A `grace` of [`Duration::MAX`] waits as long as the workers take.
    ///
    /// Each call honours its own `grace`, however many run at once: while another call is
    /// stopping the workers (one with a longer grace, say), this one waits for it until its
    /// own deadline and no longer. If that call is still running then, this one returns a
    /// [`ShutdownError`] naming the workers not yet stopped, without aborting them: they are
    /// left to the other call, which aborts them at its own deadline; when none is left running
    /// (they all returned, or the other call aborted them), it returns as that call will. A
    /// call after one that aborted workers returns that call's error (with its own `grace`),
    /// not a clean stop.
    ///
    /// `Ok` means every worker returned within the grace, not that each stopped cleanly: a
    /// worker whose run returned an error while stopping (its backend away, say) is logged at
    /// `error` ("worker failed while stopping; its in-flight work may not be finished") and
    /// left `Unhealthy` ("failed while stopping: ...") in [`health`](Self::health), not
    /// `Stopped`, and its unfinished deliveries come back after their redelivery delay, as
    /// after a crash. One stopped while it waits to restart after a failed run (its failure
    /// logged at `error` when it happened) is left `Unhealthy` too ("failed, and stopped before
    /// its restart: ...").
    pub async fn shutdown(&self, grace: Duration) -> Result<(), ShutdownError> {
        self.trigger.trigger();
        // The deadline before the wait for the workers: a call already stopping them (with a
        // longer grace) must not stretch this one's.
        let deadline = tokio::time::Instant::now().checked_add(grace);
        let mut tasks = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, self.tasks.lock()).await {
                Ok(tasks) => tasks,
                Err(_) => {
                    let (running, cut) = self.running.running_and_cut();
                    if !running.is_empty() {
                        return Err(ShutdownError {
                            grace,
                            workers: running,
                            aborted: false,
                        });
                    }
                    // None left running: all ended while the other call held them, before it
                    // noticed. Some may have been aborted by it: recorded already (the record
                    // then says it all; a run dropped after it may be listed as cut again), or
                    // not yet.
                    let recorded = !self
                        .aborted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_empty();
                    if !recorded && !cut.is_empty() {
                        return Err(ShutdownError {
                            grace,
                            workers: cut,
                            aborted: true,
                        });
                    }
                    return self.stopped(grace);
                }
            },
            None => self.tasks.lock().await,
        };
        let Some(deadline) = deadline else {
            // A grace too long for the clock (`Duration::MAX`): as long as it takes.
            while tasks.join_next().await.is_some() {}
            return self.stopped(grace);
        };
        // One budget, split: the wait for aborted runs has its share of it, not a budget of its
        // own on top.
        let stop_by = deadline - (grace / 4).min(Duration::from_secs(1));
        while !tasks.is_empty() {
            match tokio::time::timeout_at(stop_by, tasks.join_next()).await {
                Ok(_) => {}
                Err(_) => {
                    tasks.abort_all();
                    // Aborting only asks: wait until each aborted run is dropped. A run at an
                    // `.await` is dropped at once; one blocking its thread is waited for until
                    // the deadline, no longer.
                    let drained = async { while tasks.join_next().await.is_some() {} };
                    if tokio::time::timeout_at(deadline, drained).await.is_err() {
                        tracing::warn!(?grace, "aborted workers were not dropped in time");
                    }
                    // Those dropped before their end, and those not dropped yet; not one that
                    // ended by itself meanwhile (its health is its own).
                    let workers = self.running.cut_off();
                    // All ended by themselves meanwhile (one blocking its thread, say, that
                    // then returned): nothing was cut off.
                    if workers.is_empty() {
                        return self.stopped(grace);
                    }
                    self.record_aborted(&workers);
                    return Err(ShutdownError {
                        grace,
                        workers,
                        aborted: true,
                    });
                }
            }
        }
        self.stopped(grace)
    }

    /// Records `workers` as aborted, for every later call, and marks them `Stopped`: aborted,
    /// they report nothing more themselves. Recorded before they are forgotten as cut off, so
    /// a call looking in between finds them in one place or the other.
    fn record_aborted(&self, workers: &[String]) {
        *self.aborted.lock().unwrap_or_else(|p| p.into_inner()) = workers.to_vec();
        self.running.forget_cut();
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        for name in workers {
            if let Some((state, _)) = health.get_mut(name) {
                *state = Health::Stopped;
            }
        }
    }

    /// The outcome of a `shutdown` that found every worker stopped: a clean stop, unless an
    /// earlier call (one with a shorter grace, say) aborted some.
    fn stopped(&self, grace: Duration) -> Result<(), ShutdownError> {
        let mut workers = self
            .aborted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if workers.is_empty() {
            // Aborted by a call that was itself dropped while it waited for their runs to be
            // dropped (a caller's timeout): it recorded nothing. Recorded here, as it would
            // have: the workers stopped by being cut off, not cleanly.
            let (_, cut) = self.running.running_and_cut();
            if cut.is_empty() {
                return Ok(());
            }
            self.record_aborted(&cut);
            workers = cut;
        }
        Err(ShutdownError {
            grace,
            workers,
            aborted: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ShutdownError;
    use std::time::Duration;

    /// The grace period reads as it was set, not as what was left of a deadline.
    #[test]
    fn a_shutdown_error_gives_the_grace_to_the_millisecond() {
        let error = ShutdownError {
            grace: Duration::from_nanos(3_999_500_001),
            workers: vec!["relay".into()],
            aborted: true,
        };
        assert_eq!(
            error.to_string(),
            "1 worker(s) did not stop within 4s and were aborted: relay"
        );
        let error = ShutdownError {
            grace: Duration::from_micros(1_250_400),
            ..error
        };
        assert!(error.to_string().contains("within 1.25s"), "{error}");
        let error = ShutdownError {
            grace: Duration::MAX,
            ..error
        };
        assert!(
            error.to_string().contains("within 18446744073709551615"),
            "{error}"
        );
    }
}
