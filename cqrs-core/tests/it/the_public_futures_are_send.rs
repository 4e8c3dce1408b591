//! The futures of the public async API are `Send`, for any message, aggregate, projection
//! and store, so an application can `tokio::spawn` them or hold them across an `.await` in an
//! axum handler. Checked when this binary compiles: a future that stops being `Send` (a
//! `MutexGuard` or an `Rc` held across an await) fails the build here, not in a user's crate.

use cqrs_core::ports::ProjectionStore;
use cqrs_core::projection::{Projection, ProjectionRunner};
use cqrs_core::relay::StoreRelay;
use cqrs_core::runtime::Runtime;
use cqrs_core::{
    Aggregate, AggregateRepository, Command, CommandBus, EventBus, EventEnvelope, Metadata, Query,
    QueryBus,
};
use std::future::Future;
use std::time::Duration;

fn spawnable<F: Future + Send + 'static>(_: F) {}

/// Never called: that it compiles is the check.
#[allow(dead_code)]
#[allow(clippy::too_many_arguments)]
fn the_futures_of_the_public_api_are_send<C, Q, A, S, P>(
    commands: CommandBus,
    queries: QueryBus,
    events: EventBus,
    repository: AggregateRepository<A>,
    mut runner: ProjectionRunner<S, P>,
    relay: StoreRelay<S>,
    runtime: Runtime,
    (command, query, aggregate_command): (C, Q, A::Command),
    (envelope, metadata): (EventEnvelope, Metadata),
) where
    C: Command,
    Q: Query,
    A: Aggregate,
    S: ProjectionStore,
    P: Projection<S>,
{
    spawnable(async move { commands.dispatch(command).await });
    spawnable(async move { queries.dispatch(query).await });
    spawnable(async move { events.publish(envelope).await });
    spawnable(async move {
        repository.load("42").await.map(drop)?;
        repository
            .execute("42", None, aggregate_command, &metadata)
            .await
            .map(drop)?;
        repository
            .execute_retrying_prepared(
                "42",
                |_| std::future::pending::<Result<A::Command, A::Error>>(),
                &metadata,
                3,
            )
            .await
            .map(drop)
    });
    spawnable(async move {
        runner.run_once().await?;
        runner.catch_up().await?;
        runner.rebuild().await
    });
    spawnable(async move { relay.relay_once().await });
    spawnable(async move { runtime.shutdown(Duration::from_secs(1)).await });
}

/// `execute_retrying` takes a command made again for each attempt: checked apart, for
/// commands that can be cloned.
#[allow(dead_code)]
fn execute_retrying_is_send<A>(
    repository: AggregateRepository<A>,
    command: A::Command,
    metadata: Metadata,
) where
    A: Aggregate,
    A::Command: Clone,
{
    spawnable(async move {
        repository
            .execute_retrying("42", move || command.clone(), &metadata, 3)
            .await
            .map(drop)
    });
}
