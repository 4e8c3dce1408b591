//! A port already taken is found before anything starts: no connection, no migration, no
//! worker started only to be killed mid-run; the error says what to do, and the binary exits
//! with 1.

use crate::support::*;
use cqrs_core::BoxError;
use cqrs_core::runtime::{Worker, WorkerContext};
use helpdesk::{Hooks, Server};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

struct Idle;

#[async_trait::async_trait]
impl Worker for Idle {
    fn name(&self) -> &str {
        "idle"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        ctx.shutdown.requested().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_is_bound_before_the_app_is_built() {
    within(async {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let backend = Backend::from_env().await;
        let mut config = test_config(&backend);
        config.bind = addr;
        let built = Arc::new(AtomicBool::new(false));
        let flag = built.clone();
        let err = Server::start(
            config,
            Hooks {
                workers: vec![Arc::new(move || {
                    flag.store(true, Ordering::SeqCst);
                    Box::new(Idle)
                })],
                ..Hooks::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains(&format!("cannot listen on {addr}: ")), "{err}");
        assert!(
            err.contains("(set --bind / HELPDESK_BIND to another address)"),
            "{err}"
        );
        assert!(
            !built.load(Ordering::SeqCst),
            "the app was built (its workers made) before the port was found taken"
        );
        backend.clean_up().await;
    })
    .await;
}

#[test]
fn the_binary_names_the_taken_port_and_exits_with_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = Running(helpdesk_command(&["--bind", &addr], &[]).spawn().unwrap());
    let (status, stderr) = exit_of(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("helpdesk: cannot listen on {addr}: "))
            && stderr.contains("set --bind / HELPDESK_BIND to another address"),
        "{stderr}"
    );
}

/// With JSON logs (read by a collector from standard output), the reason the process exits is
/// logged there too, as a JSON line: it used to go to standard error alone.
#[test]
fn with_json_logs_the_failure_is_logged_on_standard_output() {
    use std::io::Read;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = Running(
        helpdesk_command(&["--bind", &addr, "--log-format", "json"], &[])
            .spawn()
            .unwrap(),
    );
    let (status, stderr) = exit_of(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    let mut stdout = String::new();
    child
        .0
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .unwrap();
    let logged = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no ERROR line on stdout:\n{stdout}"));
    let error = logged["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("cannot listen on {addr}")),
        "{logged}"
    );
}

/// The reason a start failed says each cause once: the framework's errors name their cause in
/// their own message, and the whole chain printed as it was repeated it once per level (a
/// refused Postgres connect read three times over).
#[test]
fn a_failed_start_says_each_cause_once() {
    // Nothing listens on port 1: the connect is refused at once.
    let mut child = Running(
        helpdesk_command(
            &["--bind", "127.0.0.1:0"],
            &[
                ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/test"),
                (
                    "HELPDESK_JWT_SECRET",
                    "a-test-secret-that-is-at-least-32-bytes-long",
                ),
            ],
        )
        .spawn()
        .unwrap(),
    );
    let (status, stderr) = exit_of(&mut child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot connect to Postgres (DATABASE_URL)"),
        "{stderr}"
    );
    assert_eq!(
        stderr
            .matches("could not connect to postgres at 127.0.0.1:1")
            .count(),
        1,
        "{stderr}"
    );
}
