//! A WebSocket hub for cqrs-core: pushes what happened to the clients that may see it,
//! authorized, bounded, across instances, resumable from the durable log.
//!
//! A server plugs in three things and mounts one route:
//!
//! * an [`Authenticator`]: bearer token → principal, at the handshake (refusal: 401; an
//!   authenticator that cannot check, or takes longer than the operation timeout: 503 with
//!   `Retry-After`), and when its credentials expire (the connection is then closed with 1008);
//! * an [`Authorizer`]: may this principal subscribe to this topic, and see this event;
//! * an [`EventRouting`]: which [`Topic`]s an [`EventRecord`](cqrs_core::EventRecord) goes to,
//!   on which coarse pub/sub channel, as which JSON `event` object, with which routing fields.
//!
//! Events reach the hub through the core's [`PubSub`](cqrs_core::ports::PubSub) port: a
//! [`Publisher`] publishes each event once per channel, and every hub subscribed to that
//! channel, in any process, pushes it. For topics clients resume with `since`, feed it from a
//! relay through [`Publisher::into_transport`] ([`PublisherTransport`]): one active relay
//! reads the event store in position order, so every hub gets the events in that order. (A
//! [`PublishWorker`] fed by the durable transport publishes in order per aggregate only.)
//!
//! ```
//! use axum::Router;
//! use cqrs_core::memory::{InMemoryEventStore, InMemoryPubSub};
//! use cqrs_core::ports::EventStore;
//! use cqrs_core::{EventRecord, ExpectedVersion};
//! use cqrs_realtime::{AllowAll, AuthenticateFn, EventRouting, Hub, Routed, Topic, Unauthenticated};
//! use std::sync::Arc;
//! # use cqrs_realtime::doc::ticket_record;
//!
//! /// Topics `tickets` and `ticket:<id>`, both carried on one channel, `tickets`.
//! struct Tickets;
//!
//! impl EventRouting for Tickets {
//!     fn channel(&self, topic: &Topic) -> Option<String> {
//!         matches!((topic.family(), topic.key()), ("tickets", None) | ("ticket", Some(_)))
//!             .then(|| "tickets".to_owned())
//!     }
//!
//!     fn route(&self, record: &EventRecord) -> Option<Routed> {
//!         let id = record.payload["ticket_id"].as_str()?;
//!         Some(
//!             Routed::new(serde_json::json!({ "type": record.event_type, "ticket_id": id }))
//!                 .topic(Topic::parse("tickets").ok()?)
//!                 .topic(Topic::with_key("ticket", id).ok()?)
//!                 .routing("reporter_id", record.payload["reporter_id"].clone()),
//!         )
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = Arc::new(InMemoryEventStore::new());
//! let hub = Hub::builder(
//!         AuthenticateFn::new(|token: String| async move {
//!             // Check a JWT here; the principal can be any type.
//!             token.strip_prefix("user-").map(str::to_owned).ok_or(Unauthenticated::new("invalid token"))
//!         })
//!         // The user, under whom the hub counts connections; with a JWT, also
//!         // `.expires_at(|claims| Some(claims.exp))`, or a connection outlives its token.
//!         .connection_key(|user: &String| Some(user.clone())),
//!     )
//!     .authorizer(AllowAll)
//!     .routing(Tickets)
//!     .pubsub(Arc::new(InMemoryPubSub::new()))
//!     .event_store(store.clone())
//!     .build()?;
//!
//! // Mount it: clients connect to ws://host/ws?token=... or send `Authorization: Bearer ...`.
//! let app: Router = Router::new().route("/ws", hub.route());
//!
//! // After a command stored its events, publish them (or run a relay over
//! // `publisher.into_transport()`, which publishes in the store's order).
//! let stored = store.append("ticket-t1", ExpectedVersion::NO_STREAM, vec![ticket_record("t1", "u1")]).await?;
//! hub.publisher().publish_all(&stored).await?;
//! # let _ = app;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # The protocol
//!
//! JSON text frames. From the client: `subscribe` `{topic, since?}`, `unsubscribe` `{topic}`,
//! `ping`. From the server: `subscribed`, `unsubscribed`, `pong`, `event`
//! `{topic, event, position}` and `error` `{code, message, topic?}` (the topic of the
//! subscription it is about, if any) ([`ClientFrame`],
//! [`ServerFrame`], [`ErrorCode`]). `subscribed` is sent once the subscription is live; a
//! connection gets one `event` frame per matching subscription. `docs/realtime.md` has every
//! frame, the limits and their defaults ([`HubOptions`]), and the guarantees:
//!
//! * live push is at-most-once (the pub/sub is), but a loss the hub sees (its subscription
//!   fell behind, or the pub/sub reconnected) is told to every subscription of the channel's
//!   topics with an `error` frame `events_missed`, so the client resumes with `since`;
//!   each topic's events arrive in the order they were published (a topic being resumed
//!   may fall behind the connection's other topics on its channel), and a position among
//!   the last 1,024 a channel delivered, delivered again (a relay re-shipping a batch), is
//!   not pushed twice;
//! * a client that resumes with `since` gets, from the event store, every event after that
//!   position it may see, then the live ones, with no gap and no duplicate at the seam.
//!
//! # Limits
//!
//! Each connection has a bounded send queue; a client that does not drain it is closed with
//! 1008. Buffers and frame sizes are set on the upgrade (512-byte read buffer, 4 KiB messages),
//! subscriptions per connection are capped, idle connections are pinged and closed, and
//! [`Hub::shutdown`] (or the runtime's [`Shutdown`](cqrs_core::runtime::Shutdown)) closes
//! everything with 1001.
//!
//! # Metrics
//!
//! Through the `metrics` facade (install the recorder before building the hub), named in
//! [`metrics::names`]: open connections, subscriptions, messages sent, slow-client closes,
//! idle closes, expired-credential closes, refused handshakes, missed upstream messages,
//! `events_missed` notices sent, replayed events. [`Hub::stats`] reads the same counters directly.

#![deny(missing_docs)]

mod auth;
mod connection;
mod connections;
mod hub;
pub mod metrics;
mod options;
mod protocol;
mod publisher;
mod queue;
mod registry;
mod replay;
mod revocation;
mod routing;
mod signal;
mod topic;
mod transport;
mod upstream;
mod worker;

pub use auth::{
    AllowAll, AuthenticateFn, Authenticator, Authorizer, ClientKey, Refusal, Unauthenticated,
};
pub use hub::{BuildError, Hub, HubBuilder, RevocationError, WeakHub};
pub use metrics::{HubStats, METRICS, describe_metrics};
pub use options::{DEFAULT_CHANNEL_PREFIX, HubOptions};
pub use protocol::{ClientFrame, ErrorCode, FrameError, ServerFrame, UnknownErrorCode, close_code};
pub use publisher::{PublishError, Publisher};
pub use routing::{EventRouting, PushedEvent, Routed};
pub use topic::{InvalidTopic, MAX_TOPIC_LEN, Topic};
pub use transport::PublisherTransport;
pub use worker::PublishWorker;

/// Re-exported for `Authenticator` and `Authorizer` implementations:
/// `#[cqrs_realtime::async_trait]`.
pub use async_trait::async_trait;

/// The crates whose types appear in this crate's public API, re-exported so a user's versions
/// cannot differ: `axum` (`Hub::route` is an axum `MethodRouter`), `chrono`
/// (`Authenticator::expires_at`), `serde_json` (`Routed::new`, `PushedEvent::routing`,
/// `PublishError::Encode`) and `uuid` (the event ids of `PublishError::Encode`).
pub mod reexports {
    pub use axum;
    pub use chrono;
    pub use serde_json;
    pub use uuid;
}

#[doc(hidden)]
pub mod doc;
