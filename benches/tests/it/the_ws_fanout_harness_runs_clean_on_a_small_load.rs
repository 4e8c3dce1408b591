//! The WebSocket fan-out harness (`src/bin/ws_fanout.rs`) runs end to end on a small load, so
//! it does not rot between measurements: the hub starts, every client subscribes and gets
//! every event once, and the report is printed. A run that lost a delivery would exit with a
//! failure naming it. Speed is not checked here (docs/benchmarks.md has the figures).

#[test]
fn the_ws_fanout_harness_runs_clean_on_a_small_load() {
    for raw in [false, true] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ws_fanout"));
        command.args(["--connections", "20", "--events", "5", "--rate", "50"]);
        if raw {
            command.arg("--raw");
        }
        let output = command.output().expect("the harness runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "raw {raw}:\n{stdout}\n{stderr}");
        for line in [
            "connections held        20 (0 failed to subscribe)",
            "deliveries              100 of 100",
            "missing                 0",
            "duplicates              0",
        ] {
            assert!(stdout.contains(line), "raw {raw}: no `{line}` in\n{stdout}");
        }
    }
}
