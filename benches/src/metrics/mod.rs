//! A metrics-style middleware, written as a user of the buses would: a counter per outcome.
//!
//! It stands for the layer most applications add, and shows that a layer over [`Dispatch`] needs
//! no boxing: its future is a pin-projected struct around the inner one.

mod future;
mod layer;

pub use future::MetricsFuture;
pub use layer::MetricsLayer;

use cqrs_core::{Dispatch, Reply};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tower::Service;

/// How many dispatches went through a [`Metrics`] service, and how each ended.
#[derive(Debug, Default)]
pub struct DispatchCounters {
    started: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
}

impl DispatchCounters {
    /// Counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Dispatches that entered the layer.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Dispatches whose inner service answered `Ok`.
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// Dispatches whose inner service answered `Err` (a handler error, a timeout, a refusal).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    // Relaxed: each counter is read on its own (a scrape); no other memory depends on it.
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The service made by [`MetricsLayer`]: counts each dispatch when it starts and when it ends.
///
/// A dispatch whose future is dropped before it finishes (a caller gave up) is counted as
/// started only.
#[derive(Clone, Debug)]
pub struct Metrics<S> {
    inner: S,
    counters: Arc<DispatchCounters>,
}

impl<S> Service<Dispatch> for Metrics<S>
where
    S: Service<Dispatch, Response = Reply>,
{
    type Response = Reply;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        DispatchCounters::add(&self.counters.started);
        MetricsFuture::new(self.inner.call(dispatch), self.counters.clone())
    }
}
