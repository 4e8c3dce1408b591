//! The futures of cqrs-postgres's async API are `Send`, for any aggregate and command, so an
//! application can `tokio::spawn` them or hold them across an `.await` in an axum handler.
//! Checked when this binary compiles: a future that stops being `Send` fails the build here,
//! not in a user's crate (`tokio::spawn(db.migrate())` once did not compile).

use cqrs_core::{Aggregate, AggregateRepository, Command, Metadata};
use cqrs_postgres::{
    IdempotencyKey, PgCommandExecutor, PgDatabase, PgOptions, PgOutboxRelay, PgUnitOfWork,
};
use std::future::Future;

fn spawnable<F: Future + Send + 'static>(_: F) {}

/// Never called: that it compiles is the check.
#[allow(dead_code)]
fn the_futures_of_the_public_api_are_send<A, C>(
    options: PgOptions,
    db: PgDatabase,
    repository: AggregateRepository<A>,
    executor: PgCommandExecutor,
    relay: PgOutboxRelay,
    (aggregate_command, command, key, metadata): (A::Command, C, IdempotencyKey, Metadata),
) where
    A: Aggregate,
    C: Command,
{
    spawnable(async move { options.connect().await });
    let database = db.clone();
    spawnable(async move { database.migrate().await });
    let database = db.clone();
    spawnable(async move {
        let _connection = database.acquire().await?;
        database.begin().await?.commit().await
    });
    let meta = metadata.clone();
    spawnable(async move {
        let mut unit = PgUnitOfWork::new(db);
        let decided = unit
            .execute(&repository, "42", None, aggregate_command, &meta)
            .await;
        (decided.is_ok(), unit.commit().await)
    });
    spawnable(async move {
        executor
            .execute_idempotent(&key, command, metadata, |_| unreachable!())
            .await
            .map(drop)
    });
    spawnable(async move { relay.relay_once().await });
}
