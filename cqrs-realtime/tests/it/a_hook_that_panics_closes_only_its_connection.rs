use crate::support::{TEST_LIMIT, TestHub, TicketRouting, TicketRules, User};
use async_trait::async_trait;
use cqrs_core::EventRecord;
use cqrs_core::memory::InMemoryPubSub;
use cqrs_core::testing::{eventually, with_timeout};
use cqrs_realtime::{
    Authorizer, EventRouting, HubOptions, PushedEvent, Refusal, Routed, Topic, close_code,
};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The test routing, except that it panics on topic family `boom`: a bug in user code that a
/// client's choice of topic reaches.
struct PanicsOnBoom;

impl EventRouting for PanicsOnBoom {
    fn channel(&self, topic: &Topic) -> Option<String> {
        assert_ne!(topic.family(), "boom", "routing bug");
        TicketRouting.channel(topic)
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
        TicketRouting.route(record)
    }
}

/// The test rules, except that subscribing to `ticket:kaboom` panics.
struct PanicsOnKaboom(TicketRules);

#[async_trait]
impl Authorizer<User> for PanicsOnKaboom {
    async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
        assert_ne!(topic.key(), Some("kaboom"), "authorizer bug");
        self.0.authorize_subscribe(user, topic).await
    }

    fn may_see(&self, user: &User, topic: &Topic, event: &PushedEvent) -> bool {
        self.0.may_see(user, topic, event)
    }
}

/// A panic while handling a client's frame closes that connection with 1011 and releases
/// everything it held (its subscriptions, the upstream channel, its place in the connection
/// limits); the hub and its other clients carry on.
async fn a_panic_on(topic: &str) {
    let options = HubOptions::new().upstream_linger(Duration::ZERO);
    let t = TestHub::start_on(Arc::new(InMemoryPubSub::new()), options, |b| {
        b.routing(PanicsOnBoom)
            .authorizer(PanicsOnKaboom(TicketRules::default()))
    })
    .await;
    let mut client = t.connect("agent-a1").await;
    client.subscribe("tickets").await;
    assert_eq!(t.hub.stats().subscriptions, 1);
    client
        .send(json!({"type": "subscribe", "topic": topic}))
        .await;
    assert_eq!(client.closed_with(4).await, close_code::INTERNAL_ERROR);
    eventually(
        Duration::from_secs(10),
        "the panicked connection released what it held",
        || async {
            let stats = t.hub.stats();
            (stats.subscriptions == 0
                && stats.connections == 0
                && t.hub.upstream_channels().await == 0)
                .then_some(())
        },
    )
    .await;

    let mut other = t.connect("agent-a2").await;
    other.subscribe("tickets").await;
    t.publish("t1", "u1", 1).await;
    assert_eq!(other.event().await.seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_that_panics_on_a_topic() {
    with_timeout(TEST_LIMIT, a_panic_on("boom")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorizer_that_panics_on_a_subscribe() {
    with_timeout(TEST_LIMIT, a_panic_on("ticket:kaboom")).await;
}

/// A recorder whose `realtime_messages_sent_total` counter panics: a bug in the metrics set-up
/// that a connection's writer reaches after its first write.
struct PanicsOnSent;

struct Panics;

impl metrics::CounterFn for Panics {
    fn increment(&self, _: u64) {
        panic!("recorder bug");
    }
    fn absolute(&self, _: u64) {
        panic!("recorder bug");
    }
}

impl metrics::Recorder for PanicsOnSent {
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
        if key.name() == cqrs_realtime::metrics::names::MESSAGES_SENT {
            metrics::Counter::from_arc(Arc::new(Panics))
        } else {
            metrics::Counter::noop()
        }
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A connection whose writer panics is closed and releases what it held, instead of staying
/// open with nobody draining its queue (a client that pings kept it alive for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_panics_closes_its_connection() {
    with_timeout(TEST_LIMIT, async {
        static RECORDER: PanicsOnSent = PanicsOnSent;
        // The hub takes its metric handles when it is built, from this thread's recorder.
        let guard = metrics::set_default_local_recorder(&RECORDER);
        // A close timeout well past the wait below: closed within that wait is closed at once.
        let t = TestHub::start(HubOptions::new().close_timeout(Duration::from_secs(30))).await;
        drop(guard);
        let mut client = t.connect("agent-a1").await;
        // The `subscribed` frame is written, then the writer panics counting it: the client
        // gets a close frame at once, not a dropped connection after the close timeout.
        client.subscribe("tickets").await;
        let closed = tokio::time::timeout(Duration::from_secs(10), client.closed_with(4)).await;
        assert_eq!(closed.ok(), Some(close_code::INTERNAL_ERROR));
        eventually(
            Duration::from_secs(10),
            "the connection whose writer panicked is closed and released",
            || async {
                let stats = t.hub.stats();
                (stats.connections == 0 && stats.subscriptions == 0).then_some(())
            },
        )
        .await;
    })
    .await;
}

/// The test rules, except that `may_see` panics on the events reporter `boom` reported,
/// counting its panics.
struct HidesBoom(TicketRules, Arc<std::sync::atomic::AtomicUsize>);

#[async_trait]
impl Authorizer<User> for HidesBoom {
    async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
        self.0.authorize_subscribe(user, topic).await
    }

    fn may_see(&self, user: &User, topic: &Topic, event: &PushedEvent) -> bool {
        if event.routing_str("reporter_id") == Some("boom") {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            panic!("authorizer bug");
        }
        self.0.may_see(user, topic, event)
    }
}

/// The error lines logged on this thread while the guard lives.
#[derive(Clone, Default)]
struct Errors(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Errors {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An event the authorizer's `may_see` panics on (for every principal) is hidden from every
/// subscriber of the topic, asked 32 times at most (each panic runs the process's panic hook
/// too) and said in one error line naming how many, not one per subscriber (thousands of
/// lines, written under the registry's lock); the next event reaches them all.
#[test]
fn an_authorizer_that_panics_on_an_event_is_logged_once_for_its_subscribers() {
    let errors = Errors::default();
    let writer = errors.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::ERROR)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Else a line another test reached first on its own thread could be lost here.
    cqrs_core::testing::scoped_subscribers_see_every_callsite();
    let _guard = tracing::subscriber::set_default(subscriber);
    let panics = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // One thread: the hub's tasks log where the guard is.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(with_timeout(TEST_LIMIT, async {
            let options = HubOptions::new();
            let t = TestHub::start_on(Arc::new(InMemoryPubSub::new()), options, |b| {
                b.authorizer(HidesBoom(TicketRules::default(), panics.clone()))
            })
            .await;
            let mut clients = Vec::new();
            for i in 0..36 {
                let mut client = t.connect(&format!("agent-a{i}")).await;
                client.subscribe("tickets").await;
                clients.push(client);
            }
            t.publish("t1", "boom", 1).await;
            t.publish("t1", "u1", 2).await;
            for client in &mut clients {
                assert_eq!(client.event().await.seq, 2, "the hidden event skipped");
            }
        }));
    let text = String::from_utf8_lossy(&errors.0.lock().unwrap()).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("the realtime authorizer panicked"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("subscribers=36"), "{text}");
    assert!(lines[0].contains("panicked=32"), "{text}");
    assert_eq!(
        panics.load(std::sync::atomic::Ordering::SeqCst),
        32,
        "asked until the 32nd panic"
    );
}

/// A `may_see` that panics for one principal only (a bug that one user's data reaches) hides
/// the event from that principal's subscriptions alone, on however many connections it has:
/// every other subscriber of the topic gets it, wherever the failing ones fall in the
/// fan-out's order. Before, every subscriber after the first in that (random) order had it
/// hidden, untold.
#[tokio::test]
async fn an_authorizer_that_panics_for_one_principal_hides_the_event_from_it_alone() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start_on(Arc::new(InMemoryPubSub::new()), HubOptions::new(), |b| {
            b.authorizer(PanicsForBad(TicketRules::default()))
        })
        .await;
        // As many connections as a principal holds by default: never enough to hide the
        // event from the others, whatever order the fan-out meets them in.
        let mut bad = Vec::new();
        for _ in 0..16 {
            let mut client = t.connect("agent-bad").await;
            client.subscribe("tickets").await;
            bad.push(client);
        }
        let mut clients = Vec::new();
        for i in 0..16 {
            let mut client = t.connect(&format!("agent-a{i}")).await;
            client.subscribe("tickets").await;
            clients.push(client);
        }
        t.publish("t1", "u1", 1).await;
        for (i, client) in clients.iter_mut().enumerate() {
            assert_eq!(
                client.event().await.seq,
                1,
                "agent-a{i} did not get the event"
            );
        }
        // Still connected; the event was hidden from them.
        for client in &mut bad {
            client.ping_pong().await;
        }
    })
    .await;
}

/// The test rules, except that `may_see` panics for the user `bad`.
struct PanicsForBad(TicketRules);

#[async_trait]
impl Authorizer<User> for PanicsForBad {
    async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
        self.0.authorize_subscribe(user, topic).await
    }

    fn may_see(&self, user: &User, topic: &Topic, event: &PushedEvent) -> bool {
        assert_ne!(user.id, "bad", "authorizer bug");
        self.0.may_see(user, topic, event)
    }
}
