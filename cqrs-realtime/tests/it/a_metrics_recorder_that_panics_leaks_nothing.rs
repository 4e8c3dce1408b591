use crate::support::{Client, TEST_LIMIT, TestHub};
use async_trait::async_trait;
use cqrs_core::memory::InMemoryPubSub;
use cqrs_core::ports::{Fanout, PubSub, Subscription, TransportError};
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::metrics::names;
use cqrs_realtime::{HubOptions, ServerFrame, close_code};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// What the recorder's handle panics on.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Op {
    GaugeIncrement,
    GaugeDecrement,
    CounterIncrement,
}

/// A recorder whose metrics `names` panic the first time `op` is done on them (every time
/// with `always`): a bug in the metrics set-up, reached from wherever the hub counts those
/// metrics. `calls` counts the times `op` was done on them.
pub(crate) struct PanicsOnce {
    pub(crate) names: Vec<&'static str>,
    pub(crate) op: Op,
    pub(crate) armed: Arc<AtomicBool>,
    pub(crate) always: bool,
    pub(crate) calls: Arc<AtomicUsize>,
}

struct Handle {
    op: Op,
    armed: Arc<AtomicBool>,
    always: bool,
    calls: Arc<AtomicUsize>,
}

impl Handle {
    fn done(&self, op: Op) {
        if op != self.op {
            return;
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.always || self.armed.swap(false, Ordering::SeqCst) {
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
        self.names.contains(&key.name()).then(|| {
            Arc::new(Handle {
                op: self.op,
                armed: self.armed.clone(),
                always: self.always,
                calls: self.calls.clone(),
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
/// channels released at once; and the count of times `op` was done on it, for a test to
/// check its panic was reached (the hub's state alone would look the same without it).
async fn hub_panicking_on(
    name: &'static str,
    op: Op,
    pubsub: Arc<InMemoryPubSub>,
) -> (TestHub, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let hub = hub_with_recorder(
        PanicsOnce {
            names: vec![name],
            op,
            armed: Arc::new(AtomicBool::new(true)),
            always: false,
            calls: calls.clone(),
        },
        pubsub,
        HubOptions::new(),
    )
    .await;
    (hub, calls)
}

/// Fails unless the recorder's panicking operation was done at least `least` times.
fn reached(calls: &AtomicUsize, least: usize) {
    let n = calls.load(Ordering::SeqCst);
    assert!(
        n >= least,
        "the recorder's panicking operation was done {n} times, not the {least} this test is about"
    );
}

/// A hub built with `recorder`, on `pubsub`, with `options`, channels released at once, a
/// small send queue and a short close timeout.
async fn hub_with_recorder(
    recorder: PanicsOnce,
    pubsub: Arc<dyn PubSub>,
    options: HubOptions,
) -> TestHub {
    // The hub takes its metric handles when it is built, from this thread's recorder.
    let guard = metrics::set_default_local_recorder(&recorder);
    let t = TestHub::start_on(
        pubsub,
        options
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
        let (t, calls) =
            hub_panicking_on(names::SUBSCRIPTIONS, Op::GaugeIncrement, pubsub.clone()).await;
        let mut client = t.connect("agent-a1").await;
        client
            .send(serde_json::json!({"type": "subscribe", "topic": "tickets"}))
            .await;
        assert_eq!(client.closed_with(4).await, close_code::INTERNAL_ERROR);
        released(&t, &pubsub).await;
        still_serves(&t).await;
        reached(&calls, 1);
    })
    .await;
}

/// The recorder panics counting the first of a closed connection's subscriptions out: the
/// clean-up still releases every subscription and upstream reference it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_cleaning_up_still_releases_every_channel() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let (t, calls) =
            hub_panicking_on(names::SUBSCRIPTIONS, Op::GaugeDecrement, pubsub.clone()).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        client.subscribe("ticket:t1").await;
        client.ws.close(None).await.unwrap();
        released(&t, &pubsub).await;
        // Both subscriptions were counted out: the first panicked, the second went on.
        reached(&calls, 2);
        // The hub's own count is exact, though the recorder panicked counting one out.
        assert_eq!(t.hub.stats().subscriptions, 0);
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

/// The recorder panics counting a closed connection out: the hub still gives its place back,
/// and `closed()` completes after a shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_counting_a_closed_connection_still_lets_the_hub_close() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let (t, calls) =
            hub_panicking_on(names::CONNECTIONS, Op::GaugeDecrement, pubsub.clone()).await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        t.hub.shutdown();
        assert_eq!(client.closed_with(4).await, close_code::GOING_AWAY);
        tokio::time::timeout(Duration::from_secs(10), t.hub.closed())
            .await
            .expect("closed() completes though the recorder panicked");
        assert_eq!(t.hub.stats().connections, 0);
        reached(&calls, 1);
    })
    .await;
}

/// The recorder panics counting a resumed subscription in: the subscription was never
/// registered, so its resume is given back to the principal's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_before_a_resume_is_registered_gives_the_resume_back() {
    with_timeout(TEST_LIMIT, async {
        let pubsub = Arc::new(InMemoryPubSub::new());
        let recorder = PanicsOnce {
            names: vec![names::SUBSCRIPTIONS],
            op: Op::GaugeIncrement,
            armed: Arc::new(AtomicBool::new(true)),
            always: false,
            calls: Arc::default(),
        };
        let t = hub_with_recorder(
            recorder,
            pubsub.clone(),
            HubOptions::new().resumes_per_minute(1),
        )
        .await;
        let mut client = t.connect("agent-a1").await;
        client
            .send(serde_json::json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        assert_eq!(client.closed_with(4).await, close_code::INTERNAL_ERROR);
        released(&t, &pubsub).await;
        // Counted in before the recorder panicked, and out again with the connection.
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(5),
            "the hub counts no subscription",
            || async { (t.hub.stats().subscriptions == 0).then_some(()) },
        )
        .await;
        // The principal's one resume a minute is still there.
        let mut again = t.connect("agent-a1").await;
        again
            .send(serde_json::json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
            .await;
        again.expect_subscribed("tickets").await;
        again.ping_pong().await;
    })
    .await;
}

/// A process-local pub/sub on the core's `Fanout`, whose losses the test makes with
/// `Fanout::lost`, as an adapter does when its connection dropped messages.
struct Lossy {
    fanout: Fanout,
}

#[async_trait]
impl PubSub for Lossy {
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
        self.fanout.deliver(channel, payload);
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
        self.fanout.subscribe(channel, async { Ok(()) }).await
    }
}

/// The recorder panics on every count of a loss (`upstream_missed`, `missed_notices`), and
/// the channel loses messages: its subscribers are told once, every later event still reaches
/// them, and the channel's task does not spin on the panic (the recorder is called for the one
/// loss only, not over and over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_that_always_panics_counting_a_loss_does_not_stop_the_channel() {
    with_timeout(TEST_LIMIT, async {
        let (fanout, _idle) = Fanout::new(64);
        let calls = Arc::new(AtomicUsize::new(0));
        let recorder = PanicsOnce {
            names: vec![names::UPSTREAM_MISSED, names::MISSED_NOTICES],
            op: Op::CounterIncrement,
            armed: Arc::new(AtomicBool::new(true)),
            always: true,
            calls: calls.clone(),
        };
        let t = hub_with_recorder(
            recorder,
            Arc::new(Lossy {
                fanout: fanout.clone(),
            }),
            HubOptions::new(),
        )
        .await;
        let mut client = t.connect("agent-a1").await;
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        assert_eq!(client.event().await.seq, 1);

        // A lag, seen when the next message arrives: told before it.
        fanout.lost(1);
        t.publish("t1", "u1", 2).await;
        assert!(event_or_missed(&mut client, 2).await, "told of the loss");
        assert!(!event_or_missed(&mut client, 2).await, "event 2 is pushed");
        for seq in 3..=50 {
            t.publish("t1", "u1", seq).await;
            assert!(!event_or_missed(&mut client, seq).await, "told once");
        }
        // The loss was counted (and panicked) a bounded number of times: the task did not go
        // round handling it again while the events above went through.
        let counted = calls.load(Ordering::SeqCst);
        assert!(
            (1..=4).contains(&counted),
            "the recorder was called {counted} times for one loss"
        );
        assert_eq!(t.hub.stats().upstream_missed, 1);
        assert_eq!(t.hub.stats().missed_notices, 1);
    })
    .await;
}

/// A recorder that panics on every slow-client close, reached from the fan-out when queues
/// overflow: two slow clients are closed one after the other, and the channel goes on
/// dispatching to the fast one, every event, with no notice of a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_panicking_on_slow_client_closes_does_not_stop_the_fan_out() {
    with_timeout(TEST_LIMIT, async {
        let calls = Arc::new(AtomicUsize::new(0));
        let t = hub_with_recorder(
            PanicsOnce {
                names: vec![names::SLOW_CLIENT_CLOSES],
                op: Op::CounterIncrement,
                armed: Arc::new(AtomicBool::new(true)),
                always: true,
                calls: calls.clone(),
            },
            Arc::new(InMemoryPubSub::new()),
            HubOptions::new(),
        )
        .await;
        let mut slow_a = t.connect_small_buffer("agent-slow-a").await;
        slow_a.subscribe("tickets").await;
        let mut slow_b = t.connect_small_buffer("agent-slow-b").await;
        slow_b.subscribe("tickets").await;
        let mut fast = t.connect("agent-fast").await;
        fast.subscribe("tickets").await;

        let mut seq = 0;
        while t.hub.stats().slow_client_closes < 2 {
            seq += 1;
            assert!(seq < 20_000, "the slow clients were never closed");
            t.publish_padded("t1", "u1", seq, 4096).await;
            assert_eq!(fast.event().await.seq, seq);
        }
        for _ in 0..20 {
            seq += 1;
            t.publish_padded("t1", "u1", seq, 4096).await;
            assert_eq!(fast.event().await.seq, seq);
        }
        fast.ping_pong().await;
        // Each close was counted, and each count panicked.
        reached(&calls, 2);
    })
    .await;
}
