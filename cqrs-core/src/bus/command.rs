//! The command bus.

use super::{Origin, Registries, check_registered, layer_service, register_single};
use crate::clock::Clock;
use crate::dispatch::{Call, Dispatcher, ErasedService, guarded, started, typed_call};
use crate::{
    BoxError, BuildError, Command, CommandContext, CommandHandler, Dispatch, DispatchError,
    EventEnvelope, Extensions, HandlerError, MessageKind, MessageType, Metadata, Position, Reply,
};
use async_trait::async_trait;
use futures_util::future::Either;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};

/// A registered handler, type-erased. `Any` as a supertrait: a dispatch upcasts to `&dyn Any`
/// (no call) and checks the type with one.
pub(crate) trait ErasedCommandHandler: Any + Send + Sync {}

struct TypedCommandHandler<C: Command> {
    handler: Arc<dyn CommandHandler<C>>,
}

impl<C: Command> ErasedCommandHandler for TypedCommandHandler<C> {}

/// The handler of `C`, or the error naming `C`.
#[inline]
fn handler_of<C: Command>(
    registries: &Registries,
) -> Result<&Arc<dyn CommandHandler<C>>, DispatchError> {
    registries
        .commands
        .get(&TypeId::of::<C>())
        .and_then(|h| (&**h as &dyn Any).downcast_ref::<TypedCommandHandler<C>>())
        .map(|typed| &typed.handler)
        .ok_or_else(|| DispatchError::NoHandler {
            kind: MessageKind::Command,
            name: C::NAME,
        })
}

/// A command on its way through the layers: the dispatcher starts it with the context the
/// layers prepared.
fn command_call<C: Command>(command: C) -> Pin<Box<dyn Call>> {
    typed_call(
        move |registries: &Registries, metadata: Metadata, extensions: Extensions| {
            let handler = handler_of::<C>(registries)?.clone();
            // The same steps as `execute_direct`, written out: an `async fn` shared by both
            // adds a future level that costs the layered path ~100 instructions a dispatch.
            let mut ctx = CommandContext::with_extensions(metadata, extensions);
            registries.lend_clock(&mut ctx);
            Ok(async move {
                let output = guarded(
                    MessageKind::Command,
                    C::NAME,
                    started(|| handler.handle(command, &mut ctx)),
                )
                .await?;
                let (events, extensions) = ctx.into_parts();
                Ok((output, events, extensions))
            })
        },
    )
}

/// Hands a successful command's `events` to `sink` in a task of its own, and waits for it: the
/// command has taken effect, so a caller that gives the dispatch up meanwhile (a timeout, a
/// client gone) must not cut the sink off half-way, leaving some of the events handed on and
/// the rest lost without a word. Outside a tokio runtime, the sink runs in place. A panic in
/// the sink goes on unwinding in the caller, as it did when the sink ran there. Boxed, as the
/// sink's own future is, so a dispatch's future does not grow by it.
fn hand_to_sink(
    sink: &Arc<dyn EventSink>,
    events: Vec<EventEnvelope>,
) -> Pin<Box<dyn Future<Output = Result<(), DispatchError>> + Send + '_>> {
    use tracing::Instrument;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return sink.accept(events);
    };
    let sink = sink.clone();
    let accepted = runtime.spawn(async move { sink.accept(events).await }.in_current_span());
    Box::pin(async move {
        match accepted.await {
            Ok(accepted) => accepted,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down and cancelled the task.
            Err(_) => Err(DispatchError::Handler(HandlerError::internal(
                "the runtime shut down while the event sink took the command's events: some \
                 may not have been handed on",
            ))),
        }
    })
}

/// Where a command's recorded events go after its handler succeeds.
///
/// The [`EventBus`](crate::EventBus) is one (in-process delivery); an outbox that writes events
/// in the command's transaction is usually a layer instead, which takes the events out of the
/// [`Reply`].
///
/// Unlike a handler's, a panic in [`accept`](Self::accept) is not caught: a sink is
/// infrastructure, and one that cannot hand events on should return an error (the dispatch
/// then fails with it).
///
/// The bus hands the events on in a task of its own, after the handler succeeded, and waits
/// for it: a caller that drops the dispatch then (a timeout, a client gone) does not cut the
/// sink off, so every event reaches it (outside a tokio runtime the sink runs in the
/// dispatch's future, and a dropped dispatch drops the events it has not taken yet). Delivery
/// is still best effort: a process that stops, or a runtime shut down, meanwhile loses them.
/// Events that must not be lost are stored with the command's own writes instead (an outbox,
/// as `cqrs-postgres`'s command layer does).
///
/// Since a dispatch given up no longer cuts its sink off, bound a sink's own waits (a store
/// with a timeout): one that hangs keeps a task per dispatch that handed it events. And the
/// sink's task needs the runtime driven: a dispatch blocked on with `Handle::block_on` on a
/// current-thread runtime that no `Runtime::block_on` drives waits for ever, as any spawned
/// task there would.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Accepts the events one successful command recorded, in order. An error fails the
    /// dispatch, although the handler's own effects may already have happened.
    async fn accept(&self, events: Vec<EventEnvelope>) -> Result<(), DispatchError>;
}

/// Command handlers collected before a bus is built (by a plugin, for instance).
#[derive(Default)]
pub struct CommandHandlers {
    entries: Vec<(MessageType, Arc<dyn ErasedCommandHandler>, Origin)>,
    /// The plugin adding handlers now (set by the plugin registrar), for error messages.
    pub(crate) plugin: &'static str,
}

impl CommandHandlers {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the handler of command `C`.
    pub fn add<C: Command, H: CommandHandler<C>>(&mut self, handler: H) -> &mut Self {
        self.push::<C>(Arc::new(handler), Some(std::any::type_name::<H>()))
    }

    /// Adds a shared handler of command `C`.
    pub fn add_arc<C: Command>(&mut self, handler: Arc<dyn CommandHandler<C>>) -> &mut Self {
        self.push::<C>(handler, None)
    }

    fn push<C: Command>(
        &mut self,
        handler: Arc<dyn CommandHandler<C>>,
        name: Option<&'static str>,
    ) -> &mut Self {
        let origin = Origin {
            handler: name,
            plugin: self.plugin,
        };
        self.entries.push((
            MessageType::command::<C>(),
            Arc::new(TypedCommandHandler { handler }),
            origin,
        ));
        self
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

impl fmt::Debug for CommandHandlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(t, _, _)| t.name()))
            .finish()
    }
}

/// Builds a [`CommandBus`]: handlers, tower layers, an event sink. See [`CommandBus`].
pub struct CommandBusBuilder<L = Identity> {
    handlers: CommandHandlers,
    layers: ServiceBuilder<L>,
    layered: bool,
    sink: Option<Arc<dyn EventSink>>,
    clock: Option<Arc<dyn Clock>>,
}

impl<L> fmt::Debug for CommandBusBuilder<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBusBuilder")
            .field("handlers", &self.handlers)
            .field("layered", &self.layered)
            .finish_non_exhaustive()
    }
}

impl<L> CommandBusBuilder<L> {
    /// Registers the handler of command `C`. A second handler for `C` makes `build` fail.
    pub fn handler<C: Command, H: CommandHandler<C>>(mut self, handler: H) -> Self {
        self.handlers.add::<C, H>(handler);
        self
    }

    /// Registers handlers collected elsewhere (by plugins).
    pub fn handlers(mut self, mut handlers: CommandHandlers) -> Self {
        self.handlers.entries.append(&mut handlers.entries);
        self
    }

    /// Wraps every dispatch in a tower layer. The first layer added is the outermost, as with
    /// [`tower::ServiceBuilder`].
    pub fn layer<T>(self, layer: T) -> CommandBusBuilder<Stack<T, L>> {
        CommandBusBuilder {
            handlers: self.handlers,
            layers: self.layers.layer(layer),
            layered: true,
            sink: self.sink,
            clock: self.clock,
        }
    }

    /// The clock that stamps the metadata [`dispatch`](CommandBus::dispatch) makes and the
    /// events handlers record ([`CommandContext::record`]). Default: the system clock; a
    /// test's [`ManualClock`](crate::clock::ManualClock) makes both deterministic. Metadata a
    /// caller hands [`dispatch_with`](CommandBus::dispatch_with) keeps its own timestamp.
    ///
    /// ```
    /// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler};
    /// use cqrs_core::reexports::chrono::{TimeZone, Utc};
    /// use cqrs_core::clock::ManualClock;
    /// use cqrs_core::{CommandBus, Metadata};
    /// use std::sync::Arc;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let at = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    /// let bus = CommandBus::builder()
    ///     .handler(OpenTicketHandler)
    ///     .clock(Arc::new(ManualClock::at(at)))
    ///     .build()?;
    /// let executed = bus.execute(OpenTicket { title: "Printer on fire".into() }, Metadata::new()).await?;
    /// assert_eq!(executed.events[0].metadata.timestamp, at);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Where recorded events go after a handler succeeds. Without a sink, recorded events are
    /// only returned by [`CommandBus::execute`] and dropped by [`CommandBus::dispatch`] (which
    /// warns the first time). [`EventStoreSink`](crate::EventStoreSink) appends them to an
    /// event store. A layer may take the events out of the [`Reply`] first (an outbox:
    /// `cqrs-postgres`'s command layer does unless told to keep them), and the sink then gets
    /// none. Only events recorded on the handler's context (`ctx.record`) reach it: the events
    /// an [`AggregateRepository`](crate::AggregateRepository) appends (its `execute`) are in
    /// its event store already, and reach consumers through the relay from there; recording
    /// them on the context too would store each a second time, with another id.
    ///
    /// The sink runs after the layers, outside them: this bus's timeout and metrics layers do
    /// not cover it. Give an [`EventBus`](crate::EventBus) used as the sink layers of its own,
    /// and a [`handler_timeout`](crate::EventBusBuilder::handler_timeout), so a hanging event
    /// handler cannot hold the command's caller for ever.
    pub fn event_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Freezes the bus. Fails, listing every problem, when a command type has two handlers or
    /// two command types share one wire name.
    pub fn build(self) -> Result<CommandBus, BuildError>
    where
        L: Layer<Dispatcher>,
        L::Service: Service<Dispatch, Response = Reply> + Clone + Send + Sync + 'static,
        <L::Service as Service<Dispatch>>::Future: Send + 'static,
        <L::Service as Service<Dispatch>>::Error: Into<BoxError>,
    {
        let (handlers, names) = register_single(self.handlers.entries)?;
        let registries = Registries {
            commands: handlers,
            clock: self.clock,
            ..Registries::default()
        };
        let registries = Arc::new(registries);
        let service = layer_service(self.layers, self.layered, &registries);
        Ok(CommandBus {
            inner: Arc::new(Inner {
                registries,
                service,
                sink: self.sink,
                names,
                told_dropped: AtomicBool::new(false),
            }),
        })
    }
}

/// A command through the layers. Its own future, so a layered dispatch does not carry the
/// direct path's state (and `dispatch_with`'s `Either` stays the size of the larger path).
async fn execute_layered<C: Command>(
    service: &Arc<dyn ErasedService>,
    command: C,
    metadata: Metadata,
    extensions: Extensions,
) -> Result<Executed<C::Output>, DispatchError> {
    let mut dispatch = command_dispatch(command, metadata);
    *dispatch.extensions_mut() = extensions;
    let mut reply = service.call(dispatch).await?;
    let output = output_of::<C>(&mut reply)?;
    Ok(Executed {
        output,
        events: reply.events,
        extensions: reply.extensions,
    })
}

/// A command as the layers see it.
fn command_dispatch<C: Command>(command: C, metadata: Metadata) -> Dispatch {
    Dispatch::message(
        MessageKind::Command,
        C::NAME,
        metadata,
        command_call(command),
    )
}

/// The handler's output in `reply`, or the error saying a layer replaced the reply.
fn output_of<C: Command>(reply: &mut Reply) -> Result<C::Output, DispatchError> {
    reply.take_output::<C::Output>().ok_or_else(|| {
        DispatchError::Middleware(
            format!(
                "a layer replaced the reply of command `{}` with one of its own, which holds no \
                 output: a layer must return the `Reply` its inner service gave it (or an error)",
                C::NAME
            )
            .into(),
        )
    })
}

struct Inner {
    registries: Arc<Registries>,
    service: Option<Arc<dyn ErasedService>>,
    sink: Option<Arc<dyn EventSink>>,
    names: HashMap<&'static str, TypeId>,
    /// Whether `dispatch` warned that it dropped recorded events (once per bus).
    told_dropped: AtomicBool,
}

impl Inner {
    /// `dispatch` without a sink drops what a handler recorded: said once per bus, at `warn`,
    /// since events that silently go nowhere are the costliest mistake to find.
    #[cold]
    fn dropped(&self, command: &'static str) {
        // Read first: after the one warning, dispatches only read the flag (no write to a line
        // every dispatch reads).
        if !self.told_dropped.load(Ordering::Relaxed)
            && !self.told_dropped.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                command,
                "a command recorded events and this bus has no event sink: `dispatch` dropped them \
                 (unless a layer stored them first and kept them in the reply); give the bus an \
                 event sink (`CommandBusBuilder::event_sink`, such as an `EventStoreSink`) or a \
                 layer that stores them (`cqrs-postgres`'s command layer), or call `execute` to \
                 get them back (said once per bus)"
            );
        }
    }
}

/// Sends each command to its one handler, through the bus's middleware.
///
/// Built once, then frozen: dispatch reads an immutable map and takes no lock. Cloning is cheap
/// (one reference count).
///
/// ```
/// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler};
/// use cqrs_core::CommandBus;
///
/// # tokio_test_block_on(async {
/// let bus = CommandBus::builder().handler(OpenTicketHandler).build()?;
/// let id = bus.dispatch(OpenTicket { title: "Printer on fire".into() }).await?;
/// assert_eq!(id, "t1");
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct CommandBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for CommandBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBus")
            .field("commands", &self.inner.names.keys().collect::<Vec<_>>())
            .field("layered", &self.inner.service.is_some())
            .finish()
    }
}

/// A command's output and the events it recorded.
#[derive(Debug)]
#[non_exhaustive]
pub struct Executed<O> {
    /// The handler's output.
    pub output: O,
    /// The events the handler recorded, in order (unless a layer took them).
    pub events: Vec<EventEnvelope>,
    /// The context's extensions after the handler and the layers ran: what a caller handed in
    /// with [`CommandBus::execute_with_extensions`] (a unit of work), back, with whatever the
    /// handler or a layer added.
    pub extensions: Extensions,
}

impl<O> Executed<O> {
    /// The global position of the last event the command stored, when the layer that stored
    /// them tells it ([`StoredPosition`]; cqrs-postgres's command layer does): wait for a
    /// projection to reach it ([`ProjectionWatch`](crate::projection::ProjectionWatch)) to
    /// read this write. `None` when it stored no event, or no layer says.
    pub fn position(&self) -> Option<Position> {
        self.extensions
            .get::<StoredPosition>()
            .map(|stored| stored.0)
    }
}

/// The global position of the last event a command stored, which the layer that stored them
/// puts in the reply's extensions once they are committed (cqrs-postgres's command layer
/// does; so should a layer of one's own that stores a command's events):
/// [`Executed::position`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredPosition(pub Position);

impl CommandBus {
    /// Starts building a bus.
    pub fn builder() -> CommandBusBuilder {
        CommandBusBuilder {
            handlers: CommandHandlers::new(),
            layers: ServiceBuilder::new(),
            layered: false,
            sink: None,
            clock: None,
        }
    }

    /// Dispatches a command with fresh metadata (a new correlation id, the bus's clock's now).
    ///
    /// # Cancel safety
    ///
    /// Dropped before it returns (a timeout, a `select!`, an HTTP request whose client left),
    /// the dispatch stops the handler at the await it had reached: what the handler wrote
    /// before it stays written unless its store undoes it (cqrs-postgres's command layer rolls
    /// its transaction back). Once the handler (and the bus's layers) returned, its recorded
    /// events are handed to the event sink in a task of their own, which finishes however
    /// long the caller waits (outside a tokio runtime, the sink runs in place, and is cut off
    /// with the dispatch).
    /// A caller that gave up cannot know whether the command took effect; an idempotency key
    /// makes its retry safe ([`IdempotencyStore`](crate::ports::IdempotencyStore)).
    pub async fn dispatch<C: Command>(&self, command: C) -> Result<C::Output, DispatchError> {
        self.dispatch_with(command, self.inner.registries.fresh_metadata())
            .await
    }

    /// Dispatches a command with the given metadata. Recorded events go to the event sink.
    pub fn dispatch_with<C: Command>(
        &self,
        command: C,
        metadata: Metadata,
    ) -> impl Future<Output = Result<C::Output, DispatchError>> + Send + '_ {
        // Two separate futures, so the unlayered one stays small: an `async fn` holding both
        // paths would carry the layered path's state on every dispatch.
        match &self.inner.service {
            None => Either::Left(self.dispatch_direct(command, metadata)),
            Some(service) => Either::Right(self.dispatch_layered(service, command, metadata)),
        }
    }

    async fn dispatch_direct<C: Command>(
        &self,
        command: C,
        metadata: Metadata,
    ) -> Result<C::Output, DispatchError> {
        // The context first: the metadata then moves once, from the arguments into it, not
        // through the stack (about 20 instructions a dispatch, callgrind).
        let mut ctx = CommandContext::new(metadata);
        self.inner.registries.lend_clock(&mut ctx);
        let handler = handler_of::<C>(&self.inner.registries)?;
        let output = guarded(
            MessageKind::Command,
            C::NAME,
            started(|| handler.handle(command, &mut ctx)),
        )
        .await?;
        if !ctx.recorded().is_empty() {
            match &self.inner.sink {
                Some(sink) => hand_to_sink(sink, ctx.take_recorded()).await?,
                None => self.inner.dropped(C::NAME),
            }
        }
        Ok(output)
    }

    /// `execute_layered`'s steps, with the sink after them, in one future: awaiting
    /// `execute_layered` here cost a future level (about 60 instructions a dispatch).
    async fn dispatch_layered<C: Command>(
        &self,
        service: &Arc<dyn ErasedService>,
        command: C,
        metadata: Metadata,
    ) -> Result<C::Output, DispatchError> {
        let mut reply = service.call(command_dispatch(command, metadata)).await?;
        let output = output_of::<C>(&mut reply)?;
        if !reply.events.is_empty() {
            match &self.inner.sink {
                Some(sink) => hand_to_sink(sink, std::mem::take(&mut reply.events)).await?,
                None => self.inner.dropped(C::NAME),
            }
        }
        Ok(output)
    }

    /// Runs a command and returns its output with the events it recorded, without handing them
    /// to the event sink: for callers that store or publish events themselves.
    pub async fn execute<C: Command>(
        &self,
        command: C,
        metadata: Metadata,
    ) -> Result<Executed<C::Output>, DispatchError> {
        self.execute_with_extensions(command, metadata, Extensions::new())
            .await
    }

    /// Like [`execute`](Self::execute), with extensions already in the dispatch and in the
    /// handler's context: a caller hands layers and the handler a value (a unit of work it
    /// opened, a tenant) without a task-local.
    pub async fn execute_with_extensions<C: Command>(
        &self,
        command: C,
        metadata: Metadata,
        extensions: Extensions,
    ) -> Result<Executed<C::Output>, DispatchError> {
        match &self.inner.service {
            None => self.execute_direct(command, metadata, extensions).await,
            Some(service) => execute_layered(service, command, metadata, extensions).await,
        }
    }

    async fn execute_direct<C: Command>(
        &self,
        command: C,
        metadata: Metadata,
        extensions: Extensions,
    ) -> Result<Executed<C::Output>, DispatchError> {
        let mut ctx = CommandContext::with_extensions(metadata, extensions);
        self.inner.registries.lend_clock(&mut ctx);
        let handler = handler_of::<C>(&self.inner.registries)?;
        let output = guarded(
            MessageKind::Command,
            C::NAME,
            started(|| handler.handle(command, &mut ctx)),
        )
        .await?;
        let (events, extensions) = ctx.into_parts();
        Ok(Executed {
            output,
            events,
            extensions,
        })
    }

    /// Hands `events` to the bus's [`EventSink`], as [`dispatch`](Self::dispatch) does with a
    /// command's recorded events once its handler succeeded: for callers that run a command
    /// with [`execute`](Self::execute) and finish it themselves (commit its transaction
    /// first). Does nothing without a sink or without events.
    ///
    /// ```
    /// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler};
    /// use cqrs_core::{CommandBus, Metadata};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let bus = CommandBus::builder().handler(OpenTicketHandler).build()?;
    /// let executed = bus.execute(OpenTicket { title: "Printer on fire".into() }, Metadata::new()).await?;
    /// // .. store the events with the command's other writes, then:
    /// bus.sink_events(executed.events).await?;
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn sink_events(&self, events: Vec<EventEnvelope>) -> Result<(), DispatchError> {
        match &self.inner.sink {
            Some(sink) if !events.is_empty() => hand_to_sink(sink, events).await,
            _ => Ok(()),
        }
    }

    /// Whether a handler for `C` is registered.
    pub fn handles<C: Command>(&self) -> bool {
        self.inner
            .registries
            .commands
            .contains_key(&TypeId::of::<C>())
    }

    /// Checks at start-up that every listed command has a handler, naming each one that has
    /// none.
    ///
    /// ```
    /// # use cqrs_core::doc::OpenTicket;
    /// use cqrs_core::{CommandBus, MessageType};
    ///
    /// let bus = CommandBus::builder().build().unwrap();
    /// let err = bus.check([MessageType::command::<OpenTicket>()]).unwrap_err();
    /// assert!(err.to_string().contains("tickets.open_ticket"));
    /// ```
    pub fn check(&self, required: impl IntoIterator<Item = MessageType>) -> Result<(), BuildError> {
        check_registered(&self.inner.registries.commands, required)
    }

    /// The wire names of every command this bus handles.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.inner.names.keys().copied()
    }
}
