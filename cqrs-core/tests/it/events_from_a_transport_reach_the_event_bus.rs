use crate::fixtures::*;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{ConsumerOptions, EventTransport};
use cqrs_core::projection::EventBusConsumer;
use cqrs_core::runtime::Runtime;
use cqrs_core::testing::eventually;
use cqrs_core::{
    EventBus, EventContext, EventEnvelope, EventHandler, EventHandlers, EventRecord, EventTypes,
    HandlerError, Metadata,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// A redelivered event goes only to the handler that failed on it: the other took it the first
/// time and is not asked again.
#[test]
fn a_failing_handler_gets_the_event_again_and_the_others_keep_theirs() {
    run(async {
        let counter = Counter::named("counter");
        let flaky = Counter {
            fail_on: Some(2),
            ..Counter::named("flaky")
        };
        let bus = EventBus::builder()
            .handler(counter.clone())
            .handler(flaky.clone())
            .build()
            .unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        transport
            .publish("adds", &[added(1), added(2)])
            .await
            .unwrap();
        let runtime = consume_adds(bus, &transport, Duration::from_millis(20));
        // Event 2 fails every time in `flaky`: it is delivered up to 3 times, then dead-lettered.
        eventually(
            Duration::from_secs(5),
            "event 2 is dead-lettered",
            || async { (!transport.dead_letters("adds", "bus").is_empty()).then_some(()) },
        )
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(flaky.seen(), 1 + 3);
        assert_eq!(
            counter.seen(),
            2,
            "the other handler saw each event once, not event 2's redeliveries"
        );
        let dead = transport.dead_letters("adds", "bus");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0.payload["sum"], 2);
        assert_eq!(dead[0].1, 3);
    });
}

/// Fails with `Unavailable` while `down` is set: a handler whose backend is away.
#[derive(Clone, Default)]
struct Away {
    down: Arc<AtomicBool>,
    seen: Arc<AtomicUsize>,
}

#[cqrs_core::async_trait]
impl EventHandler<Added> for Away {
    async fn handle(&self, _event: &Added, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.seen.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(HandlerError::unavailable(
                "backend_away",
                "the handler's backend is away",
            ));
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "away"
    }
}

/// A handler whose backend is away gets the event again and again without using up its
/// deliveries: once the backend is back, the event is handled, not dead-lettered.
#[test]
fn an_unavailable_handler_waits_without_using_up_deliveries() {
    run(async {
        let away = Away::default();
        away.down.store(true, Ordering::SeqCst);
        let bus = EventBus::builder().handler(away.clone()).build().unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        transport.publish("adds", &[added(1)]).await.unwrap();
        let runtime = consume_adds(bus, &transport, Duration::from_millis(10));
        eventually(
            Duration::from_secs(5),
            "twice max_deliveries tries",
            || async { (away.seen.load(Ordering::SeqCst) >= 6).then_some(()) },
        )
        .await;
        assert!(transport.dead_letters("adds", "bus").is_empty());
        away.down.store(false, Ordering::SeqCst);
        eventually(Duration::from_secs(5), "handled once back", || async {
            (transport.backlog("adds", "bus") == 0).then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert!(transport.dead_letters("adds", "bus").is_empty());
    });
}

/// A layer that answers a dispatch itself when `intercept` gives it a reply (an error, here),
/// and passes it on to the bus otherwise.
#[derive(Clone)]
struct Intercept {
    intercept: Arc<dyn Fn() -> Option<Answer> + Send + Sync>,
}

type Answer =
    futures_util::future::BoxFuture<'static, Result<cqrs_core::Reply, cqrs_core::BoxError>>;

#[derive(Clone)]
struct InterceptService<S> {
    inner: S,
    intercept: Arc<dyn Fn() -> Option<Answer> + Send + Sync>,
}

impl<S> tower::Layer<S> for Intercept {
    type Service = InterceptService<S>;
    fn layer(&self, inner: S) -> InterceptService<S> {
        InterceptService {
            inner,
            intercept: self.intercept.clone(),
        }
    }
}

impl<S> tower::Service<cqrs_core::Dispatch> for InterceptService<S>
where
    S: tower::Service<cqrs_core::Dispatch, Response = cqrs_core::Reply>,
    S::Error: Into<cqrs_core::BoxError>,
    S::Future: Send + 'static,
{
    type Response = cqrs_core::Reply;
    type Error = cqrs_core::BoxError;
    type Future = Answer;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dispatch: cqrs_core::Dispatch) -> Self::Future {
        if let Some(answer) = (self.intercept)() {
            return answer;
        }
        let call = self.inner.call(dispatch);
        Box::pin(async move { call.await.map_err(Into::into) })
    }
}

/// A layer that refuses every dispatch with `Unavailable` while `down` is set (counting the
/// refusals in `refused`): a rate limiter, or a layer whose backend (a transaction's
/// database) is away.
fn away_layer(down: Arc<AtomicBool>, refused: Arc<AtomicUsize>) -> Intercept {
    Intercept {
        intercept: Arc::new(move || {
            if !down.load(Ordering::SeqCst) {
                return None;
            }
            refused.fetch_add(1, Ordering::SeqCst);
            let away = HandlerError::unavailable("backend_away", "the layer's backend is away");
            Some(Box::pin(std::future::ready(Err(away.into()))))
        }),
    }
}

/// The same when a layer, not the handler, refuses because its backend is away: the refusal
/// uses up no delivery, and the event is handled once the backend is back.
#[test]
fn a_layer_refusing_as_unavailable_waits_without_using_up_deliveries() {
    run(async {
        let away = Away::default();
        let down = Arc::new(AtomicBool::new(true));
        let refused = Arc::new(AtomicUsize::new(0));
        let bus = EventBus::builder()
            .layer(away_layer(down.clone(), refused.clone()))
            .handler(away.clone())
            .build()
            .unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        transport.publish("adds", &[added(1)]).await.unwrap();
        let runtime = consume_adds(bus, &transport, Duration::from_millis(10));
        eventually(
            Duration::from_secs(5),
            "twice max_deliveries tries",
            || async { (refused.load(Ordering::SeqCst) >= 6).then_some(()) },
        )
        .await;
        assert!(transport.dead_letters("adds", "bus").is_empty());
        down.store(false, Ordering::SeqCst);
        eventually(Duration::from_secs(5), "handled once back", || async {
            (transport.backlog("adds", "bus") == 0).then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(away.seen.load(Ordering::SeqCst), 1);
        assert!(transport.dead_letters("adds", "bus").is_empty());
    });
}

/// Fails the first time it sees an event, then takes it; and on its failure has the bus's
/// layer refuse what follows, as a layer whose backend went away.
#[derive(Clone, Default)]
struct FailsOnce {
    seen: Arc<AtomicUsize>,
    then_down: Arc<AtomicBool>,
}

#[cqrs_core::async_trait]
impl EventHandler<Added> for FailsOnce {
    async fn handle(&self, _event: &Added, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        if self.seen.fetch_add(1, Ordering::SeqCst) == 0 {
            self.then_down.store(true, Ordering::SeqCst);
            return Err(HandlerError::internal("fails the first time"));
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "fails_once"
    }
}

/// A failure that names no handler (a layer's refusal) between the redeliveries does not
/// make the consumer forget which handler failed: once the layer lets it through, the event
/// goes to that handler alone, which takes it, and the event is acknowledged.
#[test]
fn a_layer_refusing_a_redelivery_keeps_it_for_the_handler_that_failed() {
    run(async {
        let counter = Counter::named("counter");
        let down = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let fails_once = FailsOnce {
            then_down: down.clone(),
            ..FailsOnce::default()
        };
        let bus = EventBus::builder()
            .layer(away_layer(down.clone(), refused.clone()))
            .handler(counter.clone())
            .handler(fails_once.clone())
            .build()
            .unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        transport.publish("adds", &[added(1)]).await.unwrap();
        let runtime = consume_adds(bus, &transport, Duration::from_millis(10));
        eventually(
            Duration::from_secs(5),
            "two redeliveries refused",
            || async { (refused.load(Ordering::SeqCst) >= 2).then_some(()) },
        )
        .await;
        down.store(false, Ordering::SeqCst);
        eventually(Duration::from_secs(5), "acknowledged", || async {
            (transport.backlog("adds", "bus") == 0).then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(fails_once.seen.load(Ordering::SeqCst), 2);
        assert_eq!(
            counter.seen(),
            1,
            "the handler that took it is not asked again"
        );
        assert!(transport.dead_letters("adds", "bus").is_empty());
    });
}

/// A layer that, the first time, fails the dispatch with what another bus's publish answered:
/// a failure naming a handler (`ghost`) that this bus does not have.
fn passes_on_another_bus(other: EventBus) -> Intercept {
    let passed = AtomicBool::new(false);
    Intercept {
        intercept: Arc::new(move || {
            if passed.swap(true, Ordering::SeqCst) {
                return None;
            }
            let other = other.clone();
            Some(Box::pin(async move {
                let added = EventEnvelope::new(Added { sum: 0 }, Metadata::new());
                let failed = other.publish(added).await.expect_err("ghost fails");
                Err(failed.into())
            }))
        }),
    }
}

/// A failure that names only handlers this bus does not have (a layer passed on another bus's)
/// does not narrow the redelivery to none of them: handed to no handler, the event would be
/// acknowledged unhandled. It goes to every handler instead.
#[test]
fn a_failure_naming_no_handler_of_the_bus_leaves_the_redelivery_to_all() {
    run(async {
        let ghost = Counter {
            fail_on: Some(0),
            ..Counter::named("ghost")
        };
        let other = EventBus::builder().handler(ghost).build().unwrap();
        let counter = Counter::named("counter");
        let bus = EventBus::builder()
            .layer(passes_on_another_bus(other))
            .handler(counter.clone())
            .build()
            .unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        transport.publish("adds", &[added(1)]).await.unwrap();
        let runtime = consume_adds(bus, &transport, Duration::from_millis(10));
        eventually(Duration::from_secs(5), "acknowledged", || async {
            (transport.backlog("adds", "bus") == 0).then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            counter.seen(),
            1,
            "the bus's own handler got the redelivery"
        );
        assert!(transport.dead_letters("adds", "bus").is_empty());
    });
}

/// Refuses `Added { sum: 1 }` permanently, `sum: 3` as invalid (not marked permanent) once,
/// and fails on `sum: 2` as an internal error, once.
#[derive(Clone, Default)]
struct RefusesOne {
    seen: Arc<std::sync::Mutex<Vec<u64>>>,
}

#[cqrs_core::async_trait]
impl EventHandler<Added> for RefusesOne {
    async fn handle(&self, event: &Added, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        let times = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(event.sum);
            seen.iter().filter(|sum| **sum == event.sum).count()
        };
        match event.sum {
            1 => Err(HandlerError::invalid("no_ones", "ones are refused").permanent()),
            2 if times == 1 => Err(HandlerError::internal("twos fail once")),
            3 if times == 1 => Err(HandlerError::invalid("threes", "threes fail once")),
            _ => Ok(()),
        }
    }

    fn name(&self) -> &str {
        "refuses_one"
    }
}

/// An event a handler refuses permanently (no redelivery mends that) is dead-lettered at once,
/// on its first delivery, with the handler's error, instead of waiting out the redelivery
/// delay `max_deliveries` times; other failures (internal, invalid not marked permanent) are
/// redelivered.
#[test]
fn an_event_a_handler_refuses_permanently_is_dead_lettered_at_once() {
    let counts = cqrs_core::testing::MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let refuses = RefusesOne::default();
            let counter = Counter::named("counter");
            let bus = EventBus::builder()
                .handler(refuses.clone())
                .handler(counter.clone())
                .build()
                .unwrap();
            let transport = Arc::new(InMemoryTransport::new());
            transport
                .publish("adds", &[added(1), added(2), added(3)])
                .await
                .unwrap();
            let runtime = consume_adds(bus, &transport, Duration::from_millis(50));
            eventually(Duration::from_secs(5), "all settled", || async {
                (transport.backlog("adds", "bus") == 0).then_some(())
            })
            .await;
            runtime.shutdown(Duration::from_secs(5)).await.unwrap();
            let dead = transport.dead_letters_with_errors("adds", "bus");
            assert_eq!(dead.len(), 1, "{dead:?}");
            assert_eq!((dead[0].0.payload["sum"].as_u64(), dead[0].1), (Some(1), 1));
            assert!(
                dead[0]
                    .2
                    .as_deref()
                    .is_some_and(|e| e.contains("ones are refused")),
                "{:?}",
                dead[0].2
            );
            let mut seen = refuses.seen.lock().unwrap().clone();
            seen.sort_unstable();
            assert_eq!(
                seen,
                [1, 2, 2, 3, 3],
                "1 once, 2 and 3 again after their failures"
            );
            assert_eq!(counter.seen(), 3, "each once");
            assert_eq!(
                counts.get("cqrs_event_bus_dead_lettered_total{event_type=test.added}"),
                1
            );
        })
    });
}

/// An `Added` event as the transport carries it.
fn added(sum: u64) -> EventRecord {
    EventRecord::from_envelope(&EventEnvelope::new(Added { sum }, Metadata::new())).unwrap()
}

/// Starts a runtime whose one worker delivers topic `adds` (group `bus`) to `bus`, with the
/// given redelivery delay and 3 deliveries before dead-lettering.
fn consume_adds(
    bus: EventBus,
    transport: &Arc<InMemoryTransport>,
    redelivery: Duration,
) -> Runtime {
    let options = ConsumerOptions::default()
        .block(Duration::from_millis(20))
        .redelivery_delay(redelivery)
        .max_deliveries(3);
    consume_adds_with(bus, transport, options)
}

/// A runtime with an event-bus consumer of `adds` (group `bus`) feeding `bus`.
pub(crate) fn consume_adds_with<T: EventTransport>(
    bus: EventBus,
    transport: &Arc<T>,
    options: ConsumerOptions,
) -> Runtime {
    // The consumer decodes what the bus handles.
    Runtime::builder()
        .worker(EventBusConsumer::new(
            bus,
            transport.clone(),
            "adds",
            "bus",
            options,
        ))
        .start()
}

/// Types given to the consumer (for their upcasters or policy) need not list what the bus
/// handles: the bus's types are added, so an `Added` is handled, not skipped and acknowledged.
#[test]
fn a_type_the_bus_handles_is_decoded_without_being_listed() {
    run(async {
        let counter = Counter::named("counter");
        let bus = EventBus::builder()
            .handler(counter.clone())
            .build()
            .unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        transport.publish("adds", &[added(1)]).await.unwrap();
        let options = ConsumerOptions::default().block(Duration::from_millis(20));
        let runtime = Runtime::builder()
            .worker(
                EventBusConsumer::new(bus, transport.clone(), "adds", "bus", options)
                    // A hand list that forgot `Added`.
                    .event_types(EventTypes::new()),
            )
            .start();
        eventually(Duration::from_secs(5), "acknowledged", || async {
            (transport.backlog("adds", "bus") == 0).then_some(())
        })
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(counter.seen(), 1, "the handler saw it");
    });
}

/// Under `UnknownEventPolicy::AwaitNewerBuild`, an event-bus consumer acknowledges an event
/// of a type another part of the build reads (no handler here takes it), and keeps one no
/// part of the build knows waiting for a newer build: handed out again and again, never
/// dead-lettered nor acknowledged.
#[test]
fn await_newer_build_holds_a_newer_builds_event_and_passes_over_the_rest() {
    #[derive(Clone, Debug, serde::Serialize, serde::Deserialize, cqrs_core::Event)]
    #[cqrs(name = "test.read_by_another_plugin")]
    struct ReadByAnotherPlugin {}

    run(async {
        let counter = Counter::named("counter");
        let bus = EventBus::builder()
            .handler(counter.clone())
            .build()
            .unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        let counted =
            crate::projections_take_effect_once_and_rebuild_from_zero::Counted::new(&transport);
        let others = EventRecord::from_envelope(&EventEnvelope::new(
            ReadByAnotherPlugin {},
            Metadata::new(),
        ))
        .unwrap();
        let mut newer = added(5);
        newer.event_type = "test.from_a_newer_build".into();
        let newer_id = newer.event_id;
        transport
            .publish("adds", &[others, newer, added(1)])
            .await
            .unwrap();
        let mut types = EventTypes::new();
        types.unknown_events(cqrs_core::UnknownEventPolicy::AwaitNewerBuild);
        let options = ConsumerOptions::default()
            .block(Duration::from_millis(20))
            .redelivery_delay(Duration::from_millis(20))
            .max_deliveries(3);
        let runtime = Runtime::builder()
            .worker(
                EventBusConsumer::new(bus, counted.clone(), "adds", "bus", options)
                    .event_types(types),
            )
            .start();
        eventually(
            Duration::from_secs(10),
            "handed out past max_deliveries",
            || async { (counted.handed_out(&[newer_id]) > 4).then_some(()) },
        )
        .await;
        eventually(
            Duration::from_secs(5),
            "the other two acknowledged",
            || async { (transport.backlog("adds", "bus") == 1).then_some(()) },
        )
        .await;
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(counter.seen(), 1, "the handler saw its own type's event");
        assert!(transport.dead_letters("adds", "bus").is_empty());
        assert_eq!(
            transport.backlog("adds", "bus"),
            1,
            "the newer build's event waits"
        );
    });
}

/// A consumer that never blocks (`block` of zero) still handles events and lets the shutdown
/// through on a single-threaded runtime.
#[test]
fn a_consumer_polling_without_blocking_still_stops() {
    run(async {
        let counter = Counter::named("counter");
        let bus = EventBus::builder()
            .handler(counter.clone())
            .build()
            .unwrap();
        let transport = Arc::new(InMemoryTransport::new());
        let options = ConsumerOptions::default().block(Duration::ZERO);
        let runtime = consume_adds_with(bus, &transport, options);
        transport.publish("adds", &[added(1)]).await.unwrap();
        eventually(Duration::from_secs(5), "handled", || async {
            (counter.seen() == 1).then_some(())
        })
        .await;
        runtime
            .shutdown(Duration::from_secs(5))
            .await
            .expect("stopped within the grace period");
    });
}

/// Handlers collected elsewhere (a plugin's `EventHandlers`) bring their types along: the
/// bus's `event_types` decodes them, and only them.
#[test]
fn the_bus_knows_the_types_of_the_handlers_it_was_given() {
    let mut collected = EventHandlers::new();
    collected.add::<Added, _>(Counter::named("counter"));
    let bus = EventBus::builder().handlers(collected).build().unwrap();
    let types = bus.event_types();
    assert!(types.decode(&added(1)).unwrap().is_some(), "Added is known");
    let bare = EventBus::builder().build().unwrap();
    assert!(
        bare.event_types().decode(&added(1)).unwrap().is_none(),
        "a bus without handlers knows no type (unknown types are skipped by default)"
    );
}

/// Holds every event until the test lets it through, saying when one arrived.
#[derive(Clone)]
struct Held {
    arrived: Arc<tokio::sync::Notify>,
    released: Arc<tokio::sync::Semaphore>,
}

impl Default for Held {
    fn default() -> Self {
        Self {
            arrived: Arc::default(),
            released: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

#[cqrs_core::async_trait]
impl EventHandler<Added> for Held {
    async fn handle(&self, _event: &Added, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.arrived.notify_one();
        self.released.acquire().await.expect("open").forget();
        Ok(())
    }

    fn name(&self) -> &str {
        "held"
    }
}

/// `cqrs_consumer_lag_seconds` of topic `adds`, group `bus`.
const CONSUMER_LAG: &str = "cqrs_consumer_lag_seconds{topic=adds,group=bus}";

/// An event-bus consumer reports how long ago the oldest event of the batch it handles
/// occurred, and 0 once a fetch finds nothing.
#[test]
fn an_event_bus_consumer_reports_how_far_behind_its_handlers_are() {
    let counts = cqrs_core::testing::MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let held = Held::default();
            let bus = EventBus::builder().handler(held.clone()).build().unwrap();
            let transport = Arc::new(InMemoryTransport::new());
            let mut old = added(1);
            old.metadata.occurred_at = chrono::Utc::now() - Duration::from_secs(45);
            transport.publish("adds", &[old]).await.unwrap();
            let runtime = consume_adds(bus, &transport, Duration::from_secs(10));
            held.arrived.notified().await;
            let lag = counts.gauge(CONSUMER_LAG).expect("set at the fetch");
            assert!((45.0..100.0).contains(&lag), "{lag}");
            held.released.add_permits(1);
            eventually(Duration::from_secs(5), "caught up", || async {
                (counts.gauge(CONSUMER_LAG) == Some(0.0)).then_some(())
            })
            .await;
            runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        })
    });
}

/// While its fetches fail, an event-bus consumer's lag is NaN, not the 0 of its last fetch
/// (which would say its handlers are up to date while they fall behind). Each failure ends the
/// worker's run and the runtime restarts it, with the consumer it had: what that consumer read
/// and could not release (its close failing too) is taken over, not reclaimed later with a
/// delivery counted that no handler got.
#[test]
fn an_event_bus_consumer_that_cannot_fetch_reports_its_lag_as_not_a_number() {
    use crate::projections_take_effect_once_and_rebuild_from_zero::Counted;
    let counts = cqrs_core::testing::MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let bus = EventBus::builder()
                .handler(Held::default())
                .build()
                .unwrap();
            let transport = Counted::new(&Arc::new(InMemoryTransport::new()));
            let options = ConsumerOptions::default().block(Duration::from_millis(20));
            let runtime = consume_adds_with(bus, &transport, options);
            eventually(
                Duration::from_secs(5),
                "a fetch that found nothing",
                || async { (counts.gauge(CONSUMER_LAG) == Some(0.0)).then_some(()) },
            )
            .await;
            transport.fetch_fails.store(true, Ordering::SeqCst);
            eventually(Duration::from_secs(5), "not a number", || async {
                counts.gauge(CONSUMER_LAG).filter(|lag| lag.is_nan())
            })
            .await;
            transport.fetch_fails.store(false, Ordering::SeqCst);
            eventually(Duration::from_secs(10), "measured again", || async {
                (counts.gauge(CONSUMER_LAG) == Some(0.0)).then_some(())
            })
            .await;
            runtime.shutdown(Duration::from_secs(5)).await.unwrap();
            assert_eq!(
                transport.consumers_made.load(Ordering::SeqCst),
                1,
                "the restarted worker kept its consumer"
            );
        })
    });
}

/// Fails the event of sum 1 with an internal error (retried, an attempt counted) while
/// `failing`; counts the events it handled.
#[derive(Clone, Default)]
struct FailsWhile {
    failing: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
    handled: Arc<AtomicUsize>,
}

#[cqrs_core::async_trait]
impl EventHandler<Added> for FailsWhile {
    async fn handle(&self, event: &Added, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        if event.sum == 1 && self.failing.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(HandlerError::internal("the handler's backend failed"));
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn name(&self) -> &str {
        "fails-while"
    }
}

/// An event whose handler failed is still to handle while it waits for its redelivery: the
/// lag holds, through empty fetches and through another event handled meanwhile (it went to
/// 0 at the next empty fetch or the next batch that succeeded, so a failing consumer looked up
/// to date but for a second every redelivery delay), then goes to 0 once it is handled.
#[test]
fn a_failed_event_waiting_for_its_redelivery_keeps_the_lag() {
    use crate::projections_take_effect_once_and_rebuild_from_zero::Counted;
    let counts = cqrs_core::testing::MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let handler = FailsWhile::default();
            handler.failing.store(true, Ordering::SeqCst);
            let bus = EventBus::builder()
                .handler(handler.clone())
                .build()
                .unwrap();
            let transport = Counted::new(&Arc::new(InMemoryTransport::new()));
            let mut old = added(1);
            old.metadata.occurred_at = chrono::Utc::now() - Duration::from_secs(45);
            transport.publish("adds", &[old]).await.unwrap();
            let options = ConsumerOptions::default()
                .block(Duration::from_millis(10))
                .redelivery_delay(Duration::from_secs(2));
            let runtime = consume_adds_with(bus, &transport, options);
            eventually(Duration::from_secs(5), "the handler failed", || async {
                (handler.failed.load(Ordering::SeqCst) == 1).then_some(())
            })
            .await;
            // Several empty fetches since, before the redelivery.
            let fetched = transport.fetches.load(Ordering::SeqCst);
            eventually(Duration::from_secs(5), "five more fetches", || async {
                (transport.fetches.load(Ordering::SeqCst) >= fetched + 5).then_some(())
            })
            .await;
            assert_eq!(
                handler.failed.load(Ordering::SeqCst),
                1,
                "not redelivered yet"
            );
            let lag = counts.gauge(CONSUMER_LAG).expect("set at each fetch");
            assert!((45.0..100.0).contains(&lag), "the lag held: {lag}");
            // A new event, handled while the failed one waits: the lag still holds it.
            transport.publish("adds", &[added(2)]).await.unwrap();
            eventually(Duration::from_secs(5), "the new event handled", || async {
                (handler.handled.load(Ordering::SeqCst) == 1).then_some(())
            })
            .await;
            let fetched = transport.fetches.load(Ordering::SeqCst);
            eventually(Duration::from_secs(5), "a fetch after it", || async {
                (transport.fetches.load(Ordering::SeqCst) > fetched).then_some(())
            })
            .await;
            assert_eq!(
                handler.failed.load(Ordering::SeqCst),
                1,
                "not redelivered yet"
            );
            let lag = counts.gauge(CONSUMER_LAG).expect("set at each fetch");
            assert!(
                (45.0..100.0).contains(&lag),
                "held past a batch that succeeded: {lag}"
            );

            handler.failing.store(false, Ordering::SeqCst);
            eventually(Duration::from_secs(10), "handled, caught up", || async {
                (counts.gauge(CONSUMER_LAG) == Some(0.0)).then_some(())
            })
            .await;
            runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        })
    });
}
