//! Settings a deployment gets wrong in practice: each refused with what is expected, or
//! accepted with a warning the server logs at start (`Config::warnings`).

use crate::support::{Running, helpdesk_command, line_with, stdout_lines};
use helpdesk::Config;

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

fn parsed(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
    let args = std::iter::once("helpdesk").chain(args.iter().copied());
    Config::try_parse_with_env(args, env.iter().copied()).map_err(|e| e.to_string())
}

fn config(args: &[&str], env: &[(&str, &str)]) -> Config {
    parsed(args, env).unwrap_or_else(|e| panic!("{args:?} {env:?}: {e}"))
}

#[test]
fn ready_details_takes_yes_or_no_words_and_refuses_others() {
    for (value, on) in [("true", true), ("yes", true), ("on", true), ("1", true)] {
        assert_eq!(
            config(&[], &[("HELPDESK_READY_DETAILS", value)]).ready_details,
            on
        );
    }
    for value in ["false", "no", "off", "0"] {
        assert!(!config(&[], &[("HELPDESK_READY_DETAILS", value)]).ready_details);
    }
    assert!(config(&["--ready-details"], &[]).ready_details);
    // Once any word but `false`, `no`, `off` and `0` turned the details on: `disabled` too.
    for value in ["disabled", "nope"] {
        let error = parsed(&[], &[("HELPDESK_READY_DETAILS", value)]).unwrap_err();
        assert!(error.contains("HELPDESK_READY_DETAILS"), "{value}: {error}");
    }
}

#[test]
fn an_address_without_an_ip_says_what_is_expected() {
    for bind in ["localhost:8080", "8080", ":8080"] {
        let error = parsed(&[], &[("HELPDESK_BIND", bind)]).unwrap_err();
        assert!(
            error.contains("like 127.0.0.1:8080") && error.contains("HELPDESK_BIND"),
            "{bind}: {error}"
        );
    }
    assert_eq!(
        config(&[], &[("HELPDESK_BIND", "[::1]:9000")]).bind,
        "[::1]:9000".parse().unwrap()
    );
}

#[test]
fn trusted_proxies_may_be_listed_with_spaces_and_as_ranges() {
    let c = config(
        &[],
        &[(
            "HELPDESK_TRUSTED_PROXIES",
            "127.0.0.1, ::1, 10.0.0.0/8, 2001:db8::/32",
        )],
    );
    let listed: Vec<String> = c.trusted_proxies.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        listed,
        ["127.0.0.1/32", "::1/128", "10.0.0.0/8", "2001:db8::/32"]
    );
    for (value, said) in [
        ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
        ("10.0.0.0/33", "at most 32 for an IPv4 address"),
        ("proxy.internal", "is no IP address or range"),
    ] {
        let error = parsed(&[], &[("HELPDESK_TRUSTED_PROXIES", value)]).unwrap_err();
        assert!(error.contains(said), "{value}: {error}");
        assert!(
            error.contains("HELPDESK_TRUSTED_PROXIES"),
            "{value}: {error}"
        );
    }
}

#[test]
fn redis_settings_are_checked_before_anything_connects() {
    let postgres = ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let problems = config(
        &[],
        &[
            postgres,
            ("HELPDESK_JWT_SECRET", SECRET),
            ("REDIS_URL", "redis://cache:99999"),
        ],
    )
    .validate()
    .unwrap_err();
    assert!(
        problems.len() == 1
            && problems[0].contains("REDIS_URL")
            && problems[0].contains("not a redis url"),
        "{problems:?}"
    );
    let missing = "/nonexistent/helpdesk-test/ca.pem";
    let problems = config(
        &[],
        &[
            postgres,
            ("HELPDESK_JWT_SECRET", SECRET),
            ("REDIS_URL", "rediss://cache:6380"),
            ("REDIS_TLS_CA_FILE", missing),
        ],
    )
    .validate()
    .unwrap_err();
    assert!(
        problems.len() == 1 && problems[0].contains(&format!("`{missing}` cannot be read")),
        "{problems:?}"
    );
}

/// Settings that parse but do not go together exit with 2, as those that do not parse do
/// (clap's code): a supervisor reads 2 as "fix the settings", not "restart".
#[test]
fn the_binary_exits_with_2_on_settings_that_do_not_go_together() {
    for (env, expected) in [
        (
            &[("REDIS_URL", "redis://127.0.0.1:6379")][..],
            "REDIS_URL (--redis-url) is set without DATABASE_URL",
        ),
        (&[("HELPDESK_POLL_MS", "x")][..], "invalid value 'x'"),
    ] {
        let mut child = Running(
            helpdesk_command(&["--bind", "127.0.0.1:0"], env)
                .spawn()
                .unwrap(),
        );
        let (status, stderr) =
            crate::support::exit_of(&mut child, std::time::Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(expected), "{env:?}: {stderr}");
    }
}

/// With JSON logs asked for, a setting that does not parse is said on standard output too, as
/// one JSON error line: a log collector reads standard output only, and saw a restart loop
/// with exit code 2 and no reason.
#[test]
fn a_setting_that_does_not_parse_is_a_json_line_when_json_logs_are_asked() {
    for (args, env) in [
        (
            &["--bind", "127.0.0.1:0"][..],
            &[("HELPDESK_LOG_FORMAT", "json"), ("HELPDESK_POLL_MS", "x")][..],
        ),
        (
            &["--bind", "127.0.0.1:0", "--log-format", "json"][..],
            &[("HELPDESK_POLL_MS", "x")][..],
        ),
    ] {
        let mut child = Running(helpdesk_command(args, env).spawn().unwrap());
        let lines = stdout_lines(&mut child);
        let (status, stderr) =
            crate::support::exit_of(&mut child, std::time::Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{env:?}: {stderr}");
        let said: serde_json::Value =
            serde_json::from_str(&line_with(&lines, "bad settings")).unwrap();
        assert_eq!(said["level"], "ERROR", "{said}");
        let error = said["fields"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("invalid value 'x'") && error.contains("poll-ms"),
            "{said}"
        );
    }
}

#[test]
fn the_pool_size_is_a_setting_with_room_for_the_workers() {
    let postgres = ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let secret = ("HELPDESK_JWT_SECRET", SECRET);
    assert_eq!(config(&[], &[]).database_max_connections, 16);
    let c = config(
        &[],
        &[
            postgres,
            secret,
            ("HELPDESK_DATABASE_MAX_CONNECTIONS", "25"),
        ],
    );
    assert_eq!(c.database_max_connections, 25);
    c.validate().unwrap();
    // Two relays each hold a connection for LISTEN for good, and the other workers up to six
    // more: a smaller pool leaves requests waiting.
    for size in ["0", "2", "9"] {
        let problems = config(
            &[],
            &[
                postgres,
                secret,
                ("HELPDESK_DATABASE_MAX_CONNECTIONS", size),
            ],
        )
        .validate()
        .unwrap_err();
        assert!(
            problems.len() == 1
                && problems[0].contains("HELPDESK_DATABASE_MAX_CONNECTIONS (--database-max-connections) must be 10 to 10000")
                && problems[0].contains("LISTEN"),
            "{size}: {problems:?}"
        );
    }
    // In memory there is no pool: the setting is not checked.
    config(&[], &[("HELPDESK_DATABASE_MAX_CONNECTIONS", "2")])
        .validate()
        .unwrap();
}

/// The hashes at once are a setting (default: the auth plugin's, two per core up to 16); zero
/// and absurd figures are refused with what to set.
#[test]
fn the_hashes_at_once_are_a_bounded_setting() {
    assert_eq!(config(&[], &[]).max_concurrent_hashes, None);
    let c = config(&[], &[("HELPDESK_MAX_CONCURRENT_HASHES", "3")]);
    assert_eq!(c.max_concurrent_hashes, Some(3));
    c.validate().unwrap();
    for n in ["0", "1025"] {
        let problems = config(&[], &[("HELPDESK_MAX_CONCURRENT_HASHES", n)])
            .validate()
            .unwrap_err();
        assert!(
            problems.len() == 1
                && problems[0].contains(
                    "HELPDESK_MAX_CONCURRENT_HASHES (--max-concurrent-hashes) must be 1 to 1024"
                ),
            "{n}: {problems:?}"
        );
    }
}

#[test]
fn the_defaults_give_no_warning() {
    assert_eq!(config(&[], &[]).warnings(), Vec::<String>::new());
}

#[test]
fn secrets_given_as_flags_are_warned_about_and_as_variables_are_not() {
    let c = config(
        &[
            "--jwt-secret",
            SECRET,
            "--database-url",
            "postgres://app:hunter2@db/helpdesk",
        ],
        &[],
    );
    let warnings = c.warnings().join("\n");
    for flag in ["--jwt-secret", "--database-url"] {
        assert!(
            warnings.contains(&format!("{flag} was given on the command line")),
            "{flag}: {warnings}"
        );
    }
    assert!(
        !warnings.contains("hunter2") && !warnings.contains(SECRET),
        "{warnings}"
    );
    // A URL without a password is no secret; the same secret from its variable is fine.
    let c = config(
        &["--database-url", "postgres://app@db/helpdesk"],
        &[("HELPDESK_JWT_SECRET", SECRET)],
    );
    assert!(
        !c.warnings().iter().any(|w| w.contains("command line")),
        "{:?}",
        c.warnings()
    );
}

#[test]
fn deployment_settings_without_a_database_warn_that_it_runs_in_memory() {
    // `DATABASE_URL=` (an empty variable from a compose file) counts as unset.
    let c = config(
        &[],
        &[("HELPDESK_JWT_SECRET", SECRET), ("DATABASE_URL", "")],
    );
    let warnings = c.warnings();
    assert!(
        warnings.len() == 1
            && warnings[0].contains("HELPDESK_JWT_SECRET is set, but DATABASE_URL is not")
            && warnings[0].contains("nothing it is told survives a restart"),
        "{warnings:?}"
    );
}

/// A server listening beyond this host with no metrics token is warned that `/metrics`
/// answers anyone; with a token, or on loopback, it is not. A weak token is refused, and one
/// given as a flag is warned about like the other secrets.
#[test]
fn an_open_metrics_endpoint_beyond_this_host_is_warned_about() {
    let database = ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let open = config(&["--bind", "0.0.0.0:8080"], &[database]);
    let warnings = open.warnings();
    assert!(
        warnings.len() == 1
            && warnings[0].contains("0.0.0.0:8080")
            && warnings[0].contains("GET /metrics answers anyone")
            && warnings[0].contains("HELPDESK_METRICS_TOKEN"),
        "{warnings:?}"
    );
    let token = ("HELPDESK_METRICS_TOKEN", "0123456789abcdef");
    let guarded = config(&["--bind", "0.0.0.0:8080"], &[database, token]);
    assert_eq!(guarded.warnings(), Vec::<String>::new());
    assert_eq!(config(&[], &[database]).warnings(), Vec::<String>::new());
    let weak = config(
        &[],
        &[
            database,
            ("HELPDESK_JWT_SECRET", SECRET),
            ("HELPDESK_METRICS_TOKEN", "aaaaaaaaaaaaaaaa"),
        ],
    );
    let problems = weak.validate().unwrap_err();
    assert!(
        problems.len() == 1 && problems[0].contains("HELPDESK_METRICS_TOKEN"),
        "{problems:?}"
    );
    for spaced in [
        "0123456789abcdef\n",
        " 0123456789abcdef",
        "0123456789abcdéf",
    ] {
        let problems = config(
            &[],
            &[
                database,
                ("HELPDESK_JWT_SECRET", SECRET),
                ("HELPDESK_METRICS_TOKEN", spaced),
            ],
        )
        .validate()
        .unwrap_err();
        assert!(
            problems.len() == 1 && problems[0].contains("visible ASCII only"),
            "{spaced:?}: {problems:?}"
        );
    }
    let flagged = config(&["--metrics-token", "0123456789abcdef"], &[database]);
    assert!(
        flagged
            .warnings()
            .iter()
            .any(|w| w.contains("--metrics-token was given on the command line")),
        "{:?}",
        flagged.warnings()
    );
    assert!(!format!("{flagged:?}").contains("0123456789abcdef"));
}

/// Trusting every address as a proxy (`0.0.0.0/0`, `::/0`, or anything broader than an IPv4
/// /8 or a public IPv6 /32) is warned about, naming the ranges; a private network's range is
/// not.
#[test]
fn trusting_every_address_as_a_proxy_is_warned_about() {
    let database = ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let broad = config(
        &[],
        &[
            database,
            (
                "HELPDESK_TRUSTED_PROXIES",
                "10.0.0.0/8,0.0.0.0/0,::/0,2000::/3,2600::/12,2001:db8::/48",
            ),
        ],
    );
    let warnings = broad.warnings();
    assert!(
        warnings.len() == 1
            && warnings[0]
                .contains("HELPDESK_TRUSTED_PROXIES trusts 0.0.0.0/0, ::/0, 2000::/3, 2600::/12:")
            && warnings[0].contains("X-Forwarded-For"),
        "{warnings:?}"
    );
    let narrow = config(
        &[],
        &[
            database,
            (
                "HELPDESK_TRUSTED_PROXIES",
                "10.0.0.0/8,127.0.0.1,fc00::/7,fd00::/8,fe80::/10,2001:db8::/32",
            ),
        ],
    );
    assert_eq!(narrow.warnings(), Vec::<String>::new());
}

/// The docs' walk-through chooses the agent code in memory mode, with agent emails: no
/// warning that a DATABASE_URL may be missing. Without agent emails the code has no use in
/// memory, and is warned about as before.
#[test]
fn an_agent_code_chosen_for_agent_emails_in_memory_is_not_warned_about() {
    let chosen = config(
        &[],
        &[
            ("HELPDESK_AGENT_EMAILS", "agent@example.com"),
            ("HELPDESK_AGENT_CODE", "0123456789abcdef0123456789abcdef"),
        ],
    );
    assert!(
        !chosen
            .warnings()
            .iter()
            .any(|w| w.contains("HELPDESK_AGENT_CODE")),
        "{:?}",
        chosen.warnings()
    );
    let stray = config(
        &[],
        &[("HELPDESK_AGENT_CODE", "0123456789abcdef0123456789abcdef")],
    );
    assert!(
        stray
            .warnings()
            .iter()
            .any(|w| w.contains("HELPDESK_AGENT_CODE is set, but DATABASE_URL is not")),
        "{:?}",
        stray.warnings()
    );
}

#[test]
fn a_grace_period_shorter_than_a_request_is_warned_about() {
    let c = config(
        &[],
        &[
            ("HELPDESK_SHUTDOWN_GRACE_MS", "10000"),
            ("HELPDESK_REQUEST_TIMEOUT_MS", "10000"),
        ],
    );
    let warnings = c.warnings();
    assert!(
        warnings.len() == 1
            && warnings[0].contains("leaves in-flight requests 8000 ms")
            && warnings[0].contains("at least 12000 ms"),
        "{warnings:?}"
    );
    let c = config(
        &[],
        &[
            ("HELPDESK_SHUTDOWN_GRACE_MS", "12000"),
            ("HELPDESK_REQUEST_TIMEOUT_MS", "10000"),
        ],
    );
    assert_eq!(c.warnings(), Vec::<String>::new());
}

/// On Postgres, a pool wait as long as a request's budget is warned about: while Postgres is
/// away, requests would be told `timeout` (a change may have been made) instead of
/// `unavailable` with Retry-After. In memory the wait is unused.
#[test]
fn a_pool_wait_as_long_as_a_request_is_warned_about() {
    let postgres = ("DATABASE_URL", "postgres://app@db/helpdesk");
    let c = config(&[], &[postgres, ("HELPDESK_REQUEST_TIMEOUT_MS", "3000")]);
    let warnings = c.warnings();
    assert!(
        warnings.len() == 1
            && warnings[0].contains("HELPDESK_DATABASE_ACQUIRE_TIMEOUT_MS (5000 ms)")
            && warnings[0].contains("HELPDESK_REQUEST_TIMEOUT_MS (3000 ms)"),
        "{warnings:?}"
    );
    let c = config(
        &[],
        &[
            postgres,
            ("HELPDESK_REQUEST_TIMEOUT_MS", "3000"),
            ("HELPDESK_DATABASE_ACQUIRE_TIMEOUT_MS", "1500"),
        ],
    );
    assert_eq!(c.warnings(), Vec::<String>::new());
    let c = config(&[], &[("HELPDESK_REQUEST_TIMEOUT_MS", "3000")]);
    assert_eq!(c.warnings(), Vec::<String>::new(), "in memory");
}

/// A shutdown delay that, with the grace period, outlasts Kubernetes' default 30 s is warned
/// about: the process would be killed mid-stop.
#[test]
fn a_stop_longer_than_the_usual_kill_deadline_is_warned_about() {
    let c = config(&[], &[("HELPDESK_SHUTDOWN_DELAY_MS", "20000")]);
    let warnings = c.warnings();
    assert!(
        warnings.len() == 1
            && warnings[0].contains("a stop takes up to 35000 ms")
            && warnings[0].contains("terminationGracePeriodSeconds"),
        "{warnings:?}"
    );
    let c = config(&[], &[("HELPDESK_SHUTDOWN_DELAY_MS", "10000")]);
    assert_eq!(c.warnings(), Vec::<String>::new());
}

/// A request timeout meant as seconds leaves `/ready`'s Postgres check a few milliseconds:
/// warned about, with what the check gets; in memory too, where a login's password hashing
/// alone may take longer.
#[test]
fn a_request_timeout_too_short_for_postgres_is_warned_about() {
    let database = ("DATABASE_URL", "postgres://postgres@db/helpdesk");
    let secret = ("HELPDESK_JWT_SECRET", SECRET);
    let c = config(
        &[],
        &[database, secret, ("HELPDESK_REQUEST_TIMEOUT_MS", "15")],
    );
    let warnings = c.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("HELPDESK_REQUEST_TIMEOUT_MS is 15 ms")
                && w.contains("4 ms for Postgres")),
        "{warnings:?}"
    );
    let c = config(
        &[],
        &[database, secret, ("HELPDESK_REQUEST_TIMEOUT_MS", "1000")],
    );
    assert!(
        !c.warnings()
            .iter()
            .any(|w| w.contains("HELPDESK_REQUEST_TIMEOUT_MS is")),
        "{:?}",
        c.warnings()
    );
    let in_memory = config(&[], &[("HELPDESK_REQUEST_TIMEOUT_MS", "15")]);
    assert!(
        in_memory
            .warnings()
            .iter()
            .any(|w| w.contains("HELPDESK_REQUEST_TIMEOUT_MS is 15 ms")
                && w.contains("password hashing")
                && !w.contains("Postgres")),
        "{:?}",
        in_memory.warnings()
    );
    let in_memory = config(&[], &[("HELPDESK_REQUEST_TIMEOUT_MS", "1000")]);
    assert!(
        !in_memory
            .warnings()
            .iter()
            .any(|w| w.contains("HELPDESK_REQUEST_TIMEOUT_MS is")),
        "{:?}",
        in_memory.warnings()
    );
}

/// A connection limit above what the open-file limit leaves is warned about at start-up:
/// past it, accepting (and every new Postgres or Redis connection) fails.
#[cfg(unix)]
#[test]
fn a_connection_limit_above_the_open_files_is_warned_about() {
    let mut child = Running(
        helpdesk_command(
            &[
                "--bind",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--max-connections",
                "4000000000",
            ],
            &[],
        )
        .spawn()
        .unwrap(),
    );
    let lines = stdout_lines(&mut child);
    let warning: serde_json::Value = serde_json::from_str(&line_with(
        &lines,
        "HELPDESK_MAX_CONNECTIONS is more than the open-file limit leaves",
    ))
    .unwrap();
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert!(
        warning["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("ulimit -n"),
        "{warning}"
    );
}

#[test]
fn cors_origins_are_origins_as_browsers_send_them() {
    let c = config(
        &[],
        &[(
            "HELPDESK_CORS_ORIGINS",
            "https://app.example.com, http://localhost:3000",
        )],
    );
    assert_eq!(
        c.cors_origins,
        ["https://app.example.com", "http://localhost:3000"]
    );
    for (wrong, why) in [
        ("app.example.com", "no scheme"),
        ("https://app.example.com/", "nothing after them"),
        ("https://app.example.com/path", "nothing after them"),
        ("ftp://app.example.com", "only http and https"),
        ("https://App.example.com", "lower-case"),
        (
            "https://app.example.com:443",
            "sends it as `https://app.example.com`",
        ),
        ("https://app.example.com:port", "is not an origin"),
    ] {
        let error = parsed(&[], &[("HELPDESK_CORS_ORIGINS", wrong)]).unwrap_err();
        assert!(
            error.contains(why) && error.contains("HELPDESK_CORS_ORIGINS"),
            "{wrong}: {error}"
        );
    }
    let problems = config(&[], &[("HELPDESK_CORS_ORIGINS", "*,https://a.example")])
        .validate()
        .unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`*` with other origins")),
        "{problems:?}"
    );
}
