//! The maintenance worker returns when shutdown is requested in the middle of a round, not
//! only between rounds: with Redis not answering, each of a round's commands waits up to the
//! command timeout, and the round could outlast the runtime's shutdown grace.

use crate::proxy::Proxy;
use crate::support::{Env, plain_redis_host, stream_options, within};
use cqrs_core::runtime::{HealthReporter, Shutdown, Worker, WorkerContext};
use cqrs_redis::{ConnectionOptions, StreamMaintenance};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_stops_at_shutdown_in_the_middle_of_a_round() {
    let Some(env) = Env::new("maintenance-shutdown").await else {
        return;
    };
    let Some(host) = plain_redis_host() else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let proxy = Proxy::start(&host).await;
            // Far longer than the test: a round whose replies never come never ends by itself.
            let connection = ConnectionOptions::new(proxy.url())
                .command_timeout(Duration::from_secs(600))
                .connect_timeout(Duration::from_secs(2));
            let proxied = stream_options(&env.id)
                .connection(connection)
                .connect()
                .await
                .expect("connect through the proxy");
            let topic = env.topic("tickets");
            // Commands reach Redis; their replies stay in the proxy.
            proxy.hold_replies();
            let sent_before = proxy.sent().len();

            let (stop, shutdown) = Shutdown::new();
            let ctx =
                WorkerContext::new(shutdown, HealthReporter::detached("maintenance-shutdown"));
            let mut maintenance = StreamMaintenance::new(proxied, [topic]);
            let worker = tokio::spawn(async move { maintenance.run(ctx).await });

            // The round's first command (the dead letters' `TIME`, read for their retention)
            // went out: the round waits for its reply.
            let until = Instant::now() + Duration::from_secs(10);
            let first = b"\r\nTIME\r\n";
            while !proxy.sent()[sent_before..]
                .windows(first.len())
                .any(|w| w.eq_ignore_ascii_case(first))
            {
                assert!(Instant::now() < until, "the round sent nothing within 10 s");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.trigger();
            let stopped = tokio::time::timeout(Duration::from_secs(10), worker).await;
            proxy.release_replies();
            let result = stopped
                .expect("the worker did not return within 10 s of the shutdown")
                .expect("the worker panicked");
            assert!(result.is_ok(), "{result:?}");
        }),
    )
    .await;
    env.cleanup().await;
}
