//! The configuration comes from flags and, for each flag not given, its environment variable;
//! a variable set to the empty string (`DATABASE_URL=` in a compose file) counts as unset.

use crate::support::*;
use clap::CommandFactory;
use clap::error::ErrorKind;
use helpdesk::Config;
use std::time::Duration;

const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes";

/// Every variable the configuration reads.
fn variables() -> Vec<String> {
    Config::command()
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|name| name.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn every_variable_set_empty_leaves_the_defaults() {
    let names = variables();
    for name in [
        "DATABASE_URL",
        "REDIS_URL",
        "HELPDESK_JWT_SECRET",
        "HELPDESK_TRUSTED_PROXIES",
        "HELPDESK_BIND",
        "HELPDESK_TOKEN_TTL",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
    let config =
        Config::try_parse_with_env(["helpdesk"], names.iter().map(|n| (n.as_str(), ""))).unwrap();
    assert_eq!(config.database_url, None);
    assert_eq!(config.redis_url, None);
    assert_eq!(config.jwt_secret, None);
    assert!(config.trusted_proxies.is_empty());
    assert_eq!(format!("{config:?}"), format!("{:?}", Config::default()));
    config.validate().unwrap();
}

#[test]
fn set_variables_apply_and_flags_win_over_them() {
    let config = Config::try_parse_with_env(
        [
            "helpdesk",
            "--bind",
            "127.0.0.1:9001",
            "--agent-emails",
            "a@x.org",
        ],
        [
            ("DATABASE_URL", "postgres://db/helpdesk"),
            ("REDIS_URL", ""),
            ("HELPDESK_JWT_SECRET", SECRET),
            ("HELPDESK_TRUSTED_PROXIES", "127.0.0.1,::1"),
            ("HELPDESK_TOKEN_TTL", "60"),
            ("HELPDESK_BIND", "127.0.0.1:9002"),
            ("HELPDESK_AGENT_EMAILS", "b@x.org,c@x.org"),
            ("HELPDESK_AGENT_CODE", "an-agent-code-of-some-length"),
        ],
    )
    .unwrap();
    assert_eq!(
        config.database_url.as_deref(),
        Some("postgres://db/helpdesk")
    );
    assert_eq!(config.redis_url, None);
    assert_eq!(config.jwt_secret.as_deref(), Some(SECRET));
    assert_eq!(config.trusted_proxies.len(), 2);
    assert_eq!(config.token_ttl_seconds, 60);
    // A flag replaces its variable's value, lists too.
    assert_eq!(config.bind.to_string(), "127.0.0.1:9001");
    assert_eq!(config.agent_emails, ["a@x.org"]);
    assert_eq!(
        config.agent_code.as_deref(),
        Some("an-agent-code-of-some-length")
    );
    config.validate().unwrap();
}

#[test]
fn an_empty_flag_value_is_unset_too_and_a_bad_value_is_an_error_not_an_exit() {
    let config = Config::try_parse_with_env(
        ["helpdesk", "--database-url", "", "--jwt-secret="],
        [("REDIS_URL", "")],
    )
    .unwrap();
    assert_eq!(config.database_url, None);
    assert_eq!(config.jwt_secret, None);
    let err = Config::try_parse_with_env(["helpdesk"], [("HELPDESK_TOKEN_TTL", "abc")])
        .expect_err("abc is no number");
    assert_eq!(err.kind(), ErrorKind::ValueValidation);
    assert!(err.to_string().contains("'abc'"), "{err}");
    // Named by the variable that set it, not only by the flag nobody typed.
    assert!(err.to_string().contains("HELPDESK_TOKEN_TTL"), "{err}");
    // A list variable whose second entry is no address.
    let err = Config::try_parse_with_env(
        ["helpdesk"],
        [("HELPDESK_TRUSTED_PROXIES", "127.0.0.1,not-an-address")],
    )
    .expect_err("not an address");
    assert!(
        err.to_string().contains("HELPDESK_TRUSTED_PROXIES"),
        "{err}"
    );
    // What clap says beside it stays: the allowed values, a similar one.
    let err = Config::try_parse_with_env(["helpdesk"], [("HELPDESK_LOG_FORMAT", "jsn")])
        .expect_err("no such format");
    let message = err.to_string();
    assert!(message.contains("HELPDESK_LOG_FORMAT"), "{message}");
    assert!(message.contains("possible values"), "{message}");
    assert!(message.contains("'json'"), "{message}");
    // The same value given as a flag is named by the flag alone.
    let err = Config::try_parse_with_env(
        ["helpdesk", "--token-ttl-seconds", "abc"],
        [("HELPDESK_BIND", "127.0.0.1:8080")],
    )
    .expect_err("abc is no number");
    assert!(!err.to_string().contains("HELPDESK_TOKEN_TTL"), "{err}");
}

/// Blank is empty: `REDIS_URL=" "` (a quoted empty value gone wrong) is not a Redis URL set
/// without DATABASE_URL, and `DATABASE_URL=" "` is not a database to connect to.
#[test]
fn a_variable_or_flag_of_only_whitespace_counts_as_unset_too() {
    let names = variables();
    for blank in [" ", "  ", "\t", " \n "] {
        let config =
            Config::try_parse_with_env(["helpdesk"], names.iter().map(|n| (n.as_str(), blank)))
                .unwrap_or_else(|e| panic!("{blank:?}: {e}"));
        assert_eq!(config.database_url, None, "{blank:?}");
        assert_eq!(config.redis_url, None, "{blank:?}");
        assert_eq!(config.jwt_secret, None, "{blank:?}");
        assert_eq!(
            format!("{config:?}"),
            format!("{:?}", Config::default()),
            "{blank:?}"
        );
        config.validate().unwrap();

        let config = Config::try_parse_with_env(
            [
                "helpdesk".to_owned(),
                format!("--database-url={blank}"),
                format!("--redis-url={blank}"),
                format!("--jwt-secret={blank}"),
            ],
            std::iter::empty::<(&str, &str)>(),
        )
        .unwrap();
        assert_eq!(config.database_url, None, "{blank:?}");
        assert_eq!(config.redis_url, None, "{blank:?}");
        assert_eq!(config.jwt_secret, None, "{blank:?}");
        config.validate().unwrap();
    }
    // Only the blank ones: a set value is kept as it is.
    let config = Config::try_parse_with_env(
        ["helpdesk"],
        [
            ("DATABASE_URL", "postgres://db/helpdesk"),
            ("REDIS_URL", " "),
            ("HELPDESK_JWT_SECRET", SECRET),
        ],
    )
    .unwrap();
    assert_eq!(
        config.database_url.as_deref(),
        Some("postgres://db/helpdesk")
    );
    assert_eq!(config.redis_url, None);
    config.validate().unwrap();
}

#[test]
fn the_help_names_the_variables_and_the_second_signal() {
    let err = Config::try_parse_with_env(["helpdesk", "--help"], [("HELPDESK_BIND", "nonsense")])
        .expect_err("--help is shown, not parsed");
    assert_eq!(err.kind(), ErrorKind::DisplayHelp);
    let help = err.to_string();
    assert!(help.contains("HELPDESK_SHUTDOWN_GRACE_MS"), "{help}");
    assert!(help.contains("HELPDESK_SHUTDOWN_DELAY_MS"), "{help}");
    assert!(help.contains("A second signal exits at once"), "{help}");
    assert!(help.contains("130 after SIGINT"), "{help}");
    assert!(help.contains("counts as unset"), "{help}");
}

/// The binary reads its environment the same way: empty variables, `DATABASE_URL=` among
/// them, leave it on the in-memory backends (it goes as far as the taken port).
#[test]
fn the_binary_takes_empty_variables_as_unset() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let empty: Vec<(String, &str)> = variables()
        .into_iter()
        .filter(|name| name != "HELPDESK_BIND")
        .map(|name| (name, ""))
        .collect();
    let mut env: Vec<(&str, &str)> = empty.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    env.push(("HELPDESK_BIND", &addr));
    let mut child = Running(helpdesk_command(&[], &env).spawn().unwrap());
    let (status, stderr) = exit_of(&mut child, Duration::from_secs(30));
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{status:?} {stderr}"
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
}

/// `REDIS_TLS_CA_FILE` goes with a TLS Redis URL: alone or with a plain `redis://` URL it is
/// refused, saying what to do; empty it is unset; with a `rediss://` URL it is taken. A client
/// certificate needs its key.
#[test]
fn a_redis_ca_file_needs_a_redis_url() {
    let alone = Config::try_parse_with_env(
        ["helpdesk"],
        [
            ("DATABASE_URL", "postgres://db/helpdesk"),
            ("HELPDESK_JWT_SECRET", SECRET),
            ("REDIS_TLS_CA_FILE", "/etc/ssl/private-ca.pem"),
        ],
    )
    .unwrap();
    let problems = alone.validate().unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("REDIS_TLS_CA_FILE (--redis-tls-ca-file) is set without REDIS_URL")),
        "{problems:?}"
    );
    let plain = Config::try_parse_with_env(
        ["helpdesk"],
        [
            ("DATABASE_URL", "postgres://db/helpdesk"),
            ("HELPDESK_JWT_SECRET", SECRET),
            ("REDIS_URL", "redis://cache.internal:6379"),
            ("REDIS_TLS_CA_FILE", "/etc/ssl/private-ca.pem"),
        ],
    )
    .unwrap();
    let problems = plain.validate().unwrap_err();
    assert!(
        problems.iter().any(|p| p.contains(
            "REDIS_TLS_CA_FILE (--redis-tls-ca-file) is set, but REDIS_URL does not ask for TLS: use a rediss:// URL"
        )),
        "{problems:?}"
    );
    let empty = Config::try_parse_with_env(["helpdesk"], [("REDIS_TLS_CA_FILE", "")]).unwrap();
    assert_eq!(empty.redis_tls_ca_file, None);
    let with_url = Config::try_parse_with_env(
        ["helpdesk"],
        [
            ("DATABASE_URL", "postgres://db/helpdesk"),
            ("HELPDESK_JWT_SECRET", SECRET),
            ("REDIS_URL", "rediss://cache.internal:6380"),
            ("REDIS_TLS_CA_FILE", "/etc/ssl/private-ca.pem"),
        ],
    )
    .unwrap();
    assert_eq!(
        with_url.redis_tls_ca_file.as_deref(),
        Some("/etc/ssl/private-ca.pem")
    );
    // Taken with a `rediss://` URL: the one problem left is that the file is not there.
    let problems = with_url.validate().unwrap_err();
    assert!(
        problems.len() == 1 && problems[0].contains("`/etc/ssl/private-ca.pem` cannot be read"),
        "{problems:?}"
    );
    // A client certificate needs its key, and the other way round.
    let half = Config::try_parse_with_env(
        ["helpdesk"],
        [
            ("DATABASE_URL", "postgres://db/helpdesk"),
            ("HELPDESK_JWT_SECRET", SECRET),
            ("REDIS_URL", "rediss://cache.internal:6380"),
            ("REDIS_TLS_CERT_FILE", "/etc/app/client.pem"),
        ],
    )
    .unwrap();
    let problems = half.validate().unwrap_err();
    assert!(
        problems.iter().any(|p| p.contains(
            "REDIS_TLS_CERT_FILE (--redis-tls-cert-file) and REDIS_TLS_KEY_FILE go together"
        )),
        "{problems:?}"
    );
}

/// `--ready-details` is a switch: alone it turns on, a falsey value (flag or variable) keeps
/// it off, and the variable never overrides the flag.
#[test]
fn ready_details_is_a_switch_with_a_variable() {
    let ready_details = |args: &[&str], env: &[(&str, &str)]| {
        Config::try_parse_with_env(
            std::iter::once("helpdesk").chain(args.iter().copied()),
            env.iter().copied(),
        )
        .unwrap_or_else(|e| panic!("{args:?} {env:?}: {e}"))
        .ready_details
    };
    assert!(!ready_details(&[], &[]));
    assert!(ready_details(&["--ready-details"], &[]));
    assert!(!ready_details(&["--ready-details=false"], &[]));
    assert!(ready_details(&[], &[("HELPDESK_READY_DETAILS", "1")]));
    assert!(ready_details(&[], &[("HELPDESK_READY_DETAILS", "true")]));
    assert!(!ready_details(&[], &[("HELPDESK_READY_DETAILS", "0")]));
    assert!(!ready_details(&[], &[("HELPDESK_READY_DETAILS", "off")]));
    assert!(!ready_details(
        &["--ready-details=no"],
        &[("HELPDESK_READY_DETAILS", "1")]
    ));
    assert!(ready_details(
        &["--ready-details"],
        &[("HELPDESK_READY_DETAILS", "0")]
    ));
}
