use crate::fixtures::*;
use cqrs_core::{CommandBus, EventBus, Metadata};
use std::sync::Arc;

#[test]
fn recorded_events_carry_the_command_correlation_and_causation() {
    let bus = CommandBus::builder().handler(AddHandler).build().unwrap();
    let command = Metadata::new();
    let executed = run(bus.execute(
        Add {
            a: 1,
            b: 1,
            record: true,
            ..Add::default()
        },
        command.clone(),
    ))
    .unwrap();
    assert_eq!(executed.output, 2);
    assert_eq!(executed.events.len(), 2);
    for event in &executed.events {
        assert_eq!(event.metadata.correlation_id, command.correlation_id);
        assert_eq!(event.metadata.causation_id, Some(command.message_id));
        assert_ne!(event.metadata.message_id, command.message_id);
        assert_eq!(event.partition_key(), Some("sums"));
    }
    let sums: Vec<u64> = executed
        .events
        .iter()
        .map(|e| e.downcast_ref::<Added>().unwrap().sum)
        .collect();
    assert_eq!(sums, [2, 3], "recorded order is kept");
    assert!(executed.events[0].metadata.message_id < executed.events[1].metadata.message_id);
}

/// A command bus whose recorded events go to an event bus with `counter` as its handler.
fn with_event_bus_sink(counter: &Counter) -> CommandBus {
    let events = EventBus::builder()
        .handler(counter.clone())
        .build()
        .unwrap();
    CommandBus::builder()
        .handler(AddHandler)
        .event_sink(Arc::new(events))
        .build()
        .unwrap()
}

#[test]
fn the_event_sink_gets_events_of_successful_commands_only() {
    let counter = Counter::named("counter");
    let bus = with_event_bus_sink(&counter);
    run(async {
        bus.dispatch(Add {
            record: true,
            fail: true,
            ..Add::default()
        })
        .await
        .unwrap_err();
        bus.dispatch(Add {
            record: true,
            panic: true,
            ..Add::default()
        })
        .await
        .unwrap_err();
        assert_eq!(counter.seen(), 0, "failed commands publish nothing");
        bus.dispatch(Add {
            record: true,
            ..Add::default()
        })
        .await
        .unwrap();
        assert_eq!(counter.seen(), 2);
    });
}

/// An event bus as the sink: a handler that fails on one of the command's events does not
/// fail the command (it has taken effect), the events after it are still published, and the
/// failure is counted by event type, so it does not pass unseen.
#[test]
fn a_failing_handler_behind_the_sink_is_counted_and_the_command_succeeds() {
    let counts = cqrs_core::testing::MetricCounts::default();
    metrics::with_local_recorder(&counts, || {
        let counter = Counter {
            fail_on: Some(2),
            ..Counter::named("counter")
        };
        let bus = with_event_bus_sink(&counter);
        run(async {
            let sum = bus
                .dispatch(Add {
                    a: 1,
                    b: 1,
                    record: true,
                    ..Add::default()
                })
                .await
                .unwrap();
            assert_eq!(sum, 2);
        });
        assert_eq!(
            counter.seen(),
            2,
            "the event after the failed one is published"
        );
        assert_eq!(
            counts.get("cqrs_event_sink_failures_total{event_type=test.added}"),
            1
        );
    });
}
