//! The three buses, their builders and their frozen registries.

pub(crate) mod command;
mod event;
mod query;
mod registry;

pub use command::{CommandBus, CommandBusBuilder, CommandHandlers, EventSink};
pub use event::{EventBus, EventBusBuilder, EventHandlers, Published};
pub use query::{QueryBus, QueryBusBuilder, QueryHandlers};

pub(crate) use event::run_event_handlers;
pub(crate) use registry::Registries;

use crate::BuildError;
use crate::dispatch::{Dispatcher, ErasedService, Layered};
use crate::{BoxError, Dispatch, Reply};
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

fn into_result(problems: Vec<String>) -> Result<(), BuildError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BuildError { problems })
    }
}
