//! The handler traits.

use crate::{Command, CommandContext, Event, EventContext, HandlerError, Query, QueryContext};
use async_trait::async_trait;

/// Handles one command type. Exactly one handler per command type may be registered.
///
/// A panic in `handle` or while its future runs fails that one dispatch
/// ([`DispatchError::Panicked`](crate::DispatchError::Panicked)), and so does one while the
/// future is dropped unfinished (a timeout, a caller gone: logged, the dispatch already
/// failed). One exception, kept for speed: a hand-written future that returned and then
/// panics while it is dropped (a guard it still held) is dropped plainly, and the panic
/// reaches the caller (on a layered bus, it is reported as a layer's). Futures written with
/// `async` never do: their locals are gone when they return.
///
/// ```
/// # use cqrs_core::doc::{OpenTicket, TicketOpened};
/// use cqrs_core::async_trait;
/// use cqrs_core::{CommandContext, CommandHandler, HandlerError};
///
/// struct OpenTicketHandler;
///
/// #[async_trait]
/// impl CommandHandler<OpenTicket> for OpenTicketHandler {
///     async fn handle(&self, cmd: OpenTicket, ctx: &mut CommandContext) -> Result<String, HandlerError> {
///         if cmd.title.trim().is_empty() {
///             return Err(HandlerError::invalid("title_required", "a ticket needs a title"));
///         }
///         let id = "t1".to_owned();
///         ctx.record_keyed(id.as_str(), TicketOpened { ticket_id: id.clone() });
///         Ok(id)
///     }
/// }
/// ```
#[async_trait]
pub trait CommandHandler<C: Command>: Send + Sync + 'static {
    /// Handles the command. Events recorded on `ctx` are handed on only if this returns `Ok`.
    async fn handle(&self, command: C, ctx: &mut CommandContext)
    -> Result<C::Output, HandlerError>;
}

/// Handles one query type. Exactly one handler per query type may be registered. Panics are
/// caught as for a [`CommandHandler`] (with the same exception).
#[async_trait]
pub trait QueryHandler<Q: Query>: Send + Sync + 'static {
    /// Answers the query.
    async fn handle(&self, query: Q, ctx: &QueryContext) -> Result<Q::Output, HandlerError>;
}

/// Reacts to one event type. Any number of handlers per event type may be registered.
///
/// ```
/// # use cqrs_core::doc::TicketOpened;
/// use cqrs_core::async_trait;
/// use cqrs_core::{EventContext, EventHandler, HandlerError};
///
/// struct NotifyAgents;
///
/// #[async_trait]
/// impl EventHandler<TicketOpened> for NotifyAgents {
///     async fn handle(&self, event: &TicketOpened, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
///         println!("new ticket {}", event.ticket_id);
///         Ok(())
///     }
///
///     fn name(&self) -> &str {
///         "notify_agents"
///     }
/// }
/// ```
#[async_trait]
pub trait EventHandler<E: Event>: Send + Sync + 'static {
    /// Reacts to the event.
    async fn handle(&self, event: &E, ctx: EventContext<'_>) -> Result<(), HandlerError>;

    /// A stable name for this handler, used in reports, logs and as a consumer name. Defaults
    /// to the Rust type name; override it when the handler's progress is stored (inbox,
    /// checkpoints), so a rename does not reset it.
    fn name(&self) -> &str {
        std::any::type_name::<Self>()
    }
}
