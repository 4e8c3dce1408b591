use crate::support::{REVOCATION_LISTENER, TEST_LIMIT, TestHub};
use cqrs_core::memory::InMemoryPubSub;
use cqrs_core::runtime::Shutdown;
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, close_code};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite;

/// The runtime's shutdown signal closes every connection (subscribed or not) with 1001,
/// `closed()` completes, and later handshakes get 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_signal_closes_connections_with_1001_and_refuses_new_ones() {
    with_timeout(TEST_LIMIT, async {
        let (trigger, signal) = Shutdown::new();
        let t = TestHub::start_on(Arc::new(InMemoryPubSub::new()), HubOptions::new(), |b| {
            b.shutdown_on(signal)
        })
        .await;
        let mut subscribed = t.connect("user-u1").await;
        subscribed.subscribe("tickets").await;
        let mut idle = t.connect("user-u2").await;
        idle.ping_pong().await;

        trigger.trigger();
        assert_eq!(subscribed.closed_with(10).await, close_code::GOING_AWAY);
        assert_eq!(idle.closed_with(10).await, close_code::GOING_AWAY);
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("every connection closed");
        assert_eq!(t.hub.stats().connections, 0);
        assert_eq!(t.hub.stats().subscriptions, 0);

        match tokio_tungstenite::connect_async(t.url("user-u1")).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503);
                let retry_after = response
                    .headers()
                    .get(tungstenite::http::header::RETRY_AFTER);
                assert_eq!(retry_after.map(|v| v.to_str().unwrap()), Some("1"));
                let body: serde_json::Value =
                    serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], "shutting_down");
            }
            other => panic!("expected 503, got {:?}", other.map(|_| ())),
        }
    })
    .await;
}

/// `Hub::shutdown` does the same without a runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_shutdown_closes_connections_with_1001() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let mut client = t.connect("user-u1").await;
        client.subscribe("tickets").await;
        t.hub.shutdown();
        assert_eq!(client.closed_with(10).await, close_code::GOING_AWAY);
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("every connection closed");
    })
    .await;
}

/// An authorizer that never answers; `asked` is set when it is asked.
struct Stalled {
    asked: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl cqrs_realtime::Authorizer<crate::support::User> for Stalled {
    async fn authorize_subscribe(
        &self,
        _user: &crate::support::User,
        _topic: &cqrs_realtime::Topic,
    ) -> Result<(), cqrs_realtime::Refusal> {
        self.asked.store(true, std::sync::atomic::Ordering::SeqCst);
        std::future::pending().await
    }

    fn may_see(
        &self,
        _user: &crate::support::User,
        _topic: &cqrs_realtime::Topic,
        _event: &cqrs_realtime::PushedEvent,
    ) -> bool {
        true
    }
}

/// A subscribe still waiting on the authorizer does not hold the connection open past a
/// shutdown: the connection ends at once, and `closed()` completes (it waited out the
/// operation timeout, 10 s by default, and then subscribed upstream for a closed connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_in_progress_does_not_delay_the_shutdown() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let options = HubOptions::new().operation_timeout(Duration::from_secs(60));
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalled = Stalled {
            asked: asked.clone(),
        };
        let t = TestHub::start_on(pubsub.clone(), options, |b| b.authorizer(stalled)).await;
        let mut client = t.connect("user-u1").await;
        client
            .send(serde_json::json!({"type": "subscribe", "topic": "tickets"}))
            .await;
        cqrs_core::testing::eventually(Duration::from_secs(10), "the authorizer asked", || async {
            asked
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        })
        .await;
        t.hub.shutdown();
        assert_eq!(client.closed_with(10).await, close_code::GOING_AWAY);
        tokio::time::timeout(Duration::from_secs(5), t.hub.closed())
            .await
            .expect("the connection ended without waiting for its subscribe");
        assert_eq!(
            pubsub.upstream_subscribes(),
            REVOCATION_LISTENER,
            "no topic's channel was ever subscribed upstream"
        );
    })
    .await;
}

/// A hub stopped by itself (`Hub::shutdown`) before the server's shutdown signal comes leaves
/// no task behind: the one that waits for the signal ends with the hub (it waited for the
/// signal, which a hub replaced at run time may never see). Counted with the runtime's alive
/// tasks, back to what they were before the hub's first connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stopped_before_the_signal_leaves_no_task_behind() {
    with_timeout(TEST_LIMIT, async {
        let (_trigger, signal) = Shutdown::new();
        // Pings often, so the keepalive task notices the stop soon after it.
        let options = HubOptions::new()
            .ping_interval(Duration::from_millis(20))
            .idle_timeout(Duration::from_secs(10));
        let t = TestHub::start_on(Arc::new(InMemoryPubSub::new()), options, |b| {
            b.shutdown_on(signal)
        })
        .await;
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = tasks();
        let mut client = t.connect("user-u1").await;
        client.ping_pong().await;
        assert!(
            tasks() > before,
            "the hub runs tasks of its own once started"
        );
        t.hub.shutdown();
        assert_eq!(client.closed_with(10).await, close_code::GOING_AWAY);
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("every connection closed");
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "the hub's tasks end with it",
            || async { (tasks() <= before).then_some(()) },
        )
        .await;
    })
    .await;
}

/// A hub watching the server's shutdown signal, dropped without a shutdown (replaced at run
/// time, a test's): its tasks end with it. The watch on the signal used to wait for a signal
/// that outlives the hub, one task per hub so dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_dropped_without_a_shutdown_leaves_no_task_behind() {
    with_timeout(TEST_LIMIT, async {
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        // The server's signal, never triggered while the hub lives.
        let (_trigger, signal) = Shutdown::new();
        let t = TestHub::start_on(Arc::new(InMemoryPubSub::new()), HubOptions::new(), |b| {
            b.shutdown_on(signal)
        })
        .await;
        let mut client = t.connect("user-u1").await;
        client.ping_pong().await;
        drop(client);
        drop(t);
        cqrs_core::testing::eventually(
            Duration::from_secs(10),
            "every task of the dropped hub ended",
            || {
                let alive = metrics.num_alive_tasks();
                async move { (alive <= before).then_some(()) }
            },
        )
        .await;
    })
    .await;
}
