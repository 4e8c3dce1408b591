use crate::fixtures::*;
use cqrs_core::middleware::TracingLayer;
use cqrs_core::{
    CommandBus, CommandContext, CommandHandler, DispatchError, EventBus, EventContext,
    EventHandler, HandlerError, Metadata, QueryBus, QueryContext, QueryHandler,
};
use std::future::Future;
use std::pin::Pin;

#[test]
fn a_panicking_command_handler_becomes_an_error_and_the_bus_keeps_working() {
    for bus in [
        CommandBus::builder().handler(AddHandler).build().unwrap(),
        CommandBus::builder()
            .layer(TracingLayer::new())
            .handler(AddHandler)
            .build()
            .unwrap(),
    ] {
        run(async {
            let err = bus
                .dispatch(Add {
                    panic: true,
                    ..Add::default()
                })
                .await
                .unwrap_err();
            match &err {
                DispatchError::Panicked { name, message, .. } => {
                    assert_eq!(*name, "test.add");
                    assert_eq!(message, "the add handler was told to panic");
                }
                other => panic!("expected Panicked, got {other:?}"),
            }
            assert_eq!(
                bus.dispatch(Add {
                    a: 1,
                    b: 2,
                    ..Add::default()
                })
                .await
                .unwrap(),
                3
            );
        });
    }
}

#[test]
fn a_panicking_query_handler_becomes_an_error() {
    let bus = QueryBus::builder().handler(DoubleHandler).build().unwrap();
    run(async {
        let err = bus.dispatch(Double(13)).await.unwrap_err();
        assert!(
            matches!(
                err,
                DispatchError::Panicked {
                    name: "test.double",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(bus.dispatch(Double(2)).await.unwrap(), 4);
    });
}

#[test]
fn a_panicking_handler_on_a_multi_threaded_runtime_does_not_abort_the_task() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bus = CommandBus::builder().handler(AddHandler).build().unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    bus.dispatch(Add {
                        a: i,
                        b: 0,
                        panic: i % 2 == 0,
                        ..Add::default()
                    })
                    .await
                })
            })
            .collect();
        let mut panicked = 0;
        for t in tasks {
            match t.await.expect("the task itself did not panic") {
                Err(DispatchError::Panicked { .. }) => panicked += 1,
                Ok(_) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(panicked, 4);
    });
}

/// Handlers written by hand (without `#[async_trait]`) that panic while building their future,
/// before there is a future to poll.
struct PanicsEagerly;

type Boxed<'a, T> = Pin<Box<dyn Future<Output = Result<T, HandlerError>> + Send + 'a>>;

impl CommandHandler<Add> for PanicsEagerly {
    fn handle<'a, 'b, 'c>(&'a self, _: Add, _: &'b mut CommandContext) -> Boxed<'c, u64>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        panic!("eager command handler")
    }
}

impl QueryHandler<Double> for PanicsEagerly {
    fn handle<'a, 'b, 'c>(&'a self, _: Double, _: &'b QueryContext) -> Boxed<'c, u64>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        panic!("eager query handler")
    }
}

impl EventHandler<Added> for PanicsEagerly {
    fn handle<'a, 'b, 'c, 'd>(&'a self, _: &'b Added, _: EventContext<'c>) -> Boxed<'d, ()>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        panic!("eager event handler")
    }
}

fn eager_panic(err: DispatchError, expected: &str) {
    match err {
        DispatchError::Panicked { message, .. } => assert_eq!(message, expected),
        other => panic!("expected Panicked, got {other:?}"),
    }
}

/// A panic in `handle` itself, not in the future it returns, is caught like any other: the
/// dispatch fails with `Panicked`, the caller's task goes on, and the other handlers of an
/// event still run.
#[test]
fn a_handler_that_panics_before_returning_its_future_is_caught_too() {
    for layered in [false, true] {
        let commands = CommandBus::builder().handler(PanicsEagerly);
        let commands = if layered {
            commands.layer(TracingLayer::new()).build().unwrap()
        } else {
            commands.build().unwrap()
        };
        let queries = QueryBus::builder().handler(PanicsEagerly);
        let queries = if layered {
            queries.layer(TracingLayer::new()).build().unwrap()
        } else {
            queries.build().unwrap()
        };
        run(async {
            eager_panic(
                commands.dispatch(Add::default()).await.unwrap_err(),
                "eager command handler",
            );
            eager_panic(
                commands
                    .execute(Add::default(), Metadata::new())
                    .await
                    .unwrap_err(),
                "eager command handler",
            );
            eager_panic(
                queries.dispatch(Double(1)).await.unwrap_err(),
                "eager query handler",
            );
        });
    }
    let counter = Counter::named("counter");
    let events = EventBus::builder()
        .handler(PanicsEagerly)
        .handler(counter.clone())
        .build()
        .unwrap();
    run(async {
        let err = events
            .publish_event(Added { sum: 1 }, Metadata::new())
            .await
            .unwrap_err();
        let DispatchError::Publish(publish) = err else {
            panic!("expected a publish error");
        };
        assert_eq!(publish.failures.len(), 1);
        eager_panic(
            publish.failures.into_iter().next().unwrap().error,
            "eager event handler",
        );
    });
    assert_eq!(counter.seen(), 1, "the other handler ran");
}

/// Its future is written by hand: it holds a [`PanicsWhenDropped`] and panics when polled,
/// keeping the guard (an `async` block would have dropped it while unwinding).
struct PanicsHoldingAGuard;

impl CommandHandler<Add> for PanicsHoldingAGuard {
    fn handle<'a, 'b, 'c>(&'a self, _: Add, _: &'b mut CommandContext) -> Boxed<'c, u64>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        let guard = PanicsWhenDropped;
        Box::pin(std::future::poll_fn(move |_| {
            let _held = &guard;
            panic!("hand-written handler")
        }))
    }
}

#[test]
fn a_hand_written_future_that_panics_and_then_panics_when_dropped_fails_only_its_dispatch() {
    for layered in [false, true] {
        let commands = CommandBus::builder().handler(PanicsHoldingAGuard);
        let commands = if layered {
            commands.layer(TracingLayer::new()).build().unwrap()
        } else {
            commands.build().unwrap()
        };
        run(async {
            eager_panic(
                commands.dispatch(Add::default()).await.unwrap_err(),
                "hand-written handler",
            );
        });
    }
}

/// A panic payload whose own `Drop` panics (a handler may `panic_any` any value) is dropped
/// inside a guard too: the dispatch fails with `Panicked` on the bare and the layered bus, and
/// the caller's task does not unwind.
#[test]
fn a_panic_whose_payload_panics_when_dropped_is_still_an_error() {
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("the payload's drop panics");
        }
    }
    struct BombHandler;
    #[cqrs_core::async_trait]
    impl QueryHandler<Double> for BombHandler {
        async fn handle(&self, _: Double, _: &QueryContext) -> Result<u64, HandlerError> {
            std::panic::panic_any(Bomb)
        }
    }
    for bus in [
        QueryBus::builder().handler(BombHandler).build().unwrap(),
        QueryBus::builder()
            .layer(TracingLayer::new())
            .handler(BombHandler)
            .build()
            .unwrap(),
    ] {
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(async { bus.dispatch(Double(1)).await })
        }));
        let Ok(answer) = answer else {
            panic!("the payload's panic unwound through the bus");
        };
        assert!(
            matches!(
                answer,
                Err(DispatchError::Panicked {
                    name: "test.double",
                    ..
                })
            ),
            "{answer:?}"
        );
    }
}

/// Written by hand: its future is ready at once, holding a [`PanicsWhenDropped`], so dropping
/// the finished future panics.
struct ReadyThenPanicsWhenDropped;

impl EventHandler<Added> for ReadyThenPanicsWhenDropped {
    fn handle<'a, 'b, 'c, 'd>(&'a self, _: &'b Added, _: EventContext<'c>) -> Boxed<'d, ()>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        let guard = PanicsWhenDropped;
        Box::pin(std::future::poll_fn(move |_| {
            let _held = &guard;
            std::task::Poll::Ready(Ok(()))
        }))
    }

    fn name(&self) -> &str {
        "ready-then-panics"
    }
}

/// An event handler whose finished future panics when dropped does not take the event's
/// other handlers down with it (they run beside it, and the panic unwound through them,
/// out of `publish`): the publish succeeds, and the handler after it ran, with layers or
/// without, with a handler timeout or without (with one, the finished future was dropped in
/// the guard's poll, and the handler failed as panicked, so a consumer redelivered an event
/// it had handled until it was dead-lettered).
#[test]
fn an_event_handler_whose_finished_future_panics_when_dropped_stops_no_other() {
    for (layered, budget) in [(false, false), (true, false), (false, true), (true, true)] {
        let counter = Counter::named("counter");
        let events = EventBus::builder()
            .handler(ReadyThenPanicsWhenDropped)
            .handler(counter.clone());
        let events = if budget {
            events.handler_timeout(std::time::Duration::from_secs(5))
        } else {
            events
        };
        let events = if layered {
            events.layer(TracingLayer::new()).build().unwrap()
        } else {
            events.build().unwrap()
        };
        run(async {
            let published = events
                .publish_event(Added { sum: 1 }, Metadata::new())
                .await;
            assert!(
                published.is_ok(),
                "layered {layered}, budget {budget}: {published:?}"
            );
        });
        assert_eq!(
            counter.seen(),
            1,
            "layered {layered}, budget {budget}: the other handler ran"
        );
    }
}
