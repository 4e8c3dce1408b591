use crate::support::*;
use cqrs_core::Plugins;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_and_tickets_plugins_are_linked_and_ordered_by_dependency() {
    within(async {
        // This test binary links the plugins only through the `helpdesk` library's
        // `use helpdesk_auth as _; use helpdesk_tickets as _;` lines.
        let plugins = Plugins::collect().unwrap();
        assert_eq!(plugins.names().collect::<Vec<_>>(), ["auth", "tickets"]);
        // In memory, whatever the environment names.
        let config = helpdesk::Config {
            database_url: None,
            redis_url: None,
            ..helpdesk::Config::default()
        };
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
        "expected plugin(s) billing are not linked into this binary; each needs its crate as a dependency and a `use <crate> as _;` line in the crate root (found: auth, tickets)"
    );
}

#[tokio::test]
async fn bad_configuration_is_refused_with_every_problem_named() {
    let config = helpdesk::Config {
        jwt_secret: Some("short".into()),
        redis_url: Some("redis://127.0.0.1:6379".into()),
        database_url: None,
        token_ttl_seconds: u64::MAX,
        login_window_seconds: u64::MAX,
        ..helpdesk::Config::default()
    };
    let err = helpdesk::build(&config, helpdesk::Hooks::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HELPDESK_JWT_SECRET is 5 bytes; it must be at least 32"),
        "{err}"
    );
    assert!(
        err.contains("REDIS_URL is set without DATABASE_URL"),
        "{err}"
    );
    // Past these, token expiry and the throttle's window overflow the calendar.
    assert!(
        err.contains("HELPDESK_TOKEN_TTL must be 1 second to 10 years"),
        "{err}"
    );
    assert!(
        err.contains("HELPDESK_LOGIN_WINDOW must be 1 second to a year"),
        "{err}"
    );
}
