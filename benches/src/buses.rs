//! The buses under measurement, built the same way for the benchmarks and the allocation checks.

use crate::fixtures::{
    IncrementHandler, Incremented, LookupHandler, SumIncrements, YieldingIncrementHandler,
};
use crate::metrics::{DispatchCounters, MetricsLayer};
use cqrs_core::middleware::{TimeoutLayer, TracingLayer};
use cqrs_core::{BuildError, CommandBus, CommandBusBuilder, EventBus, QueryBus};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The budget of the [`TimeoutLayer`] in the three-layer stack: far above any dispatch here, so
/// it never fires and only its bookkeeping is measured.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Which middleware a bus has.
#[derive(Clone, Debug)]
pub enum Stack {
    /// None: the bus takes its direct path.
    Bare,
    /// [`TracingLayer`] (outermost), [`MetricsLayer`] counting into these counters, then
    /// [`TimeoutLayer`] with [`TIMEOUT`], so the counters see timeouts as failures.
    ///
    /// Without a tracing subscriber the span is disabled: the cost of the layer when tracing is
    /// off. The dispatch bench's `bus_three_layers_traced` cases add one that enables the span
    /// and records nothing.
    ThreeLayers(Arc<DispatchCounters>),
    /// The layers cqrs-core ships, as a server stacks them (the helpdesk's order):
    /// [`TracingLayer`], cqrs-core's own [`MetricsLayer`](cqrs_core::middleware::MetricsLayer),
    /// [`TimeoutLayer`] with [`TIMEOUT`]. No `metrics` recorder is installed in the benches, so
    /// its records go to the facade's no-op one: the layers' own cost, without a recorder's
    /// (a Prometheus exporter's, say, which adds its lookups).
    Shipped,
}

impl Stack {
    /// The three-layer stack with fresh counters.
    pub fn three_layers() -> Self {
        Stack::ThreeLayers(Arc::new(DispatchCounters::new()))
    }
}

/// A command bus with [`IncrementHandler`] behind `stack`.
pub fn command_bus(stack: &Stack) -> Result<CommandBus, BuildError> {
    stacked(CommandBus::builder().handler(IncrementHandler), stack)
}

/// A command bus with [`YieldingIncrementHandler`] behind `stack`: the same command and layers
/// as [`command_bus`], with a handler that waits once.
pub fn yielding_command_bus(stack: &Stack) -> Result<CommandBus, BuildError> {
    stacked(
        CommandBus::builder().handler(YieldingIncrementHandler),
        stack,
    )
}

/// `builder` with `stack`'s layers, built.
fn stacked(builder: CommandBusBuilder, stack: &Stack) -> Result<CommandBus, BuildError> {
    match stack {
        Stack::Bare => builder.build(),
        Stack::ThreeLayers(counters) => builder
            .layer(TracingLayer::new())
            .layer(MetricsLayer::new(counters.clone()))
            .layer(TimeoutLayer::new(TIMEOUT))
            .build(),
        Stack::Shipped => builder
            .layer(TracingLayer::new())
            .layer(cqrs_core::middleware::MetricsLayer::new())
            .layer(TimeoutLayer::new(TIMEOUT))
            .build(),
    }
}

/// A query bus with [`LookupHandler`] behind `stack`.
pub fn query_bus(stack: &Stack) -> Result<QueryBus, BuildError> {
    let builder = QueryBus::builder().handler(LookupHandler);
    match stack {
        Stack::Bare => builder.build(),
        Stack::ThreeLayers(counters) => builder
            .layer(TracingLayer::new())
            .layer(MetricsLayer::new(counters.clone()))
            .layer(TimeoutLayer::new(TIMEOUT))
            .build(),
        Stack::Shipped => builder
            .layer(TracingLayer::new())
            .layer(cqrs_core::middleware::MetricsLayer::new())
            .layer(TimeoutLayer::new(TIMEOUT))
            .build(),
    }
}

/// `count` handlers of [`Incremented`], named `sum_0`, `sum_1`, ..., all adding to `total`.
pub fn event_handlers(count: usize, total: &Arc<AtomicU64>) -> Vec<SumIncrements> {
    (0..count)
        .map(|i| SumIncrements::new(format!("sum_{i}"), total.clone()))
        .collect()
}

/// An event bus without middleware whose [`Incremented`] has `count` handlers, all adding to
/// `total`.
pub fn event_bus(count: usize, total: &Arc<AtomicU64>) -> Result<EventBus, BuildError> {
    event_handlers(count, total)
        .into_iter()
        .fold(EventBus::builder(), |builder, handler| {
            builder.handler::<Incremented, _>(handler)
        })
        .build()
}
