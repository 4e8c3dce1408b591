//! A connect given up half-way (a caller's timeout while the server is slow to answer its
//! handshake) leaves no connection behind: not the stream transport's, not the pub/sub's,
//! not a joining consumer's reader. fred's `init` starts a task that connects, and reconnects
//! for as long as the client runs, which a dropped handle does not end: the connection was
//! made once the server answered, and stayed open (replaced whenever the server closed it)
//! for the life of the process.

use crate::proxy::Proxy;
use crate::support::{consumer_options, key_prefix, plain_redis_host, within};
use cqrs_core::ports::EventTransport;
use cqrs_core::testing::{eventually, test_id};
use cqrs_redis::{RedisPubSubOptions, RedisStreamOptions};
use std::future::Future;
use std::time::Duration;

/// Runs `connect` with `holder` holding Redis's replies, gives it up once its connection
/// through `holder` is open (its handshake unanswered), lets the replies through, and waits
/// until `holder` has no connection open.
async fn given_up_while_connecting<F>(holder: &Proxy, connect: F)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    holder.hold_replies();
    let connecting = tokio::spawn(connect);
    eventually(
        Duration::from_secs(10),
        "the connect's connection open",
        || async { (holder.open() == 1).then_some(()) },
    )
    .await;
    connecting.abort();
    assert!(
        connecting.await.is_err_and(|e| e.is_cancelled()),
        "given up before it connected"
    );
    holder.release_replies();
    eventually(
        Duration::from_secs(10),
        "no connection left open by the connect given up",
        || async { (holder.open() == 0).then_some(()) },
    )
    .await;
}

/// The tests' connection options, through `proxy`; a command timeout long enough that a
/// handshake the proxy holds does not time out by itself on a loaded machine.
fn through(proxy: &Proxy) -> cqrs_redis::ConnectionOptions {
    cqrs_redis::ConnectionOptions::new(proxy.url())
        .command_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_given_up_leaves_no_connection_behind() {
    let Some(host) = plain_redis_host() else {
        return;
    };
    if !crate::support::reachable().await {
        return;
    }
    let id = test_id("connect-given-up");
    within(
        60,
        Box::pin(async {
            let proxy = Proxy::start(&host).await;
            let options =
                RedisStreamOptions::with_connection(through(&proxy)).key_prefix(key_prefix(&id));
            given_up_while_connecting(&proxy, options.clone().connect()).await;

            let proxy = Proxy::start(&host).await;
            let options = RedisPubSubOptions::with_connection(through(&proxy))
                .channel_prefix(key_prefix(&id));
            given_up_while_connecting(&proxy, options.connect()).await;

            // A consumer's reader, its transport connected: new connections through the
            // transport's proxy go on through one that holds the replies.
            let proxy = Proxy::start(&host).await;
            let transport = RedisStreamOptions::with_connection(through(&proxy))
                .key_prefix(key_prefix(&id))
                .connect()
                .await
                .expect("connect the transport");
            let holder = Proxy::start(&host).await;
            proxy.redirect(&holder.host());
            let topic = format!("{id}-tickets");
            let consumer = consumer_options(&format!("{id}-a"));
            given_up_while_connecting(&holder, async move {
                let _ = transport.consumer(&topic, "g", consumer).await;
            })
            .await;
        }),
    )
    .await;
}
