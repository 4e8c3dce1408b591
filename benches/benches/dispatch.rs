//! What a message costs on its way through a bus, next to the cheapest ways of reaching the same
//! handler logic without one. One criterion group per comparison, so each group's report shows
//! the ratios; `docs/benchmarks.md` has the results and the command that made them.
//!
//! Every case runs on one current-thread tokio runtime, with metadata built once and cloned per
//! iteration (in the baselines too, so each case does the same work around the handler).
//!
//! No tracing subscriber is installed, so the tracing layer's span is disabled, except in the
//! `bus_three_layers_traced` cases: there a subscriber that enables every span at INFO and
//! records nothing ([`UpTo`] INFO) is the default, so they add the cost of creating, entering
//! and closing the span, the floor of what a real subscriber at INFO costs.
//!
//! The handlers answer without waiting, so a dispatch finishes on its first poll, except in the
//! command group's `*_yielding` cases: there the handler waits once (`yield_now`), so the
//! dispatch is polled twice and the timeout layer starts (and drops) its timer.

use cqrs_benches::baseline::{
    LocalCommandHandler, LocalEventHandler, LocalQueryHandler, call_when_ready, command_service,
    query_service, spawn_command_task, spawn_query_task,
};
use cqrs_benches::buses::{
    Stack, command_bus, event_bus, event_handlers, query_bus, yielding_command_bus,
};
use cqrs_benches::fixtures::{
    Increment, IncrementHandler, Incremented, Lookup, LookupHandler, YieldingIncrementHandler,
};
use cqrs_core::{CommandContext, EventContext, EventEnvelope, Metadata, QueryContext};
use criterion::measurement::WallTime;
use criterion::{Bencher, BenchmarkGroup, BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::runtime::Runtime;
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Dispatch, Event, Metadata as TracingMetadata, Subscriber};

/// A subscriber that enables every span and event up to its level and records nothing; it
/// only counts the spans, so a case can check that it traced.
#[derive(Debug)]
struct UpTo {
    level: LevelFilter,
    spans: AtomicU64,
}

impl UpTo {
    fn new(level: LevelFilter) -> Self {
        Self {
            level,
            spans: AtomicU64::new(0),
        }
    }
}

impl Subscriber for UpTo {
    fn enabled(&self, metadata: &TracingMetadata<'_>) -> bool {
        *metadata.level() <= self.level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.level)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.spans.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Adds the case `name` to `group`, run with an INFO [`UpTo`] subscriber as the thread's
/// default; checks that the layer made spans under it. Afterwards spans are off again, as the
/// other cases measure them.
fn bench_traced(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    mut routine: impl FnMut(&mut Bencher<'_, WallTime>),
) {
    let dispatch = Dispatch::new(UpTo::new(LevelFilter::INFO));
    group.bench_function(name, |b| {
        tracing::dispatcher::with_default(&dispatch, || routine(b));
        let spans = dispatch
            .downcast_ref::<UpTo>()
            .map_or(0, |subscriber| subscriber.spans.load(Ordering::Relaxed));
        assert!(spans > 0, "{name} made no spans");
    });
    drop(dispatch);
    // Tracing caches each callsite's interest and the highest level wanted, and recomputes
    // them only when a dispatcher is made: without one wanting nothing, the span would stay
    // enabled (and made, for no subscriber) in the cases after.
    drop(Dispatch::new(UpTo::new(LevelFilter::OFF)));
    assert_eq!(
        LevelFilter::current(),
        LevelFilter::OFF,
        "spans stay enabled after {name}"
    );
}

/// The runtime every case runs on: one thread, with the timer the timeout layer needs.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
}

fn command_dispatch(c: &mut Criterion) {
    let rt = runtime();
    let metadata = Metadata::new();
    let bare = command_bus(&Stack::Bare).expect("the bare bus builds");
    let layered = command_bus(&Stack::three_layers()).expect("the layered bus builds");
    let shipped = command_bus(&Stack::Shipped).expect("the bus with the shipped layers builds");
    // Through `black_box`, so the compiler cannot see the concrete type behind the box and
    // devirtualise the call: a handler in a real registry is reached through its vtable.
    let boxed = black_box(Box::new(IncrementHandler) as Box<dyn LocalCommandHandler>);
    let task = spawn_command_task(rt.handle());
    // The same, with a handler that waits once (`yield_now`) before answering: the dispatch
    // returns `Pending` once and is polled again, which is when the timeout layer starts its
    // timer. Every case above finishes on its first poll.
    let bare_yielding = yielding_command_bus(&Stack::Bare).expect("the bare bus builds");
    let layered_yielding =
        yielding_command_bus(&Stack::three_layers()).expect("the layered bus builds");
    let boxed_yielding =
        black_box(Box::new(YieldingIncrementHandler) as Box<dyn LocalCommandHandler>);

    // Every path must reach the handler and give its answer, or the numbers mean nothing.
    rt.block_on(async {
        let cmd = Increment { value: 41 };
        let md = || metadata.clone();
        assert_eq!(bare.dispatch_with(cmd, md()).await.ok(), Some(42));
        assert_eq!(layered.dispatch_with(cmd, md()).await.ok(), Some(42));
        assert_eq!(shipped.dispatch_with(cmd, md()).await.ok(), Some(42));
        let mut ctx = CommandContext::new(md());
        assert_eq!(boxed.handle(cmd, &mut ctx).await.ok(), Some(42));
        let answer = call_when_ready(&mut command_service(), (cmd, md())).await;
        assert_eq!(answer.ok(), Some(42));
        assert_eq!(task.call((cmd, md())).await.and_then(Result::ok), Some(42));
        assert_eq!(bare_yielding.dispatch_with(cmd, md()).await.ok(), Some(42));
        assert_eq!(
            layered_yielding.dispatch_with(cmd, md()).await.ok(),
            Some(42)
        );
        let mut ctx = CommandContext::new(md());
        assert_eq!(boxed_yielding.handle(cmd, &mut ctx).await.ok(), Some(42));
    });

    let mut group = c.benchmark_group("command_dispatch");
    group.bench_function("direct_await", |b| {
        b.to_async(&rt).iter(|| async {
            let mut ctx = CommandContext::new(metadata.clone());
            let cmd = Increment {
                value: black_box(7),
            };
            IncrementHandler.run(cmd, &mut ctx).await
        });
    });
    group.bench_function("boxed_async_trait", |b| {
        b.to_async(&rt).iter(|| async {
            let mut ctx = CommandContext::new(metadata.clone());
            let cmd = Increment {
                value: black_box(7),
            };
            boxed.handle(cmd, &mut ctx).await
        });
    });
    group.bench_function("tower_box_service", |b| {
        // A `BoxService` is called through `&mut`, so each sample owns one, built (and its one
        // allocation made) before the clock starts.
        b.to_async(&rt).iter_custom(|iters| {
            // Black-boxed, as the boxed handlers are: the compiler must not see through it.
            let mut service = black_box(command_service());
            let metadata = &metadata;
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let cmd = Increment {
                        value: black_box(7),
                    };
                    let _ = black_box(call_when_ready(&mut service, (cmd, metadata.clone())).await);
                }
                start.elapsed()
            }
        });
    });
    group.bench_function("mpsc_oneshot_task", |b| {
        b.to_async(&rt).iter(|| async {
            let cmd = Increment {
                value: black_box(7),
            };
            task.call((cmd, metadata.clone())).await
        });
    });
    group.bench_function("bus_bare", |b| {
        b.to_async(&rt).iter(|| async {
            let cmd = Increment {
                value: black_box(7),
            };
            bare.dispatch_with(cmd, metadata.clone()).await
        });
    });
    // `bus.dispatch(cmd)` as an application calls it: fresh metadata per dispatch (a UUID v7
    // message id and correlation id, the bus clock's now), which the cases above, like their
    // baselines, take ready-made.
    group.bench_function("bus_bare_fresh_metadata", |b| {
        b.to_async(&rt).iter(|| async {
            let cmd = Increment {
                value: black_box(7),
            };
            bare.dispatch(cmd).await
        });
    });
    group.bench_function("bus_three_layers", |b| {
        b.to_async(&rt).iter(|| async {
            let cmd = Increment {
                value: black_box(7),
            };
            layered.dispatch_with(cmd, metadata.clone()).await
        });
    });
    // cqrs-core's own tracing, metrics and timeout layers, as a server stacks them.
    group.bench_function("bus_shipped_layers", |b| {
        b.to_async(&rt).iter(|| async {
            let cmd = Increment {
                value: black_box(7),
            };
            shipped.dispatch_with(cmd, metadata.clone()).await
        });
    });
    bench_traced(&mut group, "bus_three_layers_traced", |b| {
        b.to_async(&rt).iter(|| async {
            let cmd = Increment {
                value: black_box(7),
            };
            layered.dispatch_with(cmd, metadata.clone()).await
        });
    });
    // The yielding handler: each case pays for one trip through the runtime's scheduler, so
    // compare them with each other (and `direct_await_yielding`, the floor), not with the
    // cases above.
    group.bench_function("direct_await_yielding", |b| {
        b.to_async(&rt).iter(|| async {
            let mut ctx = CommandContext::new(metadata.clone());
            let cmd = Increment {
                value: black_box(7),
            };
            YieldingIncrementHandler.run(cmd, &mut ctx).await
        });
    });
    group.bench_function("boxed_async_trait_yielding", |b| {
        b.to_async(&rt).iter(|| async {
            let mut ctx = CommandContext::new(metadata.clone());
            let cmd = Increment {
                value: black_box(7),
            };
            boxed_yielding.handle(cmd, &mut ctx).await
        });
    });
    group.bench_function("bus_bare_yielding", |b| {
        b.to_async(&rt).iter(|| async {
            let cmd = Increment {
                value: black_box(7),
            };
            bare_yielding.dispatch_with(cmd, metadata.clone()).await
        });
    });
    group.bench_function("bus_three_layers_yielding", |b| {
        b.to_async(&rt).iter(|| async {
            let cmd = Increment {
                value: black_box(7),
            };
            layered_yielding.dispatch_with(cmd, metadata.clone()).await
        });
    });
    group.finish();
}

fn query_dispatch(c: &mut Criterion) {
    let rt = runtime();
    let metadata = Metadata::new();
    let bare = query_bus(&Stack::Bare).expect("the bare bus builds");
    let layered = query_bus(&Stack::three_layers()).expect("the layered bus builds");
    // Through `black_box`, as in `command_dispatch`, so the call stays virtual.
    let boxed = black_box(Box::new(LookupHandler) as Box<dyn LocalQueryHandler>);
    let task = spawn_query_task(rt.handle());

    rt.block_on(async {
        let query = Lookup { key: 2 };
        let md = || metadata.clone();
        assert_eq!(bare.dispatch_with(query, md()).await.ok(), Some(62));
        assert_eq!(layered.dispatch_with(query, md()).await.ok(), Some(62));
        let ctx = QueryContext::new(md());
        assert_eq!(boxed.handle(query, &ctx).await.ok(), Some(62));
        let answer = call_when_ready(&mut query_service(), (query, md())).await;
        assert_eq!(answer.ok(), Some(62));
        assert_eq!(
            task.call((query, md())).await.and_then(Result::ok),
            Some(62)
        );
    });

    let mut group = c.benchmark_group("query_dispatch");
    group.bench_function("direct_await", |b| {
        b.to_async(&rt).iter(|| async {
            let ctx = QueryContext::new(metadata.clone());
            LookupHandler.run(Lookup { key: black_box(7) }, &ctx).await
        });
    });
    group.bench_function("boxed_async_trait", |b| {
        b.to_async(&rt).iter(|| async {
            let ctx = QueryContext::new(metadata.clone());
            boxed.handle(Lookup { key: black_box(7) }, &ctx).await
        });
    });
    group.bench_function("tower_box_service", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let mut service = black_box(query_service());
            let metadata = &metadata;
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let query = Lookup { key: black_box(7) };
                    let _ =
                        black_box(call_when_ready(&mut service, (query, metadata.clone())).await);
                }
                start.elapsed()
            }
        });
    });
    group.bench_function("mpsc_oneshot_task", |b| {
        b.to_async(&rt).iter(|| async {
            let query = Lookup { key: black_box(7) };
            task.call((query, metadata.clone())).await
        });
    });
    group.bench_function("bus_bare", |b| {
        b.to_async(&rt).iter(|| async {
            let query = Lookup { key: black_box(7) };
            bare.dispatch_with(query, metadata.clone()).await
        });
    });
    group.bench_function("bus_three_layers", |b| {
        b.to_async(&rt).iter(|| async {
            let query = Lookup { key: black_box(7) };
            layered.dispatch_with(query, metadata.clone()).await
        });
    });
    bench_traced(&mut group, "bus_three_layers_traced", |b| {
        b.to_async(&rt).iter(|| async {
            let query = Lookup { key: black_box(7) };
            layered.dispatch_with(query, metadata.clone()).await
        });
    });
    group.finish();
}

fn event_publish(c: &mut Criterion) {
    let rt = runtime();
    // Built once: publishing clones it (metadata and one reference count), as a caller that
    // publishes a stored or received envelope does.
    let envelope = EventEnvelope::new(Incremented { value: 1 }, Metadata::new());
    let mut group = c.benchmark_group("event_publish");
    for count in [1, 8] {
        let total = Arc::new(AtomicU64::new(0));
        let bus = event_bus(count, &total).expect("the event bus builds");
        let boxed: Vec<Box<dyn LocalEventHandler>> = event_handlers(count, &total)
            .into_iter()
            // Through `black_box`, as in `command_dispatch`, so the calls stay virtual.
            .map(|h| black_box(Box::new(h) as Box<dyn LocalEventHandler>))
            .collect();
        let published = rt.block_on(bus.publish(envelope.clone()));
        assert_eq!(published.map(|p| p.handlers).ok(), Some(count));

        group.bench_with_input(BenchmarkId::new("bus", count), &count, |b, _| {
            b.to_async(&rt).iter(|| bus.publish(envelope.clone()));
        });
        // The floor: the same handlers awaited one after another through `Box<dyn ..>`, which
        // is what the bus does for one handler (it runs several concurrently).
        group.bench_with_input(
            BenchmarkId::new("boxed_async_trait_loop", count),
            &count,
            |b, _| {
                b.to_async(&rt).iter(|| async {
                    let envelope = envelope.clone();
                    let Some(event) = envelope.downcast_ref::<Incremented>() else {
                        unreachable!("the envelope was built from an `Incremented`");
                    };
                    for handler in &boxed {
                        handler.handle(event, EventContext::new(&envelope)).await?;
                    }
                    Ok::<_, cqrs_core::HandlerError>(boxed.len())
                });
            },
        );
    }
    group.finish();
}

/// What `dispatch` adds to `dispatch_with`: fresh metadata (a UUID v7 and the clock's now),
/// beside the clock read alone.
fn metadata(c: &mut Criterion) {
    let mut group = c.benchmark_group("metadata");
    group.bench_function("metadata_new", |b| b.iter(cqrs_core::Metadata::new));
    group.bench_function("utc_now", |b| {
        b.iter(cqrs_core::reexports::chrono::Utc::now)
    });
    group.finish();
}

criterion_group!(
    benches,
    command_dispatch,
    query_dispatch,
    event_publish,
    metadata
);
criterion_main!(benches);
