use crate::fixtures::*;
use cqrs_core::{
    BoxError, CommandBus, MessageType, Plugin, PluginError, PluginRegistrar, Plugins, QueryBus,
};

struct P {
    name: &'static str,
    deps: &'static [&'static str],
}

impl Plugin for P {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> &'static str {
        "1.0.0"
    }
    fn depends_on(&self) -> &'static [&'static str] {
        self.deps
    }
    fn register(&self, registrar: &mut PluginRegistrar) -> Result<(), BoxError> {
        registrar.contribute(format!("route of {}", self.name));
        if self.name == "adder" || self.name == "second-adder" {
            registrar.commands().add(AddHandler);
        }
        if self.name.starts_with("listener") {
            registrar.events().add(Counter::named(self.name));
        }
        if self.name == "needs-orphan" {
            registrar.require(MessageType::command::<Orphan>());
            registrar.require(MessageType::command::<Orphan>());
        }
        if self.name == "needs-db" {
            let _url: std::sync::Arc<str> = registrar.resource()?;
        }
        if self.name == "broken" {
            return Err("the broken plugin cannot register".into());
        }
        if self.name == "panicking" {
            panic!("no configuration for the panicking plugin");
        }
        if self.name == "boxed-route" {
            registrar.contribute(Box::new("a boxed route".to_owned()));
        }
        Ok(())
    }
}

fn plugins(list: &[(&'static str, &'static [&'static str])]) -> Vec<Box<dyn Plugin>> {
    list.iter()
        .map(|(name, deps)| Box::new(P { name, deps }) as Box<dyn Plugin>)
        .collect()
}

#[test]
fn dependencies_come_first_then_names_in_order() {
    let ordered = Plugins::from_plugins(plugins(&[
        ("tickets", &["auth", "audit"]),
        ("zeta", &[]),
        ("auth", &[]),
        ("audit", &["auth"]),
        ("beta", &[]),
    ]))
    .unwrap();
    let names: Vec<_> = ordered.names().collect();
    assert_eq!(names, ["auth", "audit", "beta", "tickets", "zeta"]);
}

/// A duplicate name says what to do: rename one, or link only one.
#[test]
fn a_duplicate_name_is_an_error() {
    let err = Plugins::from_plugins(plugins(&[("auth", &[]), ("auth", &[])])).unwrap_err();
    assert!(
        matches!(err, PluginError::Duplicate { ref name, .. } if name == "auth"),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("rename one (its `name()`), or link only one of them"),
        "{message}"
    );
    // Of one version, no `cargo tree -d` can tell them apart: it says what else it can be.
    assert!(
        message.contains("(both version 1.0.0)")
            && message.contains("a crate registers it twice")
            && !message.contains("cargo tree"),
        "{message}"
    );
}

/// An empty plugin name (what the buses call the server's own) and one that would need
/// quoting in relay and checkpoint names are refused, saying what to do.
#[test]
fn a_plugin_name_that_is_empty_or_needs_quoting_is_refused() {
    let err = Plugins::from_plugins(plugins(&[("", &[])])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin `` (version 1.0.0) cannot be named so: a plugin name cannot be empty; rename it (its `name()`)"
    );
    let long: &'static str = "p".repeat(65).leak();
    for name in ["tickets ", "my plugin", "tickets/v2", long] {
        let err = Plugins::from_plugins(plugins(&[(name, &[])])).unwrap_err();
        assert!(
            matches!(err, PluginError::InvalidName { name: ref n, .. } if n == name),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("ASCII letters, digits") || message.contains("at most 64 bytes"),
            "{message}"
        );
    }
    Plugins::from_plugins(plugins(&[("tickets.v2_beta-1", &[])])).unwrap();
    let longest: &'static str = "p".repeat(64).leak();
    Plugins::from_plugins(plugins(&[(longest, &[])])).unwrap();
}

/// A plugin that depends on itself is told so, not as a cycle of one with advice to move
/// what "both" need.
#[test]
fn a_plugin_depending_on_itself_is_told_so() {
    let err = Plugins::from_plugins(plugins(&[("selfish", &["selfish"])])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin `selfish` depends on itself; remove `selfish` from its own `depends_on()`"
    );
}

/// With nothing found, the list says "none" (it read `(found: )`).
#[test]
fn an_expected_plugin_among_none_says_none_were_found() {
    let err = Plugins::from_plugins(Vec::new())
        .unwrap()
        .expect(&["auth"])
        .unwrap_err();
    assert!(err.to_string().ends_with("(found: none)"), "{err}");
}

/// A missing dependency lists the plugins found, so a misspelt name shows next to the right
/// one, and says to fix the name in `depends_on()`.
#[test]
fn a_missing_dependency_is_an_error_naming_both() {
    let err = Plugins::from_plugins(plugins(&[("tickets", &["auht"]), ("auth", &[])])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin `tickets` depends on `auht`, which is not in the list given to `Plugins::from_plugins`; add it there, or fix the name in `depends_on()` of `tickets` (found: auth, tickets)"
    );
}

/// Every missing dependency of the plugin is named at once, not one per start.
#[test]
fn every_missing_dependency_is_named_at_once() {
    let err = Plugins::from_plugins(plugins(&[(
        "tickets",
        &["auth", "audit", "auth", "mailer"],
    )]))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin `tickets` depends on `auth`, `audit` and `mailer`, which are not in the list given to `Plugins::from_plugins`; add them there, or fix the names in `depends_on()` of `tickets` (found: tickets)"
    );
}

/// The same plugins give the same error in any order (inventory's order is the linker's).
#[test]
fn the_same_plugins_give_the_same_error_in_any_order() {
    let cases: [&[(&'static str, &'static [&'static str])]; 3] = [
        &[("x y", &[]), ("a", &[]), ("a", &[])],
        &[("b", &["missing-b"]), ("a", &["missing-a"])],
        &[("a", &[]), ("a", &["c"]), ("c", &[])],
    ];
    for case in cases {
        let forward = Plugins::from_plugins(plugins(case))
            .unwrap_err()
            .to_string();
        let mut reversed = case.to_vec();
        reversed.reverse();
        let backward = Plugins::from_plugins(plugins(&reversed))
            .unwrap_err()
            .to_string();
        assert_eq!(forward, backward, "{case:?}");
    }
}

#[test]
fn a_cycle_is_an_error_naming_it() {
    let err = Plugins::from_plugins(plugins(&[
        ("a", &["b"]),
        ("b", &["c"]),
        ("c", &["a"]),
        ("d", &[]),
    ]))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugins depend on each other in a cycle: a -> b -> c -> a; remove one of these dependencies from its plugin's `depends_on()` (move what both need into a plugin of its own)"
    );
}

/// The command and query buses of what the plugins registered.
fn buses_of(registrar: &mut PluginRegistrar) -> (CommandBus, QueryBus) {
    let commands = CommandBus::builder()
        .handlers(registrar.take_commands())
        .build()
        .unwrap();
    let queries = QueryBus::builder()
        .handlers(registrar.take_queries())
        .build()
        .unwrap();
    (commands, queries)
}

#[test]
fn installing_collects_handlers_and_contributions_in_order() {
    let ordered = Plugins::from_plugins(plugins(&[("adder", &["base"]), ("base", &[])])).unwrap();
    let mut registrar = PluginRegistrar::new();
    ordered.install(&mut registrar).unwrap();
    registrar.require(MessageType::command::<Add>());
    let routes = registrar.take_contributions_by_plugin::<String>();
    assert_eq!(
        routes,
        [
            ("base", "route of base".to_owned()),
            ("adder", "route of adder".to_owned())
        ]
    );
    let (commands, queries) = buses_of(&mut registrar);
    registrar.check_required(&commands, &queries).unwrap();
    assert_eq!(
        run(commands.dispatch(Add {
            a: 1,
            b: 2,
            ..Add::default()
        }))
        .unwrap(),
        3
    );

    registrar.require(MessageType::command::<Orphan>());
    let err = registrar.check_required(&commands, &queries).unwrap_err();
    assert!(err.to_string().contains("`test.orphan`"), "{err}");
    assert!(
        err.to_string().contains("(required by the server)"),
        "{err}"
    );
}

/// A required message without a handler names the plugin that requires it, once.
#[test]
fn a_missing_required_handler_names_the_plugin_requiring_it() {
    let ordered = Plugins::from_plugins(plugins(&[("needs-orphan", &[])])).unwrap();
    let mut registrar = PluginRegistrar::new();
    ordered.install(&mut registrar).unwrap();
    let (commands, queries) = buses_of(&mut registrar);
    let err = registrar.check_required(&commands, &queries).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems[0].contains("`test.orphan`")
            && err.problems[0].ends_with("(required by plugin `needs-orphan`)"),
        "{err}"
    );
}

#[test]
fn a_missing_resource_and_a_failing_plugin_are_named() {
    let ordered = Plugins::from_plugins(plugins(&[("needs-db", &[])])).unwrap();
    let err = ordered.install(&mut PluginRegistrar::new()).unwrap_err();
    assert!(
        matches!(err, PluginError::MissingResource { ref plugin, resource } if plugin == "needs-db" && resource.contains("str")),
        "{err}"
    );
    // A value provided under another type (`Arc<InMemoryEventStore>` for `Arc<dyn
    // EventStore>`) is the usual cause: the message says how to name the type.
    assert!(
        err.to_string().contains("PluginRegistrar::provide::<"),
        "{err}"
    );
    // The type as its user writes it (`type_name` says `alloc::sync::Arc`), and the message
    // also as the `Debug` a `main` returning the error prints.
    assert!(
        err.to_string()
            .contains("PluginRegistrar::provide::<std::sync::Arc<str>>"),
        "{err}"
    );
    assert_eq!(format!("{err:?}"), err.to_string());

    let mut registrar = PluginRegistrar::new();
    registrar.provide::<std::sync::Arc<str>>("postgres://".into());
    ordered.install(&mut registrar).unwrap();

    let err = Plugins::from_plugins(plugins(&[("broken", &[])]))
        .unwrap()
        .install(&mut PluginRegistrar::new())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin `broken` failed to register: the broken plugin cannot register"
    );
}

/// A `register` that panics is an install error naming the plugin, and what the server adds
/// afterwards (a test that caught the panic, say) is not credited to it.
#[test]
fn a_plugin_whose_register_panics_is_named() {
    let ordered = Plugins::from_plugins(plugins(&[("panicking", &[])])).unwrap();
    let mut registrar = PluginRegistrar::new();
    let err = ordered.install(&mut registrar).unwrap_err();
    assert!(
        matches!(err, PluginError::Register { ref plugin, .. } if plugin == "panicking"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "plugin `panicking` failed to register: it panicked: no configuration for the \
         panicking plugin"
    );
    registrar.contribute(7_u32);
    assert_eq!(registrar.take_contributions_by_plugin::<u32>(), [("", 7)]);
}

/// A contribution of a type the server does not take (a `Box<String>` where it takes
/// `String`) is an error naming the type and the plugin, once the server took what it asks
/// for; what was taken is not named.
#[test]
fn a_contribution_nobody_takes_is_named_with_its_plugin() {
    let ordered =
        Plugins::from_plugins(plugins(&[("base", &[]), ("boxed-route", &["base"])])).unwrap();
    let mut registrar = PluginRegistrar::new();
    ordered.install(&mut registrar).unwrap();
    registrar.contribute(1_u8);
    let err = registrar.check_contributions_taken().unwrap_err();
    let PluginError::UntakenContributions { ref untaken } = err else {
        panic!("{err:?}");
    };
    let named: Vec<(&str, &[String])> = untaken
        .iter()
        .map(|u| (u.type_name.as_str(), u.plugins.as_slice()))
        .collect();
    assert_eq!(
        named,
        [
            (
                "alloc::boxed::Box<alloc::string::String>",
                &["boxed-route".to_owned()][..]
            ),
            (
                "alloc::string::String",
                &["base".to_owned(), "boxed-route".to_owned()][..]
            ),
            ("u8", &[String::new()][..]),
        ],
        "{err}"
    );

    let routes = registrar.take_contributions::<String>();
    assert_eq!(routes.len(), 2);
    let err = registrar.check_contributions_taken().unwrap_err();
    assert_eq!(
        err.to_string(),
        "contributions of types the server never took: `std::boxed::Box<std::string::String>` \
         (from plugin `boxed-route`), `u8` (from the server); the server takes each type it asks \
         plugins for with `take_contributions::<T>()`, and only values of exactly that type: \
         check that the plugin contributes the server's type (not a `Box` or a reference of it, \
         nor the type of another version of the crate that defines it: `cargo tree -d`)"
    );
    registrar.take_contributions::<Box<String>>();
    registrar.take_contributions::<u8>();
    registrar.check_contributions_taken().unwrap();
}

/// Two plugins registering a handler for one command fail the build with both named, and
/// what to do.
#[test]
fn a_command_handled_by_two_plugins_names_both() {
    let plugins = Plugins::from_plugins(plugins(&[("adder", &[]), ("second-adder", &[])])).unwrap();
    let mut registrar = PluginRegistrar::new();
    plugins.install(&mut registrar).unwrap();
    let err = CommandBus::builder()
        .handlers(registrar.take_commands())
        .handler(OtherAddHandler)
        .build()
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("(plugin `adder`)"), "{message}");
    assert!(message.contains("(plugin `second-adder`)"), "{message}");
    assert!(
        message.contains("OtherAddHandler` (on the bus builder)"),
        "{message}"
    );
    assert!(
        message.contains("remove one of the registrations"),
        "{message}"
    );
}

/// A handler the server adds to the handlers it took from the plugins is the server's: a
/// duplicate names the plugin and the server's own registration, not the plugin twice.
#[test]
fn a_handler_added_to_the_taken_handlers_is_not_blamed_on_the_last_plugin() {
    let plugins = Plugins::from_plugins(plugins(&[("adder", &[])])).unwrap();
    let mut registrar = PluginRegistrar::new();
    plugins.install(&mut registrar).unwrap();
    let mut commands = registrar.take_commands();
    commands.add(OtherAddHandler);
    let err = CommandBus::builder()
        .handlers(commands)
        .build()
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("AddHandler` (plugin `adder`)"),
        "{message}"
    );
    assert!(
        message.contains("OtherAddHandler` (on the bus builder)"),
        "{message}"
    );
}

/// Event handlers are attributed to the plugin that added them, and one the server adds after
/// the plugins installed is its own (`""`), not the last plugin's: a server splits them to give
/// each plugin's handlers a feed of their own.
#[test]
fn event_handlers_are_split_by_the_plugin_that_added_them() {
    let ordered = Plugins::from_plugins(plugins(&[
        ("listener-b", &[]),
        ("auth", &[]),
        ("listener-a", &["listener-b"]),
    ]))
    .unwrap();
    let mut registrar = PluginRegistrar::new();
    registrar.events().add(Counter::named("before"));
    ordered.install(&mut registrar).unwrap();
    let mut handlers = registrar.take_events();
    handlers.add(Counter::named("after"));
    assert_eq!(handlers.len(), 4);
    let groups: Vec<_> = handlers
        .clone()
        .by_plugin()
        .into_iter()
        .map(|(plugin, handlers)| (plugin, handlers.len()))
        .collect();
    assert_eq!(groups, [("", 2), ("listener-b", 1), ("listener-a", 1)]);
    // Each group builds a bus of its own, with its plugin's handlers only.
    for (plugin, group) in handlers.by_plugin() {
        let bus = cqrs_core::EventBus::builder()
            .handlers(group)
            .build()
            .unwrap();
        assert_eq!(
            bus.handler_count::<Added>(),
            if plugin.is_empty() { 2 } else { 1 }
        );
    }
}
