//! The futures of cqrs-realtime's async API are `Send`, so an application can `tokio::spawn`
//! them or hold them across an `.await` in an axum handler. Checked when this binary
//! compiles: a future that stops being `Send` fails the build here, not in a user's crate.

use cqrs_core::EventRecord;
use cqrs_realtime::Publisher;
use std::future::Future;

fn spawnable<F: Future + Send + 'static>(_: F) {}

/// Never called: that it compiles is the check. (`Hub::handle` is an axum handler's in the
/// helpdesk, which axum holds to `Send` already.)
#[allow(dead_code)]
fn the_futures_of_the_public_api_are_send(publisher: Publisher, record: EventRecord) {
    spawnable(async move { publisher.publish(&record).await });
}
