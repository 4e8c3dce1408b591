//! `CheckLayer`: a closure that sees each dispatch refuses it with its own `HandlerError`
//! (kind and code kept) before the handler runs, on every bus; what it lets through runs as
//! without it.

use crate::fixtures::*;
use cqrs_core::middleware::{CheckLayer, MetricsLayer};
use cqrs_core::testing::MetricCounts;
use cqrs_core::{
    CommandBus, Dispatch, DispatchError, ErrorKind, EventBus, HandlerError, Metadata, Principal,
    QueryBus,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Lets through dispatches whose principal is an agent; counts the checks.
fn agents_only(
    checked: Arc<AtomicUsize>,
) -> impl Fn(&Dispatch) -> Result<(), HandlerError> + Clone {
    move |dispatch: &Dispatch| {
        checked.fetch_add(1, Ordering::SeqCst);
        match dispatch.metadata().principal_as::<&str>() {
            Some(&"agent") => Ok(()),
            _ => Err(
                HandlerError::forbidden(format!("`{}` is for agents", dispatch.name()))
                    .with_code("agents_only"),
            ),
        }
    }
}

fn agent() -> Metadata {
    Metadata::new().with_principal(Principal::new("agent"))
}

#[test]
fn a_refused_command_never_reaches_its_handler_and_keeps_the_checks_error() {
    let checked = Arc::new(AtomicUsize::new(0));
    let counter = Counter::named("after");
    let events = EventBus::builder()
        .handler(counter.clone())
        .build()
        .unwrap();
    let bus = CommandBus::builder()
        .layer(CheckLayer::new(agents_only(checked.clone())))
        .handler(AddHandler)
        .event_sink(Arc::new(events))
        .build()
        .unwrap();
    run(async {
        let add = || Add {
            a: 1,
            b: 2,
            record: true,
            ..Add::default()
        };
        let refused = bus.dispatch(add()).await.unwrap_err();
        match &refused {
            DispatchError::Handler(e) => {
                assert_eq!((e.kind(), e.code()), (ErrorKind::Forbidden, "agents_only"));
                assert_eq!(e.message(), "`test.add` is for agents");
            }
            other => panic!("expected the check's error, got {other:?}"),
        }
        // The handler did not run: it would have recorded two events for the sink.
        assert_eq!(counter.seen(), 0);
        assert_eq!(bus.dispatch_with(add(), agent()).await.unwrap(), 3);
        assert_eq!(counter.seen(), 2, "what passes runs as without the layer");
        assert_eq!(checked.load(Ordering::SeqCst), 2, "one check per dispatch");
    });
}

#[test]
fn queries_and_events_are_checked_too() {
    let checked = Arc::new(AtomicUsize::new(0));
    let queries = QueryBus::builder()
        .layer(CheckLayer::new(agents_only(checked.clone())))
        .handler(DoubleHandler)
        .build()
        .unwrap();
    let counter = Counter::named("events");
    let events = EventBus::builder()
        .layer(CheckLayer::new(agents_only(checked.clone())))
        .handler(counter.clone())
        .build()
        .unwrap();
    run(async {
        let refused = queries.dispatch(Double(4)).await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Forbidden);
        assert_eq!(queries.dispatch_with(Double(4), agent()).await.unwrap(), 8);

        let refused = events
            .publish_event(Added { sum: 1 }, Metadata::new())
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Forbidden);
        assert_eq!(counter.seen(), 0, "no event handler ran");
        events
            .publish_event(Added { sum: 1 }, agent())
            .await
            .unwrap();
        assert_eq!(counter.seen(), 1);
        assert_eq!(checked.load(Ordering::SeqCst), 4);
    });
}

/// Layers outside the check see its refusal as the dispatch's outcome: the metrics layer
/// counts it by its kind.
#[test]
fn layers_outside_count_a_refusal_as_an_outcome() {
    let counts = MetricCounts::default();
    let bus = CommandBus::builder()
        .layer(MetricsLayer::new())
        .layer(CheckLayer::new(agents_only(Arc::default())))
        .handler(AddHandler)
        .build()
        .unwrap();
    metrics::with_local_recorder(&counts, || {
        run(async {
            let refused = bus.dispatch(Add::default()).await.unwrap_err();
            assert_eq!(refused.kind(), ErrorKind::Forbidden);
        })
    });
    let series = counts.series();
    assert!(
        series
            .iter()
            .any(|s| s.starts_with("cqrs_dispatch_total") && s.contains("outcome=forbidden")),
        "{series:?}"
    );
}

/// Counts its clones: what a check's closure captures (a set of allowed names, say).
struct Allowed(Arc<AtomicUsize>);

impl Clone for Allowed {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::SeqCst);
        Self(self.0.clone())
    }
}

/// The bus clones its layer stack for each dispatch; the check inside it is shared, so what
/// its closure captured is not copied per dispatch (an allocation per copy, for a set).
#[test]
fn a_dispatch_does_not_clone_what_the_check_captured() {
    let clones = Arc::new(AtomicUsize::new(0));
    let allowed = Allowed(clones.clone());
    let bus = CommandBus::builder()
        .layer(CheckLayer::new(move |_: &Dispatch| {
            let _ = &allowed;
            Ok(())
        }))
        .handler(AddHandler)
        .build()
        .unwrap();
    let built = clones.load(Ordering::SeqCst);
    run(async {
        for _ in 0..3 {
            bus.dispatch(Add::default()).await.unwrap();
        }
    });
    assert_eq!(clones.load(Ordering::SeqCst) - built, 0);
}
