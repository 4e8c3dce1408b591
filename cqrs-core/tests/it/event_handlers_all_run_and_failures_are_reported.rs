use crate::fixtures::*;
use cqrs_core::middleware::TracingLayer;
use cqrs_core::{DispatchError, EventBus, Metadata};

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
