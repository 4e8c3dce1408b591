//! Without middleware, with metadata built beforehand and a handler that records no events, a
//! command dispatch allocates exactly once: the handler's boxed `async_trait` future.

use crate::counting_allocator::{RUNS, WARM_UP, allocations_of, runtime};
use cqrs_benches::buses::{Stack, command_bus};
use cqrs_benches::fixtures::Increment;
use cqrs_core::Metadata;

#[test]
fn with_prebuilt_metadata_and_no_events() {
    let rt = runtime();
    let bus = command_bus(&Stack::Bare).expect("the bus builds");
    let metadata = Metadata::new();
    for value in 0..WARM_UP + RUNS {
        let (output, allocations) = allocations_of(
            &rt,
            bus.dispatch_with(Increment { value }, metadata.clone()),
        );
        assert_eq!(output.expect("the dispatch succeeds"), value + 1);
        if value >= WARM_UP {
            assert_eq!(allocations, 1, "allocations of one bare command dispatch");
        }
    }
}
