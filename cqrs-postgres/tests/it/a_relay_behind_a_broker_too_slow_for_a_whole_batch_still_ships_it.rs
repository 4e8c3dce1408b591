//! A relay whose broker cannot take a whole batch of one topic within the publish timeout
//! still ships everything: after a run that had the whole timeout and got nothing through, it
//! publishes runs half as long, so each batch gets part of its events out and commits them.
//! (Without that, every retry would publish the same run again, time out, and move nothing.)

use crate::support::{pg_test, record};
use crate::transport::ControlledTransport;
use cqrs_core::Position;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_postgres::{PgDatabase, PgOutboxRelay};
use std::time::Duration;

/// Appends events 1 to 8, has `relay` (a relay through `transport`, batches of 8) relay
/// until its checkpoint passes them, within 20 batches, and checks the broker took each once,
/// in order. A batch that ran out of time reports it; what went out is committed anyway.
async fn ships_all_eight(db: &PgDatabase, transport: &ControlledTransport, relay: &PgOutboxRelay) {
    let store = db.event_store();
    store
        .append(
            "s",
            ExpectedVersion::NO_STREAM,
            (1..=8).map(record).collect(),
        )
        .await
        .unwrap();
    let last = store
        .read_all(Position::START, 100)
        .await
        .unwrap()
        .last()
        .unwrap()
        .position
        .unwrap();
    relay.ensure_checkpoint().await.unwrap();
    let mut batches = 0;
    while relay.checkpoint().await.unwrap() != last {
        batches += 1;
        assert!(
            batches <= 20,
            "20 batches shipped only {:?}",
            transport.published()
        );
        let _ = relay.relay_once().await;
    }
    let taken: Vec<u64> = transport
        .published()
        .iter()
        .map(|e| e.payload["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        taken,
        (1..=8).collect::<Vec<_>>(),
        "every event once, in order"
    );
}

pg_test! {
    async fn a_relay_behind_a_broker_too_slow_for_a_whole_batch_still_ships_it(db: PgDatabase) {
        // A batch of 8 takes 800 ms, over the 400 ms timeout; runs of 2 go through.
        let transport = ControlledTransport::slow_per_event(Duration::from_millis(100));
        let relay = PgOutboxRelay::new(db.clone(), transport.clone())
            .batch_size(8)
            .publish_timeout(Duration::from_millis(400));
        ships_all_eight(&db, &transport, &relay).await;
        let runs = transport.runs.lock().unwrap().clone();
        assert!(runs.iter().all(|&run| run < 8), "{runs:?}");
    }
}

pg_test! {
    /// The same when the broker's client times the publish out first (its command timeout,
    /// shorter than the relay's): the run was retried whole for ever.
    async fn a_relay_whose_broker_times_out_a_whole_batch_still_ships_it(db: PgDatabase) {
        let transport = ControlledTransport::timing_out_above(2);
        let relay = PgOutboxRelay::new(db.clone(), transport.clone()).batch_size(8);
        ships_all_eight(&db, &transport, &relay).await;
    }
}
