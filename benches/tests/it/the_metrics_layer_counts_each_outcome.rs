//! The metrics layer counts every dispatch as started, then as succeeded or failed.

use crate::counting_allocator::runtime;
use async_trait::async_trait;
use cqrs_benches::fixtures::{Increment, IncrementHandler};
use cqrs_benches::metrics::{DispatchCounters, MetricsLayer};
use cqrs_core::{Command, CommandBus, CommandContext, CommandHandler, HandlerError, Message};
use std::sync::Arc;
use std::time::Duration;

struct Refuse;

impl Message for Refuse {
    const NAME: &'static str = "test.refuse";
}

impl Command for Refuse {
    type Output = ();
}

struct RefuseHandler;

#[async_trait]
impl CommandHandler<Refuse> for RefuseHandler {
    async fn handle(&self, _cmd: Refuse, _ctx: &mut CommandContext) -> Result<(), HandlerError> {
        Err(HandlerError::forbidden("refused"))
    }
}

#[test]
fn successes_and_failures_apart() {
    let rt = runtime();
    let counters = Arc::new(DispatchCounters::new());
    let bus = CommandBus::builder()
        .layer(MetricsLayer::new(counters.clone()))
        .handler(IncrementHandler)
        .handler(RefuseHandler)
        .build()
        .expect("the bus builds");
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            for value in 0..3 {
                assert_eq!(
                    bus.dispatch(Increment { value }).await.ok(),
                    Some(value + 1)
                );
            }
            assert!(bus.dispatch(Refuse).await.is_err());
        })
        .await
        .expect("the dispatches finish in time");
    });
    assert_eq!(
        (counters.started(), counters.succeeded(), counters.failed()),
        (4, 3, 1),
        "(started, succeeded, failed)"
    );
}
