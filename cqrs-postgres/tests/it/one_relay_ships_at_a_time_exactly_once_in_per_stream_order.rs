//! Two relays of one name run against concurrent writers: everything is shipped once, each
//! stream in order, in global order.

use crate::support::{pg_test, record};
use crate::transport::{ControlledTransport, receive};
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::runtime::Runtime;
use cqrs_postgres::PgOutboxRelay;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

pg_test! {
    async fn two_relays_and_four_writers_ship_each_event_once_in_order(db: PgDatabase) {
        let transport = Arc::new(ControlledTransport::default());
        let relay = |n: u32| {
            PgOutboxRelay::new(db.clone(), transport.clone())
                .relay_name("shared")
                .topic("tickets")
                .batch_size(7)
                .poll_interval(Duration::from_millis(50 * u64::from(n)))
        };
        let runtime = Runtime::builder().worker(relay(1)).worker(relay(2)).start();

        let writers: Vec<_> = (0..4)
            .map(|w| {
                let store = db.event_store();
                tokio::spawn(async move {
                    let stream = format!("writer-{w}");
                    let mut version = 0;
                    while version < 25 {
                        let batch = (1 + (version + w) % 3).min(25 - version);
                        let events = (0..batch).map(|i| record(version + i + 1)).collect();
                        store
                            .append(&stream, ExpectedVersion::Exactly(version), events)
                            .await
                            .expect("append");
                        version += batch;
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }

        let delivered = receive(transport.as_ref(), "tickets", "readers", 100).await;
        let unique: HashSet<_> = delivered.iter().map(|r| r.event_id).collect();
        assert_eq!(unique.len(), 100, "each event once: {} deliveries", delivered.len());
        let mut versions: HashMap<String, u64> = HashMap::new();
        for event in &delivered {
            let stream = event.stream_id.clone().unwrap();
            let previous = versions.insert(stream.clone(), event.stream_version.unwrap()).unwrap_or(0);
            assert_eq!(event.stream_version.unwrap(), previous + 1, "stream {stream} out of order");
        }
        runtime.shutdown(Duration::from_secs(5)).await.unwrap();
        let published = transport.published();
        assert_eq!(published.len(), 100, "nothing published twice");
        assert!(
            published.windows(2).all(|w| w[0].position < w[1].position),
            "published in global order"
        );
    }
}
