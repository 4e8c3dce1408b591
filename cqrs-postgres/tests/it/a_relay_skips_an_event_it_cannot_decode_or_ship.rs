//! One event the relay cannot decode (a row written around the append function), that the
//! transport refuses for good, or whose topic no transport takes does not stop it: it is
//! logged, counted and passed, and every other event is shipped in order. It stays in the
//! event store. A fixed topic no transport takes refuses every event alike: a configuration
//! error, and nothing is skipped.

use crate::support::{pg_test, record};
use crate::transport::receive;
use async_trait::async_trait;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventStore, EventTransport, ExpectedVersion, TransportCapabilities,
    TransportError,
};
use cqrs_core::testing::MetricCounts;
use cqrs_core::{EventRecord, Position};
use cqrs_postgres::{PgOutboxRelay, RelayBatch};
use sqlx::AssertSqlSafe;
use std::sync::Arc;

/// A transport that refuses for good every batch holding the event `{"n": refuse}`.
struct Refusing {
    inner: InMemoryTransport,
    refuse: u64,
}

#[async_trait]
impl EventTransport for Refusing {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        if events
            .iter()
            .any(|e| e.payload["n"].as_u64() == Some(self.refuse))
        {
            return Err(TransportError::Codec("this event cannot be encoded".into()));
        }
        self.inner.publish(topic, events).await
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

/// The last stored position, read around the store (which cannot decode a bad row).
async fn last_position(db: &cqrs_postgres::PgDatabase) -> Position {
    let last = format!("SELECT max(position) FROM \"{}\".events", db.schema());
    let last: i64 = sqlx::query_scalar(AssertSqlSafe(last))
        .fetch_one(db.pool())
        .await
        .unwrap();
    Position::new(last.try_into().unwrap())
}

pg_test! {
    async fn a_row_that_cannot_be_decoded_is_skipped_and_the_rest_shipped_in_order(db: PgDatabase) {
        let store = db.event_store();
        store.append("s", ExpectedVersion::NO_STREAM, vec![record(1)]).await.unwrap();
        // Written around the append function, without the metadata an event needs.
        let insert = format!(
            "INSERT INTO \"{}\".events (stream_id, stream_version, event_id, event_type, \
             schema_version, payload, metadata) \
             VALUES ('manual', 1, gen_random_uuid(), 'Noted', 1, '{{\"n\": 2}}', '{{}}')",
            db.schema()
        );
        sqlx::query(AssertSqlSafe(insert)).execute(db.pool()).await.unwrap();
        store.append("s", ExpectedVersion::Exactly(1), vec![record(3)]).await.unwrap();
        // A page holding the row fails, naming it.
        let error = store.read_all(Position::START, 10).await.unwrap_err();
        let bad = store.read_all(Position::START, 1).await.unwrap()[0].position.unwrap().get() + 1;
        assert!(error.to_string().contains(&format!("the event at position {bad} ")), "{error}");
        let last = last_position(&db).await;

        let transport = Arc::new(InMemoryTransport::new());
        let relay = PgOutboxRelay::new(db.clone(), transport.clone());
        relay.ensure_checkpoint().await.unwrap();
        let counts = MetricCounts::default();
        let batch = {
            // The body runs on the test's own thread: the local recorder sees the relay's counts.
            let _recorder = metrics::set_default_local_recorder(&counts);
            relay.relay_once().await
        };
        assert_eq!(batch.expect("the bad row does not fail the batch"), RelayBatch::Shipped(3));
        assert_eq!(relay.checkpoint().await.unwrap(), last, "the checkpoint passed the bad row");
        assert_eq!(relay.backlog().await.unwrap().unpublished, 0);
        let shipped: Vec<u64> = receive(transport.as_ref(), "events", "readers", 2)
            .await
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(shipped, [1, 3]);
        assert_eq!(counts.get("cqrs_outbox_skipped_total{relay=default,reason=undecodable}"), 1);
        assert_eq!(counts.get("cqrs_outbox_published_total{relay=default}"), 2);

        // The core's `StoreRelay`, which reads through the port, ships the event before the
        // row and stops at it, naming it (it shipped none of the page).
        let store_relay = cqrs_core::relay::StoreRelay::new(
            "store-relay",
            Arc::new(db.event_store()),
            Arc::new(db.projection_store()),
            transport.clone(),
            "store-relay-out",
        );
        assert_eq!(store_relay.relay_once().await.unwrap(), 1, "the event before the row");
        let stopped = store_relay.relay_once().await.unwrap_err();
        assert!(stopped.to_string().contains(&format!("the event at position {bad} ")), "{stopped}");
        let shipped: Vec<u64> = receive(transport.as_ref(), "store-relay-out", "readers", 1)
            .await
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(shipped, [1]);
    }
}

pg_test! {
    async fn an_event_the_transport_refuses_for_good_is_skipped_and_the_rest_shipped_in_order(db: PgDatabase) {
        db.event_store()
            .append("s", ExpectedVersion::NO_STREAM, (1..=5).map(record).collect())
            .await
            .unwrap();
        let last = last_position(&db).await;
        let transport = Arc::new(Refusing { inner: InMemoryTransport::new(), refuse: 3 });
        // Two topics: the refused event sits in a run of its own topic, between others.
        let relay = PgOutboxRelay::new(db.clone(), transport.clone())
            .topic_for(|e| if e.payload["n"].as_u64().unwrap() <= 4 { "low".into() } else { "high".into() });
        relay.ensure_checkpoint().await.unwrap();
        let counts = MetricCounts::default();
        let batch = {
            let _recorder = metrics::set_default_local_recorder(&counts);
            relay.relay_once().await
        };
        assert_eq!(batch.expect("the refusal does not fail the batch"), RelayBatch::Shipped(5));
        assert_eq!(relay.checkpoint().await.unwrap(), last);
        let low: Vec<u64> = receive(&transport.inner, "low", "readers", 3)
            .await
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(low, [1, 2, 4]);
        let high = receive(&transport.inner, "high", "readers", 1).await;
        assert_eq!(high[0].payload["n"], 5);
        assert_eq!(counts.get("cqrs_outbox_skipped_total{relay=default,reason=refused}"), 1);
        assert_eq!(counts.get("cqrs_outbox_published_total{relay=default}"), 4);
    }
}

pg_test! {
    /// The topic comes from the stream id, which a client chose: one with a brace is no
    /// topic the transports take (the Redis transport's hash tag).
    async fn an_event_whose_topic_is_invalid_is_skipped_and_the_rest_shipped(db: PgDatabase) {
        let store = db.event_store();
        for (n, stream) in [(1, "a"), (2, "b{x}"), (3, "a")] {
            let version = if n == 3 { ExpectedVersion::Exactly(1) } else { ExpectedVersion::NO_STREAM };
            store.append(stream, version, vec![record(n)]).await.unwrap();
        }
        let last = last_position(&db).await;
        let transport = Arc::new(InMemoryTransport::new());
        let relay = PgOutboxRelay::new(db.clone(), transport.clone())
            .topic_for(|e| e.stream_id.clone().unwrap_or_default());
        relay.ensure_checkpoint().await.unwrap();
        let counts = MetricCounts::default();
        let batch = {
            let _recorder = metrics::set_default_local_recorder(&counts);
            relay.relay_once().await
        };
        assert_eq!(batch.expect("the topic does not fail the batch"), RelayBatch::Shipped(3));
        assert_eq!(relay.checkpoint().await.unwrap(), last);
        let shipped: Vec<u64> = receive(transport.as_ref(), "a", "readers", 2)
            .await
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(shipped, [1, 3]);
        assert_eq!(counts.get("cqrs_outbox_skipped_total{relay=default,reason=invalid_topic}"), 1);
        assert_eq!(counts.get("cqrs_outbox_published_total{relay=default}"), 2);
    }
}

pg_test! {
    async fn a_fixed_topic_no_transport_takes_fails_the_batch_and_skips_nothing(db: PgDatabase) {
        db.event_store()
            .append("s", ExpectedVersion::NO_STREAM, (1..=2).map(record).collect())
            .await
            .unwrap();
        let relay = PgOutboxRelay::new(db.clone(), Arc::new(InMemoryTransport::new())).topic("a{b}");
        relay.ensure_checkpoint().await.unwrap();
        let error = relay.relay_once().await.expect_err("a configuration error");
        assert!(matches!(error, cqrs_postgres::RelayError::Settings { .. }), "{error:?}");
        assert!(error.to_string().contains("topic `a{b}`"), "{error}");
        assert_eq!(relay.checkpoint().await.unwrap(), Position::START, "nothing skipped");
    }
}

pg_test! {
    async fn a_column_this_build_cannot_read_fails_the_batch_instead_of_skipping_every_row(db: PgDatabase) {
        let store = db.event_store();
        store.append("s", ExpectedVersion::NO_STREAM, vec![record(1), record(2)]).await.unwrap();
        // A newer migration changed a column's type: every row fails to decode alike (sqlx:
        // "mismatched types"), which says nothing about any one event.
        let widen = format!(
            "ALTER TABLE \"{}\".events ALTER COLUMN schema_version TYPE bigint",
            db.schema()
        );
        sqlx::query(AssertSqlSafe(widen)).execute(db.pool()).await.unwrap();

        let transport = Arc::new(InMemoryTransport::new());
        let relay = PgOutboxRelay::new(db.clone(), transport.clone());
        relay.ensure_checkpoint().await.unwrap();
        let counts = MetricCounts::default();
        let batch = {
            let _recorder = metrics::set_default_local_recorder(&counts);
            relay.relay_once().await
        };
        let error = batch.expect_err("the batch fails: nothing is skipped");
        assert!(error.to_string().contains("mismatched types"), "{error}");
        assert_eq!(relay.checkpoint().await.unwrap(), Position::START, "the checkpoint stays");
        assert_eq!(relay.backlog().await.unwrap().unpublished, 2);
        assert_eq!(counts.get("cqrs_outbox_skipped_total{relay=default,reason=undecodable}"), 0);

        // A build that reads the column (here: the column back as it was) ships them all.
        let restore = format!(
            "ALTER TABLE \"{}\".events ALTER COLUMN schema_version TYPE integer",
            db.schema()
        );
        sqlx::query(AssertSqlSafe(restore)).execute(db.pool()).await.unwrap();
        // A new pool, as a new build has: the old one's prepared statements expect a bigint.
        let fresh = crate::support::options(db.schema()).connect().await.unwrap();
        let relay = PgOutboxRelay::new(fresh, transport.clone());
        assert_eq!(relay.relay_once().await.unwrap(), RelayBatch::Shipped(2));
        let shipped: Vec<u64> = receive(transport.as_ref(), "events", "readers", 2)
            .await
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(shipped, [1, 2]);
    }
}

pg_test! {
    /// A negative schema version (a row changed around the append functions) is a row that
    /// cannot be decoded, not version 0: read as 0, the event would be upcast from the wrong
    /// version.
    async fn a_negative_schema_version_cannot_be_decoded(db: PgDatabase) {
        let store = db.event_store();
        store.append("s", ExpectedVersion::NO_STREAM, vec![record(1)]).await.unwrap();
        let update = format!("UPDATE \"{}\".events SET schema_version = -1", db.schema());
        sqlx::query(AssertSqlSafe(update)).execute(db.pool()).await.unwrap();
        let error = store.load("s", 0).await.unwrap_err();
        assert!(
            matches!(error, cqrs_core::ports::StoreError::Codec(_)),
            "{error:?}"
        );
        assert!(error.to_string().contains("-1"), "{error}");
    }
}
