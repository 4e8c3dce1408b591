//! A consumer waiting in `fetch` sleeps until something can be handed out. A deferred delivery
//! queued behind its key's nacked one is due first but cannot go out before it; it must not
//! make the consumer spin.

use crate::fixtures::run_paused;
use cqrs_core::EventRecord;
use cqrs_core::memory::{InMemoryTransport, MIN_REDELIVERY_DELAY};
use cqrs_core::ports::{ConsumerOptions, EventTransport};
use cqrs_core::testing::event_store::record;
use std::time::Duration;

fn keyed(n: u64) -> EventRecord {
    record(n).with_partition_key(Some("k".to_owned()))
}

#[test]
fn a_deferred_delivery_behind_its_key_does_not_make_fetch_spin() {
    // On a paused clock, time moves only while the runtime is idle: a fetch that spins on a
    // timer already due never lets it move, never returns, and `run_paused` fails.
    run_paused(|| async {
        let transport = InMemoryTransport::new();
        transport.publish("t", &[keyed(1), keyed(2)]).await.unwrap();
        let options = ConsumerOptions::default()
            .block(Duration::from_secs(5))
            .redelivery_delay(Duration::from_millis(100));
        let mut consumer = transport.consumer("t", "g", options).await.unwrap();
        let batch = consumer.fetch(10).await.unwrap();
        assert_eq!(batch.len(), 2, "a chain of one key");
        // As a projection runner does when the first one fails.
        consumer.nack(&batch[0].id).await.unwrap();
        consumer.defer(&[batch[1].id.clone()]).await.unwrap();
        let again = consumer.fetch(10).await.unwrap();
        assert_eq!(
            again.len(),
            1,
            "only the first of the key is handed out again"
        );
        assert_eq!(again[0].attempt, 2);
        // The deferred one is past due but waits behind it; nothing else can go out
        // before the first is due again.
        let started = tokio::time::Instant::now();
        let third = consumer.fetch(10).await.unwrap();
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].attempt, 3);
        assert!(started.elapsed() >= Duration::from_millis(100));
    });
}

/// A redelivery delay under `MIN_REDELIVERY_DELAY` is refused, saying why: a zero one handed a
/// delivery to the next fetch while its handler ran. At the minimum, the keep-alive interval is
/// above zero and below the delay, as the port promises.
#[test]
fn a_redelivery_delay_under_the_minimum_is_refused() {
    crate::fixtures::run(async {
        let transport = InMemoryTransport::new();
        for delay in [Duration::ZERO, Duration::from_micros(1_999)] {
            let options = ConsumerOptions::default().redelivery_delay(delay);
            let Err(err) = transport.consumer("t", "g", options).await else {
                panic!("a redelivery delay of {delay:?} was taken");
            };
            assert!(
                matches!(err, cqrs_core::ports::TransportError::Invalid(_))
                    && err
                        .to_string()
                        .contains("below the 2ms the in-memory transport needs"),
                "{err}"
            );
        }
        let options = ConsumerOptions::default().redelivery_delay(MIN_REDELIVERY_DELAY);
        let consumer = transport.consumer("t", "g", options).await.unwrap();
        let interval = consumer.keep_alive_interval().unwrap();
        assert!(
            !interval.is_zero() && interval < MIN_REDELIVERY_DELAY,
            "{interval:?}"
        );
    });
}
