//! A bus given a clock stamps the metadata its `dispatch` makes and the events its command
//! handlers record with that clock's time, on the unlayered and the layered path alike;
//! metadata a caller hands in keeps its own timestamp.

use crate::fixtures::*;
use chrono::{TimeZone, Utc};
use cqrs_core::clock::{Clock, ManualClock};
use cqrs_core::memory::InMemoryEventStore;
use cqrs_core::middleware::TracingLayer;
use cqrs_core::ports::EventStore;
use cqrs_core::testing::CommandTest;
use cqrs_core::{
    Command, CommandBus, CommandContext, CommandHandler, EventStoreSink, HandlerError, Message,
    Metadata, Query, QueryBus, QueryContext, QueryHandler, async_trait,
};
use std::sync::Arc;

/// Records one `Added` event and answers the timestamp of its own metadata.
struct Stamp;

impl Message for Stamp {
    const NAME: &'static str = "test.stamp";
}

impl Command for Stamp {
    type Output = chrono::DateTime<Utc>;
}

struct StampHandler;

#[async_trait]
impl CommandHandler<Stamp> for StampHandler {
    async fn handle(
        &self,
        _: Stamp,
        ctx: &mut CommandContext,
    ) -> Result<chrono::DateTime<Utc>, HandlerError> {
        ctx.record(Added { sum: 1 });
        ctx.record_keyed("k", Added { sum: 2 });
        Ok(ctx.metadata().timestamp)
    }
}

/// Answers the timestamp of its own metadata.
struct When;

impl Message for When {
    const NAME: &'static str = "test.when";
}

impl Query for When {
    type Output = chrono::DateTime<Utc>;
}

struct WhenHandler;

#[async_trait]
impl QueryHandler<When> for WhenHandler {
    async fn handle(
        &self,
        _: When,
        ctx: &QueryContext,
    ) -> Result<chrono::DateTime<Utc>, HandlerError> {
        Ok(ctx.metadata().timestamp)
    }
}

#[test]
fn the_buses_stamp_metadata_and_recorded_events_with_their_clock() {
    let at = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    let clock = Arc::new(ManualClock::at(at));
    let store = Arc::new(InMemoryEventStore::new());
    let sink = || Arc::new(EventStoreSink::new(store.clone()));
    let bare = CommandBus::builder()
        .handler(StampHandler)
        .clock(clock.clone())
        .event_sink(sink())
        .build()
        .unwrap();
    let layered = CommandBus::builder()
        .layer(TracingLayer::new())
        .clock(clock.clone())
        .handler(StampHandler)
        .event_sink(sink())
        .build()
        .unwrap();
    let queries = QueryBus::builder()
        .handler(WhenHandler)
        .clock(clock.clone())
        .build()
        .unwrap();
    run(async {
        for bus in [&bare, &layered] {
            assert_eq!(
                bus.dispatch(Stamp).await.unwrap(),
                at,
                "dispatch's metadata"
            );
            let stored = store.load("k", 0).await.unwrap();
            let last = stored.last().expect("dispatch stored its events");
            assert_eq!(
                last.metadata.occurred_at, at,
                "a dispatched command's event"
            );
            let later = at + chrono::Duration::hours(1);
            clock.set(later);
            let handed = Metadata::new();
            let executed = bus.execute(Stamp, handed.clone()).await.unwrap();
            assert_eq!(
                executed.output, handed.timestamp,
                "the caller's own timestamp"
            );
            for event in &executed.events {
                assert_eq!(event.metadata.timestamp, later, "a recorded event");
            }
            clock.set(at);
        }
        assert_eq!(queries.dispatch(When).await.unwrap(), at);
    });
    // Without a clock, the system's.
    let bus = CommandBus::builder().handler(StampHandler).build().unwrap();
    let stamped = run(bus.dispatch(Stamp)).unwrap();
    assert!((Utc::now() - stamped).num_seconds().abs() < 60, "{stamped}");
}

/// A `CommandTest` with a clock stamps the command's fresh metadata and the recorded events
/// with it, as a bus given the clock does; metadata given keeps its own timestamp.
#[test]
fn a_command_test_stamps_its_metadata_and_recorded_events_with_its_clock() {
    let at = Utc.with_ymd_and_hms(2021, 6, 1, 12, 0, 0).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at(at));
    let outcome = run(CommandTest::new(StampHandler)
        .with_clock(clock.clone())
        .when(Stamp));
    assert_eq!(outcome.events().len(), 2);
    for event in outcome.events() {
        assert_eq!(event.metadata.timestamp, at);
    }
    let stamped = outcome.then_expect_events([Added { sum: 1 }, Added { sum: 2 }]);
    assert_eq!(stamped, at, "the command's own metadata");
    let given = Metadata::new();
    let outcome = run(CommandTest::new(StampHandler)
        .with_clock(clock)
        .with_metadata(given.clone())
        .when(Stamp));
    assert_eq!(
        outcome.then_expect_events([Added { sum: 1 }, Added { sum: 2 }]),
        given.timestamp
    );
}
