//! `Hub::close_connections_everywhere` closes a principal's connections on every hub sharing
//! the pub/sub and channel prefix (on Redis: `two_hubs_joined_by_redis_deliver_across_instances`),
//! and the listener behind it survives what the pub/sub does to it: a failed publish, failed
//! subscribes, messages that are not revocations.

use crate::support::{TEST_LIMIT, TestHub};
use async_trait::async_trait;
use cqrs_core::memory::InMemoryPubSub;
use cqrs_core::ports::{PubSub, Subscription, TransportError};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{HubOptions, close_code};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// The close a revoked connection gets.
fn revoked() -> (u16, String) {
    (
        close_code::POLICY_VIOLATION,
        "credentials revoked".to_owned(),
    )
}

/// Another instance's revocation of `key`'s connections, published straight on the channel of
/// hubs with channel prefix `prefix` (a hub's own call closes its connections before it
/// publishes, so it would not show that the listener acted).
async fn revoke_from_elsewhere(pubsub: &dyn PubSub, prefix: &str, key: &str) {
    let message = serde_json::json!({ "close_connections_of": key }).to_string();
    pubsub
        .publish(&format!("{prefix}#revocations"), Arc::from(message))
        .await
        .unwrap();
}

/// Waits until `t`'s revocation listener is subscribed.
async fn listening(t: &TestHub) {
    eventually(
        Duration::from_secs(20),
        "the listener subscribed",
        || async { t.hub.stats().revocations_listening.then_some(()) },
    )
    .await;
}

/// Hubs `a` and `b` (two instances): a revocation through `a` closes the principal's
/// connections on both, `a` counting its own, and leaves another principal's on `b` open and
/// receiving what `a` publishes.
pub(crate) async fn scenario(a: Arc<dyn PubSub>, b: Arc<dyn PubSub>, options: HubOptions) {
    let a = TestHub::start_on(a, options.clone(), |b| b).await;
    let b = TestHub::start_on(b, options, |b| b).await;
    let mut on_a = a.connect("agent-a").await;
    let mut on_b = b.connect("user-a").await;
    let mut second_on_b = b.connect("agent-a").await;
    let mut other_on_b = b.connect("agent-b").await;

    assert!(a.hub.stats().revocations_listening && b.hub.stats().revocations_listening);
    let closed_here = a.hub.close_connections_everywhere("a").await.unwrap();
    assert_eq!(closed_here, 1, "the connection on a");
    for client in [&mut on_a, &mut on_b, &mut second_on_b] {
        assert_eq!(client.close_frame(100).await, revoked());
    }
    assert_eq!(a.hub.stats().revoked_closes, 1, "a's own");
    assert_eq!(b.hub.stats().revoked_closes, 2, "b's, revoked by a");
    other_on_b.subscribe("tickets").await;
    a.publish("t1", "u1", 1).await;
    assert_eq!(
        other_on_b.event().await.seq,
        1,
        "the other principal receives"
    );
    eventually(
        Duration::from_secs(10),
        "b holds the other one only",
        || async { (b.hub.stats().connections == 1).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_two_hubs_on_one_pubsub() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        scenario(pubsub.clone(), pubsub, HubOptions::new()).await;
    })
    .await;
}

/// `publish_revocation` closes the principal's connections on the other hubs and leaves this
/// hub's (opened since a revocation that could not be published, with new credentials):
/// neither the call nor its echo on this hub's own listener closes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_a_revocation_again_leaves_this_hubs_connections_open() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let a = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| b).await;
        let b = TestHub::start_on(pubsub, HubOptions::new(), |b| b).await;
        let mut on_a = a.connect("agent-a").await;
        let mut on_b = b.connect("agent-a").await;
        a.hub.publish_revocation("a").await.unwrap();
        assert_eq!(on_b.close_frame(100).await, revoked());
        // Then one of b's own: once a acted on it, a took what came before, its own echo too.
        let mut marker = a.connect("agent-m").await;
        b.hub.close_connections_everywhere("m").await.unwrap();
        assert_eq!(marker.close_frame(100).await, revoked());
        on_a.ping_pong().await;
        assert_eq!(a.hub.stats().revoked_closes, 1, "the marker only");
    })
    .await;
}

/// Hubs with other channel prefixes are other applications: a revocation does not cross.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_of_another_prefix_keeps_its_connections() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let a = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| b).await;
        let other = HubOptions::new().channel_prefix("other-app:");
        let b = TestHub::start_on(pubsub.clone(), other, |b| b).await;
        let _on_a = a.connect("agent-a").await;
        let _on_b = b.connect("agent-a").await;
        let mut marker = b.connect("agent-c").await;
        assert_eq!(a.hub.close_connections_everywhere("a").await.unwrap(), 1);
        // Then a revocation on b's own channel: once b acted on it, b took what came before.
        revoke_from_elsewhere(&*pubsub, "other-app:", "c").await;
        assert_eq!(marker.close_frame(100).await, revoked());
        assert_eq!(
            b.hub.close_connections_of("a"),
            1,
            "b's connection was open"
        );
    })
    .await;
}

/// An in-memory pub/sub that fails what a test asks it to, and holds the revocation
/// listener's subscribe until let through.
struct Faulty {
    inner: InMemoryPubSub,
    publish_fails: AtomicBool,
    /// How many of the next subscribes to the revocation channel fail.
    failing_subscribes: AtomicUsize,
    subscribes: AtomicUsize,
    /// Open: subscribes to the revocation channel go through.
    gate: tokio::sync::watch::Sender<bool>,
}

impl Faulty {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: InMemoryPubSub::new(),
            publish_fails: AtomicBool::new(false),
            failing_subscribes: AtomicUsize::new(0),
            subscribes: AtomicUsize::new(0),
            gate: tokio::sync::watch::Sender::new(true),
        })
    }
}

fn unavailable() -> TransportError {
    TransportError::Unavailable {
        backend: "test",
        source: "the test's pub/sub is down".into(),
    }
}

#[async_trait]
impl PubSub for Faulty {
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
        if self.publish_fails.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        self.inner.publish(channel, payload).await
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
        if channel.ends_with("#revocations") {
            self.subscribes.fetch_add(1, Ordering::SeqCst);
            let _ = self.gate.subscribe().wait_for(|open| *open).await;
            let failing =
                self.failing_subscribes
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if failing.is_ok() {
                return Err(unavailable());
            }
        }
        self.inner.subscribe(channel).await
    }
}

/// A publish that fails is an `Err`, and this hub's connections are closed all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_that_cannot_be_published_still_closes_the_local_connections() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Faulty::new();
        let t = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| b).await;
        let mut client = t.connect("agent-a").await;
        pubsub.publish_fails.store(true, Ordering::SeqCst);
        let err = t.hub.close_connections_everywhere("a").await.unwrap_err();
        assert!(
            matches!(err.source, TransportError::Unavailable { .. }),
            "{err}"
        );
        assert_eq!(err.closed_here, 1);
        assert!(err.to_string().contains("realtime:#revocations"), "{err}");
        assert_eq!(client.close_frame(100).await, revoked());
    })
    .await;
}

/// A listener whose subscribes fail tries again until one succeeds, and then hears
/// revocations; handshakes meanwhile are not held for it (not for the two minutes of the
/// hub's operation timeout, past the test's limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_subscribes_fail_subscribes_again() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Faulty::new();
        pubsub
            .failing_subscribes
            .store(usize::MAX, Ordering::SeqCst);
        let options = HubOptions::new().operation_timeout(Duration::from_secs(120));
        let t = TestHub::start_on(pubsub.clone(), options, |b| b).await;
        let mut client = t.connect("agent-a").await;
        let _second = t.connect("agent-b").await;
        eventually(
            Duration::from_secs(20),
            "a second failed subscribe",
            || async { (pubsub.subscribes.load(Ordering::SeqCst) >= 2).then_some(()) },
        )
        .await;
        assert!(!t.hub.stats().revocations_listening);
        pubsub.failing_subscribes.store(0, Ordering::SeqCst);
        listening(&t).await;
        revoke_from_elsewhere(&pubsub.inner, "realtime:", "a").await;
        assert_eq!(client.close_frame(100).await, revoked());
        assert_eq!(t.hub.stats().connections, 1);
    })
    .await;
}

/// A first subscribe that never answers holds handshakes for the hub's operation timeout,
/// no longer: it counts as failed then, and the listener tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_subscribe_that_hangs_holds_handshakes_for_the_operation_timeout_only() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Faulty::new();
        pubsub.gate.send_replace(false);
        let options = HubOptions::new().operation_timeout(Duration::from_millis(300));
        let t = TestHub::start_on(pubsub.clone(), options, |b| b).await;
        let started = tokio::time::Instant::now();
        let mut client = t.connect("agent-a").await;
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "the handshake waited for the first subscribe's time"
        );
        assert!(!t.hub.stats().revocations_listening);
        pubsub.gate.send_replace(true);
        listening(&t).await;
        revoke_from_elsewhere(&pubsub.inner, "realtime:", "a").await;
        assert_eq!(client.close_frame(100).await, revoked());
    })
    .await;
}

/// A stopped hub's `closed` returns once the listener's subscription is gone too. (One
/// thread, and no connection to wait for: only `closed` itself lets the listener run.)
#[tokio::test]
async fn a_closed_hub_holds_no_revocation_subscription() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let t = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| b).await;
        // A refused handshake starts the listener all the same.
        tokio_tungstenite::connect_async(t.url("forged"))
            .await
            .expect_err("refused");
        assert_eq!(pubsub.upstream_subscriptions_to("realtime:#revocations"), 1);
        t.hub.shutdown();
        t.hub.closed().await;
        assert_eq!(pubsub.upstream_subscriptions_to("realtime:#revocations"), 0);
        assert!(!t.hub.stats().revocations_listening);
    })
    .await;
}

/// A hub whose listener's runtime is gone (its task dropped, never to run again) still
/// closes: `closed` does not wait for that listener.
#[test]
fn a_hub_whose_listeners_runtime_is_gone_still_closes() {
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let hub = first.block_on(async {
        let t = TestHub::start(HubOptions::new()).await;
        tokio_tungstenite::connect_async(t.url("forged"))
            .await
            .expect_err("refused");
        assert!(t.hub.stats().revocations_listening);
        t.hub.clone()
    });
    drop(first);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            hub.shutdown();
            tokio::time::timeout(Duration::from_secs(10), hub.closed())
                .await
                .expect("closed without the listener");
        });
}

/// Messages the listener missed (it fell behind the pub/sub) are counted, and it goes on.
#[tokio::test]
async fn revocations_the_listener_missed_are_counted() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::with_capacity(2));
        let t = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| b).await;
        let mut client = t.connect("agent-a").await;
        // Published without yielding on this one-thread runtime: the listener, not polled
        // in between, keeps the last two.
        for n in 0..6 {
            let revocation = format!(r#"{{"close_connections_of":"nobody-{n}"}}"#);
            pubsub
                .publish("realtime:#revocations", Arc::from(revocation))
                .await
                .unwrap();
        }
        revoke_from_elsewhere(&*pubsub, "realtime:", "a").await;
        assert_eq!(client.close_frame(100).await, revoked());
        eventually(Duration::from_secs(10), "the misses counted", || async {
            (t.hub.stats().revocations_missed == 5).then_some(())
        })
        .await;
    })
    .await;
}

/// The first handshake waits for the listener's first subscribe, so a revocation published
/// once a connection is open always finds the listener subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_handshake_waits_for_the_listener() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Faulty::new();
        pubsub.gate.send_replace(false);
        let options = HubOptions::new().operation_timeout(Duration::from_secs(120));
        let t = TestHub::start_on(pubsub.clone(), options, |b| b).await;
        let connect = t.connect("agent-a");
        tokio::pin!(connect);
        tokio::select! {
            _ = &mut connect => panic!("the handshake completed before the listener subscribed"),
            () = eventually(Duration::from_secs(10), "the listener subscribes", || async {
                (pubsub.subscribes.load(Ordering::SeqCst) == 1).then_some(())
            }) => {}
        }
        // Held while the subscribe is: given its time, it stays pending.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut connect)
                .await
                .is_err(),
            "the handshake completed before the listener subscribed"
        );
        pubsub.gate.send_replace(true);
        let mut client = connect.await;
        revoke_from_elsewhere(&pubsub.inner, "realtime:", "a").await;
        assert_eq!(client.close_frame(100).await, revoked());
    })
    .await;
}

/// What is not a revocation on the channel is ignored, and the listener goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_a_revocation_is_ignored() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let t = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| b).await;
        let mut client = t.connect("agent-a").await;
        for junk in ["not json", "{}", r#"{"close_connections_of":7}"#, "[]"] {
            pubsub
                .publish("realtime:#revocations", Arc::from(junk))
                .await
                .unwrap();
        }
        revoke_from_elsewhere(&*pubsub, "realtime:", "a").await;
        assert_eq!(client.close_frame(100).await, revoked());
    })
    .await;
}
