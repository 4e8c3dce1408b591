//! The projection store conformance suite (inbox and checkpoints). See [`ProjectionStore`]
//! for the contract.
//!
//! Run it with [`projection_store_conformance!`](crate::projection_store_conformance).

use super::Harness;
use crate::Position;
use crate::clock::ManualClock;
use crate::ports::ProjectionStore;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use uuid::Uuid;

/// What a projection store adapter provides to its conformance suite.
pub trait ProjectionStoreHarness: Harness {
    /// The store type.
    type Store: ProjectionStore;
    /// The store under test.
    fn store(&self) -> Arc<Self::Store>;

    /// The manual clock the store dates inbox entries by, when it takes one; without one, the
    /// purge scenario relies on the store's clock moving on between two statements.
    fn clock(&self) -> Option<ManualClock> {
        None
    }
}

/// Expands to one `#[tokio::test]` per projection store scenario.
#[macro_export]
macro_rules! projection_store_conformance {
    ($make:path) => {
        $crate::__conformance!(
            $make,
            projection_store,
            [
                a_message_is_processed_once_per_consumer,
                an_uncommitted_unit_leaves_no_trace,
                a_checkpoint_reads_back_what_was_committed,
                units_of_one_consumer_never_overlap,
                a_reset_forgets_the_inbox_and_the_checkpoint,
                a_purge_forgets_old_inbox_entries_of_one_consumer,
            ]
        );
    };
}

/// `mark_processed` is true the first time, false after that was committed; per consumer.
pub async fn a_message_is_processed_once_per_consumer<H: ProjectionStoreHarness>(h: &H) {
    let store = h.store();
    let (a, b) = (format!("{}-a", h.test_id()), format!("{}-b", h.test_id()));
    let id = Uuid::now_v7();
    let mut unit = store.begin(&a).await.unwrap();
    assert!(store.mark_processed(&mut unit, &a, id).await.unwrap());
    store.commit(unit).await.unwrap();
    let mut unit = store.begin(&a).await.unwrap();
    assert!(
        !store.mark_processed(&mut unit, &a, id).await.unwrap(),
        "{id} was processed already"
    );
    store.commit(unit).await.unwrap();
    let mut unit = store.begin(&b).await.unwrap();
    assert!(
        store.mark_processed(&mut unit, &b, id).await.unwrap(),
        "another consumer is independent"
    );
    store.commit(unit).await.unwrap();
}

/// Dropping a unit without committing discards its inbox entries and checkpoint.
pub async fn an_uncommitted_unit_leaves_no_trace<H: ProjectionStoreHarness>(h: &H) {
    let store = h.store();
    let c = h.test_id();
    let id = Uuid::now_v7();
    let mut unit = store.begin(c).await.unwrap();
    store.mark_processed(&mut unit, c, id).await.unwrap();
    store
        .save_checkpoint(&mut unit, c, Position::new(9))
        .await
        .unwrap();
    drop(unit);
    let mut unit = store.begin(c).await.unwrap();
    assert!(
        store.mark_processed(&mut unit, c, id).await.unwrap(),
        "the dropped unit's inbox entry is gone"
    );
    assert_eq!(store.checkpoint(&mut unit, c).await.unwrap(), None);
}

/// The checkpoint reads back as committed, and moves with later commits.
pub async fn a_checkpoint_reads_back_what_was_committed<H: ProjectionStoreHarness>(h: &H) {
    let store = h.store();
    let c = h.test_id();
    let mut unit = store.begin(c).await.unwrap();
    assert_eq!(store.checkpoint(&mut unit, c).await.unwrap(), None);
    store
        .save_checkpoint(&mut unit, c, Position::new(5))
        .await
        .unwrap();
    store.commit(unit).await.unwrap();
    let mut unit = store.begin(c).await.unwrap();
    assert_eq!(
        store.checkpoint(&mut unit, c).await.unwrap(),
        Some(Position::new(5))
    );
    store
        .save_checkpoint(&mut unit, c, Position::new(8))
        .await
        .unwrap();
    store.commit(unit).await.unwrap();
    let mut unit = store.begin(c).await.unwrap();
    assert_eq!(
        store.checkpoint(&mut unit, c).await.unwrap(),
        Some(Position::new(8))
    );
}

/// A second unit of a consumer waits until the first ends.
pub async fn units_of_one_consumer_never_overlap<H: ProjectionStoreHarness>(h: &H) {
    let store = h.store();
    let c = h.test_id().to_owned();
    let first = store.begin(&c).await.unwrap();
    let second_started = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (store, c, flag) = (store.clone(), c.clone(), second_started.clone());
        tokio::spawn(async move {
            let unit = store.begin(&c).await.unwrap();
            flag.store(true, Ordering::SeqCst);
            store.commit(unit).await.unwrap();
        })
    };
    // Give the second unit every chance to start early.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second_started.load(Ordering::SeqCst),
        "a second unit began while the first was open"
    );
    store.commit(first).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the second unit began")
        .unwrap();
    assert!(second_started.load(Ordering::SeqCst));
}

/// A committed reset forgets the consumer's inbox and checkpoint.
pub async fn a_reset_forgets_the_inbox_and_the_checkpoint<H: ProjectionStoreHarness>(h: &H) {
    let store = h.store();
    let c = h.test_id();
    let id = Uuid::now_v7();
    let mut unit = store.begin(c).await.unwrap();
    store.mark_processed(&mut unit, c, id).await.unwrap();
    store
        .save_checkpoint(&mut unit, c, Position::new(3))
        .await
        .unwrap();
    store.commit(unit).await.unwrap();
    let mut unit = store.begin(c).await.unwrap();
    store.reset(&mut unit, c).await.unwrap();
    store.commit(unit).await.unwrap();
    let mut unit = store.begin(c).await.unwrap();
    assert_eq!(store.checkpoint(&mut unit, c).await.unwrap(), None);
    assert!(store.mark_processed(&mut unit, c, id).await.unwrap());
}

/// `purge_inbox` deletes the consumer's entries older than the age it is given, and only
/// those: a purged message is processed again, a younger one and another consumer's are not.
pub async fn a_purge_forgets_old_inbox_entries_of_one_consumer<H: ProjectionStoreHarness>(h: &H) {
    let store = h.store();
    let (c, other) = (
        format!("{}-c", h.test_id()),
        format!("{}-other", h.test_id()),
    );
    let (old, young) = (Uuid::now_v7(), Uuid::now_v7());
    let hour = Duration::from_secs(3600);
    for consumer in [&c, &other] {
        let mut unit = store.begin(consumer).await.unwrap();
        assert!(
            store
                .mark_processed(&mut unit, consumer, old)
                .await
                .unwrap()
        );
        store.commit(unit).await.unwrap();
    }
    assert_eq!(
        store.purge_inbox(&c, hour).await.unwrap(),
        0,
        "nothing is an hour old yet"
    );
    assert_eq!(store.purge_inbox(&c, Duration::MAX).await.unwrap(), 0);

    let cutoff = match h.clock() {
        Some(clock) => {
            clock.advance(2 * hour);
            let mut unit = store.begin(&c).await.unwrap();
            assert!(store.mark_processed(&mut unit, &c, young).await.unwrap());
            store.commit(unit).await.unwrap();
            assert_eq!(
                store.purge_inbox(&c, hour).await.unwrap(),
                1,
                "only the old entry"
            );
            Some(young)
        }
        // The store's own clock: everything committed before is older than zero.
        None => {
            assert_eq!(store.purge_inbox(&c, Duration::ZERO).await.unwrap(), 1);
            None
        }
    };
    let mut unit = store.begin(&c).await.unwrap();
    assert!(
        store.mark_processed(&mut unit, &c, old).await.unwrap(),
        "a purged entry is forgotten"
    );
    if let Some(young) = cutoff {
        assert!(
            !store.mark_processed(&mut unit, &c, young).await.unwrap(),
            "a younger entry stays"
        );
    }
    drop(unit);
    let mut unit = store.begin(&other).await.unwrap();
    assert!(
        !store.mark_processed(&mut unit, &other, old).await.unwrap(),
        "another consumer's inbox is untouched"
    );
}
