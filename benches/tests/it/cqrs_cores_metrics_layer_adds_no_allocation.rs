//! `cqrs_core::middleware::MetricsLayer` records a dispatch without allocating: a bus with it
//! allocates as often per dispatch as a bus with a layer that does nothing. (No recorder is
//! installed, so `metrics` hands out no-op handles; building the keys is what would allocate.)

use crate::counting_allocator::command_allocations;
use cqrs_benches::fixtures::IncrementHandler;
use cqrs_core::CommandBus;
use cqrs_core::middleware::MetricsLayer;
use tower::layer::util::Identity;

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
    let (metrics, nothing) = (
        command_allocations(&with_metrics),
        command_allocations(&with_nothing),
    );
    println!("allocations per dispatch: metrics layer {metrics:?}, identity layer {nothing:?}");
    assert!(
        metrics.iter().max() <= nothing.iter().min(),
        "the metrics layer allocated: {metrics:?} against {nothing:?}"
    );
}
