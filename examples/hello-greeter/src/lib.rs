//! A plugin crate. A server picks it up by depending on it and naming it once:
//!
//! ```
//! use hello_greeter as _;
//! ```

use cqrs_core::{
    BoxError, CommandContext, CommandHandler, EventContext, EventHandler, HandlerError, Plugin,
    PluginRegistrar, async_trait, register_plugin,
};
use hello_api::{Greet, Greeted, Route};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The greeter plugin.
#[derive(Debug)]
pub struct GreeterPlugin;

impl Plugin for GreeterPlugin {
    fn name(&self) -> &'static str {
        "greeter"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn register(&self, registrar: &mut PluginRegistrar) -> Result<(), BoxError> {
        let greetings = registrar
            .try_resource::<GreetingCount>()
            .unwrap_or_default();
        registrar.commands().add(GreetHandler);
        registrar.events().add(CountGreetings(greetings));
        registrar.contribute(Route {
            path: "/greet",
            description: "greets someone by name",
        });
        Ok(())
    }
}

register_plugin!(GreeterPlugin);

/// How many greetings were seen; a server may provide one to read it.
#[derive(Clone, Debug, Default)]
pub struct GreetingCount(pub Arc<AtomicU64>);

impl GreetingCount {
    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct GreetHandler;

#[async_trait]
impl CommandHandler<Greet> for GreetHandler {
    async fn handle(&self, cmd: Greet, ctx: &mut CommandContext) -> Result<String, HandlerError> {
        let name = cmd.name.trim();
        if name.is_empty() {
            return Err(HandlerError::invalid(
                "name_required",
                "say who to greet: the name is empty",
            ));
        }
        // Not keyed by the name: a key names the stream an event is stored in, so it is an id
        // of your own, never text a client chose. Greetings need no order among themselves.
        ctx.record(Greeted {
            name: name.to_owned(),
        });
        Ok(format!("Hello, {name}!"))
    }
}

struct CountGreetings(GreetingCount);

#[async_trait]
impl EventHandler<Greeted> for CountGreetings {
    async fn handle(&self, _event: &Greeted, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.0.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn name(&self) -> &str {
        "greeter.count_greetings"
    }
}
