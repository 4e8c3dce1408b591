use crate::fixtures::*;
use async_trait::async_trait;
use cqrs_core::middleware::TracingLayer;
use cqrs_core::{
    DispatchError, ErrorKind, EventBus, EventContext, EventHandler, HandlerError, Metadata,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[test]
fn every_handler_runs_even_when_one_fails_and_one_panics() {
    let ok = Counter::named("ok");
    let failing = Counter {
        fail_on: Some(7),
        ..Counter::named("failing")
    };
    let panicking = Counter {
        panic_on: Some(7),
        ..Counter::named("panicking")
    };
    let bus = EventBus::builder()
        .handler(ok.clone())
        .handler(failing.clone())
        .handler(panicking.clone())
        .build()
        .unwrap();
    run(async {
        let err = bus
            .publish_event(Added { sum: 7 }, Metadata::new())
            .await
            .unwrap_err();
        // The text names every failed handler (what a sink logs, what a consumer records
        // as its retry's reason), not only the first.
        let text = err.to_string();
        assert!(
            text.starts_with("2 of 3 handlers of event `test.added` failed: ")
                && text.contains("failing: ")
                && text.contains("panicking: "),
            "{text}"
        );
        let DispatchError::Publish(publish) = err else {
            panic!("expected a publish error");
        };
        assert_eq!(publish.event, "test.added");
        assert_eq!(publish.handlers, 3);
        let mut failed: Vec<&str> = publish.failures.iter().map(|f| &*f.handler).collect();
        failed.sort();
        assert_eq!(failed, ["failing", "panicking"]);
        assert!(
            publish
                .failures
                .iter()
                .any(|f| matches!(f.error, DispatchError::Panicked { .. }))
        );

        let published = bus
            .publish_event(Added { sum: 1 }, Metadata::new())
            .await
            .unwrap();
        assert_eq!(published.handlers, 3);
    });
    assert_eq!((ok.seen(), failing.seen(), panicking.seen()), (2, 2, 2));
}

#[test]
fn an_event_without_handlers_is_published_to_none() {
    for bus in [
        EventBus::builder().build().unwrap(),
        EventBus::builder()
            .layer(TracingLayer::new())
            .build()
            .unwrap(),
    ] {
        let published = run(bus.publish_event(Added { sum: 1 }, Metadata::new())).unwrap();
        assert_eq!(published.handlers, 0);
    }
}

#[test]
fn a_layered_event_bus_reaches_every_handler() {
    let a = Counter::named("a");
    let b = Counter::named("b");
    let bus = EventBus::builder()
        .layer(TracingLayer::new())
        .handler(a.clone())
        .handler(b.clone())
        .build()
        .unwrap();
    assert_eq!(bus.handler_count::<Added>(), 2);
    let published = run(bus.publish_event(Added { sum: 3 }, Metadata::new())).unwrap();
    assert_eq!(published.handlers, 2);
    assert_eq!((a.seen(), b.seen()), (1, 1));
}

#[test]
fn two_handlers_with_one_name_fail_the_build() {
    let err = EventBus::builder()
        .handler(Counter::named("same"))
        .handler(Counter::named("same"))
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("two handlers named `same`"),
        "{err}"
    );
    // One handler registered twice must not be told to take a second name: it would then
    // handle every event twice.
    assert!(err.to_string().contains("register it once"), "{err}");
}

/// Hangs on every event until dropped; counts its starts and its drops.
#[derive(Clone, Default)]
struct Hangs {
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

/// Counts a drop of the handler's future.
struct CountDrop(Arc<AtomicUsize>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl EventHandler<Added> for Hangs {
    async fn handle(&self, _: &Added, _: EventContext<'_>) -> Result<(), HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let _counted = CountDrop(self.dropped.clone());
        std::future::pending().await
    }

    fn name(&self) -> &str {
        "hangs"
    }
}

/// Takes `wait` of the clock, then succeeds.
#[derive(Clone)]
struct Slow {
    wait: Duration,
    done: Arc<AtomicUsize>,
}

#[async_trait]
impl EventHandler<Added> for Slow {
    async fn handle(&self, _: &Added, _: EventContext<'_>) -> Result<(), HandlerError> {
        tokio::time::sleep(self.wait).await;
        self.done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn name(&self) -> &str {
        "slow"
    }
}

/// With a handler timeout, a hanging handler is cut off after its budget and named, alone, as
/// timed out, while the event's other handlers (a prompt one, one that waits within the
/// budget) run to the end; on a bus with layers as on a bare one.
#[test]
fn a_handler_past_its_timeout_is_named_and_the_others_finish() {
    run_paused(|| async {
        let budget = Duration::from_secs(5);
        for layered in [false, true] {
            let hangs = Hangs::default();
            let prompt = Counter::named("prompt");
            let slow = Slow {
                wait: Duration::from_secs(4),
                done: Arc::default(),
            };
            let builder = EventBus::builder()
                .handler(hangs.clone())
                .handler(prompt.clone())
                .handler(slow.clone());
            let bus = if layered {
                builder
                    .layer(TracingLayer::new())
                    .handler_timeout(budget)
                    .build()
            } else {
                builder.handler_timeout(budget).build()
            }
            .unwrap();
            let started = tokio::time::Instant::now();
            let err = bus
                .publish_event(Added { sum: 1 }, Metadata::new())
                .await
                .unwrap_err();
            assert_eq!(started.elapsed(), budget, "layered: {layered}");
            let DispatchError::Publish(publish) = &err else {
                panic!("expected a publish error, got {err}");
            };
            assert_eq!(publish.handlers, 3);
            assert_eq!(publish.failures.len(), 1, "{err}");
            assert_eq!(&*publish.failures[0].handler, "hangs");
            assert!(
                matches!(
                    publish.failures[0].error,
                    DispatchError::Timeout { after, .. } if after == budget
                ),
                "{err}"
            );
            assert_eq!(err.kind(), ErrorKind::Timeout);
            assert!(err.to_string().contains("hangs: "), "{err}");
            assert_eq!(prompt.seen(), 1);
            assert_eq!(slow.done.load(Ordering::SeqCst), 1);
            assert_eq!(
                (
                    hangs.started.load(Ordering::SeqCst),
                    hangs.dropped.load(Ordering::SeqCst)
                ),
                (1, 1),
                "the hanging handler's future was dropped"
            );
        }
    });
}

/// Without a handler timeout a publish waits for its handlers however long they take.
#[test]
fn without_a_handler_timeout_a_slow_handler_is_waited_for() {
    run_paused(|| async {
        let slow = Slow {
            wait: Duration::from_secs(3600),
            done: Arc::default(),
        };
        let bus = EventBus::builder().handler(slow.clone()).build().unwrap();
        let published = bus
            .publish_event(Added { sum: 1 }, Metadata::new())
            .await
            .unwrap();
        assert_eq!(published.handlers, 1);
        assert_eq!(slow.done.load(Ordering::SeqCst), 1);
    });
}

/// Without tokio's time driver a handler's budget cannot start: the handler that waits fails
/// as panicked, named alone, and the others run to the end; the publish itself does not
/// panic, on a bare bus or a layered one.
#[test]
fn without_a_time_driver_only_the_handler_that_waits_fails() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for layered in [false, true] {
        let hangs = Hangs::default();
        let prompt = Counter::named("prompt");
        let builder = EventBus::builder()
            .handler(hangs.clone())
            .handler(prompt.clone())
            .handler_timeout(Duration::from_secs(5));
        let bus = if layered {
            builder.layer(TracingLayer::new()).build()
        } else {
            builder.build()
        }
        .unwrap();
        let err = runtime
            .block_on(bus.publish_event(Added { sum: 1 }, Metadata::new()))
            .unwrap_err();
        let DispatchError::Publish(publish) = &err else {
            panic!("expected a publish error, got {err}");
        };
        assert_eq!(publish.failures.len(), 1, "{err}");
        assert_eq!(&*publish.failures[0].handler, "hangs");
        assert!(
            matches!(publish.failures[0].error, DispatchError::Panicked { .. }),
            "{err}"
        );
        assert_eq!(prompt.seen(), 1, "layered: {layered}");
    }
}

/// Never finishes, and panics when its future is dropped unfinished (a guard checking its
/// work finished).
struct HangsThenPanicsOnDrop;

struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("dropped before its work finished");
    }
}

#[async_trait]
impl EventHandler<Added> for HangsThenPanicsOnDrop {
    async fn handle(&self, _: &Added, _: EventContext<'_>) -> Result<(), HandlerError> {
        let _guard = PanicsOnDrop;
        std::future::pending().await
    }

    fn name(&self) -> &str {
        "hangs_then_panics"
    }
}

/// A handler cut off at the bus's `handler_timeout` whose future panics as it is dropped still
/// fails with a `Timeout` (retryable), not as a panic (`Internal`), with layers and without.
#[test]
fn a_handler_that_panics_when_cut_off_still_times_out() {
    run_paused(|| async {
        let budget = Duration::from_secs(5);
        for layered in [false, true] {
            let builder = EventBus::builder().handler(HangsThenPanicsOnDrop);
            let bus = if layered {
                builder
                    .layer(TracingLayer::new())
                    .handler_timeout(budget)
                    .build()
            } else {
                builder.handler_timeout(budget).build()
            }
            .unwrap();
            let err = bus
                .publish_event(Added { sum: 1 }, Metadata::new())
                .await
                .unwrap_err();
            let DispatchError::Publish(publish) = &err else {
                panic!("expected a publish error, got {err}");
            };
            assert!(
                matches!(
                    publish.failures[0].error,
                    DispatchError::Timeout { after, .. } if after == budget
                ),
                "layered: {layered}: {err}"
            );
            assert_eq!(err.kind(), ErrorKind::Timeout, "layered: {layered}");
        }
    });
}
