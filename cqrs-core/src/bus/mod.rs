//! The three buses, their builders and their frozen registries.

pub(crate) mod command;
mod event;
mod query;
mod registry;
mod store_sink;

pub use command::{CommandBus, CommandBusBuilder, CommandHandlers, EventSink};
pub use event::{EventBus, EventBusBuilder, EventHandlers, Published};
pub use query::{QueryBus, QueryBusBuilder, QueryHandlers};
pub use store_sink::EventStoreSink;

pub(crate) use event::run_event_handlers;
pub(crate) use registry::Registries;

use crate::BuildError;
use crate::dispatch::{Dispatcher, ErasedService, Layered};
use crate::plugin::as_written;
use crate::{BoxError, Dispatch, MessageType, Reply};
use std::any::TypeId;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use tower::{Layer, Service, ServiceBuilder};

/// Applies the builder's layers around the dispatcher, or returns `None` when there are none,
/// so an unlayered bus takes the direct, allocation-free path.
fn layer_service<L>(
    layers: ServiceBuilder<L>,
    layered: bool,
    registries: &Arc<Registries>,
) -> Option<Arc<dyn ErasedService>>
where
    L: Layer<Dispatcher>,
    L::Service: Service<Dispatch, Response = Reply> + Clone + Send + Sync + 'static,
    <L::Service as Service<Dispatch>>::Future: Send + 'static,
    <L::Service as Service<Dispatch>>::Error: Into<BoxError>,
{
    if !layered {
        return None;
    }
    let service = layers.service(Dispatcher::new(registries.clone()));
    Some(Arc::new(Layered(service)))
}

/// Where a command or query handler was registered, for the build's error messages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Origin {
    /// The handler's Rust type, or `None` for a shared (`add_arc`) handler.
    pub(crate) handler: Option<&'static str>,
    /// The plugin that registered it, or `""` for the bus builder.
    pub(crate) plugin: &'static str,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.handler {
            Some(handler) => write!(f, "`{handler}`")?,
            None => f.write_str("a shared handler")?,
        }
        match self.plugin {
            "" => f.write_str(" (on the bus builder)"),
            plugin => write!(f, " (plugin `{plugin}`)"),
        }
    }
}

/// What to do about two message types of one wire name: give each its own, unless they are
/// instantiations of one generic type, which share its one name.
pub(crate) fn unique_name_advice(first: &str, second: &str) -> &'static str {
    let generic = |name: &str| name.split_once('<').map(|(base, _)| base.to_owned());
    match (generic(first), generic(second)) {
        (Some(a), Some(b)) if a == b => {
            "both are one generic type, whose instantiations share its wire name: register one \
             of them, or give each a type of its own"
        }
        _ => "give each type a unique NAME",
    }
}

/// Puts each handler under its message type: one handler per type, one type per wire name.
/// Returns the map and the wire names, or every problem found.
fn register_single<H>(
    entries: Vec<(MessageType, H, Origin)>,
) -> Result<(registry::TypeMap<H>, HashMap<&'static str, TypeId>), BuildError> {
    let mut problems = Vec::new();
    let mut map = registry::TypeMap::default();
    let mut origins: HashMap<TypeId, Origin> = HashMap::new();
    let mut names: HashMap<&'static str, MessageType> = HashMap::new();
    // Wire names already reported: three types on one name are one problem.
    let mut told: std::collections::HashSet<&'static str> = std::collections::HashSet::new();
    for (ty, handler, origin) in entries {
        let kind = ty.kind();
        if let Some(first) = origins.get(&ty.type_id()) {
            problems.push(format!(
                "{kind} `{}` has more than one handler: {first} and {origin}; a {kind} has \
                 exactly one, so remove one of the registrations",
                ty.name()
            ));
            continue;
        }
        if let Some(&other) = names.get(ty.name())
            && other.type_id() != ty.type_id()
            && told.insert(ty.name())
        {
            let first = origins
                .get(&other.type_id())
                .map_or_else(String::new, ToString::to_string);
            problems.push(format!(
                "two {kind} types share the wire name `{}`: `{}`, handled by {first}, and `{}`, \
                 handled by {origin}; {}",
                ty.name(),
                as_written(other.type_name()),
                as_written(ty.type_name()),
                unique_name_advice(other.type_name(), ty.type_name()),
            ));
        }
        names.entry(ty.name()).or_insert(ty);
        origins.insert(ty.type_id(), origin);
        map.insert(ty.type_id(), handler);
    }
    into_result(problems)?;
    let names = names
        .into_iter()
        .map(|(name, ty)| (name, ty.type_id()))
        .collect();
    Ok((map, names))
}

/// Names every required message of `kind` that `registered` lacks.
fn check_registered<H>(
    registered: &registry::TypeMap<H>,
    required: impl IntoIterator<Item = MessageType>,
) -> Result<(), BuildError> {
    let problems = required
        .into_iter()
        .filter(|t| !registered.contains_key(&t.type_id()))
        .map(|t| {
            format!(
                "no handler is registered for {} `{}`: register one on the bus builder or \
                 through a plugin (is the plugin's crate linked with `use its_crate as _;`?)",
                t.kind(),
                t.name()
            )
        })
        .collect();
    into_result(problems)
}

fn into_result(problems: Vec<String>) -> Result<(), BuildError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BuildError { problems })
    }
}
