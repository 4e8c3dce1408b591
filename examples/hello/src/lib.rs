//! The hello example as a library, so its tests drive the same start-up the binary runs.

use cqrs_core::middleware::{TimeoutLayer, TracingLayer};
use cqrs_core::{CommandBus, EventBus, PluginRegistrar, Plugins};
use hello_api::Route;
use std::sync::Arc;
use std::time::Duration;

/// Plugins this binary must have; a missing `use <crate> as _;` line fails start-up.
pub const EXPECTED_PLUGINS: &[&str] = &["greeter"];

/// The running application: its buses and what plugins contributed.
#[derive(Debug)]
pub struct App {
    /// The command bus, with tracing and a timeout.
    pub commands: CommandBus,
    /// The event bus; commands' recorded events are delivered here.
    pub events: EventBus,
    /// Every route the plugins offered, in plugin order.
    pub routes: Vec<(&'static str, Route)>,
    /// The plugins found, in installation order.
    pub plugins: Vec<&'static str>,
}

/// Collects the linked plugins, installs them, and builds the buses.
pub fn start(registrar: PluginRegistrar) -> anyhow::Result<App> {
    let plugins = Plugins::collect()?.expect(EXPECTED_PLUGINS)?;
    let mut registrar = registrar;
    plugins.install(&mut registrar)?;
    let events = EventBus::builder()
        .layer(TracingLayer::new())
        .handlers(registrar.take_events())
        .build()?;
    let commands = CommandBus::builder()
        .layer(TracingLayer::new())
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .handlers(registrar.take_commands())
        .event_sink(Arc::new(events.clone()))
        .build()?;
    commands.check([cqrs_core::MessageType::command::<hello_api::Greet>()])?;
    let routes = registrar.take_contributions_by_plugin::<Route>();
    registrar.check_contributions_taken()?;
    Ok(App {
        commands,
        events,
        routes,
        plugins: plugins.names().collect(),
    })
}
