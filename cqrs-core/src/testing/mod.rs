//! Conformance suites for every port, and helpers for testing code built on the core.
//!
//! Enabled by the `testing` feature; add it in `[dev-dependencies]`, with tokio as a
//! dependency of the test crate's own (the suites' macros expand to `#[::tokio::test]`):
//!
//! ```toml
//! [dev-dependencies]
//! cqrs-core = { path = "../cqrs/cqrs-core", features = ["testing"] }   # not published yet
//! tokio = { version = "1.47", features = ["macros", "rt-multi-thread"] }
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
//! A test file of an adapter's crate (`tests/snapshot_store.rs`), here for the in-memory
//! snapshot store. The test crate needs tokio with the `macros` and `rt-multi-thread`
//! features, since the macro's tests are `#[tokio::test]`s; `cargo test` runs them, one test
//! a scenario. The `main` is only there so this example runs as it is: a scenario is a plain
//! `async fn`, which can also be called by hand, each with a harness of its own.
//!
//! ```
//! use cqrs_core::memory::InMemorySnapshotStore;
//! use cqrs_core::ports::SnapshotStore;
//! use cqrs_core::testing::Harness;
//! use cqrs_core::testing::snapshot_store::{self, SnapshotStoreHarness};
//! use std::sync::Arc;
//!
//! /// One fresh store per test. A store on a server would also keep `test_id` to name what
//! /// it creates, and drop that in `teardown`.
//! struct MyStoreHarness {
//!     test_id: String,
//!     store: InMemorySnapshotStore,
//! }
//!
//! impl Harness for MyStoreHarness {
//!     fn test_id(&self) -> &str {
//!         &self.test_id
//!     }
//! }
//!
//! impl SnapshotStoreHarness for MyStoreHarness {
//!     fn store(&self) -> Arc<dyn SnapshotStore> {
//!         Arc::new(self.store.clone())
//!     }
//! }
//!
//! /// `None` skips the test (after saying why: its server is unreachable). Memory is always there.
//! async fn harness(test_id: String) -> Option<MyStoreHarness> {
//!     Some(MyStoreHarness { test_id, store: InMemorySnapshotStore::default() })
//! }
//!
//! // One `#[tokio::test]` per scenario of the snapshot store suite.
//! cqrs_core::snapshot_store_conformance!(harness);
//!
//! #[tokio::main]
//! async fn main() {
//!     // A fresh harness per scenario, as the macro gives each test: scenarios name what they
//!     // make from the test id alone, so two of them on one harness may meet each other's.
//!     let h = harness(cqrs_core::testing::test_id("latest")).await.unwrap();
//!     snapshot_store::the_latest_snapshot_is_loaded_whole(&h).await;
//!     h.teardown().await;
//!     let h = harness(cqrs_core::testing::test_id("older")).await.unwrap();
//!     snapshot_store::an_older_or_equal_snapshot_is_ignored(&h).await;
//!     h.teardown().await;
//! }
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

pub use given::{
    AggregateTest, CommandOutcome, CommandTest, TEST_AGGREGATE_ID, Then, ask, ask_with, deliver,
    deliver_envelope, deliver_with,
};
#[doc(hidden)]
pub use helpers::__no_harness;
pub use helpers::{
    assert_metrics_listed, eventually, eventually_ok, long, metric_names_recorded_in,
    require_services, scoped_subscribers_see_every_callsite, test_id, with_timeout,
};
pub use metric_counts::{MetricCounts, Scoped};

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
                // The harness's set-up and teardown are bounded as the scenario is: a connect
                // that hangs fails the test instead of stalling CI.
                let made = ::tokio::time::timeout(
                    ::std::time::Duration::from_secs(60),
                    $make($crate::testing::test_id(::std::stringify!($scenario))),
                )
                .await
                .expect("the harness was not made within 60 s");
                let ::std::option::Option::Some(harness) = made else {
                    // Its service is unreachable (the harness said so), or, when services
                    // are required, the harness is wrong: a green suite that tested nothing.
                    $crate::testing::__no_harness(::std::stringify!($scenario));
                    return;
                };
                $crate::testing::with_timeout(
                    ::std::time::Duration::from_secs(60),
                    $crate::testing::$port::$scenario(&harness),
                )
                .await;
                ::tokio::time::timeout(
                    ::std::time::Duration::from_secs(60),
                    $crate::testing::Harness::teardown(harness),
                )
                .await
                .expect("the harness's teardown did not finish within 60 s");
            }
        )+
    };
}
