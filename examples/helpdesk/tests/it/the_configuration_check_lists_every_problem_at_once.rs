//! `Config::validate` finds, before anything binds or connects, every problem the backends
//! would only find later, and lists them all at once: a schema name cqrs-postgres refuses
//! (`pg_x`), a `DATABASE_URL` that is no Postgres URL (without quoting its password), a
//! secret too short or too plain to be random.

use helpdesk::Config;

fn config(env: &[(&str, &str)]) -> Config {
    Config::try_parse_with_env(["helpdesk"], env.iter().copied()).unwrap()
}

const SECRET: (&str, &str) = (
    "HELPDESK_JWT_SECRET",
    "a-test-secret-that-is-at-least-32-bytes-long",
);

#[test]
fn a_schema_name_postgres_reserves_is_refused() {
    for schema in ["pg_x", "pg_", "Upper", "1st", "with-dash"] {
        let problems = config(&[("HELPDESK_DATABASE_SCHEMA", schema)])
            .validate()
            .expect_err(schema);
        assert_eq!(problems.len(), 1, "{schema:?}: {problems:?}");
        assert!(
            problems[0].contains("HELPDESK_DATABASE_SCHEMA"),
            "{schema:?}: {problems:?}"
        );
    }
    let long = "s".repeat(57);
    assert!(
        config(&[("HELPDESK_DATABASE_SCHEMA", &long)])
            .validate()
            .is_err()
    );
    for schema in [
        "helpdesk",
        "_private",
        "a1_b2",
        "pgx",
        "x_pg_",
        &"s".repeat(56),
    ] {
        config(&[("HELPDESK_DATABASE_SCHEMA", schema)])
            .validate()
            .unwrap_or_else(|p| panic!("{schema:?}: {p:?}"));
    }
}

#[test]
fn a_malformed_database_url_is_refused_without_quoting_its_password() {
    for url in [
        "postgres://helpdesk:hunter2-secret@db:99999/helpdesk",
        "mysql://helpdesk:hunter2-secret@db/helpdesk",
        "not a url hunter2-secret",
        "postgres://helpdesk:hunter2-secret@db/helpdesk?sslmode=sometimes",
    ] {
        let problems = config(&[("DATABASE_URL", url), SECRET])
            .validate()
            .expect_err(url);
        assert_eq!(problems.len(), 1, "{url}: {problems:?}");
        assert!(problems[0].contains("DATABASE_URL"), "{url}: {problems:?}");
        assert!(!problems[0].contains("hunter2"), "{url}: {problems:?}");
    }
    for url in [
        "postgres://postgres@127.0.0.1:5432/test",
        "postgresql://u:p@db/helpdesk?sslmode=disable",
        "postgres:///helpdesk?host=/var/run/postgresql",
    ] {
        config(&[("DATABASE_URL", url), SECRET])
            .validate()
            .unwrap_or_else(|p| panic!("{url}: {p:?}"));
    }
}

#[test]
fn every_problem_is_listed_at_once() {
    let problems = config(&[
        ("DATABASE_URL", "mysql://db/helpdesk"),
        ("HELPDESK_DATABASE_SCHEMA", "pg_x"),
        ("HELPDESK_JWT_SECRET", "short"),
    ])
    .validate()
    .unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:?}");
    for name in [
        "DATABASE_URL",
        "HELPDESK_DATABASE_SCHEMA",
        "HELPDESK_JWT_SECRET",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(name)),
            "{name}: {problems:?}"
        );
    }
}

#[test]
fn secrets_too_short_or_too_plain_to_be_random_are_refused() {
    for (name, value, says) in [
        ("HELPDESK_JWT_SECRET", "short", "it must be at least 32"),
        ("HELPDESK_JWT_SECRET", &"a".repeat(64), "only 1 distinct"),
        (
            "HELPDESK_JWT_SECRET",
            &"password".repeat(4),
            "only 7 distinct",
        ),
        (
            "HELPDESK_AGENT_CODE",
            "fifteen-bytes!!",
            "it must be at least 16",
        ),
        ("HELPDESK_AGENT_CODE", &"abc".repeat(6), "only 3 distinct"),
    ] {
        let problems = config(&[(name, value)]).validate().expect_err(value);
        assert_eq!(problems.len(), 1, "{value:?}: {problems:?}");
        assert!(
            problems[0].starts_with(name) && problems[0].contains(says),
            "{value:?}: {problems:?}"
        );
        assert!(!problems[0].contains(value), "not quoted: {problems:?}");
    }
    for (name, value) in [
        SECRET,
        // `openssl rand -hex 16` and `-hex 8`: random, though made of hex digits only.
        ("HELPDESK_JWT_SECRET", "9f86d081884c7d659a2feaa0c55ad015"),
        ("HELPDESK_AGENT_CODE", "2c26b46b68ffc68f"),
        ("HELPDESK_AGENT_CODE", "the-test-agent-code"),
    ] {
        config(&[(name, value)])
            .validate()
            .unwrap_or_else(|p| panic!("{value:?}: {p:?}"));
    }
}

/// An agent list entry that is no email address (a typo, a name) would match no account, and
/// the agent it was meant for registers as a customer without a word: refused, naming it.
#[test]
fn an_agent_email_that_is_no_address_is_refused() {
    let problems = config(&[("HELPDESK_AGENT_EMAILS", "not-an-email,,ada@example.com,x@y")])
        .validate()
        .expect_err("two entries are no addresses");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("HELPDESK_AGENT_EMAILS (--agent-emails) lists `not-an-email`")
            && problems[0].contains("the email has no @"),
        "{problems:?}"
    );
    assert!(problems[1].contains("`x@y`"), "{problems:?}");
    config(&[(
        "HELPDESK_AGENT_EMAILS",
        "ada@example.com, Grace@Example.com,",
    )])
    .validate()
    .expect("addresses, spaces and an empty entry are fine");
}

/// The wait for a Postgres connection is taken in milliseconds, 1 to 600000, and checked only
/// on Postgres (unused in memory).
#[test]
fn the_database_acquire_timeout_is_bounded() {
    let on_postgres = [("DATABASE_URL", "postgres://helpdesk@db/helpdesk"), SECRET];
    for bad in ["0", "600001"] {
        let mut env = on_postgres.to_vec();
        env.push(("HELPDESK_DATABASE_ACQUIRE_TIMEOUT_MS", bad));
        let problems = config(&env).validate().expect_err(bad);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("HELPDESK_DATABASE_ACQUIRE_TIMEOUT_MS (--database-acquire-timeout-ms) must be 1 to 600000")),
            "{bad}: {problems:?}"
        );
    }
    let mut env = on_postgres.to_vec();
    env.push(("HELPDESK_DATABASE_ACQUIRE_TIMEOUT_MS", "250"));
    let set = config(&env);
    set.validate().expect("250 ms is fine");
    assert_eq!(set.database_acquire_timeout_ms, 250);
    assert_eq!(
        config(&[]).database_acquire_timeout_ms,
        5_000,
        "the default"
    );
    config(&[("HELPDESK_DATABASE_ACQUIRE_TIMEOUT_MS", "0")])
        .validate()
        .expect("unused in memory");
}

/// A URL pasted with spaces around it is taken without them: a leading space made the Redis
/// URL "not a redis scheme", while a trailing one passed.
#[test]
fn urls_are_taken_without_surrounding_spaces() {
    let set = config(&[
        ("DATABASE_URL", "  postgres://helpdesk@db/helpdesk "),
        ("REDIS_URL", " redis://cache:6379 "),
        SECRET,
    ]);
    set.validate().expect("spaces around URLs are no problem");
    assert_eq!(
        set.database_url.as_deref(),
        Some("postgres://helpdesk@db/helpdesk")
    );
    assert_eq!(set.redis_url.as_deref(), Some("redis://cache:6379"));
}

#[test]
fn a_request_burst_of_zero_is_refused_saying_how_to_turn_the_limit_off() {
    let problems = config(&[("HELPDESK_USER_REQUEST_BURST", "0")])
        .validate()
        .expect_err("a burst of 0");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0]
            .contains("HELPDESK_USER_REQUEST_BURST (--user-request-burst) must be at least 1")
            && problems[0].contains("HELPDESK_USER_REQUESTS_PER_SECOND to 0"),
        "{problems:?}"
    );
    config(&[("HELPDESK_USER_REQUESTS_PER_SECOND", "0")])
        .validate()
        .expect("the limit turned off");
    config(&[
        ("HELPDESK_USER_REQUESTS_PER_SECOND", "0"),
        ("HELPDESK_USER_REQUEST_BURST", "0"),
    ])
    .validate()
    .expect("the limit turned off, as the refusal says, whatever the burst");
}

/// A millisecond setting over a day is a slip (seconds or minutes taken for milliseconds), and
/// near `u64::MAX` a deadline past what the clock holds: each is refused by name.
#[test]
fn millisecond_settings_over_a_day_are_refused() {
    let names = [
        "HELPDESK_REQUEST_TIMEOUT_MS",
        "HELPDESK_HEADER_TIMEOUT_MS",
        "HELPDESK_PURGE_INTERVAL_MS",
        "HELPDESK_POLL_MS",
        "HELPDESK_SHUTDOWN_GRACE_MS",
    ];
    let huge = u64::MAX.to_string();
    let settings: Vec<(&str, &str)> = names.iter().map(|name| (*name, huge.as_str())).collect();
    let problems = config(&settings).validate().expect_err("over a day");
    for name in names {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{name} (--"))
                    && p.contains(") must be at most 86400000")),
            "{name}: {problems:?}"
        );
    }
    let day: Vec<(&str, &str)> = names.iter().map(|name| (*name, "86400000")).collect();
    let within = config(&day).validate();
    assert!(
        within
            .as_ref()
            .err()
            .is_none_or(|p| p.iter().all(|p| !p.contains("must be at most"))),
        "a day is taken: {within:?}"
    );
}
