//! Without middleware, with metadata built beforehand and a handler that records no events, a
//! command dispatch allocates exactly once: the handler's boxed `async_trait` future.

use crate::counting_allocator::command_allocations;
use cqrs_benches::buses::{Stack, command_bus};

#[test]
fn with_prebuilt_metadata_and_no_events() {
    let bus = command_bus(&Stack::Bare).expect("the bus builds");
    let counted = command_allocations(&bus);
    assert!(
        counted.iter().all(|&n| n == 1),
        "a bare command dispatch allocated other than once: {counted:?}"
    );
}
