//! The query bus.

use super::{Origin, Registries, check_registered, layer_service, register_single};
use crate::clock::Clock;
use crate::dispatch::{Call, Dispatcher, ErasedService, guarded, started, typed_call};
use crate::{
    BoxError, BuildError, Dispatch, DispatchError, Extensions, MessageKind, MessageType, Metadata,
    Query, QueryContext, QueryHandler, Reply,
};
use futures_util::future::Either;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};

/// A registered handler, type-erased. `Any` as a supertrait: a dispatch upcasts to `&dyn Any`
/// (no call) and checks the type with one.
pub(crate) trait ErasedQueryHandler: Any + Send + Sync {}

struct TypedQueryHandler<Q: Query> {
    handler: Arc<dyn QueryHandler<Q>>,
}

impl<Q: Query> ErasedQueryHandler for TypedQueryHandler<Q> {}

/// The handler of `Q`, or the error naming `Q`.
#[inline]
fn handler_of<Q: Query>(
    registries: &Registries,
) -> Result<&Arc<dyn QueryHandler<Q>>, DispatchError> {
    registries
        .queries
        .get(&TypeId::of::<Q>())
        .and_then(|h| (&**h as &dyn Any).downcast_ref::<TypedQueryHandler<Q>>())
        .map(|typed| &typed.handler)
        .ok_or_else(|| DispatchError::NoHandler {
            kind: MessageKind::Query,
            name: Q::NAME,
        })
}

/// A query on its way through the layers: the dispatcher starts it with the context the
/// layers prepared.
fn query_call<Q: Query>(query: Q) -> Pin<Box<dyn Call>> {
    typed_call(
        move |registries: &Registries, metadata: Metadata, extensions: Extensions| {
            let handler = handler_of::<Q>(registries)?.clone();
            let ctx = QueryContext::with_extensions(metadata, extensions);
            Ok(async move {
                let output = guarded(
                    MessageKind::Query,
                    Q::NAME,
                    started(|| handler.handle(query, &ctx)),
                )
                .await?;
                // The layers get their values back in the reply (a transaction to end).
                Ok((output, Vec::new(), ctx.into_extensions()))
            })
        },
    )
}

/// Query handlers collected before a bus is built (by a plugin, for instance).
#[derive(Default)]
pub struct QueryHandlers {
    entries: Vec<(MessageType, Arc<dyn ErasedQueryHandler>, Origin)>,
    /// The plugin adding handlers now (set by the plugin registrar), for error messages.
    pub(crate) plugin: &'static str,
}

impl QueryHandlers {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the handler of query `Q`.
    pub fn add<Q: Query, H: QueryHandler<Q>>(&mut self, handler: H) -> &mut Self {
        self.push::<Q>(Arc::new(handler), Some(std::any::type_name::<H>()))
    }

    /// Adds a shared handler of query `Q`.
    pub fn add_arc<Q: Query>(&mut self, handler: Arc<dyn QueryHandler<Q>>) -> &mut Self {
        self.push::<Q>(handler, None)
    }

    fn push<Q: Query>(
        &mut self,
        handler: Arc<dyn QueryHandler<Q>>,
        name: Option<&'static str>,
    ) -> &mut Self {
        let origin = Origin {
            handler: name,
            plugin: self.plugin,
        };
        self.entries.push((
            MessageType::query::<Q>(),
            Arc::new(TypedQueryHandler { handler }),
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

impl fmt::Debug for QueryHandlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(t, _, _)| t.name()))
            .finish()
    }
}

/// Builds a [`QueryBus`].
pub struct QueryBusBuilder<L = Identity> {
    handlers: QueryHandlers,
    layers: ServiceBuilder<L>,
    layered: bool,
    clock: Option<Arc<dyn Clock>>,
}

impl<L> fmt::Debug for QueryBusBuilder<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryBusBuilder")
            .field("handlers", &self.handlers)
            .field("layered", &self.layered)
            .finish_non_exhaustive()
    }
}

impl<L> QueryBusBuilder<L> {
    /// Registers the handler of query `Q`. A second handler for `Q` makes `build` fail.
    pub fn handler<Q: Query, H: QueryHandler<Q>>(mut self, handler: H) -> Self {
        self.handlers.add::<Q, H>(handler);
        self
    }

    /// Registers handlers collected elsewhere (by plugins).
    pub fn handlers(mut self, mut handlers: QueryHandlers) -> Self {
        self.handlers.entries.append(&mut handlers.entries);
        self
    }

    /// Wraps every dispatch in a tower layer; the first added is the outermost.
    pub fn layer<T>(self, layer: T) -> QueryBusBuilder<Stack<T, L>> {
        QueryBusBuilder {
            handlers: self.handlers,
            layers: self.layers.layer(layer),
            layered: true,
            clock: self.clock,
        }
    }

    /// The clock that stamps the metadata [`dispatch`](QueryBus::dispatch) makes. Default: the
    /// system clock. Metadata a caller hands [`dispatch_with`](QueryBus::dispatch_with) keeps
    /// its own timestamp.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Freezes the bus. Fails, listing every problem, when a query type has two handlers or two
    /// query types share one wire name.
    pub fn build(self) -> Result<QueryBus, BuildError>
    where
        L: Layer<Dispatcher>,
        L::Service: Service<Dispatch, Response = Reply> + Clone + Send + Sync + 'static,
        <L::Service as Service<Dispatch>>::Future: Send + 'static,
        <L::Service as Service<Dispatch>>::Error: Into<BoxError>,
    {
        let (handlers, names) = register_single(self.handlers.entries)?;
        let registries = Registries {
            queries: handlers,
            clock: self.clock,
            ..Registries::default()
        };
        let registries = Arc::new(registries);
        let service = layer_service(self.layers, self.layered, &registries);
        Ok(QueryBus {
            inner: Arc::new(Inner {
                registries,
                service,
                names,
            }),
        })
    }
}

struct Inner {
    registries: Arc<Registries>,
    service: Option<Arc<dyn ErasedService>>,
    names: HashMap<&'static str, TypeId>,
}

/// Sends each query to its one handler, through the bus's middleware. Frozen once built;
/// cloning is cheap.
///
/// ```
/// # use cqrs_core::doc::{CountTickets, CountTicketsHandler};
/// use cqrs_core::QueryBus;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let bus = QueryBus::builder().handler(CountTicketsHandler).build()?;
/// assert_eq!(bus.dispatch(CountTickets).await?, 42);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct QueryBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for QueryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryBus")
            .field("queries", &self.inner.names.keys().collect::<Vec<_>>())
            .field("layered", &self.inner.service.is_some())
            .finish()
    }
}

impl QueryBus {
    /// Starts building a bus.
    pub fn builder() -> QueryBusBuilder {
        QueryBusBuilder {
            handlers: QueryHandlers::new(),
            layers: ServiceBuilder::new(),
            layered: false,
            clock: None,
        }
    }

    /// Dispatches a query with fresh metadata (stamped by the bus's clock).
    pub async fn dispatch<Q: Query>(&self, query: Q) -> Result<Q::Output, DispatchError> {
        self.dispatch_with(query, self.inner.registries.fresh_metadata())
            .await
    }

    /// Dispatches a query with the given metadata.
    pub fn dispatch_with<Q: Query>(
        &self,
        query: Q,
        metadata: Metadata,
    ) -> impl Future<Output = Result<Q::Output, DispatchError>> + Send + '_ {
        // Two separate futures, so the unlayered one stays small.
        match &self.inner.service {
            None => Either::Left(self.dispatch_direct(query, metadata)),
            Some(service) => Either::Right(Self::dispatch_layered(service, query, metadata)),
        }
    }

    async fn dispatch_direct<Q: Query>(
        &self,
        query: Q,
        metadata: Metadata,
    ) -> Result<Q::Output, DispatchError> {
        // The context first: the metadata then moves once, from the arguments into it.
        let ctx = QueryContext::new(metadata);
        let handler = handler_of::<Q>(&self.inner.registries)?;
        guarded(
            MessageKind::Query,
            Q::NAME,
            started(|| handler.handle(query, &ctx)),
        )
        .await
    }

    async fn dispatch_layered<Q: Query>(
        service: &Arc<dyn ErasedService>,
        query: Q,
        metadata: Metadata,
    ) -> Result<Q::Output, DispatchError> {
        let dispatch = Dispatch::message(MessageKind::Query, Q::NAME, metadata, query_call(query));
        Self::answer_of::<Q>(service.call(dispatch).await?)
    }

    /// Like [`dispatch_with`](Self::dispatch_with), with extensions already in the dispatch
    /// and in the handler's context: a caller hands layers and the handler a value (a
    /// per-request tenant, a read-only connection) without a task-local or a layer of its own,
    /// as [`CommandBus::execute_with_extensions`](crate::CommandBus::execute_with_extensions)
    /// does for commands.
    ///
    /// ```
    /// use cqrs_core::{async_trait, Extensions, HandlerError, Metadata, Query, QueryBus};
    /// use cqrs_core::{QueryContext, QueryHandler};
    ///
    /// #[derive(Clone)]
    /// struct Tenant(&'static str);
    ///
    /// #[derive(Query)]
    /// #[cqrs(name = "doc.whose", output = String)]
    /// struct Whose;
    ///
    /// struct WhoseHandler;
    ///
    /// #[async_trait]
    /// impl QueryHandler<Whose> for WhoseHandler {
    ///     async fn handle(&self, _: Whose, ctx: &QueryContext) -> Result<String, HandlerError> {
    ///         let tenant = ctx.extensions().get::<Tenant>();
    ///         let tenant = tenant.ok_or_else(|| HandlerError::invalid("no_tenant", "no tenant"))?;
    ///         Ok(tenant.0.to_owned())
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let bus = QueryBus::builder().handler(WhoseHandler).build()?;
    /// let mut extensions = Extensions::new();
    /// extensions.insert(Tenant("acme"));
    /// let answer = bus
    ///     .dispatch_with_extensions(Whose, Metadata::new(), extensions)
    ///     .await?;
    /// assert_eq!(answer, "acme");
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn dispatch_with_extensions<Q: Query>(
        &self,
        query: Q,
        metadata: Metadata,
        extensions: Extensions,
    ) -> Result<Q::Output, DispatchError> {
        match &self.inner.service {
            None => {
                let ctx = QueryContext::with_extensions(metadata, extensions);
                let handler = handler_of::<Q>(&self.inner.registries)?;
                guarded(
                    MessageKind::Query,
                    Q::NAME,
                    started(|| handler.handle(query, &ctx)),
                )
                .await
            }
            Some(service) => {
                let mut dispatch =
                    Dispatch::message(MessageKind::Query, Q::NAME, metadata, query_call(query));
                *dispatch.extensions_mut() = extensions;
                Self::answer_of::<Q>(service.call(dispatch).await?)
            }
        }
    }

    /// The output of a layered dispatch's `reply`, or the error of a layer that replaced it.
    fn answer_of<Q: Query>(mut reply: Reply) -> Result<Q::Output, DispatchError> {
        reply.take_output::<Q::Output>().ok_or_else(|| {
            DispatchError::Middleware(
                format!(
                    "a layer replaced the reply of query `{}` with one of its own, which holds \
                     no output: a layer must return the `Reply` its inner service gave it (or \
                     an error)",
                    Q::NAME
                )
                .into(),
            )
        })
    }

    /// Whether a handler for `Q` is registered.
    pub fn handles<Q: Query>(&self) -> bool {
        self.inner
            .registries
            .queries
            .contains_key(&TypeId::of::<Q>())
    }

    /// Checks at start-up that every listed query has a handler, naming each one that has none.
    pub fn check(&self, required: impl IntoIterator<Item = MessageType>) -> Result<(), BuildError> {
        check_registered(&self.inner.registries.queries, required)
    }

    /// The wire names of every query this bus handles.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.inner.names.keys().copied()
    }
}
