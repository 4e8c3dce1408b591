//! An outbox relay into an `EventBusTransport` hands the store's events to the bus's handlers
//! in order, never hands one on twice around a failing event, and moves its checkpoint past
//! an event the handlers failed on `max_attempts` times, which it logs and counts as refused.

use crate::support::{pg_test, record};
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::projection::EventBusTransport;
use cqrs_core::testing::MetricCounts;
use cqrs_core::{Event, EventBus, EventContext, EventHandler, HandlerError, Message, async_trait};
use cqrs_postgres::{PgOutboxRelay, RelayBatch};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// The support module's `record(n)`, typed.
#[derive(Debug, Serialize, Deserialize)]
struct Noted {
    n: u64,
}

impl Message for Noted {
    const NAME: &'static str = "Noted";
}

impl Event for Noted {}

/// Records every call, and fails every time on `fails`.
#[derive(Clone, Default)]
struct Calls {
    calls: Arc<Mutex<Vec<u64>>>,
    fails: u64,
}

#[async_trait]
impl EventHandler<Noted> for Calls {
    async fn handle(&self, event: &Noted, _: EventContext<'_>) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push(event.n);
        if event.n == self.fails {
            return Err(HandlerError::invalid(
                "refused",
                format!("refuses {}", event.n),
            ));
        }
        Ok(())
    }
}

pg_test! {
    async fn an_event_the_handlers_keep_failing_on_is_given_up_and_the_rest_handed_on_once(db: PgDatabase) {
        let store = db.event_store();
        let records = (1..=4).map(record).collect();
        store.append("s", ExpectedVersion::NO_STREAM, records).await.unwrap();
        let calls = Calls { fails: 2, ..Calls::default() };
        let bus = EventBus::builder().handler(calls.clone()).build().unwrap();
        let relay = PgOutboxRelay::new(db.clone(), Arc::new(EventBusTransport::new(bus).max_attempts(3)))
            .relay_name("event-bus")
            .topic("event-bus");
        relay.ensure_checkpoint().await.unwrap();

        let counts = MetricCounts::default();
        let _recorder = metrics::set_default_local_recorder(&counts);
        let mut shipped = 0;
        for _ in 0..10 {
            match relay.relay_once().await {
                Ok(RelayBatch::Shipped(0)) => break,
                Ok(RelayBatch::Shipped(n)) => shipped += n,
                Ok(other) => panic!("no other relay runs: {other:?}"),
                Err(_) => {}
            }
        }
        assert_eq!(shipped, 4, "moved past all four, the given-up one too");
        assert_eq!(*calls.calls.lock().unwrap(), vec![1, 2, 2, 2, 3, 4]);
        assert_eq!(counts.get("cqrs_event_bus_given_up_total{event_type=Noted}"), 1);
        assert_eq!(
            counts.get("cqrs_outbox_skipped_total{relay=event-bus,reason=refused}"),
            1
        );
    }
}
