//! `cqrs_core::middleware::MetricsLayer` records a dispatch without allocating: a bus with it
//! allocates as often per dispatch as a bus with a layer that does nothing. (No recorder is
//! installed, so `metrics` hands out no-op handles; building the keys is what would allocate.)

use crate::counting_allocator::{RUNS, WARM_UP, allocations_of, runtime};
use cqrs_benches::fixtures::{Increment, IncrementHandler};
use cqrs_core::middleware::MetricsLayer;
use cqrs_core::{CommandBus, Metadata};
use tower::layer::util::Identity;

fn per_dispatch(bus: &CommandBus) -> Vec<u64> {
    let rt = runtime();
    let metadata = Metadata::new();
    let mut counted = Vec::new();
    for value in 0..WARM_UP + RUNS {
        let (output, allocations) = allocations_of(
            &rt,
            bus.dispatch_with(Increment { value }, metadata.clone()),
        );
        assert_eq!(output.expect("the dispatch succeeds"), value + 1);
        if value >= WARM_UP {
            counted.push(allocations);
        }
    }
    counted
}

#[test]
fn for_a_command() {
    let with_metrics = CommandBus::builder()
        .layer(MetricsLayer::new())
        .handler(IncrementHandler)
        .build()
        .expect("the bus builds");
    let with_nothing = CommandBus::builder()
        .layer(Identity::new())
        .handler(IncrementHandler)
        .build()
        .expect("the bus builds");
    let (metrics, nothing) = (per_dispatch(&with_metrics), per_dispatch(&with_nothing));
    println!("allocations per dispatch: metrics layer {metrics:?}, identity layer {nothing:?}");
    assert!(
        metrics.iter().max() <= nothing.iter().min(),
        "the metrics layer allocated: {metrics:?} against {nothing:?}"
    );
}
