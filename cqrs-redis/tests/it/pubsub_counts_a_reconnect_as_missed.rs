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
