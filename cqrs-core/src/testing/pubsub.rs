//! The pub/sub conformance suite. See [`PubSub`] for the contract.
//!
//! Run it with [`pubsub_conformance!`](crate::pubsub_conformance).

use super::{Harness, eventually};
use crate::ports::{PubSub, Subscription};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// What a pub/sub adapter provides to its conformance suite.
#[async_trait]
pub trait PubSubHarness: Harness {
    /// The pub/sub under test.
    fn pubsub(&self) -> Arc<dyn PubSub>;

    /// A second instance on the same broker, as another process would have; `None` for
    /// in-process adapters (the cross-instance scenario then uses the first).
    fn other_instance(&self) -> Option<Arc<dyn PubSub>> {
        None
    }

    /// How many upstream subscriptions this process holds for `channel`, when the harness can
    /// tell (the one-subscription-per-channel scenario then checks the counts; without, only
    /// the deliveries). Ask the broker
    /// (Redis: `PUBSUB NUMSUB`), not the adapter's own bookkeeping, which cannot disagree with
    /// itself: channel names carry the test id, so the broker's count is this test's.
    async fn upstream_subscriptions(&self, channel: &str) -> Option<usize> {
        let _ = channel;
        None
    }

    /// Whether this process still holds an upstream (broker) subscription to `channel`, when
    /// the adapter has one and the harness can tell (ask the broker, as for
    /// [`upstream_subscriptions`](Self::upstream_subscriptions)): the dropped-subscription
    /// scenario then checks that dropping the last local subscriber ends it. `None` (the
    /// default, and for in-process adapters) leaves that check out.
    async fn listens_upstream(&self, channel: &str) -> Option<bool> {
        let _ = channel;
        None
    }
}

/// Expands to one `#[tokio::test]` per pub/sub scenario.
#[macro_export]
macro_rules! pubsub_conformance {
    ($make:path) => {
        $crate::__conformance!(
            $make,
            pubsub,
            [
                a_subscription_is_live_when_subscribe_returns,
                subscribers_that_subscribe_together_are_each_live_when_subscribe_returns,
                every_subscriber_of_a_channel_gets_each_message_and_no_other,
                messages_arrive_in_publish_order,
                a_dropped_subscription_stops_and_a_new_one_works,
                a_subscription_made_again_at_once_is_live,
                messages_cross_instances,
                many_local_subscribers_share_one_upstream_subscription,
            ]
        );
    };
}

/// How long a message may take to arrive: generous, as it crosses a broker on a machine that
/// may be loaded (it only costs time when one never comes).
const ARRIVAL: Duration = Duration::from_secs(15);

async fn next(sub: &mut Subscription) -> String {
    match tokio::time::timeout(ARRIVAL, sub.recv()).await {
        Ok(Some(message)) => message.payload.to_string(),
        Ok(None) => panic!("the subscription to {} closed", sub.channel()),
        Err(_) => panic!(
            "no message on {} within {ARRIVAL:?} (the subscription says it missed {})",
            sub.channel(),
            sub.missed()
        ),
    }
}

/// A message published right after `subscribe` returns is received.
pub async fn a_subscription_is_live_when_subscribe_returns<H: PubSubHarness>(h: &H) {
    let ps = h.pubsub();
    for i in 0..5 {
        let channel = format!("{}-live-{i}", h.test_id());
        let mut sub = ps.subscribe(&channel).await.expect("subscribe");
        ps.publish(&channel, format!("m{i}").into())
            .await
            .expect("publish");
        assert_eq!(next(&mut sub).await, format!("m{i}"));
    }
}

/// Subscribers of one channel that subscribe at the same moment (the first one's upstream
/// subscription still on its way when the others ask for theirs) are each live when their
/// `subscribe` returns: a message each publishes right after reaches it. An adapter that
/// hands a later subscriber the channel's local fan-out before the broker confirmed it fails.
pub async fn subscribers_that_subscribe_together_are_each_live_when_subscribe_returns<
    H: PubSubHarness,
>(
    h: &H,
) {
    let ps = h.pubsub();
    for round in 0..3 {
        let channel = format!("{}-together-{round}", h.test_id());
        let subscribers = (0..8).map(|i| {
            let (ps, channel) = (ps.clone(), channel.clone());
            async move {
                let mut sub = ps.subscribe(&channel).await.expect("subscribe");
                let mine = format!("from-{i}");
                ps.publish(&channel, mine.clone().into())
                    .await
                    .expect("publish");
                // The others' messages may come first; its own must come.
                while next(&mut sub).await != mine {}
            }
        });
        futures_util::future::join_all(subscribers).await;
    }
}

/// Two subscribers of a channel both get each message; a subscriber of another channel gets
/// none of them.
pub async fn every_subscriber_of_a_channel_gets_each_message_and_no_other<H: PubSubHarness>(h: &H) {
    let ps = h.pubsub();
    let (news, other) = (
        format!("{}-news", h.test_id()),
        format!("{}-other", h.test_id()),
    );
    let mut a = ps.subscribe(&news).await.unwrap();
    let mut b = ps.subscribe(&news).await.unwrap();
    let mut c = ps.subscribe(&other).await.unwrap();
    ps.publish(&news, "hello".into()).await.unwrap();
    ps.publish(&other, "marker".into()).await.unwrap();
    assert_eq!(next(&mut a).await, "hello");
    assert_eq!(next(&mut b).await, "hello");
    assert_eq!(
        next(&mut c).await,
        "marker",
        "the other channel's subscriber got only its own message"
    );
    // "marker" has been delivered; a message published on `news` after it is the next thing
    // `news`'s subscribers get: they did not get "marker".
    ps.publish(&news, "after".into()).await.unwrap();
    for sub in [&mut a, &mut b] {
        assert_eq!(
            next(sub).await,
            "after",
            "a subscriber of {news} gets each of its channel's messages once, and no other \
             channel's"
        );
    }
    assert_eq!(a.channel(), news);
}

/// Messages from one publisher on one channel arrive in order. The subscriber reads while the
/// 100 messages go out, but an in-process adapter may publish them all before it runs: a
/// subscription's buffer must hold 100 (a subscriber that missed some is told so).
pub async fn messages_arrive_in_publish_order<H: PubSubHarness>(h: &H) {
    let ps = h.pubsub();
    let channel = format!("{}-order", h.test_id());
    let mut sub = ps.subscribe(&channel).await.unwrap();
    let sent: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let publish = async {
        for message in &sent {
            ps.publish(&channel, message.clone().into()).await.unwrap();
        }
    };
    let read = async {
        let mut got = Vec::new();
        while got.len() < sent.len() && sub.missed() == 0 {
            got.push(next(&mut sub).await);
        }
        got
    };
    let ((), got) = tokio::join!(publish, read);
    assert_eq!(
        sub.missed(),
        0,
        "the subscriber missed messages of 100 published at once (its buffer holds fewer?); \
         got {got:?}"
    );
    assert_eq!(got, sent, "the messages arrive in publish order");
}

/// After the last subscription of a channel is dropped, the adapter stops listening to it
/// upstream (where it can tell), and a new subscription to the channel works, listening again.
pub async fn a_dropped_subscription_stops_and_a_new_one_works<H: PubSubHarness>(h: &H) {
    let ps = h.pubsub();
    let channel = format!("{}-again", h.test_id());
    let mut sub = ps.subscribe(&channel).await.unwrap();
    ps.publish(&channel, "first life".into()).await.unwrap();
    assert_eq!(next(&mut sub).await, "first life");
    let tells = h.listens_upstream(&channel).await.is_some();
    if tells {
        assert_eq!(
            h.listens_upstream(&channel).await,
            Some(true),
            "subscribed upstream"
        );
    } else {
        eprintln!("the harness cannot tell upstream subscriptions: not checking they stop");
    }
    drop(sub);
    if tells {
        eventually(
            Duration::from_secs(10),
            "the upstream subscription ends with the last local subscriber",
            || async { (h.listens_upstream(&channel).await == Some(false)).then_some(()) },
        )
        .await;
    }
    let mut again = ps.subscribe(&channel).await.unwrap();
    if tells {
        assert_eq!(
            h.listens_upstream(&channel).await,
            Some(true),
            "subscribed upstream again"
        );
    }
    ps.publish(&channel, "second life".into()).await.unwrap();
    assert_eq!(next(&mut again).await, "second life");
}

/// A channel's last subscriber dropped and a new one made at once, over and over: each new one
/// is live when `subscribe` returns. The drop's upstream unsubscribe is still on its way when
/// the new subscribe asks: an adapter that lets it land after the new subscription (and so end
/// it) leaves the new subscriber deaf, without a word.
pub async fn a_subscription_made_again_at_once_is_live<H: PubSubHarness>(h: &H) {
    let ps = h.pubsub();
    let channel = format!("{}-at-once", h.test_id());
    for round in 0..20 {
        let mut sub = ps.subscribe(&channel).await.unwrap();
        ps.publish(&channel, format!("round {round}").into())
            .await
            .unwrap();
        assert_eq!(
            next(&mut sub).await,
            format!("round {round}"),
            "round {round}"
        );
        drop(sub);
    }
}

/// A message published on one instance reaches subscribers on another (on the same instance
/// when the harness gives no second one: an in-process adapter has only the one).
pub async fn messages_cross_instances<H: PubSubHarness>(h: &H) {
    let a = h.pubsub();
    let b = h.other_instance().unwrap_or_else(|| h.pubsub());
    let channel = format!("{}-cross", h.test_id());
    let mut on_b = b.subscribe(&channel).await.unwrap();
    a.publish(&channel, "from a".into()).await.unwrap();
    assert_eq!(next(&mut on_b).await, "from a");
}

/// Many local subscribers of one channel share one upstream subscription, which lasts while
/// any of them does: dropping all but one leaves it, and the last one still gets messages.
/// (The message checks run for every adapter; the upstream counts where the harness can tell
/// them.)
pub async fn many_local_subscribers_share_one_upstream_subscription<H: PubSubHarness>(h: &H) {
    let ps = h.pubsub();
    let channel = format!("{}-shared", h.test_id());
    let mut subs = Vec::new();
    for _ in 0..20 {
        subs.push(ps.subscribe(&channel).await.unwrap());
    }
    let counted = h.upstream_subscriptions(&channel).await;
    if let Some(upstream) = counted {
        assert_eq!(
            upstream, 1,
            "20 local subscribers, one upstream subscription"
        );
    }
    ps.publish(&channel, "all".into()).await.unwrap();
    for sub in &mut subs {
        assert_eq!(next(sub).await, "all");
    }
    let mut last = subs.pop().expect("20 subscribers");
    drop(subs);
    // A wrong unsubscribe at these drops is queued before this publish goes out; the message
    // takes a round trip through the broker, so it would most likely be lost.
    ps.publish(&channel, "one left".into()).await.unwrap();
    assert_eq!(next(&mut last).await, "one left");
    if counted.is_some() {
        // A sync point before counting: a subscription to another channel, confirmed by the
        // broker, and a message on it, go through the adapter after anything the drops queued
        // (an unsubscribe sent late would otherwise land after the count).
        let marker = format!("{}-shared-marker", h.test_id());
        let mut sync = ps.subscribe(&marker).await.unwrap();
        ps.publish(&marker, "sync".into()).await.unwrap();
        assert_eq!(next(&mut sync).await, "sync");
        assert_eq!(
            h.upstream_subscriptions(&channel).await,
            Some(1),
            "one local subscriber left: the upstream subscription stays"
        );
        ps.publish(&channel, "still there".into()).await.unwrap();
        assert_eq!(
            next(&mut last).await,
            "still there",
            "the last local subscriber gets each message once"
        );
    }
}
