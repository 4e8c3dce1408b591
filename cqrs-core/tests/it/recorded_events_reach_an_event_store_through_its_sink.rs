//! `EventStoreSink`: what a command records lands in the event store, by stream, in order;
//! and a bus without a sink says once that `dispatch` dropped recorded events.

use crate::fixtures::*;
use cqrs_core::Position;
use cqrs_core::memory::InMemoryEventStore;
use cqrs_core::ports::EventStore;
use cqrs_core::{
    Command, CommandBus, CommandContext, CommandHandler, ErrorKind, EventStoreSink, HandlerError,
    Message, Metadata, async_trait,
};
use std::sync::Arc;

/// Records one event per key, in order (`None`: no partition key).
struct Spread(Vec<Option<&'static str>>);

impl Message for Spread {
    const NAME: &'static str = "test.spread";
}

impl Command for Spread {
    type Output = ();
}

struct SpreadHandler;

#[async_trait]
impl CommandHandler<Spread> for SpreadHandler {
    async fn handle(&self, cmd: Spread, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        for (sum, key) in (1..).zip(cmd.0) {
            match key {
                Some(key) => ctx.record_keyed(key, Added { sum }),
                None => ctx.record(Added { sum }),
            };
        }
        Ok(())
    }
}

fn bus_into(sink: EventStoreSink) -> CommandBus {
    CommandBus::builder()
        .handler(SpreadHandler)
        .event_sink(Arc::new(sink))
        .build()
        .unwrap()
}

async fn sums(store: &InMemoryEventStore, stream: &str) -> Vec<u64> {
    store
        .load(stream, 0)
        .await
        .unwrap()
        .iter()
        .map(|r| r.payload["sum"].as_u64().unwrap())
        .collect()
}

#[test]
fn each_event_lands_in_its_keys_stream_in_order_with_its_metadata() {
    let store = Arc::new(InMemoryEventStore::new());
    let bus = bus_into(EventStoreSink::new(store.clone()));
    let command = Metadata::new();
    run(async {
        bus.dispatch_with(
            Spread(vec![Some("a"), Some("b"), Some("a"), None]),
            command.clone(),
        )
        .await
        .unwrap();
        assert_eq!(sums(&store, "a").await, [1, 3]);
        assert_eq!(sums(&store, "b").await, [2]);
        assert_eq!(
            sums(&store, "test.added").await,
            [4],
            "no key: the event type"
        );
        let all = store.read_all(Position::START, 10).await.unwrap();
        let in_order: Vec<_> = all
            .iter()
            .map(|r| r.payload["sum"].as_u64().unwrap())
            .collect();
        assert_eq!(
            in_order,
            [1, 2, 3, 4],
            "the recording order, across streams"
        );
        for record in &all {
            assert_eq!(record.metadata.correlation_id, command.correlation_id);
            assert_eq!(record.metadata.causation_id, Some(command.message_id));
        }
    });
}

#[test]
fn stream_for_names_the_streams() {
    let store = Arc::new(InMemoryEventStore::new());
    let bus = bus_into(
        EventStoreSink::new(store.clone())
            .stream_for(|r| format!("spread-{}", r.partition_key.as_deref().unwrap_or("none"))),
    );
    run(async {
        bus.dispatch(Spread(vec![Some("a"), None])).await.unwrap();
        assert_eq!(sums(&store, "spread-a").await, [1]);
        assert_eq!(sums(&store, "spread-none").await, [2]);
    });
}

/// A stream the store refuses fails the dispatch with the store's kind; the streams before it
/// are in (nothing is atomic in memory), those after it are not.
#[test]
fn a_refused_append_fails_the_dispatch_with_the_stores_kind() {
    let store = Arc::new(InMemoryEventStore::new());
    let bus = bus_into(EventStoreSink::new(store.clone()));
    run(async {
        let error = bus
            .dispatch(Spread(vec![Some("a"), Some("b\0"), Some("c")]))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Invalid, "{error}");
        assert_eq!(sums(&store, "a").await, [1]);
        assert!(sums(&store, "c").await.is_empty());
    });
}

/// Records an event under a name no other test dispatches, so the warnings it causes can be
/// told apart in the binary's global log.
struct Forgotten;

impl Message for Forgotten {
    const NAME: &'static str = "test.forgotten";
}

impl Command for Forgotten {
    type Output = ();
}

struct ForgottenHandler;

#[async_trait]
impl CommandHandler<Forgotten> for ForgottenHandler {
    async fn handle(&self, _: Forgotten, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        ctx.record(Added { sum: 0 });
        Ok(())
    }
}

#[test]
fn dispatch_without_a_sink_warns_once_per_bus_that_it_dropped_events() {
    let (_, events) = crate::the_tracing_layer_opens_a_span_per_dispatch::recorder();
    let warnings = || {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|(fields, _)| {
                fields.get("command").map(String::as_str) == Some(Forgotten::NAME)
                    && fields
                        .get("message")
                        .is_some_and(|m| m.contains("no event sink"))
            })
            .count()
    };
    let bus = || {
        CommandBus::builder()
            .handler(ForgottenHandler)
            .build()
            .unwrap()
    };
    run(async {
        let (first, second) = (bus(), bus());
        first.dispatch(Forgotten).await.unwrap();
        first.dispatch(Forgotten).await.unwrap();
        assert_eq!(warnings(), 1, "once per bus");
        // `execute` hands the events back: nothing dropped, nothing said.
        let executed = second.execute(Forgotten, Metadata::new()).await.unwrap();
        assert_eq!(executed.events.len(), 1);
        assert_eq!(warnings(), 1);
        second.dispatch(Forgotten).await.unwrap();
        assert_eq!(warnings(), 2, "another bus says it too");
    });
}

/// An event whose `Serialize` panics on a zero `count`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Counted {
    #[serde(serialize_with = "nonzero")]
    count: u64,
}

fn nonzero<S: serde::Serializer>(count: &u64, s: S) -> Result<S::Ok, S::Error> {
    assert!(*count != 0, "zero is not a count");
    s.serialize_u64(*count)
}

impl Message for Counted {
    const NAME: &'static str = "test.counted";
}

impl cqrs_core::Event for Counted {}

struct Count(u64);

impl Message for Count {
    const NAME: &'static str = "test.count";
}

impl Command for Count {
    type Output = ();
}

struct CountHandler;

#[async_trait]
impl CommandHandler<Count> for CountHandler {
    async fn handle(&self, cmd: Count, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        ctx.record(Counted { count: cmd.0 });
        Ok(())
    }
}

/// A `Serialize` that panics, or a sink's `stream_for` that does, fails that dispatch as
/// `internal`, naming the panic, instead of unwinding into the caller's task (a server's
/// connection) after the handler's work was done; the next dispatch goes on as usual.
#[test]
fn a_panicking_serialize_or_stream_for_fails_only_that_dispatch() {
    use futures_util::FutureExt;
    let store = Arc::new(InMemoryEventStore::new());
    let bus = CommandBus::builder()
        .handler(CountHandler)
        .event_sink(Arc::new(EventStoreSink::new(store.clone())))
        .build()
        .unwrap();
    let picky = CommandBus::builder()
        .handler(CountHandler)
        .event_sink(Arc::new(EventStoreSink::new(store.clone()).stream_for(
            |record| {
                assert!(record.payload["count"] != 1, "no stream for one");
                "counted".to_owned()
            },
        )))
        .build()
        .unwrap();
    run(async {
        for (bus, count, said) in [
            (&bus, 0, "its Serialize panicked: zero is not a count"),
            (
                &picky,
                1,
                "the sink's `stream_for` panicked: no stream for one",
            ),
        ] {
            let outcome = std::panic::AssertUnwindSafe(bus.dispatch(Count(count)))
                .catch_unwind()
                .await;
            let Ok(Err(error)) = outcome else {
                panic!("not an error of its own: {outcome:?}");
            };
            assert_eq!(error.kind(), ErrorKind::Internal, "{error}");
            assert!(error.to_string().contains(said), "{error}");
        }
        bus.dispatch(Count(2)).await.unwrap();
        picky.dispatch(Count(3)).await.unwrap();
        assert_eq!(store.load("counted", 0).await.unwrap().len(), 1);
        assert_eq!(store.load("test.counted", 0).await.unwrap().len(), 1);
    });
}

/// Appends to `inner`, those to stream `b` once `gate` lets them through.
struct GatedAtB {
    inner: Arc<InMemoryEventStore>,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl EventStore for GatedAtB {
    async fn append(
        &self,
        stream_id: &str,
        expected: cqrs_core::ports::ExpectedVersion,
        events: Vec<cqrs_core::EventRecord>,
    ) -> Result<Vec<cqrs_core::EventRecord>, cqrs_core::ports::StoreError> {
        if stream_id == "b" {
            let _pass = self.gate.acquire().await.expect("the gate is never closed");
        }
        self.inner.append(stream_id, expected, events).await
    }

    async fn load(
        &self,
        stream_id: &str,
        after_version: u64,
    ) -> Result<Vec<cqrs_core::EventRecord>, cqrs_core::ports::StoreError> {
        self.inner.load(stream_id, after_version).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<cqrs_core::EventRecord>, cqrs_core::ports::StoreError> {
        self.inner.read_all(after, limit).await
    }

    async fn stream_version(&self, stream_id: &str) -> Result<u64, cqrs_core::ports::StoreError> {
        self.inner.stream_version(stream_id).await
    }
}

/// A caller that gives a dispatch up while the sink appends its events (a time-out, a client
/// gone) does not cut the sink off: the command has taken effect, and every event it recorded
/// still lands. It used to leave stream `a`'s event stored and `b`'s lost, without a word.
#[test]
fn a_dispatch_given_up_during_its_sink_still_hands_every_event_on() {
    let store = Arc::new(InMemoryEventStore::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bus = bus_into(EventStoreSink::new(Arc::new(GatedAtB {
        inner: store.clone(),
        gate: gate.clone(),
    })));
    run(async {
        let mut dispatch = Box::pin(bus.dispatch(Spread(vec![Some("a"), Some("b"), Some("c")])));
        // Polled until stream `a` is stored and the sink waits at `b`, then dropped.
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(5),
            "the sink stored `a` and waits at `b`",
            || {
                let polled = futures_util::FutureExt::now_or_never(dispatch.as_mut());
                assert!(polled.is_none(), "the dispatch finished: {polled:?}");
                let store = store.clone();
                async move { (sums(&store, "a").await == [1]).then_some(()) }
            },
        )
        .await;
        drop(dispatch);
        gate.add_permits(1);
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(5),
            "the events after `a` land too",
            || async {
                (sums(&store, "b").await == [2] && sums(&store, "c").await == [3]).then_some(())
            },
        )
        .await;
    });
}
