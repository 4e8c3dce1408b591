//! A consumer closed through the port (`Consumer::close`, as `consume_until_shutdown` does at
//! shutdown) releases the entries it holds back at once: another consumer takes them well
//! before the redelivery delay.

use crate::support::{Env, n_of, within};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_consumer_releases_what_it_holds() {
    let Some(env) = Env::new("close").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("tickets");
            let delay = Duration::from_secs(8);
            let mut a = env.join(&topic, "a", |o| o.redelivery_delay(delay)).await;
            let first = env.one_pending_and_its_successor(&topic, a.as_mut()).await;
            // Read while its predecessor is pending: held back, not handed out.
            assert!(a.fetch(1).await.unwrap().is_empty());
            a.ack(std::slice::from_ref(&first.id)).await.unwrap();
            a.close().await.unwrap();

            let mut b = env.join(&topic, "b", |o| o.redelivery_delay(delay)).await;
            let started = tokio::time::Instant::now();
            let mut got = Vec::new();
            while got.is_empty() && started.elapsed() < Duration::from_secs(5) {
                got = b.fetch(10).await.unwrap();
            }
            assert_eq!(
                got.iter().map(n_of).collect::<Vec<_>>(),
                [2],
                "taken over within 5 s (the redelivery delay is {delay:?})"
            );
            drop(a);
        }),
    )
    .await;
    env.cleanup().await;
}
