//! A handler that fails, panics or is cancelled leaves no rows, no events and nothing for the
//! relay; one that succeeds commits its row and its event together. Only the hanging
//! dispatch runs under a timeout (its cancellation): the others must not be cut short by a
//! loaded machine.

use crate::support::tickets::{self, OpenTicket, OpenTicketHandler, Then};
use crate::support::{event_count, pg_test};
use cqrs_core::middleware::TimeoutLayer;
use cqrs_core::ports::EventStore;
use cqrs_core::{CommandBus, DispatchError, ErrorKind};
use cqrs_postgres::{PgDatabase, PgOutboxRelay};
use std::sync::Arc;
use std::time::Duration;

/// A bus over `db`, that cancels each dispatch after `timeout` when one is given.
fn bus(db: &PgDatabase, timeout: Option<Duration>) -> CommandBus {
    let builder = CommandBus::builder().handler(OpenTicketHandler::default());
    match timeout {
        Some(timeout) => builder
            .layer(TimeoutLayer::new(timeout))
            .layer(db.command_layer())
            .build(),
        None => builder.layer(db.command_layer()).build(),
    }
    .expect("build the bus")
}

pg_test! {
    async fn failing_panicking_and_cancelled_handlers_write_nothing(db: PgDatabase) {
        tickets::create_table(&db).await;
        // Only the hanging handler needs the timeout; under load it could cut the others short.
        let timed = bus(&db, Some(Duration::from_millis(500)));
        let bus = bus(&db, None);

        let failed = bus.dispatch(OpenTicket::new("t1", Then::Fail)).await.unwrap_err();
        assert_eq!(failed.kind(), ErrorKind::Invalid, "{failed}");

        let panicked = bus.dispatch(OpenTicket::new("t2", Then::Panic)).await.unwrap_err();
        assert!(matches!(panicked, DispatchError::Panicked { .. }), "{panicked}");

        let cancelled = timed.dispatch(OpenTicket::new("t3", Then::Hang)).await.unwrap_err();
        assert!(matches!(cancelled, DispatchError::Timeout { .. }), "{cancelled}");

        // Rolled-back transactions leave nothing, and block nothing: the same ids work now.
        assert_eq!(tickets::count(&db).await, 0, "no ticket rows");
        assert_eq!(event_count(&db).await, 0, "no events in the store (the outbox)");
        let relay = PgOutboxRelay::new(db.clone(), Arc::new(cqrs_core::memory::InMemoryTransport::new()));
        relay.ensure_checkpoint().await.unwrap();
        assert_eq!(relay.backlog().await.unwrap().unpublished, 0, "nothing to publish");

        for id in ["t1", "t2", "t3"] {
            assert_eq!(bus.dispatch(OpenTicket::new(id, Then::Succeed)).await.unwrap(), id);
        }
        assert_eq!(tickets::count(&db).await, 3);
        assert_eq!(event_count(&db).await, 3);
        let stored = db.event_store().load("t2", 0).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].event_type, "TicketOpened");
        assert_eq!(stored[0].payload["id"], "t2");
        assert_eq!(stored[0].partition_key.as_deref(), Some("t2"));
        assert_eq!(relay.backlog().await.unwrap().unpublished, 3);
    }
}
