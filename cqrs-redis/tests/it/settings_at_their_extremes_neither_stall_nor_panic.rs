//! A fetch asked for "everything" (`usize::MAX`, as a batch size taken from configuration
//! might be) hands out what is ready, a consume loop whose redelivery delay is
//! `Duration::MAX` ("never redeliver by time") handles its events, and a command timeout of
//! `Duration::MAX` ("no timeout") does not overflow the blocking read's.

use crate::support::{Env, connection, n_of, within};
use cqrs_core::projection::{ConsumeLoop, Handled, consume_until_shutdown};
use cqrs_core::runtime::{HealthReporter, Shutdown, WorkerContext};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The limit goes to the gate script, which also decides on entries held back behind a
/// predecessor another consumer has: `usize::MAX` must not turn into a count that holds them
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_of_usize_max_hands_out_what_is_ready() {
    let Some(env) = Env::new("fetch-max").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            // Nothing reclaimed by time: on a loaded machine the first entry could otherwise
            // sit idle past the tests' short redelivery delay before `a`'s first fetch.
            let patient =
                |o: cqrs_core::ports::ConsumerOptions| o.redelivery_delay(Duration::from_secs(60));
            let mut b = env.join(&topic, "b", patient).await;
            let first = env.one_pending_and_its_successor(&topic, b.as_mut()).await;
            let mut a = env.join(&topic, "a", patient).await;
            // The successor is held back while its predecessor is pending to `b`.
            assert!(a.fetch(usize::MAX).await.unwrap().is_empty());
            b.ack(std::slice::from_ref(&first.id)).await.unwrap();
            let mut got = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while got.is_empty() && tokio::time::Instant::now() < until {
                got = a.fetch(usize::MAX).await.unwrap();
            }
            assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), [2]);
        }),
    )
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_loop_with_a_redelivery_delay_of_duration_max_handles_its_events() {
    let Some(env) = Env::new("delay-max").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let mut consumer = env
                .join(&topic, "c", |o| o.redelivery_delay(Duration::MAX))
                .await;
            for n in 1..=3 {
                env.publish_one(&topic, "k", n).await;
            }
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (stop, shutdown) = Shutdown::new();
            let ctx = WorkerContext::new(shutdown, HealthReporter::detached("delay-max"));
            let worker = {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let handle = |d: cqrs_core::ports::Delivery| {
                        let seen = &seen;
                        async move {
                            // Long enough for the loop to arm its keep-alive timer.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            seen.lock().unwrap().push(n_of(&d));
                            Handled::Done
                        }
                    };
                    consume_until_shutdown(consumer.as_mut(), &ctx, ConsumeLoop::default(), handle)
                        .await
                })
            };
            cqrs_core::testing::eventually(Duration::from_secs(10), "all three handled", || {
                let seen = seen.clone();
                async move { (seen.lock().unwrap().len() == 3).then_some(()) }
            })
            .await;
            stop.trigger();
            worker
                .await
                .expect("no panic")
                .expect("the loop ends cleanly");
            assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
        }),
    )
    .await;
    env.cleanup().await;
}

/// A blocking read waits its block interval plus the command timeout: with a command timeout
/// of `Duration::MAX` the sum overflowed and the fetch panicked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_timeout_of_duration_max_does_not_overflow_a_blocking_read() {
    let Some(env) = Env::with("timeout-max", |o| {
        o.connection(connection().command_timeout(Duration::MAX))
    })
    .await
    else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let mut consumer = env.join(&topic, "c", |o| o).await;
            // Nothing yet: the fetch blocks for its interval and comes back empty.
            assert!(consumer.fetch(10).await.unwrap().is_empty());
            env.publish_one(&topic, "k", 1).await;
            let mut got = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while got.is_empty() && tokio::time::Instant::now() < until {
                got = consumer.fetch(10).await.unwrap();
            }
            assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), [1]);
        }),
    )
    .await;
    env.cleanup().await;
}
