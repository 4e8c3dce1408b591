//! Ports: the traits that storage and transport adapters implement.
//!
//! Each port states its contract in its documentation, in the words its conformance suite in
//! [`testing`](crate::testing) checks; `docs/ports.md` collects them. The in-memory adapters in
//! [`memory`](crate::memory) implement every port and run every suite.

mod error;
mod event_store;
mod idempotency;
mod projection;
mod pubsub;
mod transport;

pub use error::{StoreError, TransportError};
pub use event_store::{
    EventStore, ExpectedVersion, MAX_PAYLOAD_DEPTH, Snapshot, SnapshotStore, holds_nul,
    nests_deeper_than,
};
pub(crate) use event_store::{Page, read_up_to_undecodable, unholdable};
pub use idempotency::{
    Claim, ClaimWaitElapsed, IdempotencyGuard, IdempotencyStore, MAX_RESPONSE_DEPTH, StoredResponse,
};
pub use projection::ProjectionStore;
pub use pubsub::{Fanout, PubSub, PubSubMessage, Subscription};
pub use transport::{
    Consumer, ConsumerOptions, Delivery, DeliveryId, EventTransport, TransportCapabilities,
    validate_group, validate_payloads, validate_topic,
};
