//! An inbox entry is dated when the event is processed, not when its unit began: a unit that
//! waited (for its consumer's lock, or on a slow event) before it marked an event does not
//! make the entry look older than it is, so `purge_inbox` keeps it for the whole retention.

use crate::support::pg_test;
use cqrs_core::ports::ProjectionStore;
use std::time::Duration;

pg_test! {
    async fn inbox_entries_are_dated_when_processed(db: PgDatabase) {
        let store = db.projection_store();
        let retention = Duration::from_secs(1);
        let id = uuid::Uuid::now_v7();
        let mut unit = store.begin("c").await.unwrap();
        // The unit is older than the retention when it processes the event; the wait is the
        // condition under test, not a guess at one.
        tokio::time::sleep(retention + Duration::from_millis(500)).await;
        assert!(store.mark_processed(&mut unit, "c", id).await.unwrap());
        store.commit(unit).await.unwrap();
        assert_eq!(
            store.purge_inbox("c", retention).await.unwrap(),
            0,
            "an entry processed just now was purged as older than {retention:?}"
        );
        let mut unit = store.begin("c").await.unwrap();
        assert!(
            !store.mark_processed(&mut unit, "c", id).await.unwrap(),
            "the entry is kept: the event is still a duplicate"
        );
        store.commit(unit).await.unwrap();
        assert_eq!(store.purge_inbox("c", Duration::ZERO).await.unwrap(), 1);
    }
}
