//! A consumer holding a projection unit reads the global order on the unit's connection
//! (`PgEventStore::read_all_in`), so as many units as the pool has connections all make
//! progress instead of each waiting for a second connection.

use crate::support::{options, pg_test, record};
use cqrs_core::Position;
use cqrs_core::ports::{EventStore, ExpectedVersion, ProjectionStore};
use std::time::Duration;

pg_test! {
    async fn two_projection_units_on_a_pool_of_two_read_on_their_own_connections(db: PgDatabase) {
        db.event_store()
            .append("s", ExpectedVersion::Any, vec![record(1), record(2)])
            .await
            .unwrap();
        let small = options(db.schema())
            .max_connections(2)
            // Roomy (it covers opening the connections too): a read that waited for a third
            // connection would wait for ever, and still time out.
            .acquire_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        let (store, events) = (small.projection_store(), small.event_store());
        // Both units hold their connection: the pool has none left.
        let mut units = Vec::new();
        for consumer in ["one", "two"] {
            units.push((consumer, store.begin(consumer).await.unwrap()));
        }
        for (consumer, mut unit) in units {
            let after = store.checkpoint(&mut unit, consumer).await.unwrap().unwrap_or(Position::START);
            let read = events
                .read_all_in(unit.connection(), after, 10)
                .await
                .expect("read on the unit's connection");
            assert_eq!(read.len(), 2);
            let last = read.last().and_then(|e| e.position).unwrap();
            store.save_checkpoint(&mut unit, consumer, last).await.unwrap();
            store.commit(unit).await.unwrap();
        }
        small.pool().close().await;
    }
}
