//! Typed command, query and event buses with tower middleware, and plugins found at link time.
//!
//! A request that changes state is a [`Command`], handled by exactly one [`CommandHandler`]; a
//! request that reads state is a [`Query`], handled by exactly one [`QueryHandler`]; something
//! that happened is an [`Event`], handled by every [`EventHandler`] of its type. Each kind goes
//! through its own bus: [`CommandBus`], [`QueryBus`], [`EventBus`].
//!
//! ```
//! use cqrs_core::async_trait; // re-exported: no dependency of your own needed
//! use cqrs_core::{Command, CommandBus, CommandContext, CommandHandler, HandlerError};
//!
//! #[derive(Command)]
//! #[cqrs(name = "hello.greet", output = String)] // the stable wire name, what handling returns
//! struct Greet {
//!     name: String,
//! }
//!
//! struct GreetHandler;
//!
//! #[async_trait]
//! impl CommandHandler<Greet> for GreetHandler {
//!     async fn handle(&self, cmd: Greet, _ctx: &mut CommandContext) -> Result<String, HandlerError> {
//!         Ok(format!("hello, {}", cmd.name))
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let bus = CommandBus::builder().handler(GreetHandler).build()?;
//! assert_eq!(bus.dispatch(Greet { name: "Ada".into() }).await?, "hello, Ada");
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # What lives here, and who depends on it
//!
//! The core holds the message traits, the buses, their [middleware], message [`Metadata`], the
//! [plugin] mechanism, the [ports] that storage and transport adapters implement, with
//! in-[memory] adapters and conformance suites (`testing`, behind the feature of that name),
//! event-sourced aggregates ([`AggregateRepository`]), [projection]s and consume loops, the
//! store [relay], and the [runtime] that runs background workers with health checks and
//! graceful shutdown. Adapters (`cqrs-postgres`, `cqrs-redis`, `cqrs-realtime`) depend on the core; the
//! core depends on none of them, nor on any web framework.
//!
//! # Buses are frozen
//!
//! A bus is built once and then only read: a dispatch looks its handler up in an immutable map
//! and takes no lock. Without middleware a dispatch allocates nothing but the handler's boxed
//! future. With middleware, every dispatch goes through one type-erased tower
//! [`Service`](tower::Service) over [`Dispatch`]; see [`middleware`].
//!
//! A handler that panics does not take the bus down: the panic becomes
//! [`DispatchError::Panicked`] for that one message.
//!
//! The events a command handler records (`ctx.record`) go to the bus's
//! [`EventSink`]: `cqrs-postgres`'s command layer stores them with the
//! handler's writes, and [`EventStoreSink`] appends them to an in-memory store. A bus with
//! neither drops them, and warns once that it does.
//!
//! # Feature flags
//!
//! | flag | what it adds |
//! |------|--------------|
//! | `derive` (default) | `#[derive(Command)]`, `#[derive(Query)]` and `#[derive(Event)]`, which implement [`Message`] and the trait of their name (written out by hand, see [`Command`]) |
//! | `testing` | the conformance suites for every port, given/when/then for aggregates, and test helpers ([`testing`]) |

#![deny(missing_docs)]

mod aggregate;
mod bus;
pub mod clock;
mod codec;
mod context;
mod dispatch;
mod envelope;
mod error;
mod extensions;
mod handler;
mod json;
pub mod memory;
mod message;
mod metadata;
mod metric_catalog;
pub mod middleware;
mod panic;
pub mod plugin;
pub mod ports;
pub mod projection;
mod record;
pub mod relay;
pub mod runtime;
#[cfg(feature = "testing")]
pub mod testing;
pub mod throttled;

pub use aggregate::{
    Aggregate, AggregateError, AggregateRepository, Committed, Decided, EventSet, Loaded,
    SNAPSHOT_WAIT,
};
pub use bus::command::{Executed, StoredPosition};
pub use bus::{
    CommandBus, CommandBusBuilder, CommandHandlers, EventBus, EventBusBuilder, EventHandlers,
    EventSink, EventStoreSink, Published, QueryBus, QueryBusBuilder, QueryHandlers,
};
pub use codec::{DecodeError, EventTypes, UnknownEventPolicy};
pub use context::{CommandContext, EventContext, QueryContext};
pub use dispatch::{Dispatch, Dispatcher, DispatcherFuture, Reply};
pub use envelope::{AnyEvent, EventEnvelope};
pub use error::{
    BoxError, BuildError, DispatchError, ErrorChain, ErrorKind, HandlerError, HandlerFailure,
    PublishError,
};
pub use extensions::Extensions;
pub use handler::{CommandHandler, EventHandler, QueryHandler};
pub use message::{Command, Event, Message, MessageKind, MessageType, Query};
// The derive macros, beside the traits of the same name: `use cqrs_core::Command;` brings both.
#[cfg(feature = "derive")]
pub use cqrs_macros::{Command, Event, Query};
pub use metadata::{Headers, Metadata, Principal};
pub use metric_catalog::{METRICS, MetricDescription, MetricKind, describe_metrics};
pub use panic::{CatchUnwind, panic_message};
pub use plugin::{
    MissingResource, Plugin, PluginError, PluginRegistrar, Plugins, UntakenContribution,
};
pub use ports::ExpectedVersion;
pub use record::{EventRecord, EventTypeLabels, InvalidPosition, Position, RecordMetadata};

/// Re-exported for handler implementations: `#[cqrs_core::async_trait]`.
pub use async_trait::async_trait;

/// The crates whose types appear in this crate's public API, re-exported so a user's versions
/// cannot differ from the ones the core was built with: `chrono` (`Clock`, timestamps),
/// `uuid` (message and event ids), `tower` (bus middleware), `serde` (what an event must
/// implement), `serde_json` (stored payloads, [`EventRecord::payload`]), `tracing` (the
/// span [`TracingLayer`](middleware::TracingLayer)'s hooks get) and `metrics` (what
/// [`MetricsLayer`](middleware::MetricsLayer) records, and the test kit's recorder).
pub mod reexports {
    pub use chrono;
    pub use metrics;
    pub use serde;
    pub use serde_json;
    pub use tower;
    pub use tracing;
    pub use uuid;
}

#[doc(hidden)]
pub mod __private {
    pub use crate::codec::EventTypeOfTheBuild;
    pub use crate::plugin::PluginRegistration;
    pub use inventory;
    // For the derives' bounds on generic events.
    pub use serde;
}

#[doc(hidden)]
pub mod doc;

/// The README's Rust examples, compiled and run as doc tests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
