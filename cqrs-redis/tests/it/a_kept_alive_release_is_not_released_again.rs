//! An entry a consumer's `keep_alive` released (held behind another consumer's entry) is not
//! taken for stranded when that consumer closes: its delivery count is not taken back a second
//! time, and its next handing out counts every delivery a handler got.
//!
//! The trace: `c` is handed P and X (events 1 and 2 of one key) as a chain, count 1 each, and
//! crashes. `b` reclaims P alone (`fetch(1)`: one claim), count 2, and handles it slowly.
//! `a` reclaims X (count 2) and holds it behind P: the step script takes the claim's count
//! back, so X is pending to `a` with count 1, held as counted (not read here). `a`'s
//! `keep_alive`, with nothing of X's lane in flight at `a`, releases X as it is: count 1,
//! idle since the epoch, still pending to `a`. `a` closes. With the released entry
//! remembered as handed back, `close` leaves it alone: count 1. Without, `close` finds it
//! pending to `a` and in no list, takes it for stranded and releases it as read here, taking
//! a delivery back: count 0. Once P is done, `b` reclaims X and hands it out as attempt 2
//! (`c`'s delivery and this one), not 1.

use crate::support::{Env, consumer_options, event, fetch_some, n_of, within};
use cqrs_core::ports::{Consumer, EventTransport};
use cqrs_redis::RedisConsumer;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_release_is_not_released_again() {
    let Some(env) = Env::new("kept-alive-release").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            // Well over a fetch (its 100 ms `block`) and a keep-alive, even on a loaded
            // machine: P, kept alive by `b` before each of `a`'s fetches, is never idle that
            // long when `a` claims.
            let delay = Duration::from_secs(2);
            let mut c = env.join(&topic, "c", |o| o.redelivery_delay(delay)).await;
            let mut b = env.join(&topic, "b", |o| o.redelivery_delay(delay)).await;
            let a_name = format!("{}-a", env.id);
            let mut a: RedisConsumer = env
                .transport
                .redis_consumer(
                    &topic,
                    "g",
                    consumer_options(&a_name).redelivery_delay(delay),
                )
                .await
                .unwrap();

            // One publish, one read: `c` is handed both as a chain, one delivery each.
            let events = [1, 2].map(|n| event(Some("k"), n));
            env.transport.publish(&topic, &events).await.unwrap();
            let chain = fetch_some(c.as_mut(), 10, "c's chain").await;
            assert_eq!(chain.iter().map(n_of).collect::<Vec<_>>(), [1, 2]);
            assert!(chain.iter().all(|d| d.attempt == 1));
            let (p, x) = (chain[0].id.clone(), chain[1].id.clone());
            // `c` crashes with both pending to it.
            drop(c);

            // `b` takes P over (one claim a fetch of one) and handles it slowly.
            let handling = fetch_some(b.as_mut(), 1, "b reclaiming P").await;
            assert_eq!(handling.iter().map(n_of).collect::<Vec<_>>(), [1]);

            // `a` takes X over and holds it behind P, the claim's count taken back.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                b.keep_alive(std::slice::from_ref(&p)).await.unwrap();
                assert!(a.fetch(10).await.unwrap().is_empty(), "X held back");
                if env.pending_entry(&stream, &x.0).await.0 == a_name {
                    break;
                }
                assert!(tokio::time::Instant::now() < until, "a never reclaimed X");
            }
            assert_eq!(a.held(), 1);
            let (_, _, count) = env.pending_entry(&stream, &x.0).await;
            assert_eq!(count, 1, "c's delivery");

            // `a`'s batch runs on (nothing of X's lane): its keep-alive releases X as it is.
            a.keep_alive(&[]).await.unwrap();
            assert_eq!(a.held(), 0, "X released");
            let (owner, idle, count) = env.pending_entry(&stream, &x.0).await;
            assert_eq!(owner, a_name, "nobody took X yet");
            assert!(
                idle > 365 * 24 * 3600 * 1000,
                "released: idle since the epoch, not {idle} ms"
            );
            assert_eq!(count, 1, "released as counted");

            a.close().await.unwrap();
            let (owner, _, count) = env.pending_entry(&stream, &x.0).await;
            assert_eq!(owner, a_name);
            assert_eq!(
                count, 1,
                "close released X a second time, taking back c's delivery"
            );

            // P done: X is handed out with every delivery counted.
            b.ack(std::slice::from_ref(&p)).await.unwrap();
            let taken = fetch_some(b.as_mut(), 10, "b getting X").await;
            assert_eq!(taken.iter().map(n_of).collect::<Vec<_>>(), [2]);
            assert_eq!(taken[0].attempt, 2, "c's delivery and this one");
            b.ack(std::slice::from_ref(&x)).await.unwrap();
        }),
    )
    .await;
    env.cleanup().await;
}
