//! Redis adapters for `cqrs-core`, on [fred](https://docs.rs/fred): a durable event transport
//! on Redis Streams with consumer groups ([`RedisStreamTransport`]) and pub/sub fan-out for
//! realtime pushes ([`RedisPubSub`]).
//!
//! ```no_run
//! use cqrs_core::ports::{ConsumerOptions, EventTransport, PubSub};
//! use cqrs_redis::{RedisPubSubOptions, RedisStreamOptions};
//! # use cqrs_core::{EventEnvelope, EventRecord, Metadata};
//! # use cqrs_core::doc::TicketOpened;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Durable, at-least-once, ordered per partition key.
//! let transport = RedisStreamOptions::new("redis://127.0.0.1:6379")
//!     .key_prefix("helpdesk")
//!     .connect()
//!     .await?;
//! # let envelope = EventEnvelope::new(TicketOpened { ticket_id: "t1".into() }, Metadata::new())
//! #     .with_partition_key("t1");
//! let record = EventRecord::from_envelope(&envelope)?;
//! transport.publish("tickets", &[record]).await?;
//!
//! let mut consumer = transport
//!     .consumer("tickets", "projections", ConsumerOptions::default())
//!     .await?;
//! for delivery in consumer.fetch(32).await? {
//!     // Handle it (dedupe by delivery.record.event_id), then acknowledge it.
//!     consumer.ack(&[delivery.id]).await?;
//! }
//!
//! // At-most-once fan-out to live subscribers, in every process.
//! let pubsub = RedisPubSubOptions::new("redis://127.0.0.1:6379")
//!     .channel_prefix("helpdesk")
//!     .connect()
//!     .await?;
//! let mut subscription = pubsub.subscribe("ticket:t1").await?;
//! pubsub.publish("ticket:t1", r#"{"changed":true}"#.into()).await?;
//! let message = subscription.recv().await;
//! # let _ = message; Ok(()) }
//! ```
//!
//! # Guarantees, in short
//!
//! * **At-least-once**: an entry is delivered until a consumer of the group acknowledges it;
//!   a nacked entry, or one left pending by a crashed consumer, is reclaimed after the
//!   consumer's redelivery delay. Consumers dedupe by `record.event_id`.
//! * **Per-key order** across any number of consumers of a group: entries with one partition
//!   key are chained in a lane, and a group hands an entry out only after it acknowledged the
//!   previous one of its lane ([`KeyOrdering`]).
//! * **Dead-lettering**: past `max_deliveries`, when undecodable, or when its consumer gives
//!   it up (`Consumer::dead_letter`), an entry moves to the
//!   topic's dead-letter stream with the error and the count; [`RedisStreamTransport`] lists,
//!   replays and discards dead letters.
//! * **Trimming** by `MINID` below the oldest entry some group still needs, never a blind
//!   `MAXLEN`.
//! * **Connection loss**: publishing fails fast with `TransportError::Unavailable`; consumers
//!   and subscriptions reconnect and resume by themselves, also from a connection that died
//!   silently (TCP keepalive, and a connection that leaves a command or a watchdog `PING`
//!   unanswered for the [unresponsive timeout](ConnectionOptions::unresponsive_timeout) is
//!   replaced).
//!
//! `docs/redis.md` in the repository states them in full, with the key layout and every option
//! and its default.
//!
//! # Features
//!
//! * `tls` (off by default): TLS connections for `rediss://` URLs, with rustls and ring,
//!   trusting the system's root certificates or
//!   [`ConnectionOptions::tls_ca_file`], with a client certificate from
//!   [`ConnectionOptions::tls_client_cert`] for servers that ask for one. Without it a TLS URL
//!   is refused at connect.
//!
//! It needs Redis 7.0 or later, checked at connect.

#![deny(missing_docs)]

mod connection;
mod consumer;
mod dead_letter;
mod entry;
mod error;
mod keys;
mod maintenance;
mod metric_catalog;
mod options;
mod pubsub;
mod scripts;
mod stats;
#[cfg(feature = "tls")]
mod tls;
mod transport;

pub use consumer::RedisConsumer;
pub use dead_letter::{DeadLetter, Replayed};
pub use error::ConnectError;
pub use maintenance::{GroupWithoutConsumers, StreamMaintenance, TrimReport};
pub use metric_catalog::{METRICS, describe_metrics};
pub use options::{
    ConnectionOptions, DEFAULT_URL, KeyOrdering, RedisPubSubOptions, RedisStreamOptions,
};
pub use pubsub::RedisPubSub;
pub use stats::{GroupStats, TopicStats};
pub use transport::{MIN_REDELIVERY_DELAY, RedisStreamTransport};
