//! A panic reaches the logs as one `error` event with its message, location and thread,
//! not as loose text on standard error, which a collector reading the JSON logs on standard
//! output never saw (found by a plugin author's walk: a handler's panic, caught by the
//! framework, printed its raw message and backtrace outside the logs).
//!
//! A request handler's panic, which the gateway catches to answer 500, is that one line too,
//! not one more from the catch (a review found two).
//!
//! The hook is the process's: the test runs itself again in a child process that installs it,
//! so this binary's other tests keep the default hook.

use crate::a_panicking_handler_is_a_json_500_and_the_server_keeps_serving::{
    PANIC_TEXT, panicking_routes,
};
use crate::support::{Backend, TestServer};
use serde_json::Value;

const CHILD: &str = "HELPDESK_TEST_PANIC_CHILD";
const NAME: &str =
    "panics_reach_the_logs_as_one_error_line::a_panic_is_one_error_line_in_the_json_logs";

#[test]
fn a_panic_is_one_error_line_in_the_json_logs() {
    if let Some(filter) = std::env::var_os(CHILD) {
        let subscriber = helpdesk::log_subscriber(
            helpdesk::LogFormat::Json,
            tracing_subscriber::EnvFilter::new(filter.to_str().unwrap()),
            false,
            std::io::stdout,
        );
        tracing::subscriber::set_global_default(subscriber).unwrap();
        helpdesk::log_panics();
        let worker = std::thread::Builder::new().name("worker-7".into());
        let panicked = worker.spawn(|| panic!("told to panic")).unwrap().join();
        assert!(panicked.is_err());
        // A request handler's panic, in memory.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let s = TestServer::start_with_hooks(Backend::Memory, panicking_routes(), |_| {}).await;
            let r = s
                .send(reqwest::Method::GET, "/test-panics/plain", None, None)
                .await;
            assert_eq!(
                r.status,
                reqwest::StatusCode::INTERNAL_SERVER_ERROR,
                "{r:?}"
            );
            s.stop().await;
        });
        return;
    }
    let (stdout, stderr) = child("info");
    let events: Vec<Value> = stdout
        .lines()
        // The harness prints its `test ... ` before the line, without a line break.
        .filter_map(|line| serde_json::from_str::<Value>(&line[line.find('{')?..]).ok())
        .collect();
    let errors: Vec<&Value> = events.iter().filter(|e| e["level"] == "ERROR").collect();
    assert_eq!(
        errors.len(),
        2,
        "one error line per panic, the thread's and the handler's:\n{stdout}"
    );
    let handlers: Vec<&&Value> = errors
        .iter()
        .filter(|e| e["fields"]["panic.message"] == PANIC_TEXT)
        .collect();
    assert_eq!(handlers.len(), 1, "the handler's panic:\n{stdout}");
    assert_eq!(handlers[0]["fields"]["message"], "panicked", "{stdout}");
    assert!(
        handlers[0]["span"]["request_id"].is_string(),
        "in the request's span: {}",
        handlers[0]
    );
    let lines: Vec<&&Value> = errors
        .iter()
        .filter(|e| e["fields"]["panic.message"] == "told to panic")
        .collect();
    assert_eq!(lines.len(), 1, "one line:\n{stdout}");
    let event = lines[0];
    assert_eq!(event["level"], "ERROR", "{event}");
    assert_eq!(event["fields"]["panic.message"], "told to panic", "{event}");
    assert_eq!(event["fields"]["thread"], "worker-7", "{event}");
    let location = event["fields"]["panic.location"]
        .as_str()
        .unwrap_or_default();
    assert!(
        location.contains("panics_reach_the_logs_as_one_error_line.rs:"),
        "{event}"
    );
    assert!(
        !stderr.contains("told to panic"),
        "not on standard error:\n{stderr}"
    );

    // A filter that leaves the target `panic` out: the default hook's text instead, never
    // nothing.
    let (stdout, stderr) = child("helpdesk_tickets=debug");
    assert!(!stdout.contains("panicked"), "{stdout}");
    assert!(
        stderr.contains("told to panic"),
        "on standard error:\n{stderr}"
    );
}

/// Runs this test again in a child process whose logs pass `filter`; its output.
fn child(filter: &str) -> (String, String) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD, filter)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "the child failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}
