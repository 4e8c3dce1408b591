//! Conformance suites for every port, and helpers for testing code built on the core.
//!
//! Enabled by the `testing` feature; add it in `[dev-dependencies]`:
//!
//! ```toml
//! [dev-dependencies]
//! cqrs-core = { version = "0.1", features = ["testing"] }
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! ```
//!
//! # Conformance suites
//!
//! Each port has a module of scenarios, plain `pub async fn`s that take a harness, and a macro
//! that expands to one `#[tokio::test]` per scenario, so failures show one by one. An adapter
//! writes a harness (its port's `*Harness` trait) and an
//! `async fn(test_id: String) -> Option<Harness>` (`None` skips: its service is unreachable)
//! that builds a fresh, isolated instance: `test_id` is unique per test and belongs in every
//! schema, stream, topic, group and channel name the harness makes, so tests run in parallel
//! against one server and a log can be grepped by it.
//!
//! ```ignore
//! async fn harness(test_id: String) -> Option<MyStoreHarness> { MyStoreHarness::new(&test_id).await }
//! cqrs_core::event_store_conformance!(harness);
//! ```
//!
//! Scenarios skip or relax by the capabilities a harness declares, and assertions name the
//! message ids that went missing or came twice.

mod helpers;

pub mod event_store;
pub mod idempotency;
pub mod projection_store;
pub mod pubsub;
pub mod snapshot_store;
pub mod transport;

mod given;
mod metric_counts;

pub use given::{AggregateTest, CommandOutcome, CommandTest, TEST_AGGREGATE_ID, Then};
pub use helpers::{eventually, long, require_services, test_id, with_timeout};
pub use metric_counts::MetricCounts;

use async_trait::async_trait;

/// What every harness has: its test id and a teardown.
#[async_trait]
pub trait Harness: Send + Sync + Sized + 'static {
    /// The unique id of this test (prefix every name with it).
    fn test_id(&self) -> &str;

    /// Removes what the harness created (a schema, keys). Runs after a scenario that passed;
    /// after a failure the leftovers stay for inspection, named by the test id.
    async fn teardown(self) {}
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance {
    ($make:path, $port:ident, [$($scenario:ident),+ $(,)?]) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let ::std::option::Option::Some(harness) =
                    $make($crate::testing::test_id(::std::stringify!($scenario))).await
                else {
                    // The harness printed why (its service is unreachable); nothing to test.
                    return;
                };
                $crate::testing::with_timeout(
                    ::std::time::Duration::from_secs(60),
                    $crate::testing::$port::$scenario(&harness),
                )
                .await;
                $crate::testing::Harness::teardown(harness).await;
            }
        )+
    };
}
