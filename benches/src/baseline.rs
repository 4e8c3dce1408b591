//! What a bus dispatch is compared with: the same handler logic reached in other common ways.
//!
//! * a direct `.await` of the handler's inherent async fn (no indirection at all);
//! * a `Box<dyn Trait>` call of an `#[async_trait]` method (one boxed future): the floor for
//!   any type-erased handler, and the yardstick for the bus's overhead;
//! * a tower [`BoxService`] call (readiness, then one boxed future);
//! * a round trip over a tokio `mpsc` channel to a handler task, answered on a `oneshot`.

use crate::fixtures::{
    Increment, IncrementHandler, Incremented, Lookup, LookupHandler, SumIncrements,
    YieldingIncrementHandler,
};
use async_trait::async_trait;
use cqrs_core::{CommandContext, EventContext, HandlerError, Metadata, QueryContext};
use std::fmt;
use std::future::Future;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tower::util::BoxService;
use tower::{ServiceExt, service_fn};

/// The shape of [`cqrs_core::CommandHandler`], for a direct `Box<dyn ..>` call.
#[async_trait]
pub trait LocalCommandHandler: Send + Sync + 'static {
    /// Handles the command.
    async fn handle(
        &self,
        command: Increment,
        ctx: &mut CommandContext,
    ) -> Result<u64, HandlerError>;
}

#[async_trait]
impl LocalCommandHandler for IncrementHandler {
    async fn handle(
        &self,
        command: Increment,
        ctx: &mut CommandContext,
    ) -> Result<u64, HandlerError> {
        self.run(command, ctx).await
    }
}

#[async_trait]
impl LocalCommandHandler for YieldingIncrementHandler {
    async fn handle(
        &self,
        command: Increment,
        ctx: &mut CommandContext,
    ) -> Result<u64, HandlerError> {
        self.run(command, ctx).await
    }
}

/// The shape of [`cqrs_core::QueryHandler`], for a direct `Box<dyn ..>` call.
#[async_trait]
pub trait LocalQueryHandler: Send + Sync + 'static {
    /// Answers the query.
    async fn handle(&self, query: Lookup, ctx: &QueryContext) -> Result<u64, HandlerError>;
}

#[async_trait]
impl LocalQueryHandler for LookupHandler {
    async fn handle(&self, query: Lookup, ctx: &QueryContext) -> Result<u64, HandlerError> {
        self.run(query, ctx).await
    }
}

/// The shape of [`cqrs_core::EventHandler`], for a direct `Box<dyn ..>` call.
#[async_trait]
pub trait LocalEventHandler: Send + Sync + 'static {
    /// Reacts to the event.
    async fn handle(&self, event: &Incremented, ctx: EventContext<'_>) -> Result<(), HandlerError>;
}

#[async_trait]
impl LocalEventHandler for SumIncrements {
    async fn handle(&self, event: &Incremented, ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.run(event, ctx).await
    }
}

/// [`IncrementHandler`] as a boxed tower service taking the command and its metadata.
pub fn command_service() -> BoxService<(Increment, Metadata), u64, HandlerError> {
    BoxService::new(service_fn(
        |(command, metadata): (Increment, Metadata)| async move {
            let mut ctx = CommandContext::new(metadata);
            IncrementHandler.run(command, &mut ctx).await
        },
    ))
}

/// [`LookupHandler`] as a boxed tower service taking the query and its metadata.
pub fn query_service() -> BoxService<(Lookup, Metadata), u64, HandlerError> {
    BoxService::new(service_fn(
        |(query, metadata): (Lookup, Metadata)| async move {
            let ctx = QueryContext::new(metadata);
            LookupHandler.run(query, &ctx).await
        },
    ))
}

/// The sending side of a handler task started by [`spawn_handler_task`].
pub struct TaskClient<Req, Resp> {
    requests: mpsc::Sender<(Req, oneshot::Sender<Resp>)>,
}

impl<Req, Resp> fmt::Debug for TaskClient<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskClient").finish_non_exhaustive()
    }
}

impl<Req, Resp> TaskClient<Req, Resp> {
    /// Sends `request` to the task and waits for its answer; `None` if the task has stopped.
    pub async fn call(&self, request: Req) -> Option<Resp> {
        let (reply, answer) = oneshot::channel();
        self.requests.send((request, reply)).await.ok()?;
        answer.await.ok()
    }
}

/// Starts a task on `runtime` that answers each request with `handle`, one at a time, and
/// returns its client. The task ends when the client is dropped.
pub fn spawn_handler_task<Req, Resp, H, Fut>(runtime: &Handle, handle: H) -> TaskClient<Req, Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    H: Fn(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send,
{
    // Room for a burst, as a real command queue would have; a round trip uses one slot at a time.
    let (requests, mut incoming) = mpsc::channel::<(Req, oneshot::Sender<Resp>)>(64);
    runtime.spawn(async move {
        while let Some((request, reply)) = incoming.recv().await {
            // The caller may have given up waiting; its answer is then of no use to anyone.
            let _ = reply.send(handle(request).await);
        }
    });
    TaskClient { requests }
}

/// A handler task for [`Increment`] commands with their metadata.
pub fn spawn_command_task(
    runtime: &Handle,
) -> TaskClient<(Increment, Metadata), Result<u64, HandlerError>> {
    spawn_handler_task(
        runtime,
        |(command, metadata): (Increment, Metadata)| async move {
            let mut ctx = CommandContext::new(metadata);
            IncrementHandler.run(command, &mut ctx).await
        },
    )
}

/// A handler task for [`Lookup`] queries with their metadata.
pub fn spawn_query_task(
    runtime: &Handle,
) -> TaskClient<(Lookup, Metadata), Result<u64, HandlerError>> {
    spawn_handler_task(
        runtime,
        |(query, metadata): (Lookup, Metadata)| async move {
            let ctx = QueryContext::new(metadata);
            LookupHandler.run(query, &ctx).await
        },
    )
}

/// Calls a tower service once it is ready: what a caller of a [`BoxService`] does each time.
pub async fn call_when_ready<S, Req>(service: &mut S, request: Req) -> Result<S::Response, S::Error>
where
    S: tower::Service<Req>,
{
    service.ready().await?.call(request).await
}
