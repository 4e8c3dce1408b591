//! A projection runner reports unhealthy on a failure that cannot pass by itself, as an
//! `EventBusConsumer` does, and only degraded on one that may.

use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::memory::{InMemoryProjectionStore, InMemoryTransport, InMemoryUnit};
use cqrs_core::ports::ConsumerOptions;
use cqrs_core::projection::{Projection, ProjectionRunner};
use cqrs_core::runtime::{Health, Runtime};
use cqrs_core::testing::eventually;
use cqrs_core::{EventEnvelope, EventTypes, HandlerError};
use std::sync::Arc;
use std::time::Duration;

struct Nothing;

#[async_trait]
impl Projection<InMemoryProjectionStore> for Nothing {
    fn name(&self) -> &str {
        "nothing"
    }

    async fn apply(&self, _: &mut InMemoryUnit, _: &EventEnvelope) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn reset(&self, _: &mut InMemoryUnit) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn runner(
    transport: &Arc<InMemoryTransport>,
) -> ProjectionRunner<InMemoryProjectionStore, Nothing> {
    ProjectionRunner::from_transport(
        Arc::new(InMemoryProjectionStore::new()),
        Arc::new(Nothing),
        transport.clone(),
        "adds",
        "nothing",
        ConsumerOptions::default()
            .consumer_name("twin")
            .block(Duration::from_millis(50)),
        Arc::new(EventTypes::new()),
    )
}

/// Two transport-fed runners with one consumer name: the transport refuses the second one's
/// consumer (`Invalid`), which no retry fixes while the first runs, so it is unhealthy, not
/// merely degraded (which readiness counts as fine).
#[test]
fn a_second_runner_with_a_consumer_name_in_use_is_unhealthy() {
    run_paused(|| async {
        let transport = Arc::new(InMemoryTransport::new());
        let first = Runtime::builder().worker(runner(&transport)).start();
        eventually(Duration::from_secs(5), "the first runner runs", || async {
            (first.health().await.components["nothing"].0 == Health::Healthy).then_some(())
        })
        .await;
        let second = Runtime::builder().worker(runner(&transport)).start();
        let reason = eventually(
            Duration::from_secs(5),
            "the second runner is unhealthy",
            || async {
                match &second.health().await.components["nothing"].0 {
                    Health::Unhealthy(reason) => Some(reason.clone()),
                    _ => None,
                }
            },
        )
        .await;
        assert!(
            reason.contains("twin"),
            "the reason names the consumer: {reason}"
        );
        assert_eq!(
            first.health().await.components["nothing"].0,
            Health::Healthy
        );
        second.shutdown(Duration::from_secs(1)).await.unwrap();
        first.shutdown(Duration::from_secs(1)).await.unwrap();
    });
}
