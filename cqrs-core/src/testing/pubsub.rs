//! The pub/sub conformance suite. See [`PubSub`] for the contract.
//!
//! Run it with [`pubsub_conformance!`](crate::pubsub_conformance).

use super::{Harness, with_timeout};
use crate::ports::{PubSub, Subscription};
use std::sync::Arc;
use std::time::Duration;

/// What a pub/sub adapter provides to its conformance suite.
pub trait PubSubHarness: Harness {
    /// The pub/sub under test.
    fn pubsub(&self) -> Arc<dyn PubSub>;

    /// A second instance on the same broker, as another process would have; `None` for
    /// in-process adapters (the cross-instance scenario then uses the first).
    fn other_instance(&self) -> Option<Arc<dyn PubSub>> {
        None
    }

    /// How many upstream subscriptions this process holds for `channel`, when the adapter can
    /// tell (the one-subscription-per-channel scenario is skipped otherwise).
    fn upstream_subscriptions(&self, channel: &str) -> Option<usize> {
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
                every_subscriber_of_a_channel_gets_each_message_and_no_other,
                messages_arrive_in_publish_order,
                a_dropped_subscription_stops_and_a_new_one_works,
                messages_cross_instances,
                many_local_subscribers_share_one_upstream_subscription,
            ]
        );
    };
}

async fn next(sub: &mut Subscription) -> String {
    with_timeout(Duration::from_secs(5), sub.recv())
        .await
        .map(|m| m.payload.to_string())
        .expect("the pub/sub is open")
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
    assert_eq!(a.channel(), news);
}

/// Messages from one publisher on one channel arrive in order.
pub async fn messages_arrive_in_publish_order<H: PubSubHarness>(h: &H) {
    let ps = h.pubsub();
    let channel = format!("{}-order", h.test_id());
    let mut sub = ps.subscribe(&channel).await.unwrap();
    for i in 0..100 {
        ps.publish(&channel, i.to_string().into()).await.unwrap();
    }
    for i in 0..100 {
        assert_eq!(next(&mut sub).await, i.to_string());
    }
}

/// After a subscription is dropped, a new subscription to the channel works.
pub async fn a_dropped_subscription_stops_and_a_new_one_works<H: PubSubHarness>(h: &H) {
    let ps = h.pubsub();
    let channel = format!("{}-again", h.test_id());
    let sub = ps.subscribe(&channel).await.unwrap();
    drop(sub);
    let mut again = ps.subscribe(&channel).await.unwrap();
    ps.publish(&channel, "second life".into()).await.unwrap();
    assert_eq!(next(&mut again).await, "second life");
}

/// A message published on one instance reaches subscribers on another.
pub async fn messages_cross_instances<H: PubSubHarness>(h: &H) {
    let a = h.pubsub();
    let Some(b) = h.other_instance() else {
        eprintln!("skipped: the harness gives no second instance (`other_instance`)");
        return;
    };
    let channel = format!("{}-cross", h.test_id());
    let mut on_b = b.subscribe(&channel).await.unwrap();
    a.publish(&channel, "from a".into()).await.unwrap();
    assert_eq!(next(&mut on_b).await, "from a");
}

/// Many local subscribers of one channel share one upstream subscription.
pub async fn many_local_subscribers_share_one_upstream_subscription<H: PubSubHarness>(h: &H) {
    let ps = h.pubsub();
    let channel = format!("{}-shared", h.test_id());
    let mut subs = Vec::new();
    for _ in 0..20 {
        subs.push(ps.subscribe(&channel).await.unwrap());
    }
    let Some(upstream) = h.upstream_subscriptions(&channel) else {
        eprintln!("skipped: the adapter cannot count upstream subscriptions");
        return;
    };
    assert_eq!(
        upstream, 1,
        "20 local subscribers, one upstream subscription"
    );
    ps.publish(&channel, "all".into()).await.unwrap();
    for sub in &mut subs {
        assert_eq!(next(sub).await, "all");
    }
}
