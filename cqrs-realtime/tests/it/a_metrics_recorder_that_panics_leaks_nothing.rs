use crate::support::{Client, TEST_LIMIT, TestHub};
use cqrs_core::memory::InMemoryPubSub;
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::metrics::names;
use cqrs_realtime::{HubOptions, ServerFrame, close_code};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What the recorder's handle panics on, once.
#[derive(Clone, Copy, PartialEq)]
enum Op {
    GaugeIncrement,
    GaugeDecrement,
    CounterIncrement,
}

/// A recorder whose metric `name` panics the first time `op` is done on it: a bug in the
/// metrics set-up, reached from wherever the hub counts that metric.
struct PanicsOnce {
    name: &'static str,
    op: Op,
    armed: Arc<AtomicBool>,
}

struct Handle {
    op: Op,
    armed: Arc<AtomicBool>,
}

impl Handle {
    fn done(&self, op: Op) {
        if op == self.op && self.armed.swap(false, Ordering::SeqCst) {
            panic!("recorder bug");
        }
    }
}

impl metrics::CounterFn for Handle {
    fn increment(&self, _: u64) {
        self.done(Op::CounterIncrement);
    }
    fn absolute(&self, _: u64) {}
}

impl metrics::GaugeFn for Handle {
    fn increment(&self, _: f64) {
        self.done(Op::GaugeIncrement);
    }
    fn decrement(&self, _: f64) {
        self.done(Op::GaugeDecrement);
    }
    fn set(&self, _: f64) {}
}

impl PanicsOnce {
    fn handle(&self, key: &metrics::Key) -> Option<Arc<Handle>> {
        (key.name() == self.name).then(|| {
            Arc::new(Handle {
                op: self.op,
                armed: self.armed.clone(),
            })
        })
    }
}

impl metrics::Recorder for PanicsOnce {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        self.handle(key)
            .map_or_else(metrics::Counter::noop, metrics::Counter::from_arc)
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        self.handle(key)
            .map_or_else(metrics::Gauge::noop, metrics::Gauge::from_arc)
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A hub whose metric `name` panics the first time `op` is done on it, on `pubsub`, with
/// channels released at once.
async fn hub_panicking_on(name: &'static str, op: Op, pubsub: Arc<InMemoryPubSub>) -> TestHub {
    let recorder = PanicsOnce {
        name,
        op,
        armed: Arc::new(AtomicBool::new(true)),
    };
    // The hub takes its metric handles when it is built, from this thread's recorder.
    let guard = metrics::set_default_local_recorder(&recorder);
    let t = TestHub::start_on(
        pubsub,
        HubOptions::new()
            .upstream_linger(Duration::ZERO)
            .send_queue(16)
            .close_timeout(Duration::from_secs(1)),
        |b| b,
    )
    .await;
    drop(guard);
    t
}

/// Waits until the hub holds no connection and no upstream subscription.
async fn released(t: &TestHub, pubsub: &InMemoryPubSub) {
    eventually(
        Duration::from_secs(10),
        "the connection and its upstream channel are released",
        || async {
            (t.hub.stats().connections == 0
                && t.hub.upstream_channels().await == 0
                && pubsub.upstream_subscriptions_to("realtime:tickets") == 0)
                .then_some(())
        },
    )
    .await;
}

/// The hub still serves: a new client subscribes and receives.
async fn still_serves(t: &TestHub) {
    let mut client = t.connect("agent-a9").await;
    client.subscribe("tickets").await;
    t.publish("t1", "u1", 1000).await;
    assert_eq!(client.event().await.seq, 1000);
}

/// The recorder panics counting a subscription, after the hub subscribed upstream for it: the
/// connection is closed with 1011 and the upstream reference is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_counting_a_subscription_releases_its_channel() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let t = hub_panicking_on(names::SUBSCRIPTIONS, Op::GaugeIncrement, pubsub.clone()).await;
        let mut client = t.connect("agent-a1").await;
        client
            .send(serde_json::json!({"type": "subscribe", "topic": "tickets"}))
            .await;
        assert_eq!(client.closed_with(4).await, close_code::INTERNAL_ERROR);
        released(&t, &pubsub).await;
        still_serves(&t).await;
    })
    .await;
}

/// The recorder panics counting the first of a closed connection's subscriptions out: the
/// clean-up still releases every subscription and upstream reference it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_cleaning_up_still_releases_every_channel() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let t = hub_panicking_on(names::SUBSCRIPTIONS, Op::GaugeDecrement, pubsub.clone()).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        client.subscribe("ticket:t1").await;
        client.ws.close(None).await.unwrap();
        released(&t, &pubsub).await;
        still_serves(&t).await;
    })
    .await;
}

/// The next frame for `seq` (an event at or after it, skipping older ones), or an
/// `events_missed`: whether it was `events_missed`.
async fn event_or_missed(client: &mut Client, seq: u64) -> bool {
    loop {
        match client.frame().await {
            ServerFrame::Event { event, .. } => {
                let got = event["data"]["seq"].as_u64().unwrap();
                if got >= seq {
                    assert_eq!(got, seq, "an event was skipped");
                    return false;
                }
            }
            ServerFrame::Error { code, topic, .. } if code == "events_missed" => {
                assert_eq!(topic.as_deref(), Some("tickets"));
                return true;
            }
            other => panic!("expected an event or events_missed, got {other:?}"),
        }
    }
}

/// The recorder panics in a channel's dispatch task (counting a slow client it closes): the
/// channel goes on dispatching, and its subscribers are told they may have missed events,
/// instead of the channel staying subscribed with nobody dispatching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_channels_dispatch_keeps_the_channel_delivering() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let t = hub_panicking_on(
            names::SLOW_CLIENT_CLOSES,
            Op::CounterIncrement,
            pubsub.clone(),
        )
        .await;
        let mut slow = t.connect_small_buffer("agent-slow").await;
        slow.subscribe("tickets").await;
        let mut fast = t.connect("agent-fast").await;
        fast.subscribe("tickets").await;

        // In lock step with the fast client until the dispatch closes the slow one, and
        // panics counting it.
        let mut seq = 0;
        loop {
            seq += 1;
            assert!(seq < 20_000, "the slow client was never closed");
            t.publish_padded("t1", "u1", seq, 4096).await;
            if event_or_missed(&mut fast, seq).await {
                break;
            }
        }
        for _ in 0..20 {
            seq += 1;
            t.publish_padded("t1", "u1", seq, 4096).await;
            assert!(!event_or_missed(&mut fast, seq).await, "told once");
        }
        drop(slow);
        fast.ping_pong().await;
    })
    .await;
}
