//! `Config::default()` is the built-in defaults whatever the process's environment holds: a
//! stray variable neither changes them nor (a bad value) ends the test binary.

use helpdesk::Config;

#[test]
fn the_defaults_are_the_built_in_ones() {
    let config = Config::default();
    assert_eq!(config.bind.to_string(), "127.0.0.1:8080");
    assert_eq!(config.database_url, None);
    assert_eq!(config.redis_url, None);
    assert_eq!(config.jwt_secret, None);
    assert_eq!(config.token_ttl_seconds, 3600);
    assert_eq!(config.shutdown_grace_ms, 15_000);
    // And they pass the check, whatever `PG*` variables the shell holds (below): the schema
    // is checked against a URL of its own, not the environment's TLS settings.
    config.validate().expect("the built-in defaults are valid");
}

/// The test above, in a copy of this test binary whose environment holds stray and bad values
/// (this process's environment is left alone: other tests run in it).
#[test]
fn stray_variables_change_nothing() {
    let name = concat!(module_path!(), "::the_defaults_are_the_built_in_ones");
    let name = name.split_once("::").map_or(name, |(_, rest)| rest);
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1"])
        .env("HELPDESK_TOKEN_TTL", "abc")
        .env("HELPDESK_BIND", "not an address")
        .env("DATABASE_URL", "postgres://stray@nowhere/helpdesk")
        .env("HELPDESK_SHUTDOWN_GRACE_MS", "5")
        // Left in a shell for another database: not the schema's business.
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", "/nonexistent/helpdesk-test/root.crt")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("1 passed"), "{stdout}");
}
