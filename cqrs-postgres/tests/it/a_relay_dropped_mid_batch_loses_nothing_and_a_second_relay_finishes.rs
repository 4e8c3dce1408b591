//! A relay that dies after the broker took a batch and before its checkpoint moved loses
//! nothing: a second relay (standing by while the first held the checkpoint) ships that batch
//! again and the rest, in per-stream order, and the inbox absorbs the duplicates.

use crate::support::{pg_test, record};
use crate::transport::{ControlledTransport, receive};
use cqrs_core::Position;
use cqrs_core::ports::{EventStore, ExpectedVersion, ProjectionStore};
use cqrs_core::testing::eventually;
use cqrs_postgres::{PgOutboxRelay, RelayBatch};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pg_test! {
    async fn the_second_relay_reships_the_unacknowledged_batch_and_finishes(db: PgDatabase) {
        let store = db.event_store();
        let mut appended = Vec::new();
        for version in 0..10u64 {
            for stream in ["s0", "s1", "s2"] {
                let stored = store
                    .append(stream, ExpectedVersion::Exactly(version), vec![record(version + 1)])
                    .await
                    .unwrap();
                appended.extend(stored);
            }
        }
        let ids: HashSet<_> = appended.iter().map(|r| r.event_id).collect();

        // The first relay's second publish reaches the broker and never returns.
        let transport = ControlledTransport::hanging_on_call(2);
        let first = Arc::new(PgOutboxRelay::new(db.clone(), transport.clone()).batch_size(10));
        first.ensure_checkpoint().await.unwrap();
        let dying = {
            let first = first.clone();
            tokio::spawn(async move {
                loop {
                    first.relay_once().await.expect("a batch");
                }
            })
        };
        eventually(Duration::from_secs(10), "the first relay hangs in its second publish", || async {
            (transport.calls.load(Ordering::SeqCst) >= 2).then_some(())
        })
        .await;
        let second = PgOutboxRelay::new(db.clone(), transport.clone()).batch_size(10);
        assert_eq!(
            second.relay_once().await.unwrap(),
            RelayBatch::Standby,
            "the first relay holds the checkpoint while it works"
        );
        assert_eq!(
            second.checkpoint().await.unwrap(),
            appended[9].position.unwrap(),
            "only the first batch is acknowledged"
        );

        dying.abort();
        let _ = dying.await;

        // Its transaction rolls back as the connection goes back to the pool; then the second
        // relay takes over from the checkpoint.
        eventually(Duration::from_secs(10), "the second relay ships everything", || async {
            let _ = second.relay_once().await.expect("a batch");
            (second.backlog().await.unwrap().unpublished == 0).then_some(())
        })
        .await;
        assert_eq!(second.checkpoint().await.unwrap(), appended[29].position.unwrap());

        // 10 + 10 from the first relay, the second batch again and the third from the second.
        let delivered = receive(&transport.inner, "events", "readers", 40).await;
        let delivered_ids: HashSet<_> = delivered.iter().map(|r| r.event_id).collect();
        let missing: Vec<_> = ids.difference(&delivered_ids).collect();
        assert!(missing.is_empty(), "events never shipped: {missing:?}");

        // Published in global order: the first relay's batches, then from its checkpoint on.
        let published: Vec<Position> =
            transport.published().iter().map(|r| r.position.unwrap()).collect();
        let resumed_at = published.windows(2).position(|w| w[0] >= w[1]).expect("a re-shipped batch") + 1;
        assert_eq!(resumed_at, 20, "the second relay starts over at the unacknowledged batch");
        assert!(published[..20].windows(2).all(|w| w[0] < w[1]));
        assert!(published[20..].windows(2).all(|w| w[0] < w[1]));
        assert_eq!(published[20], published[10]);

        // Per-stream order, and the inbox takes each event once.
        let inbox = db.projection_store();
        let mut unit = inbox.begin("reader").await.unwrap();
        let (mut fresh, mut duplicates) = (0, 0);
        let mut last_version: HashMap<String, u64> = HashMap::new();
        for event in &delivered {
            if inbox.mark_processed(&mut unit, "reader", event.event_id).await.unwrap() {
                fresh += 1;
                let stream = event.stream_id.clone().unwrap();
                let version = event.stream_version.unwrap();
                let previous = last_version.insert(stream.clone(), version).unwrap_or(0);
                assert_eq!(version, previous + 1, "stream {stream} out of order");
                assert_eq!(event.partition_key.as_deref(), Some(stream.as_str()));
            } else {
                duplicates += 1;
            }
        }
        inbox.commit(unit).await.unwrap();
        assert_eq!((fresh, duplicates), (30, 10));
    }
}
