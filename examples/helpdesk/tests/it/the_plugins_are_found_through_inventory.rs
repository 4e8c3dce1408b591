use crate::support::*;
use cqrs_core::Plugins;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_and_tickets_plugins_are_linked_and_ordered_by_dependency() {
    within(async {
        // This test binary links the plugins only through the `helpdesk` library's
        // `use helpdesk_auth as _; use helpdesk_tickets as _;` lines.
        let plugins = Plugins::collect().unwrap();
        assert_eq!(plugins.names().collect::<Vec<_>>(), ["auth", "tickets"]);
        // In memory: the defaults name no services, whatever the environment holds.
        let config = helpdesk::Config::default();
        let app = helpdesk::build(&config, helpdesk::Hooks::default())
            .await
            .unwrap();
        assert_eq!(app.plugins, ["auth", "tickets"]);
        app.runtime
            .shutdown(std::time::Duration::from_secs(5))
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_plugin_that_is_not_linked_is_named_at_start_up() {
    let err = Plugins::collect()
        .unwrap()
        .expect(&["auth", "tickets", "billing"])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "expected plugin(s) billing is not linked into this binary; each needs its crate as a dependency and a `use <crate> as _;` line in the crate root (or, when not registered through inventory, a place in the list given to `Plugins::collect_with`); a plugin crate built against another version of cqrs-core registers with that version and is not found either (`cargo tree -d -i cqrs-core` lists them) (found: auth, tickets)"
    );
}

/// A binary that links plugins of its own names them in `Hooks::expect_plugins`: one left
/// unlinked fails the start, named, instead of its routes answering 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binarys_own_expected_plugins_are_checked_at_start() {
    within(async {
        let config = helpdesk::Config::default();
        let hooks = |expect_plugins: Vec<&'static str>| helpdesk::Hooks {
            expect_plugins,
            ..helpdesk::Hooks::default()
        };
        let err = helpdesk::build(&config, hooks(vec!["tickets", "tags"]))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("expected plugin(s) tags is not linked into this binary"),
            "{err}"
        );
        let app = helpdesk::build(&config, hooks(vec!["tickets"]))
            .await
            .unwrap();
        app.runtime
            .shutdown(std::time::Duration::from_secs(5))
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn bad_configuration_is_refused_with_every_problem_named() {
    let config = helpdesk::Config {
        jwt_secret: Some("short".into()),
        redis_url: Some("redis://127.0.0.1:6379".into()),
        database_url: None,
        token_ttl_seconds: u64::MAX,
        login_window_seconds: u64::MAX,
        header_timeout_ms: 0,
        purge_interval_ms: 0,
        poll_ms: 0,
        shutdown_grace_ms: 0,
        shutdown_delay_ms: 600_001,
        ..helpdesk::Config::default()
    };
    let err = helpdesk::build(&config, helpdesk::Hooks::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HELPDESK_JWT_SECRET (--jwt-secret) is 5 bytes; it must be at least 32"),
        "{err}"
    );
    assert!(
        err.contains("REDIS_URL (--redis-url) is set without DATABASE_URL"),
        "{err}"
    );
    // Past these, token expiry and the throttle's window overflow the calendar.
    assert!(
        err.contains("HELPDESK_TOKEN_TTL (--token-ttl-seconds) must be 1 second to 10 years"),
        "{err}"
    );
    assert!(
        err.contains("HELPDESK_LOGIN_WINDOW (--login-window-seconds) must be 1 second to a year"),
        "{err}"
    );
    // Zero is no "off": each would become a millisecond.
    for name in [
        "HELPDESK_HEADER_TIMEOUT_MS",
        "HELPDESK_PURGE_INTERVAL_MS",
        "HELPDESK_POLL_MS",
        "HELPDESK_SHUTDOWN_GRACE_MS",
    ] {
        assert!(
            err.lines()
                .any(|line| line.contains(&format!("{name} (--"))
                    && line.contains(") must be at least")),
            "{name}: {err}"
        );
    }
    assert!(
        err.contains("HELPDESK_SHUTDOWN_DELAY_MS (--shutdown-delay-ms) must be at most 600000"),
        "{err}"
    );
}

/// The configuration's and the auth commands' `Debug` output leave secrets out, so a
/// `tracing::debug!(?config)` cannot leak them.
#[test]
fn debug_output_leaves_secrets_out() {
    let config = helpdesk::Config {
        jwt_secret: Some("a-jwt-secret-that-must-never-be-logged".into()),
        database_url: Some("postgres://app:hunter2secret@db.internal:5432/helpdesk".into()),
        ..helpdesk::Config::default()
    };
    let shown = format!("{config:?}");
    assert!(!shown.contains("never-be-logged"), "{shown}");
    assert!(!shown.contains("hunter2secret"), "{shown}");
    assert!(
        shown.contains("postgres://app:***@db.internal:5432/helpdesk"),
        "{shown}"
    );
    // A lone user name in a Redis URL is most often a password written in its place.
    let redis = helpdesk::Config {
        redis_url: Some("redis://hunter6secret@redis.internal:6379/2".into()),
        database_url: Some("postgres://app@db.internal/helpdesk".into()),
        ..helpdesk::Config::default()
    };
    let shown = format!("{redis:?}");
    assert!(!shown.contains("hunter6secret"), "{shown}");
    assert!(
        shown.contains("redis://***@redis.internal:6379/2"),
        "{shown}"
    );
    assert!(
        shown.contains("postgres://app@db.internal/helpdesk"),
        "{shown}"
    );
    let in_query = helpdesk::Config {
        database_url: Some(
            "postgres://app@db/helpdesk?sslmode=require&password=hunter3secret".into(),
        ),
        ..helpdesk::Config::default()
    };
    let shown = format!("{in_query:?}");
    assert!(!shown.contains("hunter3secret"), "{shown}");
    assert!(shown.contains("sslmode=require&password=***"), "{shown}");
    // The client decodes the key: `pass%77ord` is `password`; and `sslpassword` is one too.
    let encoded = helpdesk::Config {
        database_url: Some(
            "postgres://app@db/helpdesk?pass%77ord=hunter4secret&sslpassword=hunter5secret".into(),
        ),
        ..helpdesk::Config::default()
    };
    let shown = format!("{encoded:?}");
    assert!(
        !shown.contains("hunter4secret") && !shown.contains("hunter5secret"),
        "{shown}"
    );
    assert!(shown.contains("pass%77ord=***&sslpassword=***"), "{shown}");
    let login = helpdesk_auth::LogIn {
        email: "ada@example.com".into(),
        password: "correct horse battery".into(),
        client: None,
    };
    assert!(!format!("{login:?}").contains("battery"));
    let register = helpdesk_auth::RegisterUser {
        email: "ada@example.com".into(),
        password: "correct horse battery".into(),
        display_name: None,
        agent_code: Some("an-agent-code-never-logged".into()),
        client: None,
    };
    assert!(!format!("{register:?}").contains("battery"));
    assert!(!format!("{register:?}").contains("never-logged"));
    let config = helpdesk::Config {
        agent_code: Some("an-agent-code-never-logged".into()),
        ..helpdesk::Config::default()
    };
    assert!(!format!("{config:?}").contains("never-logged"));
}
