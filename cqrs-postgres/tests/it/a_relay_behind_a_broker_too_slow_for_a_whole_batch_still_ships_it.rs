//! A relay whose broker cannot take a whole batch of one topic within the publish timeout
//! still ships everything: after a run that had the whole timeout and got nothing through, it
//! publishes runs half as long, so each batch gets part of its events out and commits them.
//! (Without that, every retry would publish the same run again, time out, and move nothing.)

use crate::support::{pg_test, record};
use crate::transport::ControlledTransport;
use cqrs_core::Position;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_postgres::PgOutboxRelay;
use std::time::Duration;

pg_test! {
    async fn a_relay_behind_a_broker_too_slow_for_a_whole_batch_still_ships_it(db: PgDatabase) {
        let store = db.event_store();
        store
            .append("s", ExpectedVersion::NO_STREAM, (1..=8).map(record).collect())
            .await
            .unwrap();
        let last = store.read_all(Position::START, 100).await.unwrap().last().unwrap().position.unwrap();
        // A batch of 8 takes 800 ms, over the 400 ms timeout; runs of 2 go through.
        let transport = ControlledTransport::slow_per_event(Duration::from_millis(100));
        let relay = PgOutboxRelay::new(db.clone(), transport.clone())
            .batch_size(8)
            .publish_timeout(Duration::from_millis(400));
        relay.ensure_checkpoint().await.unwrap();
        let mut batches = 0;
        while relay.checkpoint().await.unwrap() != last {
            batches += 1;
            assert!(
                batches <= 20,
                "20 batches shipped only {:?}",
                transport.published()
            );
            // A batch that ran out of time reports it; what went out is committed anyway.
            let _ = relay.relay_once().await;
        }
        let taken: Vec<u64> = transport
            .published()
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(taken, (1..=8).collect::<Vec<_>>(), "every event once, in order");
        let runs = transport.runs.lock().unwrap().clone();
        assert!(runs.iter().all(|&run| run < 8), "{runs:?}");
    }
}

pg_test! {
    /// The same when the broker's client times the publish out first (its command timeout,
    /// shorter than the relay's): the run was retried whole for ever.
    async fn a_relay_whose_broker_times_out_a_whole_batch_still_ships_it(db: PgDatabase) {
        let store = db.event_store();
        store
            .append("s", ExpectedVersion::NO_STREAM, (1..=8).map(record).collect())
            .await
            .unwrap();
        let last = store.read_all(Position::START, 100).await.unwrap().last().unwrap().position.unwrap();
        let transport = ControlledTransport::timing_out_above(2);
        let relay = PgOutboxRelay::new(db.clone(), transport.clone()).batch_size(8);
        relay.ensure_checkpoint().await.unwrap();
        let mut batches = 0;
        while relay.checkpoint().await.unwrap() != last {
            batches += 1;
            assert!(batches <= 20, "20 batches shipped only {:?}", transport.published());
            let _ = relay.relay_once().await;
        }
        let taken: Vec<u64> = transport
            .published()
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(taken, (1..=8).collect::<Vec<_>>(), "every event once, in order");
    }
}
