use crate::fixtures::*;
use cqrs_core::middleware::{MetricsLayer, TracingLayer};
use cqrs_core::testing::MetricCounts;
use cqrs_core::{
    BoxError, CommandBus, Dispatch, DispatchError, ErrorKind, EventBus, Metadata, Reply,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// Where the layer panics: chosen per dispatch by the actor in its metadata, except for
/// `poll_ready`, which sees no dispatch and panics once when `ready_panics` is set.
#[derive(Clone)]
pub(crate) struct Faulty<S> {
    inner: S,
    ready_panics: Arc<AtomicBool>,
}

#[derive(Clone, Default)]
pub(crate) struct FaultyLayer {
    ready_panics: Arc<AtomicBool>,
}

impl<S> Layer<S> for FaultyLayer {
    type Service = Faulty<S>;
    fn layer(&self, inner: S) -> Faulty<S> {
        Faulty {
            inner,
            ready_panics: self.ready_panics.clone(),
        }
    }
}

impl<S> Service<Dispatch> for Faulty<S>
where
    S: Service<Dispatch, Response = Reply> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.ready_panics.swap(false, Ordering::SeqCst) {
            panic!("the layer panics in poll_ready");
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        match dispatch.metadata().actor.as_deref() {
            Some("panic in call") => panic!("the layer panics in call"),
            Some("panic in poll") => Box::pin(async { panic!("the layer panics in its future") }),
            // Never done, and its guard panics when the future is dropped unfinished.
            Some("panic on drop") => Box::pin(async {
                let _guard = PanicOnDrop;
                std::future::pending::<()>().await;
                Err("unreachable".into())
            }),
            _ => {
                let inner = self.inner.call(dispatch);
                Box::pin(async move { inner.await.map_err(Into::into) })
            }
        }
    }
}

/// Panics when dropped, as a guard that checks its work finished would.
struct PanicOnDrop;

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        panic!("the layer's guard panics: dropped before its work finished");
    }
}

/// A dispatch dropped while a layer's future is pending (a timeout outside the bus, a caller
/// gone) drops that future inside the bus's guard: a panic in its drop stops there (it
/// reached the caller's task), and the bus keeps working.
#[test]
fn a_layer_future_that_panics_when_dropped_does_not_reach_the_caller() {
    let bus = CommandBus::builder()
        .layer(FaultyLayer::default())
        .handler(AddHandler)
        .build()
        .unwrap();
    let add = || Add {
        a: 2,
        b: 3,
        ..Add::default()
    };
    run(async {
        let mut pending = Box::pin(bus.dispatch_with(add(), as_actor("panic on drop")));
        let polled = std::future::poll_fn(|cx| Poll::Ready(pending.as_mut().poll(cx))).await;
        assert!(polled.is_pending());
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(pending)));
        assert!(dropped.is_ok(), "the drop's panic reached the caller");
        assert_eq!(bus.dispatch(add()).await.unwrap(), 5);
    });
}

pub(crate) fn as_actor(actor: &str) -> Metadata {
    Metadata::new().with_actor(actor)
}

fn assert_layer_panicked(error: &DispatchError, what: &str) {
    assert_eq!(error.kind(), ErrorKind::Internal, "{error}");
    let text = error.to_string();
    assert!(
        text.contains("a layer of the command bus panicked while dispatching `test.add`")
            || text.contains("a layer of the event bus panicked while dispatching `test.added`"),
        "{text}"
    );
    assert!(text.contains(what), "{text}");
}

#[test]
fn a_layer_that_panics_in_call_poll_or_poll_ready_fails_that_dispatch_and_the_bus_keeps_working() {
    let faulty = FaultyLayer::default();
    // The metrics and tracing layers outside it see the failure like any other.
    let bus = CommandBus::builder()
        .layer(TracingLayer::new())
        .layer(MetricsLayer::new())
        .layer(faulty.clone())
        .handler(AddHandler)
        .build()
        .unwrap();
    let add = || Add {
        a: 2,
        b: 3,
        ..Add::default()
    };
    run(async {
        let error = bus
            .dispatch_with(add(), as_actor("panic in call"))
            .await
            .unwrap_err();
        assert_layer_panicked(&error, "the layer panics in call");

        let error = bus
            .dispatch_with(add(), as_actor("panic in poll"))
            .await
            .unwrap_err();
        assert_layer_panicked(&error, "the layer panics in its future");

        faulty.ready_panics.store(true, Ordering::SeqCst);
        let error = bus.dispatch(add()).await.unwrap_err();
        assert_layer_panicked(&error, "the layer panics in poll_ready");

        assert_eq!(bus.dispatch(add()).await.unwrap(), 5);
    });
}

#[test]
fn an_event_bus_layer_that_panics_fails_that_publish() {
    let counter = Counter::named("counter");
    let bus = EventBus::builder()
        .layer(FaultyLayer::default())
        .handler::<Added, _>(counter.clone())
        .build()
        .unwrap();
    run(async {
        let error = bus
            .publish_event(Added { sum: 1 }, as_actor("panic in call"))
            .await
            .unwrap_err();
        assert_layer_panicked(&error, "the layer panics in call");
        assert_eq!(counter.seen(), 0);
        bus.publish_event(Added { sum: 2 }, Metadata::new())
            .await
            .unwrap();
        assert_eq!(counter.seen(), 1);
    });
}

/// A metrics layer outside a layer that panics counts the dispatch as `internal`, the kind of
/// the error the caller gets, not as `cancelled`: a panic in the layer's future and one in its
/// `call` alike.
#[test]
fn a_metrics_layer_outside_counts_the_panic_as_internal() {
    let counts = MetricCounts::default();
    let bus = CommandBus::builder()
        .layer(MetricsLayer::new())
        .layer(FaultyLayer::default())
        .handler(AddHandler)
        .build()
        .unwrap();
    metrics::with_local_recorder(&counts, || {
        run(async {
            for actor in ["panic in poll", "panic in call"] {
                bus.dispatch_with(Add::default(), as_actor(actor))
                    .await
                    .unwrap_err();
            }
        })
    });
    assert_eq!(
        counts.get("cqrs_dispatch_total{kind=command,message=test.add,outcome=internal}"),
        2
    );
    assert_eq!(
        counts.get("cqrs_dispatch_duration_seconds{kind=command,message=test.add}"),
        2
    );
    assert_eq!(
        counts.get("cqrs_dispatch_total{kind=command,message=test.add,outcome=cancelled}"),
        0
    );
}

/// Passes every dispatch on; panics once when cloned or once when dropped, as it is told.
struct Brittle<S> {
    inner: S,
    clone_panics: Arc<AtomicBool>,
    drop_panics: Arc<AtomicBool>,
}

impl<S: Clone> Clone for Brittle<S> {
    fn clone(&self) -> Self {
        if self.clone_panics.swap(false, Ordering::SeqCst) {
            panic!("the layer panics when cloned");
        }
        Brittle {
            inner: self.inner.clone(),
            clone_panics: self.clone_panics.clone(),
            drop_panics: self.drop_panics.clone(),
        }
    }
}

impl<S> Drop for Brittle<S> {
    fn drop(&mut self) {
        if self.drop_panics.swap(false, Ordering::SeqCst) {
            panic!("the layer panics when dropped");
        }
    }
}

#[derive(Clone, Default)]
struct BrittleLayer {
    clone_panics: Arc<AtomicBool>,
    drop_panics: Arc<AtomicBool>,
}

impl<S> Layer<S> for BrittleLayer {
    type Service = Brittle<S>;
    fn layer(&self, inner: S) -> Brittle<S> {
        Brittle {
            inner,
            clone_panics: self.clone_panics.clone(),
            drop_panics: self.drop_panics.clone(),
        }
    }
}

impl<S: Service<Dispatch>> Service<Dispatch> for Brittle<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dispatch: Dispatch) -> S::Future {
        self.inner.call(dispatch)
    }
}

/// The bus clones its layer stack for each dispatch and drops the clone after the call: a
/// layer whose clone or drop panics fails that dispatch, not the caller, and the bus keeps
/// working.
#[test]
fn a_layer_that_panics_when_cloned_or_dropped_fails_that_dispatch() {
    use futures_util::FutureExt;
    let brittle = BrittleLayer::default();
    let bus = CommandBus::builder()
        .layer(brittle.clone())
        .handler(AddHandler)
        .build()
        .unwrap();
    let add = || Add {
        a: 2,
        b: 3,
        ..Add::default()
    };
    run(async {
        for (flag, what) in [
            (&brittle.clone_panics, "the layer panics when cloned"),
            (&brittle.drop_panics, "the layer panics when dropped"),
        ] {
            flag.store(true, Ordering::SeqCst);
            let dispatched = std::panic::AssertUnwindSafe(async { bus.dispatch(add()).await })
                .catch_unwind()
                .await
                .unwrap_or_else(|_| panic!("{what}: the panic reached the caller"));
            assert_layer_panicked(&dispatched.unwrap_err(), what);
            assert!(!flag.load(Ordering::SeqCst), "{what}: it did panic");
            assert_eq!(bus.dispatch(add()).await.unwrap(), 5);
        }
    });
}
