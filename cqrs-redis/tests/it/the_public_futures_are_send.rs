//! The futures of cqrs-redis's async API are `Send`, so an application can `tokio::spawn`
//! them or hold them across an `.await` in an axum handler. Checked when this binary
//! compiles: a future that stops being `Send` fails the build here, not in a user's crate.

use cqrs_redis::{RedisPubSubOptions, RedisStreamOptions, RedisStreamTransport, StreamMaintenance};
use std::future::Future;

fn spawnable<F: Future + Send + 'static>(_: F) {}

/// Never called: that it compiles is the check.
#[allow(dead_code)]
fn the_futures_of_the_public_api_are_send(
    streams: RedisStreamOptions,
    pubsub: RedisPubSubOptions,
    transport: RedisStreamTransport,
    maintenance: StreamMaintenance,
) {
    spawnable(async move { streams.connect().await });
    spawnable(async move { pubsub.connect().await });
    spawnable(async move {
        let dead = transport.dead_letters("tickets", None, 10).await?;
        let ids: Vec<String> = dead.iter().map(|d| d.id.clone()).collect();
        transport.replay_dead_letters("tickets", &ids).await
    });
    spawnable(async move { maintenance.run_once().await });
}
