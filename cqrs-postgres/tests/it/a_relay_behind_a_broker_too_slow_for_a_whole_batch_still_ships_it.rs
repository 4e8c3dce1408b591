//! A relay whose broker cannot take a whole batch of one topic within the publish timeout
//! still ships everything: after a run that had the whole timeout and got nothing through, it
//! publishes runs half as long, so each batch gets part of its events out and commits them.
//! (Without that, every retry would publish the same run again, time out, and move nothing.)

use crate::support::{pg_test, record};
use async_trait::async_trait;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventStore, EventTransport, ExpectedVersion, TransportCapabilities,
    TransportError,
};
use cqrs_core::{EventRecord, Position};
use cqrs_postgres::PgOutboxRelay;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A broker that takes `per_event` for each event of a publish, and takes none of them when
/// the publish is given up before that.
struct Slow {
    inner: InMemoryTransport,
    per_event: Duration,
    /// Every publish that went through: its events, by `n`.
    taken: Mutex<Vec<Vec<u64>>>,
}

#[async_trait]
impl EventTransport for Slow {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        let count = u32::try_from(events.len()).unwrap();
        tokio::time::sleep(self.per_event * count).await;
        self.inner.publish(topic, events).await?;
        let taken = events.iter().map(|e| e.payload["n"].as_u64().unwrap());
        self.taken.lock().unwrap().push(taken.collect());
        Ok(())
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        self.inner.consumer(topic, group, options).await
    }
}

pg_test! {
    async fn a_relay_behind_a_broker_too_slow_for_a_whole_batch_still_ships_it(db: PgDatabase) {
        let store = db.event_store();
        store
            .append("s", ExpectedVersion::NO_STREAM, (1..=8).map(record).collect())
            .await
            .unwrap();
        let last = store.read_all(Position::START, 100).await.unwrap().last().unwrap().position.unwrap();
        // A batch of 8 takes 800 ms, over the 400 ms timeout; runs of 2 go through.
        let transport = Arc::new(Slow {
            inner: InMemoryTransport::new(),
            per_event: Duration::from_millis(100),
            taken: Mutex::default(),
        });
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
                transport.taken.lock().unwrap()
            );
            // A batch that ran out of time reports it; what went out is committed anyway.
            let _ = relay.relay_once().await;
        }
        let taken = transport.taken.lock().unwrap().clone();
        assert_eq!(
            taken.concat(),
            (1..=8).collect::<Vec<_>>(),
            "every event once, in order"
        );
        assert!(taken.iter().all(|run| run.len() < 8), "{taken:?}");
    }
}
