//! Appends wake the relay through LISTEN/NOTIFY (its poll interval is an hour), and the
//! backlog says how many events wait and for how long.

use crate::support::{pg_test, record};
use crate::transport::{GatedTransport, receive};
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::runtime::{
    Health, HealthReporter, Shutdown, ShutdownTrigger, Worker, WorkerContext,
};
use cqrs_core::testing::eventually;
use cqrs_postgres::PgOutboxRelay;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pg_test! {
    async fn an_append_wakes_an_idle_relay_and_the_backlog_drains(db: PgDatabase) {
        let transport = Arc::new(InMemoryTransport::new());
        let relay = || PgOutboxRelay::new(db.clone(), transport.clone()).poll_interval(Duration::from_secs(3600));
        let observer = relay();
        observer.ensure_checkpoint().await.unwrap();
        let store = db.event_store();
        store.append("early", ExpectedVersion::NO_STREAM, (1..=3).map(record).collect()).await.unwrap();
        let backlog = observer.backlog().await.unwrap();
        assert_eq!(backlog.unpublished, 3);
        assert!(backlog.oldest_age.is_some());

        let mut worker = relay();
        let (trigger, shutdown) = Shutdown::new();
        let health = HealthReporter::detached("relay");
        let ctx = WorkerContext::new(shutdown, health.clone());
        let running = tokio::spawn(async move { worker.run(ctx).await });

        // The first batch ships the backlog; then the relay idles for an hour unless woken.
        receive(transport.as_ref(), "events", "readers", 3).await;
        eventually(Duration::from_secs(5), "the relay is healthy and idle", || async {
            (health.get() == Health::Healthy && observer.backlog().await.unwrap().unpublished == 0)
                .then_some(())
        })
        .await;
        assert_eq!(observer.backlog().await.unwrap().oldest_age, None);

        store.append("late", ExpectedVersion::NO_STREAM, vec![record(4)]).await.unwrap();
        let woken = receive(transport.as_ref(), "events", "readers", 1).await;
        assert_eq!(woken[0].stream_id.as_deref(), Some("late"));

        trigger.trigger();
        running.await.unwrap().expect("a clean stop");
    }
}

pg_test! {
    /// A relay still waiting for a connection (a server slow to accept, a pool exhausted)
    /// stops as soon as shutdown is requested, not when the connection finally comes. The
    /// pool's connections never finish opening: its `after_connect` hook counts them and
    /// never returns, so once one is counted the relay is inside its wait.
    async fn a_relay_waiting_for_a_connection_stops_at_shutdown(db: PgDatabase) {
        use std::str::FromStr;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let opening = Arc::new(AtomicUsize::new(0));
        let counted = opening.clone();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .after_connect(move |_conn, _meta| {
                counted.fetch_add(1, Ordering::SeqCst);
                Box::pin(std::future::pending())
            })
            .connect_lazy_with(
                sqlx::postgres::PgConnectOptions::from_str(&crate::support::database_url())
                    .expect("DATABASE_URL parses"),
            );
        let slow = cqrs_postgres::PgDatabase::from_pool(pool, db.schema()).unwrap();
        let mut worker = PgOutboxRelay::new(slow, Arc::new(InMemoryTransport::new()));
        let (trigger, shutdown) = Shutdown::new();
        let ctx = WorkerContext::new(shutdown, HealthReporter::detached("relay"));
        let running = tokio::spawn(async move { worker.run(ctx).await });
        eventually(Duration::from_secs(10), "the relay waits for a connection", || async {
            (opening.load(Ordering::SeqCst) > 0).then_some(())
        })
        .await;
        trigger.trigger();
        let stopped = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the relay waited for its connection instead of stopping");
        stopped
            .expect("the relay did not panic")
            .expect("the relay stopped cleanly");
    }
}

pg_test! {
    /// Appends made while the relay publishes leave one notification each on its LISTEN
    /// connection; the next batch ships them all, and the relay takes every notification
    /// already there before it waits again, instead of running one batch per notification
    /// that finds nothing new. Counted at the wire: the relay's pool goes through a proxy.
    async fn a_burst_of_notifications_wakes_the_relay_once(db: PgDatabase) {
        use crate::proxy::Proxy;
        const BURST: u64 = 20;
        let (proxy, pool) =
            Proxy::in_front_of_the_database(sqlx::postgres::PgPoolOptions::new().max_connections(3))
                .await;
        let counted = cqrs_postgres::PgDatabase::from_pool(pool.clone(), db.schema()).unwrap();
        let store = db.event_store();
        store.append("early", ExpectedVersion::NO_STREAM, vec![record(0)]).await.unwrap();
        // The first publish (of "early") waits until the burst has landed.
        let transport = Arc::new(GatedTransport::new());
        // It listens before its first batch: from its first publish on, every append notifies it.
        let (trigger, running) =
            run_until_first_publish(PgOutboxRelay::new(counted, transport.clone()), &transport).await;
        for n in 1..=BURST {
            store.append(&format!("burst-{n}"), ExpectedVersion::NO_STREAM, vec![record(n)]).await.unwrap();
        }
        assert!(
            transport.published().is_empty(),
            "the burst was appended while the first publish was still under way"
        );
        let started = proxy.round_trips();
        transport.gate.add_permits(1);
        eventually(Duration::from_secs(15), "the relay ships the burst", || async {
            (transport.published().len() == 1 + BURST as usize).then_some(())
        })
        .await;
        // All of it counted: every connection but the listener's back, pings included.
        proxy.settle_with(&pool, 1).await;
        let round_trips = proxy.round_trips() - started;
        // The end of the first batch and one batch for the burst, with the pool's pings of
        // the connections it gets back: 12 when this test was written. One batch per
        // notification added about 5 for each of the other 19 (107 then).
        assert!(round_trips <= 40, "{round_trips} round trips after the first publish");
        assert_eq!(transport.calls.load(Ordering::SeqCst), 2, "one publish for the burst");

        trigger.trigger();
        running.await.unwrap().expect("a clean stop");
    }
}

pg_test! {
    /// A relay standing by (another holds the checkpoint) checks again once per poll
    /// interval, not at each append's notification: every standby instance would otherwise
    /// run a batch per burst of appends that finds the row held. Counted at the wire: the
    /// standby's pool goes through a proxy.
    async fn appends_do_not_wake_a_standby_relay(db: PgDatabase) {
        use crate::proxy::Proxy;
        let (proxy, pool) =
            Proxy::in_front_of_the_database(sqlx::postgres::PgPoolOptions::new().max_connections(3))
                .await;
        let counted = cqrs_postgres::PgDatabase::from_pool(pool.clone(), db.schema()).unwrap();
        let relay = PgOutboxRelay::new(db.clone(), Arc::new(InMemoryTransport::new()));
        relay.ensure_checkpoint().await.unwrap();
        // The active relay's batch, as far as the standby can tell.
        let mut active = db.pool().begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT 1 FROM {}.relay_checkpoints FOR UPDATE",
            db.schema()
        )))
        .execute(&mut *active)
        .await
        .unwrap();

        let mut standby = PgOutboxRelay::new(counted, Arc::new(InMemoryTransport::new()))
            .poll_interval(Duration::from_secs(3600))
            .metrics_interval(Duration::from_secs(3600));
        let (trigger, shutdown) = Shutdown::new();
        let health = HealthReporter::detached("relay");
        let ctx = WorkerContext::new(shutdown, health.clone());
        let running = tokio::spawn(async move { standby.run(ctx).await });
        eventually(Duration::from_secs(10), "the relay stands by", || async {
            (health.get() == Health::Healthy).then_some(())
        })
        .await;
        // Every connection but its listener's is back, its release ping counted before the start.
        proxy.settle_with(&pool, 1).await;
        let started = proxy.round_trips();

        // A listener of the test's own, on the standby's channel: once it has every
        // notification, the server has sent the standby its own.
        let mut witness = sqlx::postgres::PgListener::connect_with(db.pool()).await.unwrap();
        witness.listen(db.channel()).await.unwrap();
        let store = db.event_store();
        for n in 1..=10 {
            store.append(&format!("s-{n}"), ExpectedVersion::NO_STREAM, vec![record(n)]).await.unwrap();
        }
        for _ in 1..=10 {
            tokio::time::timeout(Duration::from_secs(10), witness.recv()).await.unwrap().unwrap();
        }
        // Half a second for a woken standby to start a batch (nothing to wait for when none
        // does); one run meanwhile is counted whole, its release ping too.
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.settle_with(&pool, 1).await;
        // One batch per wake-up was 5 or more (begin, lock and read, rollback, the
        // checkpoint's insert, the pool's ping).
        let round_trips = proxy.round_trips() - started;
        assert_eq!(round_trips, 0, "the standby ran batches on notifications");

        trigger.trigger();
        running.await.unwrap().expect("a clean stop");
        active.rollback().await.unwrap();
    }
}

pg_test! {
    /// The backlog is counted up to the relay's limit and estimated past it, from the span of
    /// positions: a relay (or each standby) does not scan a backlog of millions to report it.
    async fn a_backlog_past_the_count_limit_is_estimated_from_the_positions(db: PgDatabase) {
        let transport = Arc::new(InMemoryTransport::new());
        let relay = |limit| PgOutboxRelay::new(db.clone(), transport.clone()).backlog_count_limit(limit);
        relay(1).ensure_checkpoint().await.unwrap();
        let store = db.event_store();
        store.append("a", ExpectedVersion::NO_STREAM, (1..=5).map(record).collect()).await.unwrap();
        let counted = relay(6).backlog().await.unwrap();
        assert_eq!((counted.unpublished, counted.exact), (5, true));
        let estimated = relay(2).backlog().await.unwrap();
        assert_eq!((estimated.unpublished, estimated.exact), (5, false));
        assert!(estimated.oldest_age.is_some());
        // At the limit exactly, the count cannot tell whether more wait: an estimate.
        let at_limit = relay(5).backlog().await.unwrap();
        assert_eq!((at_limit.unpublished, at_limit.exact), (5, false));

        // A write that rolls back after drawing a position leaves a gap, which the estimate
        // spans and the count does not.
        let mut tx = db.pool().begin().await.unwrap();
        let gap: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {}.events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
             SELECT stream_id, 99, gen_random_uuid(), event_type, schema_version, payload, metadata \
             FROM {0}.events ORDER BY position LIMIT 1 RETURNING position",
            db.schema()
        )))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.rollback().await.unwrap();
        assert!(gap > 5, "the rolled-back row drew position {gap}");
        store.append("b", ExpectedVersion::NO_STREAM, vec![record(6)]).await.unwrap();
        let counted = relay(100).backlog().await.unwrap();
        assert_eq!((counted.unpublished, counted.exact), (6, true));
        let estimated = relay(2).backlog().await.unwrap();
        assert_eq!(
            (estimated.unpublished, estimated.exact),
            (7, false),
            "the estimate spans the gap: an upper bound"
        );
    }
}

pg_test! {
    /// The relay's LISTEN connection is lost while it ships a backlog: it connects a new
    /// listener at its next idle wait (appends wake it again, with an hour's poll interval),
    /// and every other pooled connection still answers queries, none left listening. (sqlx
    /// reconnected inside the relay's reads of notifications, which a read without waiting or
    /// a poll interval can cut off half-way: cut off after its LISTEN went out, it handed a
    /// listening connection back to the pool, which fails its next query once a notification
    /// arrives. This test passed before that change too: here the pool's check of the
    /// connection it hands out comes first, and the cut falls there.) The late appends wait
    /// for the new listener: with one event a batch the relay does not idle while events keep
    /// coming, so appended earlier they would ship before it listens again.
    async fn a_lost_listen_connection_leaves_no_listening_connection_in_the_pool(db: PgDatabase) {
        let relay_db = crate::support::options(db.schema())
            .max_connections(4)
            .connect()
            .await
            .expect("connect");
        let store = db.event_store();
        for n in 0..3 {
            store.append(&format!("early-{n}"), ExpectedVersion::NO_STREAM, vec![record(n)]).await.unwrap();
        }
        // One event a batch: after each full batch the relay reads its notifications without
        // waiting, and goes on at once. The first publish waits at the gate.
        let transport = Arc::new(GatedTransport::new());
        let relay = PgOutboxRelay::new(relay_db.clone(), transport.clone()).batch_size(1);
        let (trigger, running) = run_until_first_publish(relay, &transport).await;

        // The server ends the listener's session.
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) \
             FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
        )
        .bind(format!("cqrs-test {}", db.schema()))
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(ended, 1, "the relay's LISTEN session");
        transport.gate.add_permits(1);
        eventually(Duration::from_secs(15), "the relay ships the backlog", || async {
            (transport.published().len() == 3).then_some(())
        })
        .await;

        eventually(Duration::from_secs(15), "the relay listens again", || async {
            (listening_sessions(&db).await == 1).then_some(())
        })
        .await;
        // Appends notify every session that listens, and wake the relay through its new one.
        for n in 3..6 {
            store.append(&format!("late-{n}"), ExpectedVersion::NO_STREAM, vec![record(n)]).await.unwrap();
        }
        eventually(Duration::from_secs(15), "the new listener wakes the relay", || async {
            (transport.published().len() == 6).then_some(())
        })
        .await;
        // Every other pooled connection (the listener holds one of the four), all at once,
        // answers a query.
        let queries = (0..3).map(|_| sqlx::query("SELECT pg_sleep(0.05)").execute(relay_db.pool()));
        for answer in futures_util::future::join_all(queries).await {
            assert!(answer.is_ok(), "a pooled connection failed a query: {answer:?}");
        }
        assert_eq!(listening_sessions(&db).await, 1, "sessions whose last statement was a LISTEN");

        trigger.trigger();
        running.await.unwrap().expect("a clean stop");
    }
}

/// How many of this test's sessions last ran a `LISTEN`: listen, that is.
async fn listening_sessions(db: &cqrs_postgres::PgDatabase) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
    )
    .bind(format!("cqrs-test {}", db.schema()))
    .fetch_one(db.pool())
    .await
    .unwrap()
}

/// Runs `relay`, polling once an hour and measuring its backlog as seldom, until the trigger
/// returned fires; returns once its first publish is under way (waiting at `transport`'s gate).
async fn run_until_first_publish(
    relay: PgOutboxRelay,
    transport: &GatedTransport,
) -> (
    ShutdownTrigger,
    tokio::task::JoinHandle<Result<(), cqrs_core::BoxError>>,
) {
    let mut worker = relay
        .poll_interval(Duration::from_secs(3600))
        .metrics_interval(Duration::from_secs(3600));
    let (trigger, shutdown) = Shutdown::new();
    let ctx = WorkerContext::new(shutdown, HealthReporter::detached("relay"));
    let running = tokio::spawn(async move { worker.run(ctx).await });
    eventually(
        Duration::from_secs(10),
        "the relay publishes its first batch",
        || async { (transport.calls.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    (trigger, running)
}

/// The last value each gauge was set to, by name (labels aside).
#[derive(Default)]
struct Gauges(std::sync::Mutex<std::collections::HashMap<String, Arc<GaugeCell>>>);

#[derive(Default)]
struct GaugeCell(std::sync::atomic::AtomicU64);

impl cqrs_core::reexports::metrics::GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        self.set(self.get() + value);
    }
    fn decrement(&self, value: f64) {
        self.set(self.get() - value);
    }
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::SeqCst);
    }
}

impl GaugeCell {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::SeqCst))
    }
}

impl Gauges {
    fn get(&self, name: &str) -> Option<f64> {
        self.0.lock().unwrap().get(name).map(|cell| cell.get())
    }
}

impl cqrs_core::reexports::metrics::Recorder for Gauges {
    fn describe_counter(
        &self,
        _: cqrs_core::reexports::metrics::KeyName,
        _: Option<cqrs_core::reexports::metrics::Unit>,
        _: cqrs_core::reexports::metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: cqrs_core::reexports::metrics::KeyName,
        _: Option<cqrs_core::reexports::metrics::Unit>,
        _: cqrs_core::reexports::metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: cqrs_core::reexports::metrics::KeyName,
        _: Option<cqrs_core::reexports::metrics::Unit>,
        _: cqrs_core::reexports::metrics::SharedString,
    ) {
    }
    fn register_counter(
        &self,
        _: &cqrs_core::reexports::metrics::Key,
        _: &cqrs_core::reexports::metrics::Metadata<'_>,
    ) -> cqrs_core::reexports::metrics::Counter {
        cqrs_core::reexports::metrics::Counter::noop()
    }
    fn register_gauge(
        &self,
        key: &cqrs_core::reexports::metrics::Key,
        _: &cqrs_core::reexports::metrics::Metadata<'_>,
    ) -> cqrs_core::reexports::metrics::Gauge {
        let cell = self
            .0
            .lock()
            .unwrap()
            .entry(key.name().to_owned())
            .or_default()
            .clone();
        cqrs_core::reexports::metrics::Gauge::from_arc(cell)
    }
    fn register_histogram(
        &self,
        _: &cqrs_core::reexports::metrics::Key,
        _: &cqrs_core::reexports::metrics::Metadata<'_>,
    ) -> cqrs_core::reexports::metrics::Histogram {
        cqrs_core::reexports::metrics::Histogram::noop()
    }
}

/// While the backlog cannot be measured (here its table renamed away), the relay's gauges are
/// NaN, not the last value, which may be small while the backlog grows; measured again, they
/// are numbers again. On one thread: the recorder is this thread's.
#[tokio::test]
async fn the_backlog_gauges_are_nan_while_the_backlog_cannot_be_measured() {
    const UNPUBLISHED: &str = "cqrs_outbox_unpublished";
    const OLDEST: &str = "cqrs_outbox_oldest_unpublished_seconds";
    let id = cqrs_core::testing::test_id("backlog_nan");
    let Some(db) = crate::support::schema(&id).await else {
        return;
    };
    let gauges = Gauges::default();
    let _recorder = cqrs_core::reexports::metrics::set_default_local_recorder(&gauges);
    cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
        let mut worker = PgOutboxRelay::new(db.clone(), Arc::new(InMemoryTransport::new()))
            .poll_interval(Duration::from_millis(20))
            .metrics_interval(Duration::from_millis(20));
        let (trigger, shutdown) = Shutdown::new();
        let ctx = WorkerContext::new(shutdown, HealthReporter::detached("relay"));
        let running = tokio::spawn(async move { worker.run(ctx).await });
        let gauges = &gauges;
        eventually(Duration::from_secs(10), "measured", || async {
            (gauges.get(UNPUBLISHED) == Some(0.0)).then_some(())
        })
        .await;
        let rename =
            |from: &str, to: &str| format!("ALTER TABLE \"{}\".{from} RENAME TO {to}", db.schema());
        sqlx::query(sqlx::AssertSqlSafe(rename("events", "events_away")))
            .execute(db.pool())
            .await
            .unwrap();
        eventually(
            Duration::from_secs(10),
            "NaN while unmeasurable",
            || async {
                (gauges.get(UNPUBLISHED).is_some_and(f64::is_nan)
                    && gauges.get(OLDEST).is_some_and(f64::is_nan))
                .then_some(())
            },
        )
        .await;
        sqlx::query(sqlx::AssertSqlSafe(rename("events_away", "events")))
            .execute(db.pool())
            .await
            .unwrap();
        eventually(Duration::from_secs(10), "measured again", || async {
            (gauges.get(UNPUBLISHED) == Some(0.0)).then_some(())
        })
        .await;
        trigger.trigger();
        let _ = running.await.unwrap();
    })
    .await;
    db.drop_schema().await.expect("drop the test schema");
}
