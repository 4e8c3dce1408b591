//! Messages published while the subscriber connection is down never arrive: after `CLIENT
//! KILL ID` of the pub/sub's own subscriber connection, its subscriptions count a possible
//! loss in `missed()` when the reconnect is seen and again once the channel is subscribed
//! again (the realtime hub tells its clients to resume), and messages flow again.

use crate::support::{connect_admin, raw, reachable, within};
use crate::the_pubsub_passes_the_conformance_suite::options;
use cqrs_core::ports::PubSub;
use cqrs_core::testing::{eventually, test_id};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_counts_a_reconnect_as_missed() {
    if !reachable().await {
        return;
    }
    let id = test_id("reconnect-missed");
    within(
        60,
        Box::pin(async {
            let pubsub = options(&id).connect().await.expect("connect");
            let admin = connect_admin().await.unwrap();
            let channel = format!("{id}-news");
            let mut a = pubsub.subscribe(&channel).await.unwrap();
            let b = pubsub.subscribe(&channel).await.unwrap();
            pubsub.publish(&channel, "before".into()).await.unwrap();
            let message = tokio::time::timeout(Duration::from_secs(5), a.recv())
                .await
                .expect("a message before the kill")
                .expect("open");
            assert_eq!(&*message.payload, "before");
            assert_eq!((a.missed(), b.missed()), (0, 0), "nothing missed yet");

            // Both connections (`client_ids` does not say which is which); one CLIENT KILL per
            // id: its filters combine with AND.
            for id in pubsub.client_ids().await.unwrap() {
                let reply = raw(
                    &admin,
                    "CLIENT",
                    vec!["KILL".into(), "ID".into(), id.into()],
                )
                .await;
                assert_eq!(reply.as_u64(), Some(1), "killed connection {id}");
            }

            eventually(
                Duration::from_secs(10),
                "a possible loss counted after the reconnect",
                || {
                    let missed = (a.missed(), b.missed());
                    async move { (missed.0 >= 1 && missed.1 >= 1).then_some(()) }
                },
            )
            .await;
            // Counted when the reconnect is seen and again once the channel is live: then a
            // message published arrives. (Published before the second count, it could reach
            // Redis before the resubscription and be lost, as pub/sub loses anything sent to
            // no subscriber.)
            eventually(Duration::from_secs(10), "two losses per reconnect", || {
                let missed = (a.missed(), b.missed());
                async move { (missed == (2, 2)).then_some(()) }
            })
            .await;
            // The publisher's connection was killed too: it may still be reconnecting, when
            // a publish fails fast.
            eventually(
                Duration::from_secs(10),
                "a publish after the reconnect",
                || async { pubsub.publish(&channel, "after".into()).await.ok() },
            )
            .await;
            let message = tokio::time::timeout(Duration::from_secs(5), a.recv())
                .await
                .expect("a message after the reconnect")
                .expect("open");
            assert_eq!(&*message.payload, "after");
            assert_eq!(
                (a.missed(), b.missed()),
                (2, 2),
                "counted once more, no more"
            );
            pubsub.publish(&channel, "later".into()).await.unwrap();
            let message = tokio::time::timeout(Duration::from_secs(5), a.recv())
                .await
                .expect("a later message")
                .expect("open");
            assert_eq!(&*message.payload, "later");
            assert_eq!(a.missed(), 2, "nothing more missed");
        }),
    )
    .await;
}

/// The second loss of a reconnect is recorded before the first message from after it: a
/// subscriber that resumed during the outage is told before that message, not after it (when
/// resuming from it skips what was published during the outage). It was recorded once the
/// whole resubscription was done, a `CLIENT LIST` round trip after Redis had confirmed it
/// and started sending the channel's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_from_after_a_reconnect_arrives_before_its_second_loss() {
    if !reachable().await {
        return;
    }
    let id = test_id("reconnect-order");
    within(
        60,
        Box::pin(async {
            let pubsub = options(&id).connect().await.expect("connect");
            let admin = connect_admin().await.unwrap();
            let channel = format!("{id}-news");
            let mut subscription = pubsub.subscribe(&channel).await.unwrap();

            // Only the subscriber's connection (flag `P`): the publisher goes on publishing.
            let mut args = vec!["LIST".into(), "ID".into()];
            args.extend(
                pubsub
                    .client_ids()
                    .await
                    .unwrap()
                    .into_iter()
                    .map(Into::into),
            );
            let list = raw(&admin, "CLIENT", args).await;
            let list = list.as_str().expect("CLIENT LIST is text").into_owned();
            let subscriber = list
                .lines()
                .find(|line| line.contains(" flags=P "))
                .and_then(|line| line.strip_prefix("id="))
                .and_then(|rest| rest.split(' ').next())
                .unwrap_or_else(|| panic!("no subscriber connection in {list}"))
                .to_owned();
            let reply = raw(
                &admin,
                "CLIENT",
                vec!["KILL".into(), "ID".into(), subscriber.into()],
            )
            .await;
            assert_eq!(reply.as_u64(), Some(1), "killed the subscriber connection");

            // Messages as fast as they go, so that some reach Redis the moment the channel is
            // live again: every message received is from after the kill.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let publishing = tokio::spawn({
                let (pubsub, channel, stop) = (pubsub.clone(), channel.clone(), stop.clone());
                async move {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = pubsub.publish(&channel, n.to_string().into()).await;
                        n += 1;
                    }
                }
            });
            let first = tokio::time::timeout(Duration::from_secs(20), subscription.recv())
                .await
                .expect("a message after the reconnect")
                .expect("open");
            let missed = subscription.missed();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            publishing.await.unwrap();
            assert!(
                missed >= 2,
                "message {} arrived with {missed} losses recorded, before the second",
                first.payload
            );
        }),
    )
    .await;
}
