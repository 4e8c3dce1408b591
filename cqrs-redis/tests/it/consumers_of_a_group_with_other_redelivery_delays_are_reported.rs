//! The consumers of a group should share one redelivery delay: each records its own as it
//! joins, one joining with another delay than a consumer still consuming logs a warning naming
//! it, and `redelivery_delays` lists those still consuming, without those that closed, were
//! dropped, left the group or have been idle past their window.

use crate::proxy::Proxy;
use crate::support::{Captured, Env, consumer_options, plain_redis_host, within};
use cqrs_core::ports::ConsumerOptions;
use cqrs_core::testing::eventually;
use cqrs_redis::ConnectionOptions;
use std::time::Duration;

/// A consumer that counts as consuming for 11 s after it last read (twice its 5 s `block`,
/// plus a second) whatever the machine's load, so the test's consumers that never read stay
/// in.
fn with_delay(env: &Env, name: &str, delay: Duration) -> ConsumerOptions {
    consumer_options(&format!("{}-{name}", env.id))
        .redelivery_delay(delay)
        .block(Duration::from_secs(5))
}

fn names(env: &Env, delays: &[(String, Duration)]) -> Vec<(String, u128)> {
    delays
        .iter()
        .map(|(name, delay)| {
            let short = name.strip_prefix(&format!("{}-", env.id)).unwrap_or(name);
            (short.to_owned(), delay.as_millis())
        })
        .collect()
}

// On the test's thread (a current-thread runtime), so the subscriber set for it sees the
// consumers' warnings.
#[tokio::test]
async fn consumers_of_a_group_with_other_redelivery_delays_are_reported() {
    let Some(env) = Env::new("delays").await else {
        return;
    };
    let (captured, _logs) = Captured::warnings();
    within(30, async {
        let topic = env.topic("orders");
        let t = &env.transport;
        let short = Duration::from_millis(300);
        let a = t
            .redis_consumer(&topic, "g", with_delay(&env, "a", short))
            .await
            .unwrap();
        assert_eq!(
            names(&env, &t.redelivery_delays(&topic, "g").await.unwrap()),
            [("a".into(), 300)]
        );
        assert_eq!(
            captured.text(),
            "",
            "the first consumer has none to differ from"
        );

        let b = t
            .redis_consumer(&topic, "g", with_delay(&env, "b", Duration::from_secs(2)))
            .await
            .unwrap();
        let warned = captured.text();
        assert!(
            warned.contains("use another redelivery_delay")
                && warned.contains(&format!("`{}-a` 300ms", env.id)),
            "b's join names a and its delay: {warned}"
        );
        assert!(
            !warned.contains(&format!("`{}-b`", env.id)),
            "not itself: {warned}"
        );
        captured.clear();

        // Another group of the topic is none of its business.
        let other = t
            .redis_consumer(
                &topic,
                "other",
                with_delay(&env, "o", Duration::from_secs(5)),
            )
            .await
            .unwrap();
        assert_eq!(captured.text(), "", "a consumer of another group");
        other.close().await.unwrap();

        let c = t
            .redis_consumer(&topic, "g", with_delay(&env, "c", short))
            .await
            .unwrap();
        let warned = captured.text();
        assert!(
            warned.contains(&format!("`{}-b` 2s", env.id))
                && !warned.contains(&format!("`{}-a`", env.id)),
            "c differs from b only: {warned}"
        );
        captured.clear();
        assert_eq!(
            names(&env, &t.redelivery_delays(&topic, "g").await.unwrap()),
            [("a".into(), 300), ("b".into(), 2000), ("c".into(), 300)]
        );

        // Closed: out at once. Dropped: out once its drop's clean-up ran.
        a.close().await.unwrap();
        assert_eq!(
            names(&env, &t.redelivery_delays(&topic, "g").await.unwrap()),
            [("b".into(), 2000), ("c".into(), 300)]
        );
        drop(b);
        eventually(Duration::from_secs(5), "b's record gone", || async {
            let left = names(&env, &t.redelivery_delays(&topic, "g").await.unwrap());
            (left == [("c".to_owned(), 300)]).then_some(())
        })
        .await;
        let d = t
            .redis_consumer(
                &topic,
                "g",
                // It reads below: the test's short `block`.
                consumer_options(&format!("{}-d", env.id)).redelivery_delay(Duration::from_secs(1)),
            )
            .await
            .unwrap();
        assert!(captured.text().contains(&format!("`{}-c` 300ms", env.id)));
        captured.clear();

        // x never reads: idle past its window (twice its 300 ms, plus a second), it no longer
        // counts as consuming, while d, reading, stays.
        let x = t
            .redis_consumer(
                &topic,
                "g",
                consumer_options(&format!("{}-x", env.id)).redelivery_delay(short),
            )
            .await
            .unwrap();
        assert!(captured.text().contains(&format!("`{}-d` 1s", env.id)));
        captured.clear();
        let mut d = d;
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // A read (of 100 ms at most: d's `block`): d is seen consuming.
            cqrs_core::ports::Consumer::fetch(&mut d, 1).await.unwrap();
            let left = names(&env, &t.redelivery_delays(&topic, "g").await.unwrap());
            if !left.iter().any(|(name, _)| name == "x") {
                assert!(left.contains(&("d".to_owned(), 1000)), "{left:?}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "x still counted as consuming: {left:?}"
            );
        }
        drop(x);

        // Closed through the port (which leaves it usable) and used again: recorded again.
        cqrs_core::ports::Consumer::close(&mut d).await.unwrap();
        let left = names(&env, &t.redelivery_delays(&topic, "g").await.unwrap());
        assert!(!left.iter().any(|(name, _)| name == "d"), "{left:?}");
        cqrs_core::ports::Consumer::fetch(&mut d, 0).await.unwrap();
        let left = names(&env, &t.redelivery_delays(&topic, "g").await.unwrap());
        assert!(left.contains(&("d".to_owned(), 1000)), "{left:?}");

        // A record whose consumer left the group (pruned, or one that crashed and was
        // deleted) is dropped at the next join.
        drop(c);
        d.close().await.unwrap();
        t.prune_consumers(&topic, "g", Duration::ZERO)
            .await
            .unwrap();
        let key = format!("cqrs-test:{}:{{{topic}}}:delays:g", env.id);
        env.command(
            "HSET",
            vec![key.as_str().into(), "ghost".into(), "5000 11000".into()],
        )
        .await;
        let e = t
            .redis_consumer(&topic, "g", with_delay(&env, "e", short))
            .await
            .unwrap();
        assert_eq!(captured.text(), "", "no consumer left to differ from");
        let recorded = env.command("HKEYS", vec![key.as_str().into()]).await;
        let recorded: Vec<String> = recorded
            .into_array()
            .into_iter()
            .filter_map(|v| v.into_string())
            .collect();
        assert_eq!(
            recorded,
            [format!("{}-e", env.id)],
            "only e's record is left"
        );

        // Dropped and at once joined again under its name: the new record stays, whenever
        // the dropped one's clean-up runs (it takes out its own record only).
        let f = t
            .redis_consumer(&topic, "g", with_delay(&env, "f", short))
            .await
            .unwrap();
        drop(f);
        let f = t
            .redis_consumer(&topic, "g", with_delay(&env, "f", short))
            .await
            .unwrap();
        for _ in 0..3 {
            // Round trips, while the clean-up task runs.
            t.redelivery_delays(&topic, "g").await.unwrap();
        }
        let left = names(&env, &t.redelivery_delays(&topic, "g").await.unwrap());
        assert_eq!(left, [("e".to_owned(), 300), ("f".to_owned(), 300)]);
        f.close().await.unwrap();
        e.close().await.unwrap();
    })
    .await;
    env.cleanup().await;
}

/// A join dropped while its reader connects (a caller's timeout) takes its delay record out of
/// the group's records: the group listed a consumer that never was for the record's window (a
/// minute here), and a joiner with another delay was warned about it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_dropped_while_connecting_leaves_no_delay_record() {
    let Some(upstream) = plain_redis_host() else {
        return;
    };
    let proxy = Proxy::start(&upstream).await;
    let Some(env) = Env::with("dropped-join", |options| {
        options.connection(connection_through(&proxy))
    })
    .await
    else {
        return;
    };
    within(30, async {
        let topic = env.topic("orders");
        // New connections (the joining consumer's reader) reach a server that never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        proxy.redirect(&silent.local_addr().unwrap().to_string());
        let holding = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = silent.accept().await {
                held.push(connection);
            }
        });

        let name = format!("{}-late", env.id);
        // Counted as consuming for a minute after it joined (twice its `block`, plus a second).
        let options = consumer_options(&name).block(Duration::from_secs(30));
        let joining = tokio::spawn({
            let (transport, topic) = (env.transport.clone(), topic.clone());
            async move {
                transport
                    .redis_consumer(&topic, "g", options)
                    .await
                    .map(drop)
            }
        });
        let listed = || async {
            let delays = env.transport.redelivery_delays(&topic, "g").await.unwrap();
            delays.iter().any(|(listed, _)| *listed == name)
        };
        eventually(
            Duration::from_secs(10),
            "the join recorded its delay",
            || async { listed().await.then_some(()) },
        )
        .await;
        assert!(!joining.is_finished(), "still connecting its reader");

        joining.abort();
        eventually(
            Duration::from_secs(10),
            "the dropped join's record taken out",
            || async { (!listed().await).then_some(()) },
        )
        .await;
        holding.abort();
    })
    .await;
    env.cleanup().await;
}

/// The test's connection options, through `proxy`.
fn connection_through(proxy: &Proxy) -> ConnectionOptions {
    ConnectionOptions::new(proxy.url())
        .command_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(20))
        .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
}
