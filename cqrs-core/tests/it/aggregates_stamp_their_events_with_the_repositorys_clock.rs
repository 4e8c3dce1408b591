//! The repository's clock, not the system's, stamps the events `execute`, `decide` and
//! `decide_on` make.

use crate::aggregates_decide_on_their_history::Total;
use crate::fixtures::*;
use chrono::{TimeZone, Utc};
use cqrs_core::clock::{Clock, ManualClock};
use cqrs_core::memory::InMemoryEventStore;
use cqrs_core::ports::EventStore;
use cqrs_core::{AggregateRepository, Metadata};
use std::sync::Arc;
use std::time::Duration;

/// With a manual clock set to 2020, `execute` and `decide` record their events at 2020 (the
/// request's own metadata says today), and they follow the clock when it moves.
#[test]
fn execute_and_decide_stamp_events_with_the_injected_clock() {
    run(async {
        let at = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
        let clock = ManualClock::at(at);
        let store = Arc::new(InMemoryEventStore::new());
        let repo =
            AggregateRepository::<Total>::new(store.clone()).with_clock(Arc::new(clock.clone()));
        let request = Metadata::new();

        let committed = repo.execute("c", None, 1, &request).await.unwrap();
        assert_eq!(committed.records[0].metadata.occurred_at, at);
        let stored = store.load("total-c", 0).await.unwrap();
        assert_eq!(
            stored[0].metadata.occurred_at, at,
            "stored at the clock's time"
        );

        clock.advance(Duration::from_secs(60));
        let decided = repo.decide("c", None, 2, &request).await.unwrap();
        assert_eq!(decided.records[0].metadata.occurred_at, clock.now());
        assert_eq!(repo.now(), clock.now());

        // On an aggregate loaded first, too.
        clock.advance(Duration::from_secs(60));
        let loaded = repo.load("c").await.unwrap();
        let decided = repo.decide_on(loaded, None, 3, &request).unwrap();
        assert_eq!(decided.records[0].metadata.occurred_at, clock.now());
    });
}
