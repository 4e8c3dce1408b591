use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::BoxError;
use cqrs_core::runtime::{Health, HealthCheck, Periodic, Runtime, Worker, WorkerContext};
use cqrs_core::testing::eventually;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Fails its first `fail` runs, then works until shutdown and finishes "in-flight" work.
struct Flaky {
    runs: Arc<AtomicUsize>,
    fail: usize,
    finished_in_flight: Arc<AtomicBool>,
}

#[async_trait]
impl Worker for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if run == 1 && self.fail > 0 {
            return Err("the first run fails".into());
        }
        if run <= self.fail {
            panic!("run {run} panics");
        }
        ctx.health.set(Health::Healthy);
        ctx.shutdown.requested().await;
        // Work that was in flight when shutdown came.
        tokio::task::yield_now().await;
        self.finished_in_flight.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Ignores shutdown; `dropped` is set when its run is dropped (as a consumer's `Drop` releases
/// what it holds, or a transaction rolls back).
struct Stuck {
    dropped: Arc<AtomicBool>,
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl Worker for Stuck {
    fn name(&self) -> &str {
        "stuck"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        let _guard = SetOnDrop(self.dropped.clone());
        ctx.health.set(Health::Healthy);
        std::future::pending::<()>().await;
        Ok(())
    }
}

struct Fixed(Health);

#[async_trait]
impl HealthCheck for Fixed {
    async fn check(&self) -> Health {
        self.0.clone()
    }
}

#[test]
fn a_failing_or_panicking_worker_is_restarted_and_stops_gracefully() {
    run(async {
        let runs = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let runtime = Runtime::builder()
            .restart_backoff(Duration::from_millis(1), Duration::from_millis(5))
            .worker(Flaky {
                runs: runs.clone(),
                fail: 2,
                finished_in_flight: finished.clone(),
            })
            .start();
        eventually(
            Duration::from_secs(5),
            "the worker is healthy after two restarts",
            || async {
                (runtime.health().await.components["flaky"].0 == Health::Healthy).then_some(())
            },
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert!(
            finished.load(Ordering::SeqCst),
            "in-flight work finished before shutdown returned"
        );
        let report = runtime.health().await;
        assert!(!report.ready, "a stopped runtime is not ready");
        assert_eq!(report.components["flaky"].0, Health::Stopped);
    });
}

/// A worker written without `#[async_trait]` whose `run` panics before it returns its future:
/// the panic is caught like one in the future (so the supervisor lives on and restarts it).
struct EagerPanic {
    runs: Arc<AtomicUsize>,
}

impl Worker for EagerPanic {
    fn name(&self) -> &str {
        "eager"
    }

    fn run<'a: 'f, 'f>(
        &'a mut self,
        ctx: WorkerContext,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send + 'f>>
    {
        if self.runs.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("the first run panics before its future");
        }
        Box::pin(async move {
            ctx.health.set(Health::Healthy);
            ctx.shutdown.requested().await;
            Ok(())
        })
    }
}

#[test]
fn a_worker_panicking_before_its_future_is_restarted() {
    run(async {
        let runs = Arc::new(AtomicUsize::new(0));
        let runtime = Runtime::builder()
            .restart_backoff(Duration::from_millis(1), Duration::from_millis(5))
            .worker(EagerPanic { runs: runs.clone() })
            .start();
        eventually(
            Duration::from_secs(5),
            "the worker is healthy after a restart",
            || async {
                (runtime.health().await.components["eager"].0 == Health::Healthy).then_some(())
            },
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// On tokio's paused clock: the wait for the aborted run is a quarter of the grace, and on
/// the real clock a late wake-up of a loaded machine could use it up before the run was
/// dropped.
#[test]
fn a_worker_that_ignores_shutdown_is_aborted_and_named() {
    run_paused(|| async {
        let dropped = Arc::new(AtomicBool::new(false));
        let runtime = Runtime::builder()
            .worker(Stuck {
                dropped: dropped.clone(),
            })
            .start();
        let err = runtime
            .shutdown(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.workers, ["stuck"]);
        assert!(err.aborted);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the aborted worker's run was dropped before shutdown returned"
        );
        // A later call finds nothing running, and still does not report a clean stop.
        let again = runtime
            .shutdown(Duration::from_secs(5))
            .await
            .expect_err("a stop that aborted a worker is not clean the second time asked");
        assert_eq!(again.workers, ["stuck"]);
        assert!(again.aborted);
        assert_eq!(again.grace, Duration::from_secs(5));
    });
}

#[test]
fn only_critical_checks_make_the_server_unready() {
    run(async {
        let degraded = Runtime::builder()
            .check("postgres", Arc::new(Fixed(Health::Healthy)), true)
            .check(
                "redis",
                Arc::new(Fixed(Health::Unhealthy("connection refused".into()))),
                false,
            )
            .start();
        let report = degraded.health().await;
        assert!(report.ready);
        assert_eq!(
            report.components["redis"].0.reason(),
            Some("connection refused")
        );

        let down = Runtime::builder()
            .check(
                "postgres",
                Arc::new(Fixed(Health::Unhealthy("refused".into()))),
                true,
            )
            .start();
        assert!(!down.health().await.ready);
    });
}

/// A check that never answers (a database that accepts connections and says nothing).
struct Hangs;

#[async_trait]
impl HealthCheck for Hangs {
    async fn check(&self) -> Health {
        std::future::pending().await
    }
}

/// A check that panics.
struct Panics;

#[async_trait]
impl HealthCheck for Panics {
    async fn check(&self) -> Health {
        panic!("the check's own bug")
    }
}

/// A hand-written check (no `#[async_trait]`) that panics before it returns its future.
struct PanicsAtOnce;

impl HealthCheck for PanicsAtOnce {
    fn check<'life0, 'async_trait>(
        &'life0 self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Health> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        panic!("the check's eager bug")
    }
}

/// The checks run at once, each cut off at the budget: two hanging checks cost one budget,
/// not two (on tokio's paused clock, so the time is exact), and a panic is a failed check.
#[tokio::test(start_paused = true)]
async fn checks_run_at_once_and_each_is_cut_off_at_the_budget() {
    let runtime = Runtime::builder()
        .check("postgres", Arc::new(Hangs), true)
        .check("memory", Arc::new(Fixed(Health::Healthy)), false)
        .check("redis", Arc::new(Hangs), false)
        .check("broken", Arc::new(Panics), false)
        .check("eager", Arc::new(PanicsAtOnce), false)
        .start();
    let started = tokio::time::Instant::now();
    let report = runtime.health_within(Duration::from_millis(200)).await;
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    assert!(!report.ready, "the critical check did not answer");
    assert_eq!(
        report.components["postgres"].0.reason(),
        Some("no answer within 200 ms")
    );
    assert_eq!(report.components["memory"].0, Health::Healthy);
    assert!(report.components["redis"].0.reason().is_some());
    assert_eq!(
        report.components["broken"].0.reason(),
        Some("the check panicked: the check's own bug")
    );
    assert_eq!(
        report.components["eager"].0.reason(),
        Some("the check panicked: the check's eager bug")
    );
}

/// A grace of `Duration::MAX` ("as long as it takes") waits for the workers instead of
/// overflowing the clock.
#[test]
fn a_grace_of_duration_max_waits_for_the_workers() {
    run(async {
        let finished = Arc::new(AtomicBool::new(false));
        let runtime = Runtime::builder()
            .worker(Flaky {
                runs: Arc::default(),
                fail: 0,
                finished_in_flight: finished.clone(),
            })
            .start();
        runtime.shutdown(Duration::MAX).await.unwrap();
        assert!(finished.load(Ordering::SeqCst));
    });
}

/// Each `shutdown` call honours its own grace: while a first call waits as long as the workers
/// take (a worker that ignores shutdown: for ever), a second one with a grace of 100 ms
/// returns after 100 ms (on tokio's paused clock, so the time is exact), naming the worker
/// still running, instead of waiting behind the first.
#[test]
fn a_second_shutdown_returns_within_its_own_grace() {
    run_paused(|| async {
        let dropped = Arc::new(AtomicBool::new(false));
        let runtime = Runtime::builder()
            .worker(Stuck {
                dropped: dropped.clone(),
            })
            .start();
        health_becomes(&runtime, "stuck", Health::Healthy).await;
        let first = runtime.shutdown(Duration::MAX);
        tokio::pin!(first);
        let started = tokio::time::Instant::now();
        let second = tokio::time::timeout(
            Duration::from_secs(10),
            runtime.shutdown(Duration::from_millis(100)),
        );
        // `biased`: the first call is polled first, so it holds the workers when the second
        // one asks for them.
        let second = tokio::select! {
            biased;
            first = &mut first => panic!("the first shutdown returned: {first:?}"),
            second = second => second,
        };
        let err = second
            .expect("the second shutdown waited as long as the first")
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(err.grace, Duration::from_millis(100));
        assert_eq!(err.workers, ["stuck"], "the worker still running");
        assert!(!err.aborted, "left to the first call");
        assert!(err.to_string().contains("left to the shutdown"), "{err}");
        assert!(
            !dropped.load(Ordering::SeqCst),
            "the first call still waits for the worker"
        );
    });
}

/// Fails at once on runs 1–4 and 6, fails after running a while on run 5, then runs until
/// shutdown; records when each run started.
struct Relapsing {
    starts: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
}

#[async_trait]
impl Worker for Relapsing {
    fn name(&self) -> &str {
        "relapsing"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        let run = {
            let mut starts = self.starts.lock().unwrap();
            starts.push(tokio::time::Instant::now());
            starts.len()
        };
        match run {
            5 => tokio::time::sleep(Duration::from_secs(2)).await,
            7.. => {
                ctx.shutdown.requested().await;
                return Ok(());
            }
            _ => {}
        }
        Err(format!("run {run} failed").into())
    }
}

/// The restart backoff grows while a worker keeps failing, and starts again from the minimum
/// after a run that lasted: a failure days after the last one is not met with the maximum.
#[test]
fn the_restart_backoff_starts_over_after_a_run_that_lasted() {
    run_paused(|| async {
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let runtime = Runtime::builder()
            .restart_backoff(Duration::from_millis(100), Duration::from_millis(800))
            .worker(Relapsing {
                starts: starts.clone(),
            })
            .start();
        eventually(Duration::from_secs(30), "seven runs", || async {
            (starts.lock().unwrap().len() >= 7).then_some(())
        })
        .await;
        let starts = starts.lock().unwrap().clone();
        let gaps: Vec<u128> = starts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        assert_eq!(&gaps[..4], [100, 200, 400, 800], "growing while failing");
        let after_long_run = (starts[5] - (starts[4] + Duration::from_secs(2))).as_millis();
        assert_eq!(after_long_run, 100, "started over after the 2 s run");
        assert_eq!(gaps[5], 200, "and grows again from there");
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A shutdown whose every trigger is dropped without a request can no longer come: waiting
/// for it waits for ever, instead of completing as if it had been requested.
#[test]
fn a_dropped_trigger_is_no_shutdown_request() {
    run(async {
        let (trigger, shutdown) = cqrs_core::runtime::Shutdown::new();
        drop(trigger);
        assert!(!shutdown.is_requested());
        let waited = tokio::time::timeout(Duration::from_millis(50), shutdown.requested()).await;
        assert!(waited.is_err(), "`requested` completed without a request");
    });
}

/// The health `runtime` reports for `worker`, once it is `expected` (no time passes meanwhile).
async fn health_becomes(runtime: &Runtime, worker: &str, expected: Health) {
    for _ in 0..10_000 {
        if runtime.health().await.components[worker].0 == expected {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!(
        "{worker} is {:?}, not {expected:?}",
        runtime.health().await.components[worker].0
    );
}

/// A periodic job runs at start and then once per interval; a failed run degrades its health
/// until a run succeeds; shutdown stops it.
#[test]
fn a_periodic_job_runs_every_interval_and_reports_failures() {
    run_paused(|| async {
        let (runs_tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
        let mut count = 0;
        let job = move || {
            count += 1;
            let _ = runs_tx.send((count, tokio::time::Instant::now()));
            let result: Result<(), BoxError> = if count == 2 {
                Err("disk full".into())
            } else {
                Ok(())
            };
            async move { result }
        };
        let every = Duration::from_secs(3600);
        let runtime = Runtime::builder()
            .worker(Periodic::new("purge", every, job))
            .start();
        let (first, at_start) = runs.recv().await.unwrap();
        assert_eq!(first, 1, "a run at start");
        health_becomes(&runtime, "purge", Health::Healthy).await;
        let (second, at) = runs.recv().await.unwrap();
        assert_eq!(second, 2);
        assert!(at - at_start >= every, "one interval later");
        health_becomes(&runtime, "purge", Health::Degraded("disk full".into())).await;
        let (third, _) = runs.recv().await.unwrap();
        assert_eq!(third, 3, "tried again at the next interval");
        health_becomes(&runtime, "purge", Health::Healthy).await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(runs.recv().await, None, "no run after shutdown");
    });
}

/// The health `runtime` reports for `worker`, once it is `expected`, letting (paused) time
/// pass meanwhile.
async fn health_turns(runtime: &Runtime, worker: &str, expected: Health) {
    eventually(
        Duration::from_secs(7200),
        &format!("{worker} {expected:?}"),
        || async { (runtime.health().await.components[worker].0 == expected).then_some(()) },
    )
    .await;
}

/// A run that hangs is reported once it goes on past `stall_after`, instead of the last run's
/// health standing; when it ends at last, its outcome is reported.
#[test]
fn a_periodic_run_that_hangs_is_reported() {
    run_paused(|| async {
        let release = Arc::new(tokio::sync::Notify::new());
        let (runs_tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
        let mut count = 0;
        let job = {
            let release = release.clone();
            move || {
                count += 1;
                let _ = runs_tx.send(count);
                let release = release.clone();
                let hangs = count == 2;
                async move {
                    if hangs {
                        release.notified().await;
                    }
                    Ok::<(), BoxError>(())
                }
            }
        };
        let every = Duration::from_secs(10);
        let runtime = Runtime::builder()
            .worker(Periodic::new("purge", every, job))
            .start();
        assert_eq!(runs.recv().await, Some(1));
        health_turns(&runtime, "purge", Health::Healthy).await;
        assert_eq!(
            runs.recv().await,
            Some(2),
            "the second run starts, and hangs"
        );
        let started = tokio::time::Instant::now();
        health_turns(
            &runtime,
            "purge",
            Health::Degraded("a run has been going for over 60s".into()),
        )
        .await;
        assert!(
            started.elapsed() >= Duration::from_secs(60),
            "by default, reported after the longer of the interval and a minute"
        );
        release.notify_one();
        health_turns(&runtime, "purge", Health::Healthy).await;
        assert_eq!(runs.recv().await, Some(3), "and the job goes on");
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// With a timeout, a run that hangs is cancelled and counts as failed; the next run comes at
/// the next interval.
#[test]
fn a_periodic_run_past_its_timeout_is_cancelled() {
    run_paused(|| async {
        let cancelled = Arc::new(AtomicBool::new(false));
        let (runs_tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
        let mut count = 0;
        let job = {
            let cancelled = cancelled.clone();
            move || {
                count += 1;
                let _ = runs_tx.send(count);
                let hangs = count == 1;
                // Dropped only when the run is: it never finishes.
                let on_drop = hangs.then(|| SetOnDrop(cancelled.clone()));
                async move {
                    let _on_drop = on_drop;
                    if hangs {
                        std::future::pending::<()>().await;
                    }
                    Ok::<(), BoxError>(())
                }
            }
        };
        let runtime = Runtime::builder()
            .worker(
                Periodic::new("purge", Duration::from_secs(10), job)
                    .stall_after(Duration::from_secs(5))
                    .timeout(Duration::from_secs(30)),
            )
            .start();
        assert_eq!(runs.recv().await, Some(1));
        health_turns(
            &runtime,
            "purge",
            Health::Degraded("a run has been going for over 5s".into()),
        )
        .await;
        health_turns(
            &runtime,
            "purge",
            Health::Degraded("the run did not finish within 30s and was cancelled".into()),
        )
        .await;
        assert!(cancelled.load(Ordering::SeqCst), "the hung run was dropped");
        assert_eq!(runs.recv().await, Some(2), "the next run comes");
        health_turns(&runtime, "purge", Health::Healthy).await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A job that panics, making its future or running it, fails that run: the worker is
/// degraded and tries again at the next interval, as after an error. (The panic escaped the
/// worker, which the runtime restarted at its own pace, running the job again at once.)
#[test]
fn a_periodic_job_that_panics_fails_that_run_only() {
    run_paused(|| async {
        let (runs_tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
        let mut count = 0;
        let job = move || {
            count += 1;
            let _ = runs_tx.send((count, tokio::time::Instant::now()));
            assert!(count != 1, "the job panics making run 1");
            let panics = count == 2;
            async move {
                assert!(!panics, "the job panics running run 2");
                Ok::<(), BoxError>(())
            }
        };
        let every = Duration::from_secs(3600);
        let runtime = Runtime::builder()
            .worker(Periodic::new("purge", every, job))
            .start();
        let (first, at_start) = runs.recv().await.unwrap();
        assert_eq!(first, 1);
        health_turns(
            &runtime,
            "purge",
            Health::Degraded("the run panicked: the job panics making run 1".into()),
        )
        .await;
        let (second, at) = runs.recv().await.unwrap();
        assert_eq!(second, 2);
        assert!(at - at_start >= every, "one interval later, not restarted");
        health_turns(
            &runtime,
            "purge",
            Health::Degraded("the run panicked: the job panics running run 2".into()),
        )
        .await;
        let (third, at_third) = runs.recv().await.unwrap();
        assert_eq!(third, 3);
        assert!(at_third - at >= every, "one interval later again");
        health_turns(&runtime, "purge", Health::Healthy).await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// Fails every run, recording when each started.
struct AlwaysFails {
    name: &'static str,
    starts: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
}

#[async_trait]
impl Worker for AlwaysFails {
    fn name(&self) -> &str {
        self.name
    }

    async fn run(&mut self, _ctx: WorkerContext) -> Result<(), BoxError> {
        self.starts
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        Err("always fails".into())
    }
}

/// Returns `Ok` at once, as a one-shot job would.
struct ReturnsAtOnce {
    runs: Arc<AtomicUsize>,
}

#[async_trait]
impl Worker for ReturnsAtOnce {
    fn name(&self) -> &str {
        "one-shot"
    }

    async fn run(&mut self, _ctx: WorkerContext) -> Result<(), BoxError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A worker whose `run` returns `Ok` before shutdown is a worker that stopped: reported
/// `Unhealthy` ("returned before shutdown") and run again after the backoff, as the `Worker`
/// rustdoc says.
#[test]
fn a_worker_that_returns_before_shutdown_is_restarted() {
    run(async {
        let runs = Arc::new(AtomicUsize::new(0));
        let runtime = Runtime::builder()
            .restart_backoff(Duration::from_millis(200), Duration::from_millis(200))
            .worker(ReturnsAtOnce { runs: runs.clone() })
            .start();
        eventually(Duration::from_secs(10), "a second run", || async {
            (runs.load(Ordering::SeqCst) >= 2).then_some(())
        })
        .await;
        eventually(Duration::from_secs(10), "its health", || async {
            let health = runtime.health().await.components["one-shot"].0.clone();
            (health == Health::Unhealthy("returned before shutdown".into())).then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        // It returned `Ok` each time: stopped, whether during a run or its backoff.
        assert_eq!(
            runtime.health().await.components["one-shot"].0,
            Health::Stopped
        );
    });
}

/// An error that keeps its cause out of its message, as `#[source]` and anyhow's context do.
#[derive(Debug)]
struct CouldNotConnect(std::io::Error);

impl std::fmt::Display for CouldNotConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("could not connect to the mail relay")
    }
}

impl std::error::Error for CouldNotConnect {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

struct FailsWithACause;

#[async_trait]
impl Worker for FailsWithACause {
    fn name(&self) -> &str {
        "mailer"
    }

    async fn run(&mut self, _ctx: WorkerContext) -> Result<(), BoxError> {
        Err(CouldNotConnect(std::io::Error::other("connection refused")).into())
    }
}

/// A worker's or a periodic job's error is reported with the causes its message leaves out:
/// "could not connect" alone says what failed, not why.
#[test]
fn a_failure_is_reported_with_its_causes() {
    run(async {
        let runtime = Runtime::builder()
            .restart_backoff(Duration::from_secs(10), Duration::from_secs(10))
            .worker(FailsWithACause)
            .worker(Periodic::new("sender", Duration::from_secs(10), || async {
                Err(CouldNotConnect(std::io::Error::other("connection refused")).into())
            }))
            .start();
        let expected = "could not connect to the mail relay: connection refused";
        eventually(
            Duration::from_secs(10),
            "both failures reported",
            || async {
                let report = runtime.health().await;
                let worker = &report.components["mailer"].0;
                let job = &report.components["sender"].0;
                (*worker == Health::Unhealthy(expected.into())
                    && *job == Health::Degraded(expected.into()))
                .then_some(())
            },
        )
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// Dropping the runtime without `shutdown` fires its signal, so what follows it outside the
/// workers (a realtime hub, an HTTP server) stops instead of waiting for ever.
#[test]
fn dropping_the_runtime_fires_its_shutdown_signal() {
    run(async {
        let runtime = Runtime::builder().start();
        let signal = runtime.shutdown_signal();
        let follower = tokio::spawn(async move { signal.requested().await });
        drop(runtime);
        tokio::time::timeout(Duration::from_secs(10), follower)
            .await
            .expect("the signal fired when the runtime was dropped")
            .unwrap();
    });
}

/// A restart backoff of zero still waits a millisecond between restarts, instead of
/// restarting a failing worker in a tight loop.
#[test]
fn a_zero_restart_backoff_still_waits_between_restarts() {
    run_paused(|| async {
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let runtime = Runtime::builder()
            .restart_backoff(Duration::ZERO, Duration::ZERO)
            .worker(AlwaysFails {
                name: "failing",
                starts: starts.clone(),
            })
            .start();
        eventually(Duration::from_secs(30), "twenty runs", || async {
            (starts.lock().unwrap().len() >= 20).then_some(())
        })
        .await;
        let starts = starts.lock().unwrap().clone();
        for w in starts[1..].windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(1), "{:?}", w[1] - w[0]);
        }
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// Two workers of one name each keep a health of their own (the second as `name#2`), and a
/// worker aborted at shutdown reports `Stopped`, not the last status it set.
#[test]
fn workers_sharing_a_name_and_aborted_workers_report_their_own_health() {
    run(async {
        let dropped = Arc::new(AtomicBool::new(false));
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let runtime = Runtime::builder()
            .restart_backoff(Duration::from_secs(3600), Duration::from_secs(3600))
            .worker(Stuck {
                dropped: dropped.clone(),
            })
            .worker(AlwaysFails {
                name: "stuck",
                starts: starts.clone(),
            })
            // Named like the second one's new name: it becomes `stuck#2#2`.
            .worker(AlwaysFails {
                name: "stuck#2",
                starts,
            })
            .start();
        health_becomes(&runtime, "stuck", Health::Healthy).await;
        eventually(Duration::from_secs(10), "the second one failed", || async {
            let report = runtime.health().await;
            let failed =
                |name: &str| matches!(report.components.get(name), Some((Health::Unhealthy(_), _)));
            (failed("stuck#2") && failed("stuck#2#2")).then_some(())
        })
        .await;
        let err = runtime
            .shutdown(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.workers, ["stuck"], "the one that ignored shutdown");
        assert_eq!(
            runtime.health().await.components["stuck"].0,
            Health::Stopped,
            "aborted, it is stopped"
        );
    });
}

/// A worker boxed as `Box<dyn Worker>` (as plugins contribute them) goes to the runtime as it
/// is, under its own name.
#[test]
fn a_boxed_worker_is_a_worker() {
    run(async {
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let boxed: Box<dyn Worker> = Box::new(AlwaysFails {
            name: "boxed",
            starts: starts.clone(),
        });
        let runtime = Runtime::builder().worker(boxed).start();
        eventually(Duration::from_secs(10), "the boxed worker ran", || async {
            (!starts.lock().unwrap().is_empty()).then_some(())
        })
        .await;
        assert!(runtime.health().await.components.contains_key("boxed"));
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// Ignores shutdown and blocks its thread (a synchronous call that hangs): aborting it cannot
/// drop it until the call returns.
struct BlocksItsThread {
    blocking: Arc<AtomicBool>,
    for_: Duration,
}

#[async_trait]
impl Worker for BlocksItsThread {
    fn name(&self) -> &str {
        "blocks-its-thread"
    }

    async fn run(&mut self, _ctx: WorkerContext) -> Result<(), BoxError> {
        self.blocking.store(true, Ordering::SeqCst);
        std::thread::sleep(self.for_);
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// The grace period bounds the whole shutdown, the wait for aborted runs to be dropped
/// included: a worker blocking its thread does not make it twice as long.
#[test]
fn a_worker_blocking_its_thread_does_not_stretch_the_shutdown_past_its_grace() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    // Long enough that a loaded machine has a wide margin (1.5 s) under the bound, while a
    // second grace period for the drain (6 s in all) is as far over it.
    let grace = Duration::from_secs(3);
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            let blocking = Arc::new(AtomicBool::new(false));
            let workers = Runtime::builder()
                .worker(BlocksItsThread {
                    blocking: blocking.clone(),
                    // Past both grace periods of the old shutdown.
                    for_: grace * 2 + Duration::from_secs(1),
                })
                .start();
            eventually(Duration::from_secs(10), "the worker blocks", || async {
                blocking.load(Ordering::SeqCst).then_some(())
            })
            .await;
            let stopping = std::time::Instant::now();
            let err = workers.shutdown(grace).await.unwrap_err();
            let took = stopping.elapsed();
            assert_eq!(err.workers, ["blocks-its-thread"]);
            assert!(
                took < grace + grace / 2,
                "the shutdown took {took:?} with a grace period of {grace:?}"
            );
        })
        .await
        .expect("the test finished within 20 s");
    });
    // The blocked thread is left to finish its sleep on its own.
    runtime.shutdown_background();
}

/// Its last step, after shutdown was requested, fails (acknowledging what it handled, say).
struct FailsWhileStopping;

#[async_trait]
impl Worker for FailsWhileStopping {
    fn name(&self) -> &str {
        "fails-while-stopping"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        ctx.health.set(Health::Healthy);
        ctx.shutdown.requested().await;
        Err("the last acknowledgement failed".into())
    }
}

/// Keeps the message of every ERROR event, with its fields.
#[derive(Default)]
struct Errors(std::sync::Mutex<Vec<String>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

impl tracing::Subscriber for Errors {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() == tracing::Level::ERROR
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A worker whose run fails after shutdown was requested is logged at error level, naming it
/// and the error, and left unhealthy, not stopped: its in-flight work may come back or be
/// missing. It used to stop without a word, then read as stopped in the health report.
#[test]
fn a_worker_failing_while_it_stops_is_logged() {
    let errors = Arc::new(Errors::default());
    let dispatch = tracing::Dispatch::from(errors.clone());
    // Else a line another test reached first on its own thread could be lost here.
    cqrs_core::testing::scoped_subscribers_see_every_callsite();
    tracing::dispatcher::with_default(&dispatch, || {
        run(async {
            let runtime = Runtime::builder().worker(FailsWhileStopping).start();
            eventually(Duration::from_secs(5), "the worker runs", || async {
                (runtime.health().await.components["fails-while-stopping"].0 == Health::Healthy)
                    .then_some(())
            })
            .await;
            runtime.shutdown(Duration::from_secs(5)).await.unwrap();
            let report = runtime.health().await;
            assert_eq!(
                report.components["fails-while-stopping"].0,
                Health::Unhealthy(
                    "failed while stopping: the last acknowledgement failed".to_owned()
                ),
                "{report:?}"
            );
        });
    });
    let logged = errors.0.lock().unwrap().clone();
    assert!(
        logged.iter().any(|e| e.contains("failed while stopping")
            && e.contains("fails-while-stopping")
            && e.contains("the last acknowledgement failed")),
        "{logged:?}"
    );
}

/// Fails its first run, then runs until shutdown without reporting any health of its own.
struct QuietAfterAFailure {
    runs: Arc<AtomicUsize>,
}

#[async_trait]
impl Worker for QuietAfterAFailure {
    fn name(&self) -> &str {
        "quiet"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        if self.runs.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err("the first run fails".into());
        }
        ctx.shutdown.requested().await;
        Ok(())
    }
}

/// A restarted worker reports `Starting`, not the failure of the run before it: one that
/// reports nothing itself stayed unhealthy for good after it recovered.
#[test]
fn a_restarted_worker_no_longer_reports_the_last_runs_failure() {
    run_paused(|| async {
        let runs = Arc::new(AtomicUsize::new(0));
        let runtime = Runtime::builder()
            .worker(QuietAfterAFailure { runs: runs.clone() })
            .restart_backoff(Duration::from_millis(10), Duration::from_millis(10))
            .start();
        while runs.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        health_becomes(&runtime, "quiet", Health::Starting).await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A health check named like a worker is reported beside it, not over it.
#[test]
fn a_check_named_like_a_worker_does_not_hide_it() {
    run(async {
        let runtime = Runtime::builder()
            .worker(Stuck {
                dropped: Arc::new(AtomicBool::new(false)),
            })
            .check(
                "stuck",
                Arc::new(Fixed(Health::Unhealthy("the check's view".into()))),
                false,
            )
            .start();
        health_becomes(&runtime, "stuck", Health::Healthy).await;
        let report = runtime.health().await;
        assert_eq!(
            report.components["stuck (check)"].0.reason(),
            Some("the check's view"),
            "{report:?}"
        );
        let _ = runtime.shutdown(Duration::from_millis(100)).await;
    });
}

/// Panics when dropped: a guard checking, on drop, that its work finished.
struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("dropped before its work finished");
    }
}

/// A check that never answers and panics when it is dropped unfinished.
struct HangsThenPanicsOnDrop;

#[async_trait]
impl HealthCheck for HangsThenPanicsOnDrop {
    async fn check(&self) -> Health {
        let _guard = PanicsOnDrop;
        std::future::pending().await
    }
}

/// A check cut off at the budget whose future panics as it is dropped is reported as not
/// answering, as any other: the panic does not escape into the readiness endpoint.
#[tokio::test(start_paused = true)]
async fn a_check_that_panics_when_cut_off_is_reported_as_not_answering() {
    let runtime = Runtime::builder()
        .check("mail", Arc::new(HangsThenPanicsOnDrop), false)
        .start();
    let report = runtime.health_within(Duration::from_millis(200)).await;
    assert_eq!(
        report.components["mail"].0.reason(),
        Some("no answer within 200 ms")
    );
}

/// A periodic run cancelled at its timeout whose future panics as it is dropped is a run that
/// timed out (degraded, the next one an interval later), not a panicking worker restarted at
/// once.
#[test]
fn a_periodic_run_that_panics_when_cancelled_still_times_out() {
    run_paused(|| async {
        let (runs_tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
        let mut count = 0;
        let job = move || {
            count += 1;
            let _ = runs_tx.send((count, tokio::time::Instant::now()));
            async move {
                let _guard = PanicsOnDrop;
                std::future::pending::<()>().await;
                Ok::<(), BoxError>(())
            }
        };
        let runtime = Runtime::builder()
            .worker(
                Periodic::new("purge", Duration::from_secs(10), job)
                    .stall_after(Duration::from_secs(20))
                    .timeout(Duration::from_secs(1)),
            )
            .start();
        let (_, first) = runs.recv().await.unwrap();
        health_turns(
            &runtime,
            "purge",
            Health::Degraded("the run did not finish within 1s and was cancelled".into()),
        )
        .await;
        let (second, at) = runs.recv().await.unwrap();
        assert_eq!(second, 2);
        assert!(
            at - first >= Duration::from_secs(10),
            "the next run came after {:?}, not an interval later",
            at - first
        );
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// A shutdown past its grace names and aborts only the workers still running: one that ended
/// by failing while it stopped is not named, and keeps its "failed while stopping" health.
#[test]
fn a_shutdown_past_its_grace_names_only_the_workers_still_running() {
    run_paused(|| async {
        let runtime = Runtime::builder()
            .worker(FailsWhileStopping)
            .worker(Stuck {
                dropped: Arc::default(),
            })
            .start();
        eventually(Duration::from_secs(5), "both run", || async {
            let report = runtime.health().await;
            (report.components["fails-while-stopping"].0 == Health::Healthy
                && report.components["stuck"].0 == Health::Healthy)
                .then_some(())
        })
        .await;
        let err = runtime
            .shutdown(Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err.workers, ["stuck"], "{err}");
        let report = runtime.health().await;
        assert_eq!(
            report.components["fails-while-stopping"].0,
            Health::Unhealthy("failed while stopping: the last acknowledgement failed".into())
        );
        assert_eq!(report.components["stuck"].0, Health::Stopped);
    });
}

/// Finishes its in-flight work 500 ms after shutdown is requested, then returns.
struct Lingering;

#[async_trait]
impl Worker for Lingering {
    fn name(&self) -> &str {
        "lingering"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        ctx.health.set(Health::Healthy);
        ctx.shutdown.requested().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }
}

/// A second `shutdown` whose grace ends while a first call holds the workers, all of which
/// have returned by then (the first call not yet polled again to notice), is a clean stop: not
/// an error naming no worker.
#[test]
fn a_second_shutdown_after_every_worker_returned_is_a_clean_stop() {
    run_paused(|| async {
        let runtime = Runtime::builder().worker(Lingering).start();
        health_becomes(&runtime, "lingering", Health::Healthy).await;
        let first = runtime.shutdown(Duration::from_secs(10));
        tokio::pin!(first);
        // Polled until it holds the workers, then left alone.
        tokio::select! {
            biased;
            first = &mut first => panic!("the first shutdown returned: {first:?}"),
            _ = tokio::task::yield_now() => {}
        }
        let started = tokio::time::Instant::now();
        let second = runtime.shutdown(Duration::from_secs(1)).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "waited its grace"
        );
        assert!(second.is_ok(), "{second:?}");
        first.await.unwrap();
    });
}

/// A worker stopped while it waits out its restart backoff keeps its last run's failure in its
/// health: it did not stop cleanly.
#[test]
fn a_worker_stopped_while_waiting_to_restart_reports_its_failure() {
    run_paused(|| async {
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let runtime = Runtime::builder()
            .restart_backoff(Duration::from_secs(60), Duration::from_secs(60))
            .worker(AlwaysFails {
                name: "failing",
                starts: starts.clone(),
            })
            .start();
        health_becomes(
            &runtime,
            "failing",
            Health::Unhealthy("always fails".into()),
        )
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(starts.lock().unwrap().len(), 1, "not restarted");
        assert_eq!(
            runtime.health().await.components["failing"].0,
            Health::Unhealthy("failed, and stopped before its restart: always fails".into())
        );
    });
}

/// Ignores shutdown; notifies `dropped` when its run is dropped (aborted).
struct StuckTillAborted {
    dropped: Arc<tokio::sync::Notify>,
}

struct NotifyOnDrop(Arc<tokio::sync::Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

#[async_trait]
impl Worker for StuckTillAborted {
    fn name(&self) -> &str {
        "stuck"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        let _guard = NotifyOnDrop(self.dropped.clone());
        ctx.health.set(Health::Healthy);
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// A second `shutdown` whose grace ends after the first call aborted a worker, but before that
/// call recorded it, names the worker as aborted: not a clean stop because none is left
/// running.
/// A runtime running [`StuckTillAborted`], healthy, and what it notifies when aborted.
async fn runtime_with_a_stuck_worker() -> (Runtime, Arc<tokio::sync::Notify>) {
    let dropped = Arc::new(tokio::sync::Notify::new());
    let runtime = Runtime::builder()
        .worker(StuckTillAborted {
            dropped: dropped.clone(),
        })
        .start();
    health_becomes(&runtime, "stuck", Health::Healthy).await;
    (runtime, dropped)
}

/// Polls `shutdown` until it aborted the stuck worker and its run was dropped (`dropped`
/// notified), before the shutdown recorded the abort.
async fn poll_until_aborted<F>(mut shutdown: std::pin::Pin<&mut F>, dropped: &tokio::sync::Notify)
where
    F: std::future::Future,
    F::Output: std::fmt::Debug,
{
    tokio::select! {
        biased;
        () = dropped.notified() => {}
        first = shutdown.as_mut() => panic!("the first shutdown returned: {first:?}"),
    }
}

#[test]
fn a_second_shutdown_while_the_first_records_its_aborts_names_them() {
    run_paused(|| async {
        let (runtime, dropped) = runtime_with_a_stuck_worker().await;
        let first = runtime.shutdown(Duration::from_millis(100));
        tokio::pin!(first);
        // Then left alone: it has not recorded the abort yet.
        poll_until_aborted(first.as_mut(), &dropped).await;
        let err = runtime
            .shutdown(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.workers, ["stuck"], "{err}");
        assert!(err.aborted, "{err}");
        let err = first.await.unwrap_err();
        assert_eq!((err.workers, err.aborted), (vec!["stuck".to_owned()], true));
    });
}

/// A `shutdown` dropped while it waits for the runs it aborted to be dropped (a caller's
/// timeout around it) recorded nothing: a later call found every worker stopped and returned
/// a clean stop, the aborted worker still `Healthy`. It now names the worker as aborted.
#[test]
fn a_shutdown_after_one_dropped_while_it_aborted_names_the_aborted() {
    run_paused(|| async {
        let (runtime, dropped) = runtime_with_a_stuck_worker().await;
        {
            let first = runtime.shutdown(Duration::from_millis(100));
            tokio::pin!(first);
            // Then dropped itself, before it recorded the abort.
            poll_until_aborted(first.as_mut(), &dropped).await;
        }
        let err = runtime
            .shutdown(Duration::from_secs(1))
            .await
            .expect_err("not a clean stop");
        assert_eq!(
            (err.workers.clone(), err.aborted),
            (vec!["stuck".to_owned()], true),
            "{err}"
        );
        assert_eq!(
            runtime.health().await.components["stuck"].0,
            Health::Stopped
        );
        let again = runtime.shutdown(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(again.workers, ["stuck"], "{again}");
    });
}

/// A periodic job whose worker starts with its shutdown already asked for (a runtime stopped
/// as soon as it started) does not run: it ran once, holding the grace for a whole job.
#[test]
fn a_periodic_job_asked_to_stop_before_its_first_run_does_not_run() {
    run_paused(|| async {
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let job = {
            let runs = runs.clone();
            move || {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<(), BoxError>(()) }
            }
        };
        let runtime = Runtime::builder()
            .worker(Periodic::new("purge", Duration::from_secs(3600), job))
            .start();
        // On this current-thread runtime the worker's task has not run yet.
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0);
    });
}

/// Logs `marker` at each run; the first run fails.
struct Logs {
    marker: String,
    runs: Arc<AtomicUsize>,
}

#[async_trait]
impl Worker for Logs {
    fn name(&self) -> &str {
        "logs"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        tracing::info!(marker = %self.marker, "a line of the worker's");
        if self.runs.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err("the first run fails".into());
        }
        ctx.health.set(Health::Healthy);
        ctx.shutdown.requested().await;
        Ok(())
    }
}

/// Every line a worker logs is inside a `worker` span that names it (a consume loop's
/// warnings do not name their worker themselves), and each restart is counted in
/// `cqrs_worker_restarts_total{worker}`.
#[test]
fn a_workers_lines_carry_its_name_and_its_restarts_are_counted() {
    use cqrs_core::reexports::metrics::with_local_recorder;
    let (spans, events) = crate::the_tracing_layer_opens_a_span_per_dispatch::recorder();
    let counts = cqrs_core::testing::MetricCounts::default();
    let marker = cqrs_core::testing::test_id("worker_span");
    with_local_recorder(&counts, || {
        run(async {
            let runs = Arc::new(AtomicUsize::new(0));
            let runtime = Runtime::builder()
                .restart_backoff(Duration::from_millis(1), Duration::from_millis(5))
                .worker(Logs {
                    marker: marker.clone(),
                    runs: runs.clone(),
                })
                .start();
            eventually(Duration::from_secs(5), "a second run", || async {
                (runtime.health().await.components["logs"].0 == Health::Healthy).then_some(())
            })
            .await;
            runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        })
    });
    let in_spans: Vec<usize> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|(fields, _)| fields.get("marker") == Some(&marker))
        .map(|(_, span)| span.expect("logged inside a span"))
        .collect();
    assert_eq!(in_spans.len(), 2, "one line per run");
    let spans = spans.lock().unwrap();
    for span in in_spans {
        let (name, fields) = &spans[span];
        assert_eq!(name, "worker");
        assert_eq!(fields.get("worker").map(String::as_str), Some("logs"));
    }
    assert_eq!(counts.get("cqrs_worker_restarts_total{worker=logs}"), 1);
}
