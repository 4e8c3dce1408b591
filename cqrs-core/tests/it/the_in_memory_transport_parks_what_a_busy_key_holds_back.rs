//! Messages held back because a message of their key is in flight are parked under their key:
//! once the key is free they go out before anything younger, in log order across keys, and
//! after a nacked predecessor's redelivery, never before it.

use crate::fixtures::run_paused;
use cqrs_core::EventRecord;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{ConsumerOptions, Delivery, EventTransport};
use cqrs_core::testing::event_store::record;
use std::time::Duration;

fn keyed(key: &str, n: u64) -> EventRecord {
    record(n).with_partition_key(Some(key.to_owned()))
}

fn numbers(batch: &[Delivery]) -> Vec<u64> {
    batch
        .iter()
        .map(|d| d.record.payload["n"].as_u64().expect("a numbered record"))
        .collect()
}

#[test]
fn parked_messages_go_out_in_log_order_once_their_keys_are_free() {
    run_paused(|| async {
        let transport = InMemoryTransport::new();
        let options = ConsumerOptions::default().block(Duration::ZERO);
        let mut consumer = transport.consumer("t", "g", options).await.unwrap();
        transport
            .publish("t", &[keyed("a", 0), keyed("b", 10)])
            .await
            .unwrap();
        let first = consumer.fetch(2).await.unwrap();
        assert_eq!(numbers(&first), [0, 10]);
        transport
            .publish(
                "t",
                &[keyed("a", 1), keyed("b", 11), keyed("a", 2), keyed("b", 12)],
            )
            .await
            .unwrap();
        assert!(
            consumer.fetch(2).await.unwrap().is_empty(),
            "both keys are busy: everything is held back (and parked)"
        );
        assert_eq!(
            transport.backlog("t", "g"),
            6,
            "parked messages are in the backlog"
        );
        let ids: Vec<_> = first.iter().map(|d| d.id.clone()).collect();
        consumer.ack(&ids).await.unwrap();
        // As they were published, across the two keys: not a whole chain of one key first.
        let next = consumer.fetch(2).await.unwrap();
        assert_eq!(numbers(&next), [1, 11]);
        let ids: Vec<_> = next.iter().map(|d| d.id.clone()).collect();
        consumer.ack(&ids).await.unwrap();
        transport.publish("t", &[keyed("c", 20)]).await.unwrap();
        let rest = consumer.fetch(10).await.unwrap();
        assert_eq!(
            numbers(&rest),
            [2, 12, 20],
            "the parked ones before the newer one"
        );
    });
}

#[test]
fn a_parked_message_waits_for_its_nacked_predecessors_redelivery() {
    run_paused(|| async {
        let transport = InMemoryTransport::new();
        let options = ConsumerOptions::default()
            .block(Duration::from_secs(5))
            .redelivery_delay(Duration::from_millis(100));
        let mut consumer = transport.consumer("t", "g", options).await.unwrap();
        transport.publish("t", &[keyed("a", 0)]).await.unwrap();
        let first = consumer.fetch(10).await.unwrap();
        assert_eq!(numbers(&first), [0]);
        transport
            .publish("t", &[keyed("a", 1), keyed("b", 10)])
            .await
            .unwrap();
        // "a" is busy: 1 is parked, 10 goes out.
        let other = consumer.fetch(10).await.unwrap();
        assert_eq!(numbers(&other), [10]);
        consumer.ack(&[other[0].id.clone()]).await.unwrap();
        consumer.nack(&first[0].id).await.unwrap();
        // After the delay, 0 again, alone: 1 still waits behind it.
        let again = consumer.fetch(10).await.unwrap();
        assert_eq!(numbers(&again), [0]);
        assert_eq!(again[0].attempt, 2);
        consumer.ack(&[again[0].id.clone()]).await.unwrap();
        let after = consumer.fetch(10).await.unwrap();
        assert_eq!(numbers(&after), [1]);
    });
}
