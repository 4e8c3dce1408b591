//! In-memory adapters of every port: for tests, examples, and servers that run as one process
//! without durability. Each passes its port's conformance suite.

mod event_store;
mod idempotency;
mod projection;
mod pubsub;
mod transport;

pub use event_store::{InMemoryEventStore, InMemorySnapshotStore};
pub use idempotency::InMemoryIdempotencyStore;
pub use projection::{InMemoryProjectionStore, InMemoryUnit};
pub use pubsub::InMemoryPubSub;
pub use transport::{DEAD_LETTERS_KEPT, InMemoryTransport, MIN_REDELIVERY_DELAY};
