//! The three kinds of message and their wire names.

use serde::{Serialize, de::DeserializeOwned};
use std::any::TypeId;

/// Anything that travels through a bus.
///
/// `NAME` is the message's stable wire name: it identifies the type in logs, metrics, errors,
/// stored events and on the network, so it must not change when the Rust type is renamed or
/// moved. Prefer a dotted, namespaced form such as `"tickets.open_ticket"`.
///
/// The derives `#[derive(Command)]`, `#[derive(Query)]` and `#[derive(Event)]` implement this
/// trait along with theirs (feature `derive`, on by default), from `#[cqrs(name = "...")]`, and
/// check at compile time that the name is 1 to 64 ASCII letters, digits, `.`, `_` and `-`, so it
/// needs no quoting in metrics labels, log fields or URLs. Implement it by hand for a name
/// outside that rule, such as one events were already stored under.
pub trait Message: Send + 'static {
    /// The stable wire name of this message type.
    const NAME: &'static str;
}

/// A request to change state. Exactly one [`CommandHandler`](crate::CommandHandler) handles each
/// command type.
///
/// Derived, with the wire name and what the handler returns:
///
/// ```
/// use cqrs_core::Command;
///
/// #[derive(Command)]
/// #[cqrs(name = "tickets.open_ticket", output = u64)] // leave `output` out for ()
/// struct OpenTicket {
///     title: String,
/// }
/// ```
///
/// Or by hand, which is the same:
///
/// ```
/// use cqrs_core::{Command, Message};
///
/// struct OpenTicket {
///     title: String,
/// }
///
/// impl Message for OpenTicket {
///     const NAME: &'static str = "tickets.open_ticket";
/// }
///
/// impl Command for OpenTicket {
///     type Output = u64;
/// }
/// ```
pub trait Command: Message {
    /// What a successful handler returns to the caller.
    type Output: Send + 'static;
}

/// A request to read state. Exactly one [`QueryHandler`](crate::QueryHandler) handles each query
/// type.
///
/// ```
/// use cqrs_core::Query;
///
/// #[derive(Query)]
/// #[cqrs(name = "tickets.get_ticket", output = Option<String>)]
/// struct GetTicket {
///     id: u64,
/// }
/// ```
///
/// By hand: `impl Message for GetTicket { const NAME: &'static str = "tickets.get_ticket"; }`
/// and `impl Query for GetTicket { type Output = Option<String>; }`.
pub trait Query: Message {
    /// What the handler returns.
    type Output: Send + 'static;
}

/// Something that happened. Any number of [`EventHandler`](crate::EventHandler)s react to each
/// event type.
///
/// Events are serializable because they are stored and shipped between processes. `VERSION` is the
/// schema version of the payload: raise it when the shape changes and register an upcaster for the
/// old versions (see [`EventTypes::upcaster`](crate::EventTypes::upcaster)).
///
/// Derived (`version` is 1 when left out):
///
/// ```
/// use cqrs_core::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
/// #[cqrs(name = "tickets.ticket_opened", version = 1)]
/// struct TicketOpened {
///     ticket_id: String,
///     title: String,
/// }
/// ```
///
/// Or by hand:
///
/// ```
/// use cqrs_core::{Event, Message};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// struct TicketOpened {
///     ticket_id: String,
///     title: String,
/// }
///
/// impl Message for TicketOpened {
///     const NAME: &'static str = "TicketOpened";
/// }
///
/// impl Event for TicketOpened {
///     const VERSION: u32 = 1;
/// }
/// ```
pub trait Event: Message + Sync + Serialize + DeserializeOwned {
    /// The schema version of this event's payload. Starts at 1.
    const VERSION: u32 = 1;
}

/// Which bus a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageKind {
    /// A [`Command`].
    Command,
    /// A [`Query`].
    Query,
    /// An [`Event`].
    Event,
}

impl MessageKind {
    /// The lower-case name used in logs and metrics: `command`, `query` or `event`.
    pub const fn as_str(self) -> &'static str {
        match self {
            MessageKind::Command => "command",
            MessageKind::Query => "query",
            MessageKind::Event => "event",
        }
    }
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message type, by kind, wire name and Rust type: what a server checks at start-up with
/// [`CommandBus::check`](crate::CommandBus::check) and its siblings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageType {
    kind: MessageKind,
    name: &'static str,
    type_id: TypeId,
    type_name: &'static str,
}

impl MessageType {
    /// The type of command `C`.
    pub fn command<C: Command>() -> Self {
        Self {
            kind: MessageKind::Command,
            name: C::NAME,
            type_id: TypeId::of::<C>(),
            type_name: std::any::type_name::<C>(),
        }
    }

    /// The type of query `Q`.
    pub fn query<Q: Query>() -> Self {
        Self {
            kind: MessageKind::Query,
            name: Q::NAME,
            type_id: TypeId::of::<Q>(),
            type_name: std::any::type_name::<Q>(),
        }
    }

    /// The type of event `E`.
    pub fn event<E: Event>() -> Self {
        Self {
            kind: MessageKind::Event,
            name: E::NAME,
            type_id: TypeId::of::<E>(),
            type_name: std::any::type_name::<E>(),
        }
    }

    /// The bus this type belongs to.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// The wire name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The Rust type's id.
    pub fn type_id(&self) -> TypeId {
        self.type_id
    }

    /// The Rust type's name, as [`std::any::type_name`] gives it: for messages to people (it
    /// may change between compiler versions), never for matching.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
}
