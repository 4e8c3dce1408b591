use cqrs_core::{ErrorKind, PluginRegistrar, Plugins};
use hello_api::{Greet, Route};
use hello_greeter::GreetingCount;

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), f)
                .await
                .unwrap()
        })
}

#[test]
fn the_greeter_plugin_is_collected_from_its_own_crate() {
    let plugins = Plugins::collect().unwrap();
    assert_eq!(plugins.names().collect::<Vec<_>>(), ["greeter"]);
}

#[test]
fn the_plugin_handles_commands_reacts_to_events_and_contributes_a_server_type() {
    let count = GreetingCount::default();
    let mut registrar = PluginRegistrar::new();
    registrar.provide(count.clone());
    let app = hello::start(registrar).unwrap();
    assert_eq!(
        app.routes,
        [(
            "greeter",
            Route {
                path: "/greet",
                description: "greets someone by name"
            }
        )]
    );
    run(async {
        assert_eq!(
            app.commands
                .dispatch(Greet {
                    name: " Ada ".into()
                })
                .await
                .unwrap(),
            "Hello, Ada!"
        );
        let err = app
            .commands
            .dispatch(Greet { name: "  ".into() })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
    });
    assert_eq!(
        count.get(),
        1,
        "the event handler saw the one successful greeting"
    );
}

#[test]
fn a_plugin_that_is_not_linked_is_named_at_start_up() {
    let err = Plugins::collect()
        .unwrap()
        .expect(&["greeter", "farewell"])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "expected plugin(s) farewell is not linked into this binary; each needs its crate as a dependency and a `use <crate> as _;` line in the crate root (or, when not registered through inventory, a place in the list given to `Plugins::collect_with`); a plugin crate built against another version of cqrs-core registers with that version and is not found either (`cargo tree -d -i cqrs-core` lists them) (found: greeter)"
    );
}

/// The binary greets each name, says on standard error which it could not, and exits with a
/// failure then, so a script running it sees it.
#[test]
fn the_binary_exits_with_a_failure_when_a_greeting_fails() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hello"))
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("the hello binary runs")
    };
    let greeted = run(&["Ada"]);
    assert!(greeted.status.success(), "{greeted:?}");
    assert!(String::from_utf8_lossy(&greeted.stdout).contains("Hello, Ada!"));
    let refused = run(&["Ada", " "]);
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("error (invalid): say who to greet"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&refused.stdout).contains("Hello, Ada!"));
}
