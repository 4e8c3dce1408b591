//! A relay retries a failing transport with backoff, degraded meanwhile, and ships everything
//! once it recovers; when it keeps failing, the relay gives up after its attempts (the runtime
//! restarts it) and nothing is lost.

use crate::support::{pg_test, record};
use crate::transport::{ControlledTransport, receive};
use cqrs_core::Position;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::runtime::{Health, HealthReporter, Shutdown, Worker, WorkerContext};
use cqrs_core::testing::{MetricCounts, eventually};
use cqrs_postgres::PgOutboxRelay;
use std::sync::atomic::Ordering;
use std::time::Duration;

pg_test! {
    async fn a_transport_that_recovers_gets_every_event_once(db: PgDatabase) {
        db.event_store()
            .append("s", ExpectedVersion::NO_STREAM, (1..=5).map(record).collect())
            .await
            .unwrap();
        let transport = ControlledTransport::failing_first(3);
        let mut relay = PgOutboxRelay::new(db.clone(), transport.clone())
            .backoff(Duration::from_millis(10), Duration::from_millis(40))
            .poll_interval(Duration::from_millis(50));
        let (trigger, shutdown) = Shutdown::new();
        let health = HealthReporter::detached("relay");
        let ctx = WorkerContext::new(shutdown, health.clone());
        let worker = tokio::spawn(async move { relay.run(ctx).await });

        let delivered = receive(&transport.inner, "events", "readers", 5).await;
        assert_eq!(delivered.len(), 5);
        assert_eq!(transport.failures.load(Ordering::SeqCst), 3);
        eventually(Duration::from_secs(5), "healthy again", || async {
            (health.get() == Health::Healthy).then_some(())
        })
        .await;
        trigger.trigger();
        worker.await.unwrap().expect("a clean stop");
        assert_eq!(transport.inner.backlog("events", "readers"), 0, "shipped once");
    }
}

pg_test! {
    async fn a_transport_that_stays_down_exhausts_the_attempts_and_loses_nothing(db: PgDatabase) {
        db.event_store()
            .append("s", ExpectedVersion::NO_STREAM, (1..=5).map(record).collect())
            .await
            .unwrap();
        let transport = ControlledTransport::failing_first(usize::MAX);
        let mut relay = PgOutboxRelay::new(db.clone(), transport.clone())
            .backoff(Duration::from_millis(5), Duration::from_millis(20))
            .max_attempts(3);
        let (_trigger, shutdown) = Shutdown::new();
        let health = HealthReporter::detached("relay");
        let ctx = WorkerContext::new(shutdown, health.clone());
        let counts = MetricCounts::default();
        let err = {
            // The body runs on the test's own thread: the local recorder sees the relay's counts.
            let _recorder = metrics::set_default_local_recorder(&counts);
            relay.run(ctx).await.expect_err("the relay gives up")
        };
        assert_eq!(
            counts.get("cqrs_outbox_publish_failures_total{relay=default,cause=transport}"),
            3,
            "each failed batch counted, with its cause"
        );
        assert!(err.to_string().contains("the broker is down"), "{err}");
        assert_eq!(transport.failures.load(Ordering::SeqCst), 3);
        assert!(matches!(health.get(), Health::Unhealthy(_)));
        assert_eq!(relay.checkpoint().await.unwrap(), Position::START);
        assert_eq!(relay.backlog().await.unwrap().unpublished, 5);
    }
}

pg_test! {
    /// Intervals too long for the clock (`Duration::MAX`, to mean "never" or "no limit") do
    /// not overflow it: the relay backs off, recovers and ships.
    async fn intervals_of_duration_max_do_not_overflow(db: PgDatabase) {
        db.event_store()
            .append("s", ExpectedVersion::NO_STREAM, (1..=3).map(record).collect())
            .await
            .unwrap();
        let transport = ControlledTransport::failing_first(2);
        let mut relay = PgOutboxRelay::new(db.clone(), transport.clone())
            .backoff(Duration::from_millis(10), Duration::MAX)
            .metrics_interval(Duration::MAX)
            .poll_interval(Duration::from_millis(50));
        let (trigger, shutdown) = Shutdown::new();
        let ctx = WorkerContext::new(shutdown, HealthReporter::detached("relay"));
        let worker = tokio::spawn(async move { relay.run(ctx).await });
        let delivered = receive(&transport.inner, "events", "readers", 3).await;
        assert_eq!(delivered.len(), 3);
        trigger.trigger();
        worker.await.expect("no panic").expect("a clean stop");
    }
}

pg_test! {
    /// A broker too slow for a whole batch within `publish_timeout` still gets everything: the
    /// runs it took are shipped and the rest goes with the next batch. The batch's transaction
    /// never sits idle past the server's idle-in-transaction timeout (2 s here, against runs of
    /// 300 ms: room for a loaded machine's stalls), which would end the session, lose the
    /// checkpoint row to a standby, and ship runs again.
    async fn a_broker_too_slow_for_a_whole_batch_still_gets_everything(db: PgDatabase) {
        let strict = crate::support::options(db.schema())
            .idle_in_transaction_timeout(Some(Duration::from_secs(2)))
            .connect()
            .await
            .unwrap();
        // Alternating topics: every event is a run of its own, 300 ms each.
        let events: Vec<_> = (1..=10).map(record).collect();
        db.event_store()
            .append("s", ExpectedVersion::NO_STREAM, events.clone())
            .await
            .unwrap();
        let transport = ControlledTransport::slow(Duration::from_millis(300));
        let relay = PgOutboxRelay::new(strict, transport.clone())
            .topic_for(|e| format!("t{}", e.payload["n"].as_u64().unwrap() % 2))
            .publish_timeout(Duration::from_millis(700));
        relay.ensure_checkpoint().await.unwrap();
        let last = relay_last_position(&db).await;
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while relay.checkpoint().await.unwrap() < last {
            assert!(tokio::time::Instant::now() < until, "the relay made no progress");
            let _ = relay.relay_once().await;
        }
        // A run cut off by the timeout may have reached the broker: it goes again, next to
        // itself. A batch whose session ended would ship its runs again after others.
        let mut shipped: Vec<u64> = transport
            .published()
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        shipped.dedup();
        assert_eq!(shipped, (1..=10).collect::<Vec<_>>(), "every event, in order, once");
    }
}

async fn relay_last_position(db: &cqrs_postgres::PgDatabase) -> Position {
    let all = db
        .event_store()
        .read_all(Position::START, 100)
        .await
        .unwrap();
    all.last().and_then(|r| r.position).unwrap()
}
