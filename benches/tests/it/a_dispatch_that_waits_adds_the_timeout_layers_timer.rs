//! A dispatch whose handler waits once (`yield_now`) is polled twice; its allocations are
//! counted over both polls, on one current-thread runtime. The other checks cover handlers that
//! finish on their first poll, where the timeout layer never starts its timer; here it does, and
//! its timer is one allocation more. The counts are printed (`--nocapture`) for
//! docs/benchmarks.md.

use crate::counting_allocator::{RUNS, WARM_UP, allocations_until_done, runtime};
use cqrs_benches::baseline::LocalCommandHandler;
use cqrs_benches::buses::{Stack, yielding_command_bus};
use cqrs_benches::fixtures::{Increment, YieldingIncrementHandler};
use cqrs_benches::metrics::{DispatchCounters, MetricsLayer};
use cqrs_core::middleware::TracingLayer;
use cqrs_core::{CommandBus, CommandContext, Metadata};
use std::future::Future;
use std::sync::Arc;

/// The allocations of each counted run of `dispatch(value)`, which must answer `value + 1`
/// after exactly two polls.
fn per_dispatch<F, E>(mut dispatch: impl FnMut(u64) -> F) -> Vec<u64>
where
    F: Future<Output = Result<u64, E>>,
    E: std::fmt::Debug,
{
    let rt = runtime();
    let mut counted = Vec::new();
    for value in 0..WARM_UP + RUNS {
        let (output, allocations, polls) = allocations_until_done(&rt, dispatch(value));
        assert_eq!(output.expect("the dispatch succeeds"), value + 1);
        assert_eq!(
            polls, 2,
            "the handler waits once, so the dispatch is polled twice"
        );
        if value >= WARM_UP {
            counted.push(allocations);
        }
    }
    counted
}

/// Every counted run allocated `expected` times.
fn assert_all(counted: &[u64], expected: u64, path: &str) {
    assert!(
        counted.iter().all(|&n| n == expected),
        "{path}: expected {expected} allocations per dispatch, counted {counted:?}"
    );
}

#[test]
fn for_a_command() {
    let metadata = Metadata::new();

    // The yield itself: tokio's current-thread scheduler defers the wake-up into a `Vec` that
    // each `block_on` starts empty, so its first deferred wake-up grows it once. Every path
    // below pays this one; a long-running `block_on` (criterion's samples) pays it once.
    let direct = per_dispatch(|value| {
        let metadata = metadata.clone();
        async move {
            let mut ctx = CommandContext::new(metadata);
            YieldingIncrementHandler
                .run(Increment { value }, &mut ctx)
                .await
        }
    });
    assert_all(&direct, 1, "direct await, yielding");

    // The yardstick: the yield, plus the boxed `async_trait` future.
    let boxed = Box::new(YieldingIncrementHandler) as Box<dyn LocalCommandHandler>;
    let baseline = per_dispatch(|value| {
        let boxed = &boxed;
        let metadata = metadata.clone();
        async move {
            let mut ctx = CommandContext::new(metadata);
            boxed.handle(Increment { value }, &mut ctx).await
        }
    });
    assert_all(&baseline, 2, "boxed async_trait, yielding");

    // The bare bus: exactly the yardstick's two (the yield and the handler's boxed future);
    // waiting adds nothing of the bus's own, as without waiting (1 = the boxed future).
    let bare = yielding_command_bus(&Stack::Bare).expect("the bus builds");
    let bare = per_dispatch(|value| bare.dispatch_with(Increment { value }, metadata.clone()));
    assert_all(&bare, 2, "bare bus, yielding");

    // Tracing (off) and the metrics layer without the timeout layer: the three of a layered
    // dispatch that does not wait (a_three_layer_dispatch_stays_within_its_allocation_budget)
    // plus the yield; waiting adds nothing to these two layers.
    let two_layers = CommandBus::builder()
        .handler(YieldingIncrementHandler)
        .layer(TracingLayer::new())
        .layer(MetricsLayer::new(Arc::new(DispatchCounters::new())))
        .build()
        .expect("the bus builds");
    let two_layers =
        per_dispatch(|value| two_layers.dispatch_with(Increment { value }, metadata.clone()));
    assert_all(&two_layers, 4, "tracing and metrics layers, yielding");

    // The three layers: those four plus the timeout layer's timer, `Box::pin(sleep(budget))`,
    // made on the first `Pending` (cqrs-core/src/middleware/timeout.rs). Registering it with
    // the runtime's timer wheel and cancelling it when the dispatch ends allocate nothing.
    let layered = yielding_command_bus(&Stack::three_layers()).expect("the bus builds");
    let layered =
        per_dispatch(|value| layered.dispatch_with(Increment { value }, metadata.clone()));
    assert_all(&layered, 5, "three layers, yielding");

    println!(
        "yielding command dispatch, allocations over both polls: direct await {direct:?}, \
         boxed async_trait {baseline:?}, bare bus {bare:?}, tracing + metrics {two_layers:?}, \
         three layers {layered:?}"
    );
}
