//! The event bus.

use super::command::EventSink;
use super::{Registries, layer_service};
use crate::dispatch::{Dispatcher, ErasedService, OnlyHandlers, guarded_to_the_end, started};
use crate::middleware::Budgeted;
use crate::{
    BoxError, BuildError, Dispatch, DispatchError, Event, EventContext, EventEnvelope,
    EventHandler, EventTypes, HandlerError, HandlerFailure, MessageKind, MessageType, Metadata,
    PublishError, Reply,
};
use async_trait::async_trait;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, join_all};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};

pub(crate) trait ErasedEventHandler: Send + Sync {
    fn name(&self) -> &Arc<str>;
    fn handle<'a>(&'a self, envelope: &'a EventEnvelope)
    -> BoxFuture<'a, Result<(), HandlerError>>;
}

struct TypedEventHandler<E: Event> {
    handler: Arc<dyn EventHandler<E>>,
    name: Arc<str>,
}

impl<E: Event> ErasedEventHandler for TypedEventHandler<E> {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn handle<'a>(
        &'a self,
        envelope: &'a EventEnvelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        match envelope.downcast_ref::<E>() {
            Some(event) => started(|| self.handler.handle(event, EventContext::new(envelope))),
            None => Box::pin(std::future::ready(Err(HandlerError::internal(format!(
                "event `{}` does not carry the payload type its handler expects",
                E::NAME
            ))))),
        }
    }
}

/// Runs the handlers of one event (those `only` names, when given) concurrently, each guarded
/// against panics and given `budget` when there is one. Returns how many ran, or every
/// failure.
pub(crate) async fn run_event_handlers(
    handlers: &[Arc<dyn ErasedEventHandler>],
    only: Option<&[Arc<str>]>,
    envelope: &EventEnvelope,
    budget: Option<Duration>,
) -> Result<usize, DispatchError> {
    match (only, budget) {
        (None, None) => run_every(handlers, envelope).await,
        // Boxed: a retry's or a timer's cost dwarfs the box's, and inline it would enlarge
        // every publish's future.
        (only, budget) => Box::pin(run_chosen(handlers, only, envelope, budget)).await,
    }
}

/// Every handler, guarded: the common path, with no choice of handlers and no budget.
async fn run_every(
    handlers: &[Arc<dyn ErasedEventHandler>],
    envelope: &EventEnvelope,
) -> Result<usize, DispatchError> {
    run_all(handlers, envelope, |h, name| {
        guarded_to_the_end(MessageKind::Event, name, h.handle(envelope))
    })
    .await
}

/// [`run_event_handlers`] with a choice of handlers or a budget.
async fn run_chosen(
    handlers: &[Arc<dyn ErasedEventHandler>],
    only: Option<&[Arc<str>]>,
    envelope: &EventEnvelope,
    budget: Option<Duration>,
) -> Result<usize, DispatchError> {
    let chosen: Vec<Arc<dyn ErasedEventHandler>>;
    let handlers = match only {
        None => handlers,
        Some(only) => {
            chosen = handlers
                .iter()
                .filter(|h| only.contains(h.name()))
                .cloned()
                .collect();
            &chosen
        }
    };
    match budget {
        None => run_every(handlers, envelope).await,
        Some(budget) => {
            run_all(handlers, envelope, |h, name| {
                budgeted(h, name, envelope, budget)
            })
            .await
        }
    }
}

/// Runs every handler of `handlers` on one event, each as `run` starts it.
async fn run_all<'a, F, Fut>(
    handlers: &'a [Arc<dyn ErasedEventHandler>],
    envelope: &'a EventEnvelope,
    run: F,
) -> Result<usize, DispatchError>
where
    F: Fn(&'a dyn ErasedEventHandler, &'static str) -> Fut,
    Fut: Future<Output = Result<(), DispatchError>> + 'a,
{
    let name = envelope.name();
    let failures: Vec<HandlerFailure> = match handlers {
        [] => return Ok(0),
        [one] => match run(one.as_ref(), name).await {
            Ok(()) => return Ok(1),
            Err(error) => vec![HandlerFailure {
                handler: one.name().clone(),
                error,
            }],
        },
        many => join_all(many.iter().map(|h| run(h.as_ref(), name)))
            .await
            .into_iter()
            .zip(many)
            .filter_map(|(result, h)| {
                result.err().map(|error| HandlerFailure {
                    handler: h.name().clone(),
                    error,
                })
            })
            .collect(),
    };
    if failures.is_empty() {
        Ok(handlers.len())
    } else {
        Err(DispatchError::Publish(PublishError {
            event: name,
            handlers: handlers.len(),
            failures,
        }))
    }
}

/// Runs one handler of an event, guarded against panics, within `budget`.
async fn budgeted(
    handler: &dyn ErasedEventHandler,
    name: &'static str,
    envelope: &EventEnvelope,
    budget: Duration,
) -> Result<(), DispatchError> {
    // The timer inside the guard too: without tokio's time driver it panics, and that is this
    // handler's failure, not the whole publish's.
    let run = Budgeted::new(handler.handle(envelope), budget).map(|outcome| match outcome {
        Ok(handled) => handled.map(|()| None),
        Err(after) => Ok(Some(after)),
    });
    match guarded_to_the_end(MessageKind::Event, name, run).await? {
        None => Ok(()),
        Some(after) => Err(DispatchError::Timeout {
            kind: MessageKind::Event,
            name,
            after,
        }),
    }
}

/// Event handlers collected before a bus is built (by a plugin, for instance).
#[derive(Clone, Default)]
pub struct EventHandlers {
    entries: Vec<(MessageType, Arc<dyn ErasedEventHandler>)>,
    /// How to decode each handled type, for [`EventBus::event_types`].
    types: Vec<fn(&mut EventTypes)>,
    /// The plugin that added each entry (`""`: none, the server itself).
    plugins: Vec<&'static str>,
    /// The plugin adding handlers now (set by the plugin registrar).
    pub(crate) plugin: &'static str,
}

/// Registers `E` (its current version) in `types`.
fn register_type<E: Event>(types: &mut EventTypes) {
    types.register::<E>();
}

impl EventHandlers {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a handler of event `E`.
    pub fn add<E: Event, H: EventHandler<E>>(&mut self, handler: H) -> &mut Self {
        self.add_arc::<E>(Arc::new(handler))
    }

    /// Adds a shared handler of event `E`.
    pub fn add_arc<E: Event>(&mut self, handler: Arc<dyn EventHandler<E>>) -> &mut Self {
        let name: Arc<str> = Arc::from(handler.name());
        self.entries.push((
            MessageType::event::<E>(),
            Arc::new(TypedEventHandler { handler, name }),
        ));
        self.types.push(register_type::<E>);
        self.plugins.push(self.plugin);
        self
    }

    /// Splits the handlers by the plugin that registered them
    /// ([`PluginRegistrar::events`](crate::PluginRegistrar::events); `""` for those the server
    /// added itself), in the order each plugin first added one. A server gives each plugin's
    /// handlers a feed of their own (a bus, a relay and its checkpoint), so that one plugin's
    /// failing handler does not hold up another's.
    ///
    /// ```
    /// # use cqrs_core::doc::CountOpened;
    /// use cqrs_core::EventHandlers;
    ///
    /// let mut handlers = EventHandlers::new();
    /// handlers.add(CountOpened::default());
    /// let groups = handlers.by_plugin();
    /// assert_eq!(groups.len(), 1);
    /// assert_eq!((groups[0].0, groups[0].1.len()), ("", 1));
    /// ```
    pub fn by_plugin(self) -> Vec<(&'static str, EventHandlers)> {
        let mut groups: Vec<(&'static str, EventHandlers)> = Vec::new();
        let entries = self.entries.into_iter().zip(self.types).zip(self.plugins);
        for ((entry, types), plugin) in entries {
            let at = match groups.iter().position(|(p, _)| *p == plugin) {
                Some(at) => at,
                None => {
                    groups.push((plugin, EventHandlers::default()));
                    groups.len() - 1
                }
            };
            let group = &mut groups[at].1;
            group.entries.push(entry);
            group.types.push(types);
            group.plugins.push(plugin);
        }
        groups
    }

    /// How many handlers are collected.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is collected.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for EventHandlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(t, h)| (t.name(), h.name())))
            .finish()
    }
}

/// Builds an [`EventBus`].
pub struct EventBusBuilder<L = Identity> {
    handlers: EventHandlers,
    layers: ServiceBuilder<L>,
    layered: bool,
    handler_timeout: Option<Duration>,
}

impl<L> fmt::Debug for EventBusBuilder<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBusBuilder")
            .field("handlers", &self.handlers)
            .field("layered", &self.layered)
            .field("handler_timeout", &self.handler_timeout)
            .finish_non_exhaustive()
    }
}

impl<L> EventBusBuilder<L> {
    /// Registers a handler of event `E`. Any number of handlers may handle one event type.
    pub fn handler<E: Event, H: EventHandler<E>>(mut self, handler: H) -> Self {
        self.handlers.add::<E, H>(handler);
        self
    }

    /// Registers handlers collected elsewhere (by plugins).
    pub fn handlers(mut self, mut handlers: EventHandlers) -> Self {
        self.handlers.entries.append(&mut handlers.entries);
        self.handlers.types.append(&mut handlers.types);
        self.handlers.plugins.append(&mut handlers.plugins);
        self
    }

    /// Wraps every publish in a tower layer; the first added is the outermost.
    pub fn layer<T>(self, layer: T) -> EventBusBuilder<Stack<T, L>> {
        EventBusBuilder {
            handlers: self.handlers,
            layers: self.layers.layer(layer),
            layered: true,
            handler_timeout: self.handler_timeout,
        }
    }

    /// Gives each handler of an event `budget`, counted from its first wait (a handler that
    /// finishes without waiting never reads the clock). Past it, that handler's future is
    /// dropped at its `.await` and it fails with [`DispatchError::Timeout`], named in the
    /// [`PublishError`], while the event's other handlers run on: a hanging handler is told
    /// apart from the others, which a [`TimeoutLayer`](crate::middleware::TimeoutLayer) around
    /// the whole publish cannot do. Handlers of one event run concurrently, so a publish takes
    /// about `budget` at most, as long as each handler waits rather than blocks: they share
    /// the publishing task, so the budget is checked only when a handler yields (a handler
    /// that blocks its thread, or computes for long between two `.await`s, is not cut off, and
    /// holds up the others meanwhile; move such work to `spawn_blocking`). At least 1 ms; none
    /// by default. The runtime needs tokio's time driver (`enable_time`): without it, each
    /// handler that waits fails as panicked.
    ///
    /// ```
    /// # use cqrs_core::doc::TicketOpened;
    /// use cqrs_core::async_trait;
    /// use cqrs_core::{
    ///     DispatchError, ErrorKind, EventBus, EventContext, EventHandler, HandlerError, Metadata,
    /// };
    /// use std::time::Duration;
    ///
    /// struct Hangs;
    ///
    /// #[async_trait]
    /// impl EventHandler<TicketOpened> for Hangs {
    ///     fn name(&self) -> &str {
    ///         "hangs"
    ///     }
    ///
    ///     async fn handle(&self, _: &TicketOpened, _: EventContext<'_>) -> Result<(), HandlerError> {
    ///         std::future::pending().await
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
    /// let bus = EventBus::builder()
    ///     .handler(Hangs)
    ///     .handler_timeout(Duration::from_secs(5))
    ///     .build()?;
    /// let opened = TicketOpened { ticket_id: "t1".into() };
    /// let Err(DispatchError::Publish(failed)) = bus.publish_event(opened, Metadata::new()).await
    /// else {
    ///     panic!("the handler hangs");
    /// };
    /// assert_eq!(&*failed.failures[0].handler, "hangs");
    /// assert_eq!(failed.kind(), ErrorKind::Timeout);
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn handler_timeout(mut self, budget: Duration) -> Self {
        self.handler_timeout = Some(budget.max(Duration::from_millis(1)));
        self
    }

    /// Freezes the bus. Fails when two handlers of one event type share a name (their stored
    /// progress would collide) or two event types share one wire name.
    pub fn build(self) -> Result<EventBus, BuildError>
    where
        L: Layer<Dispatcher>,
        L::Service: Service<Dispatch, Response = Reply> + Clone + Send + Sync + 'static,
        <L::Service as Service<Dispatch>>::Future: Send + 'static,
        <L::Service as Service<Dispatch>>::Error: Into<BoxError>,
    {
        let mut problems = Vec::new();
        let mut registries = Registries::default();
        let mut names: HashMap<&'static str, MessageType> = HashMap::new();
        let mut told = std::collections::HashSet::new();
        for (ty, handler) in self.handlers.entries {
            // Compared with the first type of the name, and told once per name however many
            // types and handlers share it.
            let first = *names.entry(ty.name()).or_insert(ty);
            if first.type_id() != ty.type_id() && told.insert(ty.name()) {
                problems.push(format!(
                    "two event types share the wire name `{}`: `{}` and `{}`; {}",
                    ty.name(),
                    crate::plugin::as_written(first.type_name()),
                    crate::plugin::as_written(ty.type_name()),
                    super::unique_name_advice(first.type_name(), ty.type_name()),
                ));
            }
            let list = registries.events.entry(ty.type_id()).or_default();
            if list.iter().any(|h| h.name() == handler.name()) {
                problems.push(format!(
                    "event `{}` has two handlers named `{}`: registered twice (by the server and a \
                     plugin, or by two plugins), it would handle every event twice, so register it \
                     once; two different handlers need each a unique name()",
                    ty.name(),
                    handler.name()
                ));
            }
            list.push(handler);
        }
        super::into_result(problems)?;
        registries.event_handler_timeout = self.handler_timeout;
        let registries = Arc::new(registries);
        let service = layer_service(self.layers, self.layered, &registries);
        Ok(EventBus {
            inner: Arc::new(Inner {
                registries,
                service,
                names,
                types: self.handlers.types,
            }),
        })
    }
}

struct Inner {
    registries: Arc<Registries>,
    service: Option<Arc<dyn ErasedService>>,
    names: HashMap<&'static str, MessageType>,
    types: Vec<fn(&mut EventTypes)>,
}

/// Delivers each event to every handler of its type (or to those named, with
/// [`publish_to`](EventBus::publish_to)), in process. Frozen once built; cloning is cheap.
///
/// Handlers of one event run concurrently on the publishing task (polled together, not
/// spawned: a handler that blocks its thread holds up the others); a failing or panicking
/// handler does not stop the others, and [`publish`](EventBus::publish) reports every failure.
///
/// ```
/// # use cqrs_core::doc::{TicketOpened, CountOpened};
/// use cqrs_core::{EventBus, Metadata};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let counter = CountOpened::default();
/// let bus = EventBus::builder().handler(counter.clone()).build()?;
/// let published = bus.publish_event(TicketOpened { ticket_id: "t1".into() }, Metadata::new()).await?;
/// assert_eq!(published.handlers, 1);
/// assert_eq!(counter.count(), 1);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for EventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("events", &self.inner.names.keys().collect::<Vec<_>>())
            .field("layered", &self.inner.service.is_some())
            .finish()
    }
}

/// The outcome of a successful publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// How many handlers ran (and succeeded).
    pub handlers: usize,
}

impl EventBus {
    /// Starts building a bus.
    pub fn builder() -> EventBusBuilder {
        EventBusBuilder {
            handlers: EventHandlers::new(),
            layers: ServiceBuilder::new(),
            layered: false,
            handler_timeout: None,
        }
    }

    /// The event types this bus has handlers for, registered at their current versions: what
    /// a consumer feeding the bus from a transport must decode
    /// ([`EventBusConsumer`](crate::projection::EventBusConsumer)). Add upcasters for older
    /// versions, or types handled elsewhere, to the result.
    ///
    /// ```
    /// # use cqrs_core::doc::{TicketOpened, CountOpened};
    /// use cqrs_core::{EventBus, EventEnvelope, EventRecord, Metadata};
    ///
    /// let bus = EventBus::builder().handler(CountOpened::default()).build()?;
    /// let opened = EventEnvelope::new(TicketOpened { ticket_id: "t1".into() }, Metadata::new());
    /// let decoded = bus.event_types().decode(&EventRecord::from_envelope(&opened)?)?;
    /// assert!(decoded.is_some());
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// ```
    pub fn event_types(&self) -> EventTypes {
        let mut types = EventTypes::new();
        for register in &self.inner.types {
            register(&mut types);
        }
        types
    }

    /// Delivers an event to every handler of its type and waits for them. An event nobody
    /// handles is fine (`handlers: 0`). Fails with [`DispatchError::Publish`], naming each
    /// failed handler, when any of them failed; the others have run.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe. The handlers run concurrently on the caller's task: dropped before it
    /// returns (a timeout, a `select!`), the handlers that finished stay done and the others
    /// stop at the await they had reached, and nothing reports which. A handler that must see
    /// every event is fed through a durable path (an outbox relay, a transport's consumer),
    /// whose deliveries are retried, not through a call its caller may give up on.
    pub async fn publish(&self, envelope: EventEnvelope) -> Result<Published, DispatchError> {
        match &self.inner.service {
            None => {
                let handlers = self.inner.registries.event_handlers(&envelope);
                let handlers = match self.inner.registries.event_handler_timeout {
                    // The common path, its future as small as can be.
                    None => run_every(handlers, &envelope).await?,
                    budget => Box::pin(run_chosen(handlers, None, &envelope, budget)).await?,
                };
                Ok(Published { handlers })
            }
            Some(service) => {
                let reply = service.call(Dispatch::for_event(envelope)).await?;
                Ok(Published {
                    handlers: reply.handlers,
                })
            }
        }
    }

    /// Delivers an event to those of its handlers named in `handlers`
    /// ([`EventHandler::name`]), through the bus's layers, and waits for them: the event
    /// handed again to the handlers that failed on it
    /// ([`HandlerFailure::handler`](crate::HandlerFailure::handler)), not to those that
    /// already took it. A name no handler of the event has is passed over; none of them:
    /// `handlers: 0`.
    ///
    /// The choice travels in the dispatch's [`Extensions`](crate::Extensions): a layer of the
    /// bus that replaces them (rather than inserting into them) erases it, and the event goes
    /// to every handler.
    ///
    /// ```
    /// # use cqrs_core::doc::{TicketOpened, CountOpened};
    /// use cqrs_core::{EventBus, EventEnvelope, Metadata};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let counter = CountOpened::default();
    /// let bus = EventBus::builder().handler(counter.clone()).build()?;
    /// let opened = EventEnvelope::new(TicketOpened { ticket_id: "t1".into() }, Metadata::new());
    ///
    /// let published = bus.publish_to(opened.clone(), &["someone_else".into()]).await?;
    /// assert_eq!((published.handlers, counter.count()), (0, 0));
    /// let published = bus.publish_to(opened, &["count_opened".into()]).await?;
    /// assert_eq!((published.handlers, counter.count()), (1, 1));
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn publish_to(
        &self,
        envelope: EventEnvelope,
        handlers: &[Arc<str>],
    ) -> Result<Published, DispatchError> {
        match &self.inner.service {
            None => {
                let registries = &self.inner.registries;
                let all = registries.event_handlers(&envelope);
                let budget = registries.event_handler_timeout;
                let handlers = run_chosen(all, Some(handlers), &envelope, budget).await?;
                Ok(Published { handlers })
            }
            Some(service) => {
                let mut dispatch = Dispatch::for_event(envelope);
                dispatch
                    .extensions_mut()
                    .insert(OnlyHandlers(Arc::from(handlers)));
                let reply = service.call(dispatch).await?;
                Ok(Published {
                    handlers: reply.handlers,
                })
            }
        }
    }

    /// Wraps an event with the given metadata and publishes it.
    pub async fn publish_event<E: Event>(
        &self,
        event: E,
        metadata: Metadata,
    ) -> Result<Published, DispatchError> {
        self.publish(EventEnvelope::new(event, metadata)).await
    }

    /// How many handlers event `E` has.
    pub fn handler_count<E: Event>(&self) -> usize {
        self.inner
            .registries
            .events
            .get(&std::any::TypeId::of::<E>())
            .map_or(0, Vec::len)
    }

    /// The wire names of every event type with a handler.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.inner.names.keys().copied()
    }
}

/// Publishing a command's recorded events in process. A failed handler is logged at error
/// level and counted (`cqrs_event_sink_failures_total`, label `event_type`), not returned: the
/// command has already taken effect, and failing its dispatch would invite a retry that
/// repeats it. Nothing retries the handler: a handler that must see every event is fed by a
/// relay instead ([`EventBusTransport`](crate::projection::EventBusTransport)).
#[async_trait]
impl EventSink for EventBus {
    async fn accept(&self, events: Vec<EventEnvelope>) -> Result<(), DispatchError> {
        for envelope in events {
            // Named by ids, so the failed event can be traced back to its command.
            let (message_id, correlation_id, name) = (
                envelope.metadata.message_id,
                envelope.metadata.correlation_id,
                envelope.name(),
            );
            if let Err(error) = self.publish(envelope).await {
                // A type's wire name: as many series as event types the program has.
                metrics::counter!("cqrs_event_sink_failures_total", "event_type" => name)
                    .increment(1);
                tracing::error!(
                    %error,
                    event_type = name,
                    %message_id,
                    %correlation_id,
                    "an event handler failed after the command succeeded"
                );
            }
        }
        Ok(())
    }
}
