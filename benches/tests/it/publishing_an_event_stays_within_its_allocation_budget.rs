//! Publishing a pre-built event envelope through a bus without middleware allocates exactly
//! what it did when these budgets were measured. The counts are printed (`--nocapture`).

use crate::counting_allocator::{RUNS, WARM_UP, allocations_of, runtime};
use cqrs_benches::buses::event_bus;
use cqrs_benches::fixtures::Incremented;
use cqrs_core::{EventEnvelope, Metadata};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

fn allocations_per_publish(handlers: usize) -> Vec<u64> {
    let rt = runtime();
    let total = Arc::new(AtomicU64::new(0));
    let bus = event_bus(handlers, &total).expect("the bus builds");
    let envelope = EventEnvelope::new(Incremented { value: 1 }, Metadata::new());
    let mut counted = Vec::new();
    for run in 0..WARM_UP + RUNS {
        let (published, allocations) = allocations_of(&rt, bus.publish(envelope.clone()));
        assert_eq!(published.map(|p| p.handlers).ok(), Some(handlers));
        if run >= WARM_UP {
            counted.push(allocations);
        }
    }
    println!("event publish to {handlers} handler(s): allocations per publish {counted:?}");
    counted
}

/// One handler is awaited directly: its boxed `async_trait` future is the only allocation.
#[test]
fn to_one_handler() {
    let counted = allocations_per_publish(1);
    assert!(counted.iter().all(|&n| n == 1), "{counted:?}");
}

/// Measured, and asserted exactly (fewer is a change docs/benchmarks.md must say): one boxed
/// future per handler, plus `join_all`'s slice of futures and its `Vec` of results.
const EIGHT_HANDLER_BUDGET: u64 = 8 + 2;

#[test]
fn to_eight_handlers() {
    let counted = allocations_per_publish(8);
    assert!(
        counted.iter().all(|&n| n == EIGHT_HANDLER_BUDGET),
        "publishing to 8 handlers allocated other than {EIGHT_HANDLER_BUDGET} times: {counted:?}"
    );
}
