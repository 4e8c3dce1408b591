//! An entry whose handler always fails is dead-lettered after `max_deliveries` with the error
//! and the count, and the next event of its key is handled after it; an entry that does not
//! decode is dead-lettered without reaching the handler. Replaying the poison entry once the
//! handler is fixed delivers it again to its group only.

use crate::support::{Env, consumer_options, event, n_of, within};
use cqrs_core::ports::{Consumer, EventTransport, TransportError};
use cqrs_redis::RedisConsumer;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_undecodable_entries_are_dead_lettered_and_replay_works() {
    let Some(env) = Env::new("dead").await else {
        return;
    };
    let counts = cqrs_core::testing::MetricCounts::default();
    within(
        60,
        Box::pin(counts.scope(async {
            let topic = env.topic("payments");
            let stream = env.transport.stream_key(&topic).unwrap();
            let options = |name: &str| {
                consumer_options(&format!("{}-{name}", env.id))
                    .redelivery_delay(Duration::from_millis(200))
                    .max_deliveries(2)
            };
            let mut consumer = env
                .transport
                .redis_consumer(&topic, "billing", options("billing"))
                .await
                .unwrap();
            let mut audit = env
                .transport
                .redis_consumer(&topic, "audit", options("audit"))
                .await
                .unwrap();

            // n = 1 is the poison; n = 2 shares its key and must wait for it.
            let events = [
                event(Some("p"), 1),
                event(Some("p"), 2),
                event(Some("q"), 3),
            ];
            env.transport.publish(&topic, &events[..2]).await.unwrap();
            env.command(
                "XADD",
                vec![
                    stream.as_str().into(),
                    "*".into(),
                    "id".into(),
                    "not-a-uuid".into(),
                    "record".into(),
                    "{broken".into(),
                ],
            )
            .await;
            env.transport.publish(&topic, &events[2..]).await.unwrap();

            let mut handled = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            while handled.len() < 2 && tokio::time::Instant::now() < until {
                // n = 2 may come in n = 1's batch, after it, in its chain: when n = 1 fails,
                // n = 2 is handed back unhandled, which does not use up its deliveries.
                let mut broken = std::collections::HashSet::new();
                for d in consumer.fetch(10).await.unwrap() {
                    if d.order_key.as_ref().is_some_and(|k| broken.contains(k)) {
                        consumer.defer(&[d.id]).await.unwrap();
                    } else if n_of(&d) == 1 {
                        broken.extend(d.order_key.clone());
                        consumer
                            .nack_with_error(&d.id, "card declined: handler exploded")
                            .await
                            .unwrap();
                    } else {
                        handled.push(n_of(&d));
                        consumer.ack(&[d.id]).await.unwrap();
                    }
                }
            }
            handled.sort_unstable();
            assert_eq!(
                handled,
                [2, 3],
                "everything but the poison and the broken entry"
            );

            let dead = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert_eq!(dead.len(), 2, "{dead:#?}");
            let broken = dead
                .iter()
                .find(|d| d.record.is_none())
                .expect("the broken entry");
            assert!(
                broken.error.starts_with("undecodable entry"),
                "{}",
                broken.error
            );
            assert_eq!(broken.group, "billing");
            assert!(broken.fields.contains(&("record".into(), "{broken".into())));
            let poison = dead
                .iter()
                .find(|d| d.record.is_some())
                .expect("the poison");
            assert_eq!(poison.record.as_ref().unwrap().event_id, events[0].event_id);
            assert_eq!(poison.error, "card declined: handler exploded");
            assert_eq!(poison.deliveries, 2, "handed out max_deliveries times");
            assert_eq!(poison.group, "billing");
            let stats = env.transport.topic_stats(&topic).await.unwrap();
            assert_eq!(stats.dead_letters, 2);
            // Each counted once, by why.
            let dead_lettered = |reason: &str| {
                counts.get(&format!(
                    "cqrs_transport_dead_lettered_total{{topic={topic},group=billing,transport=redis,reason={reason}}}"
                ))
            };
            assert_eq!(
                (dead_lettered("max_deliveries"), dead_lettered("given_up")),
                (1, 1),
                "{:?}",
                counts.series()
            );

            // Paged one at a time; past the last, and past the largest id, nothing.
            let first = env.transport.dead_letters(&topic, None, 1).await.unwrap();
            assert_eq!(first.len(), 1);
            assert_eq!(first[0].id, dead[0].id);
            let second = env
                .transport
                .dead_letters(&topic, Some(&first[0].id), 1)
                .await
                .unwrap();
            assert_eq!(second.len(), 1);
            assert_eq!(second[0].id, dead[1].id);
            let past = Some(dead[1].id.as_str());
            let largest = format!("{}-{}", u64::MAX, u64::MAX);
            for after in [past, Some(largest.as_str())] {
                let page = env.transport.dead_letters(&topic, after, 10).await.unwrap();
                assert!(page.is_empty(), "after {after:?}: {page:?}");
            }
            assert!(
                env.transport
                    .dead_letters(&topic, None, 0)
                    .await
                    .unwrap()
                    .is_empty()
            );
            // An `after` that is no id is the caller's mistake, not a backend failure.
            for after in ["abc", "", "1-2-3", "+1-0", "12", "18446744073709551616-0"] {
                let error = env
                    .transport
                    .dead_letters(&topic, Some(after), 10)
                    .await
                    .unwrap_err();
                assert!(
                    matches!(&error, TransportError::Invalid(m) if m.contains("no dead letter id")),
                    "after {after:?}: {error}"
                );
            }

            // The audit group handles everything decodable; the broken entry is dead-lettered for
            // it too.
            let audited = drain(&mut audit, 3).await;
            assert_eq!(audited.len(), 3);

            // The handler is fixed: replay the poison. Ids that are no stream ids (a typo, a
            // blank line of an operator's list) are not found, and fail nothing. The poison
            // named again with zeros in front of its parts (which Redis reads as the same
            // entry) is replayed once.
            let not_ids = ["not an id", "", "1-2-3", "+1-0", "12"].map(String::from);
            let (ms, seq) = poison.id.split_once('-').unwrap();
            let asked: Vec<String> = [
                poison.id.clone(),
                format!("00{ms}-0{seq}"),
                format!("{ms}-00{seq}"),
            ]
            .into_iter()
            .chain(not_ids.iter().cloned())
            .collect();
            let replayed = env
                .transport
                .replay_dead_letters(&topic, &asked)
                .await
                .unwrap();
            assert_eq!(replayed.len(), 1);
            assert_eq!(replayed[0].dead_letter_id, poison.id);
            let again = drain(&mut consumer, 1).await;
            assert_eq!(again, [1], "the replayed poison reaches its group");
            let remaining = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(
                remaining.iter().all(|d| d.id != poison.id),
                "replayed dead letters are removed"
            );

            // The audit group skips a replay meant for billing.
            assert!(
                drain(&mut audit, 1).await.is_empty(),
                "audit got the replay"
            );
            let audit_pending = env
                .command("XPENDING", vec![stream.as_str().into(), "audit".into()])
                .await
                .into_array();
            assert_eq!(audit_pending.first().and_then(Value::as_u64), Some(0));
            let stats = env.transport.topic_stats(&topic).await.unwrap();
            let audit_stats = stats.groups.iter().find(|g| g.name == "audit").unwrap();
            assert_eq!(
                audit_stats.lag,
                Some(0),
                "audit read the replay and skipped it"
            );

            // Discarding removes dead letters for good.
            let ids: Vec<_> = remaining.iter().map(|d| d.id.clone()).collect();
            let with_not_ids: Vec<String> = ids.iter().chain(&not_ids).cloned().collect();
            let discarded = env
                .transport
                .discard_dead_letters(&topic, &with_not_ids)
                .await
                .unwrap();
            assert_eq!(discarded, ids.len() as u64);
            let left = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert!(left.is_empty(), "{left:?}");
        })),
    )
    .await;
    env.cleanup().await;
}

/// Fetches and acknowledges until `count` deliveries or a second without any; returns the `n`s.
async fn drain(consumer: &mut RedisConsumer, count: usize) -> Vec<u64> {
    let mut got = Vec::new();
    let mut idle_until = tokio::time::Instant::now() + Duration::from_secs(1);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < count && tokio::time::Instant::now() < until.min(idle_until) {
        let batch = consumer.fetch(10).await.unwrap();
        if !batch.is_empty() {
            idle_until = tokio::time::Instant::now() + Duration::from_secs(1);
        }
        got.extend(batch.iter().map(n_of));
        let ids: Vec<_> = batch.into_iter().map(|d| d.id).collect();
        consumer.ack(&ids).await.unwrap();
    }
    got
}

/// A dead letter written by hand without `dead.group` is replayed to every group, and a
/// delivery of it that fails comes back like any other: the entry read back from the stream
/// (after a nack, or reclaimed) is not taken for a replay meant for another group and
/// acknowledged unhandled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_written_without_its_group_is_replayed_and_retried() {
    let Some(env) = Env::new("dead-no-group").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("payments");
            let stream = env.transport.stream_key(&topic).unwrap();
            let dead = env.transport.dead_letter_key(&topic).unwrap();
            let options = consumer_options(&format!("{}-c", env.id))
                .redelivery_delay(Duration::from_millis(200))
                .max_deliveries(5);
            let mut consumer = env
                .transport
                .redis_consumer(&topic, "g", options)
                .await
                .unwrap();
            // An entry as a publish writes it, handled; its fields make the dead letter.
            env.transport
                .publish(&topic, &[event(None, 7)])
                .await
                .unwrap();
            let first = drain(&mut consumer, 1).await;
            assert_eq!(first, [7]);
            let entries = env
                .command(
                    "XRANGE",
                    vec![stream.as_str().into(), "-".into(), "+".into()],
                )
                .await
                .into_array();
            let entry = entries[0].clone().into_array();
            let mut fields: Vec<Value> = vec![
                dead.as_str().into(),
                "*".into(),
                "dead.entry".into(),
                entry[0].clone(),
                "dead.error".into(),
                "written by hand".into(),
            ];
            fields.extend(entry[1].clone().into_array());
            env.command("XADD", fields).await;
            let letters = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert_eq!(letters.len(), 1, "{letters:#?}");
            env.transport
                .replay_dead_letters(&topic, std::slice::from_ref(&letters[0].id))
                .await
                .unwrap();

            // Handed out, failed, and handed out again after the delay.
            let mut attempts = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(15);
            while attempts.len() < 2 {
                assert!(
                    tokio::time::Instant::now() < until,
                    "the replay came back {} time(s) of 2",
                    attempts.len()
                );
                for d in consumer.fetch(10).await.unwrap() {
                    assert_eq!(n_of(&d), 7);
                    attempts.push(d.attempt);
                    if attempts.len() == 1 {
                        consumer.nack_with_reason(&d.id, "failed").await.unwrap();
                    } else {
                        consumer.ack(&[d.id]).await.unwrap();
                    }
                }
            }
            assert_eq!(attempts, [1, 2]);
        }),
    )
    .await;
    env.cleanup().await;
}

/// A dead letter whose group no longer exists (the projection was renamed, its group
/// destroyed) is not replayed: published for it, every other group would acknowledge the
/// entry unhandled and the event would be gone. It stays in the dead-letter stream, and once
/// the group exists again, replaying it reaches the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_of_a_group_that_is_gone_stays_until_the_group_is_back() {
    let Some(env) = Env::new("dead-gone").await else {
        return;
    };
    within(
        60,
        Box::pin(async {
            let topic = env.topic("payments");
            let stream = env.transport.stream_key(&topic).unwrap();
            let options = |name: &str| {
                consumer_options(&format!("{}-{name}", env.id))
                    .redelivery_delay(Duration::from_millis(200))
                    .max_deliveries(1)
            };
            let mut old = env
                .transport
                .redis_consumer(&topic, "proj-v1", options("old"))
                .await
                .unwrap();
            let mut other = env
                .transport
                .redis_consumer(&topic, "audit", options("audit"))
                .await
                .unwrap();
            env.transport
                .publish(&topic, &[event(None, 7)])
                .await
                .unwrap();
            let d = old.fetch(10).await.unwrap().pop().expect("the event");
            old.nack_with_error(&d.id, "handler exploded")
                .await
                .unwrap();
            assert_eq!(
                drain(&mut other, 1).await,
                [7],
                "the audit group handles it"
            );
            // Its deliveries spent, the next fetch dead-letters it.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let letters = loop {
                assert!(old.fetch(10).await.unwrap().is_empty(), "handed out again");
                let letters = env.transport.dead_letters(&topic, None, 10).await.unwrap();
                if !letters.is_empty() {
                    break letters;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "not dead-lettered in 10 s"
                );
            };
            assert_eq!(letters.len(), 1, "{letters:#?}");
            assert_eq!(letters[0].group, "proj-v1");

            // The projection is renamed: its group destroyed.
            drop(old);
            env.command(
                "XGROUP",
                vec!["DESTROY".into(), stream.as_str().into(), "proj-v1".into()],
            )
            .await;
            let replayed = env
                .transport
                .replay_dead_letters(&topic, std::slice::from_ref(&letters[0].id))
                .await
                .unwrap();
            assert!(
                replayed.is_empty(),
                "replayed for a group that is gone: {replayed:?}"
            );
            let kept = env.transport.dead_letters(&topic, None, 10).await.unwrap();
            assert_eq!(
                kept.iter().map(|l| &l.id).collect::<Vec<_>>(),
                [&letters[0].id],
                "the dead letter stays"
            );
            assert!(drain(&mut other, 1).await.is_empty(), "audit got a replay");

            // The group is back: the replay reaches it.
            let mut back = env
                .transport
                .redis_consumer(&topic, "proj-v1", options("back"))
                .await
                .unwrap();
            // A new group reads the stream from its start: the original entry first.
            assert_eq!(drain(&mut back, 1).await, [7], "the original entry");
            let replayed = env
                .transport
                .replay_dead_letters(&topic, std::slice::from_ref(&letters[0].id))
                .await
                .unwrap();
            assert_eq!(replayed.len(), 1);
            assert_eq!(
                drain(&mut back, 1).await,
                [7],
                "the replay reaches the group"
            );
        }),
    )
    .await;
    env.cleanup().await;
}

/// A burst of undecodable entries is dead-lettered over several fetches, each within its
/// `block` and one step past it, not in one fetch that runs until the burst is worked off (the
/// consume loop checks its health and the shutdown between fetches); a fetch with no `block`
/// still hands out an event ready behind one step of dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_undecodable_entries_is_worked_off_over_several_fetches() {
    let Some(env) = Env::new("burst").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("payments");
            let stream = env.transport.stream_key(&topic).unwrap();
            let mut consumer = env
                .transport
                .redis_consumer(
                    &topic,
                    "billing",
                    consumer_options(&format!("{}-billing", env.id)).block(Duration::ZERO),
                )
                .await
                .unwrap();
            const BURST: u64 = 10;
            const MAX: usize = 2;
            let broken = || {
                env.command(
                    "XADD",
                    vec![
                        stream.as_str().into(),
                        "*".into(),
                        "record".into(),
                        "{broken".into(),
                    ],
                )
            };
            for _ in 0..BURST {
                broken().await;
            }
            let mut dead = 0;
            for _ in 0..50 {
                assert!(consumer.fetch(MAX).await.unwrap().is_empty());
                let now = env
                    .transport
                    .topic_stats(&topic)
                    .await
                    .unwrap()
                    .dead_letters;
                assert!(
                    now - dead <= 2 * MAX as u64,
                    "one fetch dead-lettered {} entries, more than two steps of {MAX}",
                    now - dead
                );
                dead = now;
                if dead == BURST {
                    break;
                }
            }
            assert_eq!(dead, BURST, "the burst is worked off");

            for _ in 0..MAX {
                broken().await;
            }
            env.transport
                .publish(&topic, &[event(None, 7)])
                .await
                .unwrap();
            let handed = consumer.fetch(MAX).await.unwrap();
            assert_eq!(
                handed.iter().map(n_of).collect::<Vec<_>>(),
                [7],
                "the event behind the dead letters"
            );
        }),
    )
    .await;
    env.cleanup().await;
}
