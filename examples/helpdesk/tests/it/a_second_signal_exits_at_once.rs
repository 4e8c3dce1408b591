//! SIGINT or SIGTERM starts a graceful stop; a second one, while that stop waits, exits at once
//! with the customary code (128 + the signal's number).
#![cfg(unix)]

use crate::support::*;
use std::time::Duration;

fn kill(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

fn second_signal_exits_with(signal: &str, code: i32) {
    // A grace period far longer than the test's patience: only the second signal ends it.
    let (mut child, lines, addr) = serving(
        &[
            "--shutdown-grace-ms",
            "600000",
            "--request-timeout-ms",
            "600000",
        ],
        &[],
    );
    // A request in flight, so that the first signal's stop waits.
    let held = held_request(addr);
    let pid = child.0.id();
    kill(pid, signal);
    line_with(&lines, "shutting down");
    kill(pid, signal);
    let (status, stderr) = exit_of(&mut child, Duration::from_secs(30));
    drop(held);
    assert_eq!(status.code(), Some(code), "{status:?} {stderr}");
}

/// One signal, and nothing in flight: the stop finishes, says so, and exits with 0.
#[test]
fn a_graceful_stop_says_it_finished_and_exits_with_0() {
    let mut child = Running(
        helpdesk_command(&["--bind", "127.0.0.1:0", "--log-format", "json"], &[])
            .spawn()
            .unwrap(),
    );
    let lines = stdout_lines(&mut child);
    line_with(&lines, "helpdesk listening");
    kill(child.0.id(), "TERM");
    line_with(&lines, "shutting down");
    let stopped: serde_json::Value = serde_json::from_str(&line_with(&lines, "stopped")).unwrap();
    assert_eq!(stopped["level"], "INFO", "{stopped}");
    assert_eq!(stopped["fields"]["message"], "stopped", "{stopped}");
    let (status, stderr) = exit_of(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status:?} {stderr}");
}

#[test]
fn a_second_sigint_exits_with_130() {
    second_signal_exits_with("INT", 130);
}

#[test]
fn a_second_sigterm_exits_with_143() {
    second_signal_exits_with("TERM", 143);
}
