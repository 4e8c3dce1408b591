//! Event handlers a plugin registers with `registrar.events()` are handed every committed
//! event, in store order, in memory, on Postgres + Redis and on Postgres alone; a handler that
//! fails gets the event again (and the events before it are not handed on again); with two
//! instances on one schema, each event is handed to the handlers once; each plugin's handlers
//! have a relay of their own, so one plugin's waiting handler holds up no other's. Before,
//! nothing fed the helpdesk's event bus: such handlers never ran (the start only warned).

use crate::events_a_plugin_records_reach_the_store_on_either_backend::{
    RememberHandler, Remembered, remember,
};
use crate::support::*;
use cqrs_core::{EventContext, EventHandler, HandlerError, async_trait};
use helpdesk::Hooks;
use helpdesk_api::BusHandle;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Records what it handled, in order, and every call; fails once on what it is told to, and
/// on everything while `down`.
#[derive(Clone, Default)]
struct Seen {
    handled: Arc<Mutex<Vec<String>>>,
    calls: Arc<Mutex<Vec<String>>>,
    fail_once: Arc<Mutex<HashSet<String>>>,
    down: Arc<AtomicBool>,
}

impl Seen {
    fn handled(&self) -> Vec<String> {
        self.handled.lock().unwrap().clone()
    }

    fn calls_of(&self, what: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|w| *w == what)
            .count()
    }

    /// Waits until `what` was handled.
    async fn wait_for(&self, what: &str) {
        cqrs_core::testing::eventually(Duration::from_secs(15), what, || async {
            self.handled().iter().any(|w| w == what).then_some(())
        })
        .await;
    }
}

#[async_trait]
impl EventHandler<Remembered> for Seen {
    async fn handle(&self, event: &Remembered, _: EventContext<'_>) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push(event.what.clone());
        if self.fail_once.lock().unwrap().remove(&event.what) {
            return Err(HandlerError::internal(format!(
                "refuses {} once",
                event.what
            )));
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(HandlerError::unavailable(
                "its mail server is away",
                "connection refused",
            ));
        }
        self.handled.lock().unwrap().push(event.what.clone());
        Ok(())
    }

    fn name(&self) -> &str {
        "test.seen"
    }
}

/// Hooks that register the command recording `Remembered` and `seen` as its handler, and keep
/// the server's buses.
fn hooks(seen: &Seen, buses: &Arc<OnceLock<BusHandle>>) -> Hooks {
    let (seen, buses) = (seen.clone(), buses.clone());
    Hooks {
        provide: vec![Arc::new(move |registrar| {
            registrar.commands().add(RememberHandler);
            registrar.events().add::<Remembered, _>(seen.clone());
            let _ = buses.set(registrar.resource::<BusHandle>().unwrap());
        })],
        ..Hooks::default()
    }
}

/// Runs on the backend the environment asks for, and on Postgres alone.
async fn handed_in_order_and_again_after_a_failure(backend: Backend, redis: bool) {
    let seen = Seen::default();
    let buses = Arc::default();
    let s = TestServer::start_with_hooks(backend.clone(), hooks(&seen, &buses), |c| {
        if !redis {
            c.redis_url = None;
        }
    })
    .await;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let whats: Vec<String> = (0..3).map(|i| format!("{tag}-{i}")).collect();
    seen.fail_once.lock().unwrap().insert(whats[1].clone());
    for what in &whats {
        remember(&buses, what).await;
    }
    seen.wait_for(&whats[2]).await;
    assert_eq!(seen.handled(), whats, "{backend:?}");
    assert_eq!(seen.calls_of(&whats[0]), 1, "not handed on again");
    assert_eq!(
        seen.calls_of(&whats[1]),
        2,
        "handed again after its failure"
    );
    let metrics = s.metrics().await;
    for series in [
        r#"cqrs_events_published_total{relay="event-bus",event_type="test.remembered"}"#,
        r#"cqrs_dispatch_total{kind="event",message="test.remembered",outcome="ok"}"#,
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
    s.stop().await;
    backend.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_handlers_get_every_committed_event_in_order() {
    within(async {
        handed_in_order_and_again_after_a_failure(Backend::from_env().await, true).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_handlers_get_every_committed_event_on_postgres_alone() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        handed_in_order_and_again_after_a_failure(backend, false).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_hand_each_event_to_the_handlers_once() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let seen = Seen::default();
        let (buses_a, buses_b) = (Arc::default(), Arc::default());
        let a =
            TestServer::start_with_hooks(backend.shared(), hooks(&seen, &buses_a), |_| {}).await;
        let b = TestServer::start_with_hooks(backend.clone(), hooks(&seen, &buses_b), |_| {}).await;
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let whats: Vec<String> = (0..20).map(|i| format!("{tag}-{i}")).collect();
        for (i, what) in whats.iter().enumerate() {
            let buses = if i % 2 == 0 { &buses_a } else { &buses_b };
            remember(buses, what).await;
        }
        // Handed on in store order: once the last is in, a repeat of any before it would be too.
        seen.wait_for(&whats[19]).await;
        assert_eq!(seen.handled(), whats);
        for what in &whats {
            assert_eq!(seen.calls_of(what), 1, "{what}");
        }
        a.stop().await;
        b.stop().await;
        backend.clean_up().await;
    })
    .await;
}

/// The `event-handlers` check in `/ready`, once it has `status`.
async fn handlers_status(s: &TestServer, status: &str) -> serde_json::Value {
    cqrs_core::testing::eventually(Duration::from_secs(15), status, || async {
        let ready = s.send(reqwest::Method::GET, "/ready", None, None).await;
        let check = &ready.body["components"]["event-handlers"];
        (check["status"] == status).then(|| check.clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_shows_in_ready_and_its_event_is_handed_on_once_it_recovers() {
    within(async {
        let backend = Backend::from_env().await;
        let seen = Seen::default();
        let buses = Arc::default();
        let s = TestServer::start_with_hooks(backend.clone(), hooks(&seen, &buses), |c| {
            c.ready_details = true;
        })
        .await;
        assert_eq!(handlers_status(&s, "healthy").await["critical"], false);
        seen.down.store(true, Ordering::SeqCst);
        let what = uuid::Uuid::now_v7().simple().to_string();
        remember(&buses, &what).await;
        // While the batch hands it on again, before the relay itself hears of a failure.
        let check = handlers_status(&s, "degraded").await;
        let reason = check["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("test.remembered")
                && reason.contains("test.seen")
                && reason.contains("its mail server is away"),
            "{check}"
        );
        cqrs_core::testing::eventually(Duration::from_secs(15), "a second attempt", || async {
            (seen.calls_of(&what) >= 2).then_some(())
        })
        .await;
        seen.down.store(false, Ordering::SeqCst);
        seen.wait_for(&what).await;
        handlers_status(&s, "healthy").await;
        s.stop().await;
        backend.clean_up().await;
    })
    .await;
}

/// Before, a failed batch let the relay go, and another instance took it at once: the events
/// before the failing one were handed on again there, and each instance counted the
/// failures afresh. A failing event is now handed on again within the batch, the relay held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_instances_a_failing_event_is_retried_on_one_of_them() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (seen_a, seen_b) = (Seen::default(), Seen::default());
        let (buses_a, buses_b) = (Arc::default(), Arc::default());
        let a =
            TestServer::start_with_hooks(backend.shared(), hooks(&seen_a, &buses_a), |_| {}).await;
        let b =
            TestServer::start_with_hooks(backend.clone(), hooks(&seen_b, &buses_b), |_| {}).await;
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let whats: Vec<String> = (0..6).map(|i| format!("{tag}-{i}")).collect();
        // Fails once on each instance: retried where it failed, it passes there on its second
        // attempt; handed to the other instance, it would fail there too.
        for seen in [&seen_a, &seen_b] {
            seen.fail_once.lock().unwrap().insert(whats[2].clone());
        }
        for what in &whats {
            remember(&buses_a, what).await;
        }
        cqrs_core::testing::eventually(Duration::from_secs(15), "the last one", || async {
            let all = [seen_a.handled(), seen_b.handled()].concat();
            all.contains(&whats[5]).then_some(())
        })
        .await;
        let calls = |what: &str| (seen_a.calls_of(what), seen_b.calls_of(what));
        for what in whats.iter().filter(|w| **w != whats[2]) {
            let (on_a, on_b) = calls(what);
            assert_eq!(on_a + on_b, 1, "{what} handed on once");
        }
        let (on_a, on_b) = calls(&whats[2]);
        assert!(
            (on_a, on_b) == (2, 0) || (on_a, on_b) == (0, 2),
            "retried on the instance it failed on: {on_a} on a, {on_b} on b"
        );
        a.stop().await;
        b.stop().await;
        backend.clean_up().await;
    })
    .await;
}

/// `Seen`, under another handler name (`test.plugin_seen` by default): a plugin's.
#[derive(Clone)]
struct PluginSeen(Seen, &'static str);

impl Default for PluginSeen {
    fn default() -> Self {
        Self(Seen::default(), "test.plugin_seen")
    }
}

#[async_trait]
impl EventHandler<Remembered> for PluginSeen {
    async fn handle(&self, event: &Remembered, ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.0.handle(event, ctx).await
    }

    fn name(&self) -> &str {
        self.1
    }
}

/// A plugin of the test's own whose one event handler is `PluginSeen`.
#[derive(Clone)]
struct Notifier {
    name: &'static str,
    seen: PluginSeen,
}

impl Notifier {
    /// Plugin `name`, whose handler is named `handler` (unique across plugins: the server's
    /// one bus of every handler refuses a name twice).
    fn new(name: &'static str, handler: &'static str) -> Self {
        Self {
            name,
            seen: PluginSeen(Seen::default(), handler),
        }
    }
}

impl cqrs_core::Plugin for Notifier {
    fn name(&self) -> &'static str {
        self.name
    }

    fn version(&self) -> &'static str {
        "1.0.0"
    }

    fn register(
        &self,
        registrar: &mut cqrs_core::PluginRegistrar,
    ) -> Result<(), cqrs_core::BoxError> {
        registrar.events().add::<Remembered, _>(self.seen.clone());
        Ok(())
    }
}

/// Each plugin's event handlers have a relay (and a checkpoint) of their own: while a plugin's
/// handler waits for its mail server (answering `Unavailable`, which no retry budget gives up
/// on), the server's own handler gets every event at once, and the plugin's gets them all, in
/// order, once it is back. Before, one relay fed every handler, and the waiting handler held
/// up all of them.
async fn a_plugins_waiting_handler_holds_up_only_its_own(backend: Backend, redis: bool) {
    let (own, plugin) = (Seen::default(), PluginSeen::default());
    let buses = Arc::default();
    let mut hooks = hooks(&own, &buses);
    let notifier = plugin.clone();
    hooks.plugins = vec![Arc::new(move || {
        Box::new(Notifier {
            name: "notifier",
            seen: notifier.clone(),
        })
    })];
    let s = TestServer::start_with_hooks(backend.clone(), hooks, |c| {
        c.ready_details = true;
        if !redis {
            c.redis_url = None;
        }
    })
    .await;
    plugin.0.down.store(true, Ordering::SeqCst);
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let whats: Vec<String> = (0..3).map(|i| format!("{tag}-{i}")).collect();
    for what in &whats {
        remember(&buses, what).await;
    }
    own.wait_for(&whats[2]).await;
    assert_eq!(own.handled(), whats, "{backend:?}");
    assert!(plugin.0.handled().is_empty(), "{backend:?}");
    // Its relay's check says why it waits; the server's own is healthy.
    cqrs_core::testing::eventually(Duration::from_secs(15), "degraded", || async {
        let ready = s.send(reqwest::Method::GET, "/ready", None, None).await;
        let components = &ready.body["components"];
        (components["event-handlers.notifier"]["status"] == "degraded"
            && components["event-handlers"]["status"] == "healthy")
            .then_some(())
    })
    .await;

    plugin.0.down.store(false, Ordering::SeqCst);
    plugin.0.wait_for(&whats[2]).await;
    assert_eq!(plugin.0.handled(), whats, "{backend:?}");
    assert_eq!(
        own.handled(),
        whats,
        "nothing handed to the server's own twice"
    );
    let metrics = s.metrics().await;
    for relay in ["event-bus", "event-bus.notifier"] {
        let series = format!(
            r#"cqrs_events_published_total{{relay="{relay}",event_type="test.remembered"}}"#
        );
        assert!(metrics.contains(&series), "{series} in:\n{metrics}");
    }
    s.stop().await;
    backend.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_waiting_handler_holds_up_only_its_own_plugins() {
    within(async {
        a_plugins_waiting_handler_holds_up_only_its_own(Backend::from_env().await, true).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_waiting_handler_holds_up_only_its_own_plugins_on_postgres_alone() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        a_plugins_waiting_handler_holds_up_only_its_own(backend, false).await;
    })
    .await;
}

/// The checkpoint of relay `name` in the backend's schema, if it has one.
async fn relay_checkpoint(backend: &Backend, name: &str) -> Option<cqrs_core::Position> {
    let Backend::Postgres {
        database_url,
        namespace,
        ..
    } = backend
    else {
        panic!("on Postgres only");
    };
    let db = cqrs_postgres::PgOptions::new(database_url.clone())
        .schema(namespace.clone())
        .connect()
        .await
        .unwrap();
    let relay = cqrs_postgres::PgOutboxRelay::new(
        db,
        Arc::new(cqrs_core::memory::InMemoryTransport::new()),
    )
    .relay_name(name);
    relay.stored_checkpoint().await.unwrap()
}

/// Hooks that register the command recording `Remembered` and `plugins`, and no event
/// handler of the server's own.
fn plugin_hooks(buses: &Arc<OnceLock<BusHandle>>, plugins: Vec<Notifier>) -> Hooks {
    let buses = buses.clone();
    Hooks {
        provide: vec![Arc::new(move |registrar| {
            registrar.commands().add(RememberHandler);
            let _ = buses.set(registrar.resource::<BusHandle>().unwrap());
        })],
        plugins: plugins
            .into_iter()
            .map(|plugin| -> helpdesk::MakePlugin { Arc::new(move || Box::new(plugin.clone())) })
            .collect(),
        ..Hooks::default()
    }
}

/// A plugin's relay made on a database whose `event-bus` relay handed events on (one a build
/// before fed every plugin's handlers through) starts where that relay is: the plugin's
/// handlers get what it had not handed on, not the history again. With no handlers of the
/// server's own left, `event-bus` follows the store, handing on nothing, so a plugin added
/// later starts at the present too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_new_relay_starts_where_the_event_bus_relay_is() {
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let [before, stuck, after, last] =
            ["before", "stuck", "after", "last"].map(|w| format!("{tag}-{w}"));
        // A build whose one relay, `event-bus`, feeds the server's own handler, which takes
        // `before` and then waits for its backend on `stuck`, while the outbox relay goes on.
        let own = Seen::default();
        let buses = Arc::default();
        let first = TestServer::start_with_hooks(backend.shared(), hooks(&own, &buses), |c| {
            c.redis_url = None;
        })
        .await;
        remember(&buses, &before).await;
        own.wait_for(&before).await;
        own.down.store(true, Ordering::SeqCst);
        remember(&buses, &stuck).await;
        // Handed `stuck`: the batch of `before` (one event a batch) has committed.
        cqrs_core::testing::eventually(Duration::from_secs(15), "stuck handed on", || async {
            (own.calls_of(&stuck) > 0).then_some(())
        })
        .await;
        let event_bus = relay_checkpoint(&backend, "event-bus").await;
        assert!(event_bus.is_some());
        cqrs_core::testing::eventually(
            Duration::from_secs(15),
            "the outbox relay passes it",
            || async { (relay_checkpoint(&backend, "default").await > event_bus).then_some(()) },
        )
        .await;
        first.stop().await;
        assert_eq!(relay_checkpoint(&backend, "event-bus").await, event_bus);

        // A build with the plugin's handler alone, which waits for its backend at first.
        let notifier = Notifier::new("notifier", "test.notified");
        let plugin = notifier.seen.0.clone();
        plugin.down.store(true, Ordering::SeqCst);
        let buses = Arc::default();
        let second = TestServer::start_with_hooks(
            backend.shared(),
            plugin_hooks(&buses, vec![notifier]),
            |c| c.redis_url = None,
        )
        .await;
        assert_eq!(
            relay_checkpoint(&backend, "event-bus.notifier").await,
            event_bus,
            "the plugin's relay starts where event-bus was"
        );
        plugin.down.store(false, Ordering::SeqCst);
        remember(&buses, &after).await;
        plugin.wait_for(&after).await;
        assert_eq!(
            plugin.handled(),
            [stuck, after],
            "what event-bus had not handed on, and not the history again"
        );
        // With no handler of the server's own, event-bus follows the store, handing on nothing.
        cqrs_core::testing::eventually(Duration::from_secs(15), "event-bus follows", || async {
            let at = relay_checkpoint(&backend, "event-bus").await;
            (at > event_bus && at == relay_checkpoint(&backend, "event-bus.notifier").await)
                .then_some(())
        })
        .await;
        second.stop().await;

        // A plugin added later starts where event-bus is: not at the history.
        let pager = Notifier::new("pager", "test.paged");
        let paged = pager.seen.0.clone();
        let buses = Arc::default();
        let event_bus = relay_checkpoint(&backend, "event-bus").await;
        let third = TestServer::start_with_hooks(
            backend.shared(),
            plugin_hooks(
                &buses,
                vec![Notifier::new("notifier", "test.notified"), pager],
            ),
            |c| c.redis_url = None,
        )
        .await;
        assert_eq!(
            relay_checkpoint(&backend, "event-bus.pager").await,
            event_bus
        );
        remember(&buses, &last).await;
        paged.wait_for(&last).await;
        assert_eq!(paged.handled(), [last]);
        third.stop().await;
        backend.clean_up().await;
    })
    .await;
}
