//! With the tracing, metrics and timeout layers (no tracing subscriber), a dispatch allocates
//! exactly what it did when this budget was measured, each allocation accounted for below: more
//! is a regression, fewer a change docs/benchmarks.md must say (then lower the budget). The
//! count is printed (`--nocapture`).

use crate::counting_allocator::{RUNS, WARM_UP, allocations_of, command_allocations, runtime};
use cqrs_benches::buses::{Stack, command_bus, query_bus};
use cqrs_benches::fixtures::Lookup;
use cqrs_core::Metadata;

/// Measured allocations of one layered dispatch: the layered service's boxed future, the boxed
/// call (the message, then the handler's run and its output) and the handler's boxed
/// `async_trait` future. Tracing (disabled), the metrics layer and the timeout layer add none,
/// for this handler, which finishes on its first poll: one that waits makes the timeout layer
/// start its timer, one allocation more (a_dispatch_that_waits_adds_the_timeout_layers_timer).
const BUDGET: u64 = 3;

#[test]
fn for_a_command() {
    let bus = command_bus(&Stack::three_layers()).expect("the bus builds");
    let counted = command_allocations(&bus);
    println!("three-layer command dispatch: allocations per dispatch {counted:?}");
    assert!(
        counted.iter().all(|&n| n == BUDGET),
        "a three-layer command dispatch allocated other than {BUDGET} times: {counted:?}"
    );
}

/// cqrs-core's own layers (its `MetricsLayer`, whose keys are built at a message's first
/// dispatch, in the warm-up, and kept) allocate what the bench's three do, with no `metrics`
/// recorder installed.
#[test]
fn for_a_command_through_the_shipped_layers() {
    let bus = command_bus(&Stack::Shipped).expect("the bus builds");
    let counted = command_allocations(&bus);
    println!("shipped-layer command dispatch: allocations per dispatch {counted:?}");
    assert!(
        counted.iter().all(|&n| n == BUDGET),
        "a command dispatch through the shipped layers allocated other than {BUDGET} times: \
         {counted:?}"
    );
}

#[test]
fn for_a_query() {
    let rt = runtime();
    let bus = query_bus(&Stack::three_layers()).expect("the bus builds");
    let metadata = Metadata::new();
    let mut counted = Vec::new();
    for key in 0..WARM_UP + RUNS {
        let (output, allocations) =
            allocations_of(&rt, bus.dispatch_with(Lookup { key }, metadata.clone()));
        assert_eq!(output.expect("the dispatch succeeds"), key * 31);
        if key >= WARM_UP {
            counted.push(allocations);
        }
    }
    println!("three-layer query dispatch: allocations per dispatch {counted:?}");
    assert!(
        counted.iter().all(|&n| n == BUDGET),
        "a three-layer query dispatch allocated other than {BUDGET} times: {counted:?}"
    );
}
