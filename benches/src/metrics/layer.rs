//! The layer that adds [`Metrics`] to a bus.

use super::{DispatchCounters, Metrics};
use std::sync::Arc;
use tower::Layer;

/// Counts every dispatch of a bus and its outcome in a shared [`DispatchCounters`].
///
/// ```
/// use cqrs_benches::fixtures::{Increment, IncrementHandler};
/// use cqrs_benches::metrics::{DispatchCounters, MetricsLayer};
/// use cqrs_core::CommandBus;
/// use std::sync::Arc;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let counters = Arc::new(DispatchCounters::new());
/// let bus = CommandBus::builder()
///     .layer(MetricsLayer::new(counters.clone()))
///     .handler(IncrementHandler)
///     .build()?;
/// assert_eq!(bus.dispatch(Increment { value: 1 }).await?, 2);
/// assert_eq!((counters.started(), counters.succeeded()), (1, 1));
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    counters: Arc<DispatchCounters>,
}

impl MetricsLayer {
    /// A layer that counts into `counters`.
    pub fn new(counters: Arc<DispatchCounters>) -> Self {
        Self { counters }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            counters: self.counters.clone(),
        }
    }
}
