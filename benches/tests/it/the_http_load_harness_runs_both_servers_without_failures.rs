//! The HTTP load harness (`src/bin/http_load.rs`) runs end to end on a tiny load, so it does
//! not rot between measurements: both servers start, every request opens a ticket, and the
//! summary is printed. Speed is not checked here (docs/benchmarks.md has the figures).

#[test]
fn the_http_load_harness_runs_both_servers_without_failures() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_http_load"))
        .args(["--connections", "2", "--seconds", "1", "--rounds", "1"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("the harness runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for server in ["framework:", "baseline: "] {
        let line = stdout
            .lines()
            .find(|l| l.contains(server))
            .unwrap_or_else(|| panic!("no line for {server}\n{stdout}"));
        assert!(line.contains(", 0 failed)"), "{line}");
        // Tickets were made: "(N in", N above zero (the rate is rounded, and a loaded
        // machine's few tickets over a long catch-up could print 0 tickets/s).
        let made = line
            .split_once(" tickets/s (")
            .and_then(|(_, rest)| rest.split_once(" in "))
            .and_then(|(n, _)| n.parse::<u64>().ok());
        assert!(made.is_some_and(|n| n > 0), "{line}");
    }
    assert!(stdout.contains("median framework / baseline"), "{stdout}");
}
