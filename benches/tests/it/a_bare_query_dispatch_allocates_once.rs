//! Without middleware and with metadata built beforehand, a query dispatch allocates exactly
//! once: the handler's boxed `async_trait` future.

use crate::counting_allocator::{RUNS, WARM_UP, allocations_of, runtime};
use cqrs_benches::buses::{Stack, query_bus};
use cqrs_benches::fixtures::Lookup;
use cqrs_core::Metadata;

#[test]
fn with_prebuilt_metadata() {
    let rt = runtime();
    let bus = query_bus(&Stack::Bare).expect("the bus builds");
    let metadata = Metadata::new();
    for key in 0..WARM_UP + RUNS {
        let (output, allocations) =
            allocations_of(&rt, bus.dispatch_with(Lookup { key }, metadata.clone()));
        assert_eq!(output.expect("the dispatch succeeds"), key * 31);
        if key >= WARM_UP {
            assert_eq!(allocations, 1, "allocations of one bare query dispatch");
        }
    }
}
