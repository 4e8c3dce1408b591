//! An entry held back behind its lane predecessor, and taken over by one consumer after
//! another (each reclaim is a delivery to Redis), was never handed out: when its predecessor
//! is done, it is handed out, not dead-lettered for deliveries it never had. (The read that
//! first held it counts as one delivery: it comes out as attempt 1 or 2.)

use crate::support::{Env, n_of, within};
use cqrs_core::ports::{Consumer, ConsumerOptions, EventTransport};
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_held_back_do_not_use_up_their_deliveries() {
    let Some(env) = Env::new("held-count").await else {
        return;
    };
    within(
        90,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            // One long delay for all, so no one reclaims the first event from `first`;
            // a closing holder releases the second at once all the same.
            let options = |o: ConsumerOptions| {
                o.redelivery_delay(Duration::from_secs(60))
                    .max_deliveries(2)
            };
            // The first event is handed to `first`, which keeps it pending a long while.
            let mut first = env.join(&topic, "first", options).await;
            let one = env
                .one_pending_and_its_successor(&topic, first.as_mut())
                .await;

            // Four consumers in turn take the second event over and hold it back.
            for turn in 0..4 {
                let name = format!("{}-holder{turn}", env.id);
                let mut holder = env.join(&topic, &format!("holder{turn}"), options).await;
                let until = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    assert!(holder.fetch(10).await.unwrap().is_empty(), "held back");
                    if owner_of_second(&env, &stream).await.as_deref() == Some(name.as_str()) {
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < until,
                        "holder {turn} never took it over"
                    );
                }
                // Gone without handing it out: the next one reclaims it.
                Consumer::close(holder.as_mut()).await.unwrap();
            }

            first.ack(std::slice::from_ref(&one.id)).await.unwrap();
            let mut last = env.join(&topic, "last", options).await;
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut got = Vec::new();
            while got.is_empty() && tokio::time::Instant::now() < until {
                got = last.fetch(10).await.unwrap();
            }
            assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), [2], "handed out");
            assert!(got[0].attempt <= 2, "attempt {}", got[0].attempt);
            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(dead.is_empty(), "dead-lettered: {dead:?}");
        }),
    )
    .await;
    env.cleanup().await;
}

/// `keep_alive`, which `consume_until_shutdown` calls while a batch runs, also keeps the
/// entries the consumer holds back: no other consumer takes them over meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_keeps_the_entries_held_back_too() {
    let Some(env) = Env::new("held-alive").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            // Long enough that a loaded machine's stall between a keep-alive and c2's next
            // claim does not pass for an expired one.
            let delay = Duration::from_secs(3);
            let mut c1 = env.join(&topic, "c1", |o| o.redelivery_delay(delay)).await;
            let mut c2 = env.join(&topic, "c2", |o| o.redelivery_delay(delay)).await;
            let one = env.one_pending_and_its_successor(&topic, c1.as_mut()).await;
            // Read by c1 and held back behind the first, which c1 is still handling.
            assert!(c1.fetch(10).await.unwrap().is_empty());
            let c1_name = format!("{}-c1", env.id);
            assert_eq!(
                owner_of_second(&env, &stream).await.as_deref(),
                Some(c1_name.as_str())
            );
            // c1 handles the first for two delays, keeping it alive; c2 keeps fetching.
            let until = tokio::time::Instant::now() + delay * 2;
            while tokio::time::Instant::now() < until {
                c1.keep_alive(std::slice::from_ref(&one.id)).await.unwrap();
                assert!(c2.fetch(10).await.unwrap().is_empty());
            }
            assert_eq!(
                owner_of_second(&env, &stream).await.as_deref(),
                Some(c1_name.as_str()),
                "the held entry was taken over"
            );
            c1.ack(std::slice::from_ref(&one.id)).await.unwrap();
            let two = c1.fetch(10).await.unwrap();
            assert_eq!(two.iter().map(n_of).collect::<Vec<_>>(), [2]);
        }),
    )
    .await;
    env.cleanup().await;
}

/// `keep_alive` keeps only the held entries that wait for an entry this consumer is handling:
/// one held behind another consumer's entry, acknowledged meanwhile, is released while the
/// batch runs, and that consumer takes it at once, as its first delivery, instead of after the
/// batch (or, with a hung handler, never).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_releases_the_held_entries_that_wait_for_no_entry_here() {
    let Some(env) = Env::new("held-free").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("tickets");
            // Long: only a release lets c2 take the entry within the test.
            let delay = Duration::from_secs(60);
            let mut c1 = env.join(&topic, "c1", |o| o.redelivery_delay(delay)).await;
            let mut c2 = env.join(&topic, "c2", |o| o.redelivery_delay(delay)).await;
            env.publish_one(&topic, "k2", 1).await;
            let first = c2.fetch(10).await.unwrap();
            assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), [1]);
            env.publish_one(&topic, "k1", 2).await;
            env.publish_one(&topic, "k2", 3).await;
            // c1 reads both: 2 is handed out, 3 held behind 1, which c2 is handling.
            let mut handling = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while handling.is_empty() {
                assert!(tokio::time::Instant::now() < until, "2 was not handed out");
                handling = c1.fetch(10).await.unwrap();
            }
            assert_eq!(handling.iter().map(n_of).collect::<Vec<_>>(), [2]);
            c2.ack(&[first[0].id.clone()]).await.unwrap();

            // c1's batch goes on (its handler of 2 is slow): 3 waits for nothing of c1's.
            c1.keep_alive(&[handling[0].id.clone()]).await.unwrap();
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let taken = loop {
                let batch = c2.fetch(10).await.unwrap();
                if !batch.is_empty() {
                    break batch;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "c2 did not get 3 while c1's batch ran"
                );
            };
            assert_eq!(taken.iter().map(n_of).collect::<Vec<_>>(), [3]);
            assert_eq!(
                taken[0].attempt, 1,
                "the held read's delivery was taken back"
            );
            c1.ack(&[handling[0].id.clone()]).await.unwrap();
            c2.ack(&[taken[0].id.clone()]).await.unwrap();
            assert!(
                c1.fetch(10).await.unwrap().is_empty(),
                "nothing handed out twice"
            );
        }),
    )
    .await;
    env.cleanup().await;
}

/// A consumer polling the gate for an entry held behind another consumer's keeps it from
/// being reclaimed by restarting its idle time, once it is an eighth of the delay old, not
/// at every poll: each restart is an `XCLAIM`, a write Redis replicates and logs, and at every poll
/// (every 10 ms here) a few hundred held entries made thousands of them a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_entries_are_refreshed_now_and_then_not_at_every_poll() {
    let Some(env) = Env::new("held-refresh").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            // An eighth of it is 3.75 s: the held entry's idle time grows until then.
            let options = |o: ConsumerOptions| o.redelivery_delay(Duration::from_secs(30));
            let mut first = env.join(&topic, "first", options).await;
            let mut holder = env.join(&topic, "holder", options).await;
            env.one_pending_and_its_successor(&topic, first.as_mut())
                .await;
            assert!(holder.fetch(10).await.unwrap().is_empty(), "held back");
            let name = format!("{}-holder", env.id);
            assert_eq!(
                owner_of_second(&env, &stream).await.as_deref(),
                Some(name.as_str())
            );
            // The holder polls the gate all along (it cannot tell alone whether `first`'s
            // entry is done: the script decides, at every poll).
            let until = tokio::time::Instant::now() + Duration::from_secs(3);
            loop {
                assert!(holder.fetch(10).await.unwrap().is_empty(), "still held");
                let idle = idle_of_second(&env, &stream).await;
                if idle >= Duration::from_millis(500) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "refreshed at every poll: idle {idle:?}"
                );
            }
            // And refreshed all the same once it is an eighth of the delay old, long before
            // anyone may reclaim it (at 30 s).
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut oldest = Duration::ZERO;
            loop {
                assert!(holder.fetch(10).await.unwrap().is_empty(), "still held");
                let idle = idle_of_second(&env, &stream).await;
                if idle < oldest {
                    break;
                }
                oldest = idle;
                assert!(
                    tokio::time::Instant::now() < until,
                    "never refreshed: idle {idle:?}"
                );
            }
            assert!(
                oldest < Duration::from_secs(5),
                "refreshed late: {oldest:?}"
            );
            assert_eq!(
                owner_of_second(&env, &stream).await.as_deref(),
                Some(name.as_str())
            );
        }),
    )
    .await;
    env.cleanup().await;
}

/// How long the second entry has been idle.
async fn idle_of_second(env: &Env, stream: &str) -> Duration {
    let idle = second_pending(env, stream)
        .await
        .expect("two pending")
        .into_iter()
        .nth(2)
        .and_then(|v| v.as_u64())
        .expect("an idle time");
    Duration::from_millis(idle)
}

/// The consumer the second entry of the stream is pending to.
async fn owner_of_second(env: &Env, stream: &str) -> Option<String> {
    second_pending(env, stream)
        .await?
        .into_iter()
        .nth(1)?
        .into_string()
}

/// The second pending entry of group `g`, as `XPENDING` lists it: `[id, consumer, idle,
/// deliveries]`.
async fn second_pending(env: &Env, stream: &str) -> Option<Vec<Value>> {
    let pending = env
        .command(
            "XPENDING",
            vec![
                stream.into(),
                "g".into(),
                "-".into(),
                "+".into(),
                Value::from(10),
            ],
        )
        .await
        .into_array();
    Some(pending.into_iter().nth(1)?.into_array())
}

/// Entries a consumer reclaims count against `max_held`: a backlog of one key left pending by
/// a consumer that died is taken over a few at a time while its first entry is in flight, not
/// all at once (each entry held costs every step of the gate). The set grew by a batch at
/// every step, to the whole backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaimed_entries_waiting_for_their_turn_are_bounded_by_max_held() {
    const BACKLOG: u64 = 200;
    const MAX_HELD: usize = 16;
    let Some(env) = Env::with("held-reclaim", |o| o.max_held(MAX_HELD)).await else {
        return;
    };
    within(
        90,
        Box::pin(async {
            let topic = env.topic("tickets");
            let stream = env.transport.stream_key(&topic).unwrap();
            // A claim interval of a second (a quarter of the delay, at most a second).
            let mut consumer = env
                .transport
                .redis_consumer(
                    &topic,
                    "g",
                    crate::support::consumer_options(&format!("{}-heir", env.id))
                        .redelivery_delay(Duration::from_secs(4)),
                )
                .await
                .unwrap();
            let events: Vec<_> = (1..=BACKLOG)
                .map(|n| crate::support::event(Some("k"), n))
                .collect();
            env.transport.publish(&topic, &events).await.unwrap();
            // A consumer read the whole backlog and died.
            env.read_as(&stream, "ghost", BACKLOG as usize).await;
            // The first entries come once the delay has passed (a chain, in order); they stay
            // in flight, and the rest of the key waits behind them.
            let until = tokio::time::Instant::now() + Duration::from_secs(30);
            let first = loop {
                let batch = consumer.fetch(8).await.unwrap();
                if !batch.is_empty() {
                    break batch;
                }
                assert!(tokio::time::Instant::now() < until, "nothing reclaimed");
            };
            let numbers: Vec<u64> = first.iter().map(n_of).collect();
            assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
            // Two seconds of steps: two claim intervals.
            let until = tokio::time::Instant::now() + Duration::from_secs(2);
            while tokio::time::Instant::now() < until {
                assert!(consumer.fetch(8).await.unwrap().is_empty(), "held back");
                assert!(
                    consumer.held() <= MAX_HELD + 4,
                    "{} entries held",
                    consumer.held()
                );
            }
            let ids: Vec<_> = first.iter().map(|d| d.id.clone()).collect();
            consumer.ack(&ids).await.unwrap();
            // Their successors follow, in order.
            let next: Vec<u64> = consumer.fetch(8).await.unwrap().iter().map(n_of).collect();
            assert_eq!(next.first(), Some(&(numbers.len() as u64 + 1)), "{next:?}");
            assert!(next.windows(2).all(|w| w[1] == w[0] + 1), "{next:?}");
            drop(consumer);
        }),
    )
    .await;
    env.cleanup().await;
}
