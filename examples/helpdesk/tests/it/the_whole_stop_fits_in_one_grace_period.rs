//! The grace period bounds the whole stop: in-flight requests, WebSocket close frames and the
//! background workers share one deadline instead of getting a grace period each; and the
//! requests do not use it all up: a share is kept for the workers to stop in.

use crate::support::*;
use cqrs_core::BoxError;
use cqrs_core::runtime::{Worker, WorkerContext};
use helpdesk::{Hooks, Server};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A worker that never stops: it ignores the shutdown it is asked for.
struct Stubborn(Arc<AtomicBool>);

#[async_trait::async_trait]
impl Worker for Stubborn {
    fn name(&self) -> &str {
        "stubborn"
    }

    async fn run(&mut self, _ctx: WorkerContext) -> Result<(), BoxError> {
        self.0.store(true, Ordering::SeqCst);
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_and_a_stubborn_worker_together_wait_one_grace_period() {
    within(async {
        let backend = Backend::from_env().await;
        // Long enough that the bound below leaves a loaded machine a wide margin (3 s) while a
        // grace period per phase (at least 6 s) still fails.
        let grace = Duration::from_millis(3_000);
        let mut config = test_config(&backend);
        config.shutdown_grace_ms = grace.as_millis() as u64;
        // The request is cut off by the stop, not by its own time budget.
        config.request_timeout_ms = 60_000;
        let running = Arc::new(AtomicBool::new(false));
        let flag = running.clone();
        let server = Server::start(
            config,
            Hooks {
                workers: vec![Arc::new(move || Box::new(Stubborn(flag.clone())))],
                ..Hooks::default()
            },
        )
        .await
        .unwrap();
        wait_until("the stubborn worker runs", Duration::from_secs(10), || {
            running.load(Ordering::SeqCst)
        })
        .await;
        let took = stop_holding_a_request(server).await;
        // The request was held until the workers' share (a quarter, here) was all that was
        // left; then the worker until the end. A grace period each made it two at least (three
        // with a WebSocket that would not close).
        assert!(
            took >= grace * 3 / 4,
            "the stop took {took:?}: the request was not held"
        );
        assert!(
            took < grace * 2,
            "the stop took {took:?}, a grace period per phase (of {grace:?})"
        );
        backend.clean_up().await;
    })
    .await;
}

/// Waits for shutdown, then takes a while to stop (as a consumer releasing what it holds):
/// records that it saw the request and that it got to finish.
struct Orderly {
    running: Arc<AtomicBool>,
    asked: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    takes: Duration,
}

#[async_trait::async_trait]
impl Worker for Orderly {
    fn name(&self) -> &str {
        "orderly"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        self.running.store(true, Ordering::SeqCst);
        ctx.shutdown.requested().await;
        self.asked.store(true, Ordering::SeqCst);
        tokio::time::sleep(self.takes).await;
        self.finished.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_to_the_end_leaves_the_workers_their_share() {
    within(async {
        let backend = Backend::from_env().await;
        // The workers' share is a quarter of this (1 s); the worker needs a tenth of that, a
        // wide margin on a loaded machine, where before it got nothing at all.
        let grace = Duration::from_millis(4_000);
        let takes = Duration::from_millis(100);
        let mut config = test_config(&backend);
        config.shutdown_grace_ms = grace.as_millis() as u64;
        config.request_timeout_ms = 60_000;
        let [running, asked, finished] = [(); 3].map(|()| Arc::new(AtomicBool::new(false)));
        let flags = (running.clone(), asked.clone(), finished.clone());
        let server = Server::start(
            config,
            Hooks {
                workers: vec![Arc::new(move || {
                    Box::new(Orderly {
                        running: flags.0.clone(),
                        asked: flags.1.clone(),
                        finished: flags.2.clone(),
                        takes,
                    })
                })],
                ..Hooks::default()
            },
        )
        .await
        .unwrap();
        wait_until("the worker runs", Duration::from_secs(10), || {
            running.load(Ordering::SeqCst)
        })
        .await;
        let took = stop_holding_a_request(server).await;
        assert!(
            asked.load(Ordering::SeqCst),
            "the worker was aborted without being asked to stop (the stop took {took:?})"
        );
        assert!(
            finished.load(Ordering::SeqCst),
            "the worker was cut off while stopping (the stop took {took:?})"
        );
        assert!(
            took >= grace / 2,
            "the stop took {took:?}: the request was not held"
        );
        assert!(
            took < grace * 3 / 2,
            "the stop took {took:?}, more than the grace period of {grace:?}"
        );
        backend.clean_up().await;
    })
    .await;
}

/// Stops `server` while one of its requests is held open (its body never sent); how long the
/// stop took.
async fn stop_holding_a_request(server: Server) -> Duration {
    let addr = server.addr();
    let held = tokio::task::spawn_blocking(move || held_request(addr))
        .await
        .unwrap();
    let stopping = Instant::now();
    server.shutdown().await.unwrap();
    let took = stopping.elapsed();
    drop(held);
    took
}

/// With a shutdown delay, a stop turns `/ready` to 503 `stopping` at once and goes on serving,
/// new connections too, until the delay is over (load balancers move traffic away first), each
/// answer closing its connection; a second stop cuts the delay short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_a_delay_turns_unready_and_serves_on_meanwhile() {
    within(async {
        let mut s = TestServer::start_with(|c| c.shutdown_delay_ms = 600_000).await;
        let (token, _) = s.customer().await;
        let ready = s.send(reqwest::Method::GET, "/ready", None, None).await;
        assert_eq!(ready.status, reqwest::StatusCode::OK, "{ready:?}");
        let server = s.server.take().unwrap();
        server.stopper()();
        let unready =
            cqrs_core::testing::eventually(Duration::from_secs(10), "/ready turns 503", || async {
                let r = s.send(reqwest::Method::GET, "/ready", None, None).await;
                (r.status == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(r)
            })
            .await;
        assert_eq!(unready.body["status"], "stopping", "{unready:?}");
        // Still served, on a new connection too.
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let r = fresh.get(s.url("/health")).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        // Each answer closes its connection, so a client that keeps connections alive (a
        // proxy's pool) connects again, and the load balancer sends it elsewhere.
        assert_eq!(
            r.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "{:?}",
            r.headers()
        );
        let t = s.ticket(&token, "opened while draining").await;
        assert_eq!(t["title"], "opened while draining");
        // The second stop: well before the ten minutes are over.
        server.shutdown().await.expect("a clean stop");
        let refused = fresh.get(s.url("/health")).send().await;
        assert!(
            refused.is_err(),
            "still listening after the stop: {refused:?}"
        );
        s.stop().await;
    })
    .await;
}

/// The stop begins once the delay is over: it takes the delay, and then at most one grace
/// period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_a_delay_ends_after_it() {
    within(async {
        let (delay, grace) = (Duration::from_millis(1_500), Duration::from_millis(3_000));
        let mut s = TestServer::start_with(|c| {
            c.shutdown_delay_ms = delay.as_millis() as u64;
            c.shutdown_grace_ms = grace.as_millis() as u64;
        })
        .await;
        let server = s.server.take().unwrap();
        let began = Instant::now();
        server.shutdown().await.expect("a clean stop");
        let took = began.elapsed();
        assert!(
            took >= delay,
            "stopped after {took:?}, before the delay was over"
        );
        // A margin of three quarters of the grace period for a loaded machine.
        assert!(
            took < delay + grace * 7 / 4,
            "the stop took {took:?}: more than the delay and one grace period"
        );
        let refused = s.http.get(s.url("/health")).send().await;
        assert!(
            refused.is_err(),
            "still listening after the stop: {refused:?}"
        );
        s.stop().await;
    })
    .await;
}
