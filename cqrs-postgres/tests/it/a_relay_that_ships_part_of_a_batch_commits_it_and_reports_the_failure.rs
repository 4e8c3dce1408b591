//! A batch cut short after part of it was shipped (or skipped) commits that part, then
//! reports the failure: `relay_once` returns the error with the checkpoint moved past what was
//! shipped, and the worker is degraded and backs off, yet never gives up while it moves.

use crate::proxy::Proxy;
use crate::support::{pg_test, record};
use crate::transport::{ControlledTransport, RunningRelay};
use async_trait::async_trait;
use cqrs_core::memory::InMemoryTransport;
use cqrs_core::ports::{
    Consumer, ConsumerOptions, EventStore, EventTransport, ExpectedVersion, TransportCapabilities,
    TransportError,
};
use cqrs_core::runtime::{Health, HealthReporter, Shutdown, Worker, WorkerContext};
use cqrs_core::testing::{MetricCounts, eventually};
use cqrs_core::{EventRecord, Position};
use cqrs_postgres::{PgDatabase, PgOutboxRelay, RelayBatch, RelayError};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A transport that takes the first publish of each pair and fails the second retryably: a
/// relay publishing runs of one event (one topic each, or one at a time after the transport
/// refused the whole run) gets one event through per batch, then a failure.
#[derive(Default)]
struct EveryOtherFails {
    inner: InMemoryTransport,
    /// Refuse for good (as too large) every publish of more than one event.
    one_at_a_time: bool,
    /// Publishes of one event so far.
    calls: AtomicUsize,
    /// Every event taken, in order.
    taken: std::sync::Mutex<Vec<u64>>,
}

#[async_trait]
impl EventTransport for EveryOtherFails {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        if self.one_at_a_time && events.len() > 1 {
            return Err(TransportError::Codec("the batch is too large".into()));
        }
        if self.calls.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
            return Err(TransportError::Unavailable {
                backend: "test",
                source: "the broker dropped the connection".into(),
            });
        }
        self.inner.publish(topic, events).await?;
        self.taken
            .lock()
            .unwrap()
            .extend(events.iter().map(|e| e.payload["n"].as_u64().unwrap()));
        Ok(())
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

/// Appends events `1..=n` to one stream and returns their positions.
async fn append(db: &PgDatabase, n: u64) -> Vec<Position> {
    let store = db.event_store();
    store
        .append(
            "s",
            ExpectedVersion::NO_STREAM,
            (1..=n).map(record).collect(),
        )
        .await
        .unwrap();
    store
        .read_all(Position::START, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position.unwrap())
        .collect()
}

/// Each event a run of its own topic.
fn by_parity(e: &EventRecord) -> String {
    format!("t{}", e.payload["n"].as_u64().unwrap() % 2)
}

pg_test! {
    async fn a_batch_cut_short_between_runs_commits_the_first_and_returns_the_error(db: PgDatabase) {
        let positions = append(&db, 4).await;
        let transport = Arc::new(EveryOtherFails::default());
        let relay = PgOutboxRelay::new(db.clone(), transport.clone()).topic_for(by_parity);
        relay.ensure_checkpoint().await.unwrap();
        let counts = MetricCounts::default();
        for (shipped, &position) in positions.iter().enumerate().take(3) {
            let batch = {
                let _recorder = metrics::set_default_local_recorder(&counts);
                relay.relay_once().await
            };
            let error = batch.expect_err("the batch reports the failure");
            assert!(error.to_string().contains("dropped the connection"), "{error}");
            assert_eq!(relay.checkpoint().await.unwrap(), position, "batch {shipped}: one event");
        }
        assert_eq!(*transport.taken.lock().unwrap(), [1, 2, 3], "each event once, in order");
        assert_eq!(counts.get("cqrs_outbox_published_total{relay=default}"), 3);
        assert_eq!(relay.backlog().await.unwrap().unpublished, 1);
    }
}

pg_test! {
    async fn a_batch_cut_short_while_publishing_one_at_a_time_commits_what_went_through(db: PgDatabase) {
        let positions = append(&db, 3).await;
        let transport = Arc::new(EveryOtherFails { one_at_a_time: true, ..Default::default() });
        let relay = PgOutboxRelay::new(db.clone(), transport.clone());
        relay.ensure_checkpoint().await.unwrap();
        let error = relay.relay_once().await.expect_err("the batch reports the failure");
        assert!(error.to_string().contains("dropped the connection"), "{error}");
        assert_eq!(relay.checkpoint().await.unwrap(), positions[0]);
        assert_eq!(*transport.taken.lock().unwrap(), [1]);
    }
}

pg_test! {
    async fn rows_skipped_before_a_failing_publish_are_committed_and_the_error_returned(db: PgDatabase) {
        // Written around the append function, without the metadata an event needs.
        let insert = format!(
            "INSERT INTO \"{}\".events (stream_id, stream_version, event_id, event_type, \
             schema_version, payload, metadata) \
             VALUES ('manual', 1, gen_random_uuid(), 'Noted', 1, '{{\"n\": 0}}', '{{}}')",
            db.schema()
        );
        sqlx::query(AssertSqlSafe(insert)).execute(db.pool()).await.unwrap();
        let bad: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT max(position) FROM \"{}\".events",
            db.schema()
        )))
        .fetch_one(db.pool())
        .await
        .unwrap();
        db.event_store()
            .append("s", ExpectedVersion::NO_STREAM, vec![record(1)])
            .await
            .unwrap();
        let transport = Arc::new(EveryOtherFails::default());
        // The first publish goes through: spend it.
        transport.calls.store(1, Ordering::SeqCst);
        let relay = PgOutboxRelay::new(db.clone(), transport.clone());
        relay.ensure_checkpoint().await.unwrap();
        let counts = MetricCounts::default();
        let batch = {
            let _recorder = metrics::set_default_local_recorder(&counts);
            relay.relay_once().await
        };
        batch.expect_err("the batch reports the failure");
        assert_eq!(relay.checkpoint().await.unwrap(), Position::new(bad.try_into().unwrap()));
        assert_eq!(counts.get("cqrs_outbox_skipped_total{relay=default,reason=undecodable}"), 1);
        assert!(transport.taken.lock().unwrap().is_empty());
    }
}

pg_test! {
    /// The worker is degraded and backs off after a batch cut short, but the batch moved: it
    /// does not count toward `max_attempts` (1 here: one failure without progress would stop
    /// the worker).
    async fn the_worker_is_degraded_and_backs_off_but_does_not_give_up_while_it_moves(db: PgDatabase) {
        let positions = append(&db, 4).await;
        let transport = Arc::new(EveryOtherFails::default());
        let watch = PgOutboxRelay::new(db.clone(), transport.clone());
        // A backoff far longer than the test waits, and no poll or wake-up meanwhile: after the
        // first batch, the worker waits.
        let mut relay = PgOutboxRelay::new(db.clone(), transport.clone())
            .topic_for(by_parity)
            .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
            .poll_interval(Duration::from_secs(3600))
            .listen(false)
            .max_attempts(1);
        let (trigger, shutdown) = Shutdown::new();
        let health = HealthReporter::detached("relay");
        let ctx = WorkerContext::new(shutdown, health.clone());
        let worker = tokio::spawn(async move { relay.run(ctx).await });

        eventually(Duration::from_secs(10), "the first event shipped", || async {
            (watch.checkpoint().await.unwrap() == positions[0]).then_some(())
        })
        .await;
        let degraded = eventually(Duration::from_secs(10), "degraded", || async {
            match health.get() {
                Health::Degraded(reason) => Some(reason),
                _ => None,
            }
        })
        .await;
        assert!(degraded.contains("dropped the connection"), "{degraded}");
        assert_eq!(transport.calls.load(Ordering::SeqCst), 2, "backing off: no other batch");
        assert!(!worker.is_finished(), "a batch that moved does not count toward giving up");
        trigger.trigger();
        worker.await.unwrap().expect("a clean stop");
        assert_eq!(watch.checkpoint().await.unwrap(), positions[0]);
    }
}

pg_test! {
    /// A batch that moved before it failed backs off by the shortest backoff, not one doubled
    /// from the failure before: a relay that ships one event a batch behind a flaky broker
    /// keeps shipping. Doubled from 1 ms, the twentieth batch would wait 17 minutes.
    async fn a_batch_that_moved_backs_off_from_the_start_again(db: PgDatabase) {
        let positions = append(&db, 40).await;
        let transport = Arc::new(EveryOtherFails::default());
        let watch = PgOutboxRelay::new(db.clone(), transport.clone());
        let mut relay = PgOutboxRelay::new(db.clone(), transport.clone())
            .topic_for(by_parity)
            .backoff(Duration::from_millis(1), Duration::from_secs(3600))
            .max_attempts(1);
        let (trigger, shutdown) = Shutdown::new();
        let ctx = WorkerContext::new(shutdown, HealthReporter::detached("relay"));
        let worker = tokio::spawn(async move { relay.run(ctx).await });

        let last = *positions.last().unwrap();
        eventually(Duration::from_secs(30), "every event shipped", || async {
            (watch.checkpoint().await.unwrap() == last).then_some(())
        })
        .await;
        assert_eq!(
            *transport.taken.lock().unwrap(),
            (1..=40).collect::<Vec<u64>>(),
            "one event a batch, each once, in order"
        );
        trigger.trigger();
        worker.await.unwrap().expect("a clean stop");
    }
}

/// Takes every publish, then holds back the relay's next statements for `stall`: the
/// check of the batch's session before its next run cannot answer before the publish
/// deadline, as behind a transport that used nearly all of the publish timeout.
struct StallsTheLeaseCheck {
    inner: InMemoryTransport,
    proxy: Arc<Proxy>,
    stall: Duration,
    taken: std::sync::Mutex<Vec<u64>>,
}

#[async_trait]
impl EventTransport for StallsTheLeaseCheck {
    fn capabilities(&self) -> TransportCapabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, topic: &str, events: &[EventRecord]) -> Result<(), TransportError> {
        self.inner.publish(topic, events).await?;
        self.taken
            .lock()
            .unwrap()
            .extend(events.iter().map(|e| e.payload["n"].as_u64().unwrap()));
        self.proxy.stall_for(self.stall);
        Ok(())
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

pg_test! {
    /// The publish deadline passes while the relay checks its session before the next run:
    /// the batch ends as a publish timeout and commits the run it shipped, so each retry
    /// starts after it, instead of rolling back and shipping the first run again for ever.
    async fn a_batch_out_of_time_during_its_lease_check_commits_what_it_shipped(db: PgDatabase) {
        let positions = append(&db, 3).await;
        let (proxy, pool) =
            Proxy::in_front_of_the_database(PgPoolOptions::new().max_connections(2)).await;
        let proxy = Arc::new(proxy);
        let slow = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let publish_timeout = Duration::from_millis(300);
        let transport = Arc::new(StallsTheLeaseCheck {
            inner: InMemoryTransport::new(),
            proxy: proxy.clone(),
            // Past the deadline by a whole publish timeout: the session's answer cannot beat it.
            stall: publish_timeout * 2,
            taken: Default::default(),
        });
        let relay = PgOutboxRelay::new(slow.clone(), transport.clone())
            .topic_for(by_parity)
            .publish_timeout(publish_timeout)
            .listen(false);
        relay.ensure_checkpoint().await.unwrap();

        for (batch, &shipped) in positions[..2].iter().enumerate() {
            let error = relay.relay_once().await.expect_err("out of time");
            assert!(matches!(error, RelayError::PublishTimeout { .. }), "{error:?}");
            assert_eq!(
                relay.checkpoint().await.unwrap(),
                shipped,
                "batch {}: the run it shipped is committed",
                batch + 1
            );
        }
        assert_eq!(relay.relay_once().await.unwrap(), RelayBatch::Shipped(1));
        assert_eq!(relay.checkpoint().await.unwrap(), positions[2]);
        assert_eq!(*transport.taken.lock().unwrap(), vec![1, 2, 3], "each event shipped once");
        slow.pool().close().await;
    }
}

pg_test! {
    /// A batch whose statement the server never answers (here the network holds it back for
    /// a while) is reported degraded once it has run twice the publish timeout, instead of the
    /// relay looking healthy while it ships nothing; once the network passes messages again,
    /// the event ships and the relay is healthy again.
    async fn a_batch_the_server_does_not_answer_is_reported_degraded(db: PgDatabase) {
        append(&db, 1).await;
        // One connection: the relay's messages (its pool's pings too) go one after the other,
        // each sent once the one before was answered.
        let (proxy, pool) =
            Proxy::in_front_of_the_database(PgPoolOptions::new().max_connections(1)).await;
        let through_proxy = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let relay =
            relay_shipping_the_first_event(&through_proxy, Duration::from_millis(20)).await;

        // Everything the relay sends from now on waits 3 s: its next batch's first statement
        // goes unanswered for far longer than twice the publish timeout.
        proxy.stall_for(Duration::from_secs(3));
        // A statement sent just before the stall may still run after the append below, and
        // ship it. Once the relay's next message is held, every earlier one was answered.
        let before = proxy.round_trips();
        eventually(Duration::from_secs(10), "the relay's next message is held", || async {
            (proxy.round_trips() > before).then_some(())
        })
        .await;
        let store = db.event_store();
        store
            .append("s", ExpectedVersion::Exactly(1), vec![record(2)])
            .await
            .unwrap();
        let reason = eventually(Duration::from_secs(10), "the stalled batch is reported", || async {
            match relay.health.get() {
                Health::Degraded(reason) => Some(reason),
                _ => None,
            }
        })
        .await;
        assert!(reason.contains("twice the publish timeout"), "{reason}");
        assert_eq!(relay.shipped().len(), 1, "nothing shipped meanwhile");

        eventually(Duration::from_secs(15), "the batch ships once answered", || async {
            (relay.shipped().len() == 2 && relay.health.get() == Health::Healthy)
                .then_some(())
        })
        .await;
        assert_eq!(relay.shipped(), vec![1, 2]);
        relay.stop().await;
        through_proxy.pool().close().await;
    }
}

pg_test! {
    /// A batch whose connection went silent for good (a server that froze, a network that
    /// drops packets: its TCP never gives up, since nothing is left unacknowledged) is given
    /// up at four times the publish timeout plus the pool's acquire timeout, its connection
    /// closed, and the next batch ships on another connection, instead of the relay waiting
    /// for ever.
    async fn a_silent_batch_is_given_up_and_shipped_on_another_connection(db: PgDatabase) {
        append(&db, 1).await;
        // A session the silence caught inside a batch holds the checkpoint row until the
        // server ends it: soon, here. One connection: the given-up batch's must be closed, not
        // handed back to the pool (whose ping of it would never end), for the next to ship.
        let options = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            // As `PgOptions` pools are: a ping before each checkout would find the silence
            // before the batch does.
            .test_before_acquire(false)
            .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(
                    "SET idle_in_transaction_session_timeout = '1s'".to_owned(),
                ))
                .execute(conn)
                .await
                .map(drop)
            })
        });
        let (proxy, pool) = Proxy::in_front_of_the_database(options).await;
        let through_proxy = PgDatabase::from_pool(pool, db.schema()).unwrap();
        // Idle between polls, its connection back in the pool (pinged first, on a task of its
        // own): the silence then catches the next batch, not that ping, which has no deadline.
        let relay =
            relay_shipping_the_first_event(&through_proxy, Duration::from_millis(500))
                .await;
        eventually(Duration::from_secs(10), "the connection is back in the pool", || async {
            (through_proxy.pool().num_idle() == 1).then_some(())
        })
        .await;
        proxy.silence_open_connections();
        db.event_store()
            .append("s", ExpectedVersion::Exactly(1), vec![record(2)])
            .await
            .unwrap();
        eventually(Duration::from_secs(15), "the event ships on another connection", || async {
            (relay.shipped().contains(&2) && relay.health.get() == Health::Healthy).then_some(())
        })
        .await;
        assert_eq!(relay.shipped(), vec![1, 2], "each event once: the silenced batch published nothing");
        relay.stop().await;
    }
}

pg_test! {
    /// A backlog measurement given up mid-statement (the relay bounds it, as a batch) leaves
    /// its connection closed, not handed back to the pool, whose ping of it would never end on
    /// a silent server and hold one of its connections for good.
    async fn a_backlog_measurement_given_up_holds_no_connection(db: PgDatabase) {
        let options = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(false);
        let (proxy, pool) = Proxy::in_front_of_the_database(options).await;
        let through_proxy = PgDatabase::from_pool(pool, db.schema()).unwrap();
        let relay =
            PgOutboxRelay::new(through_proxy.clone(), Arc::new(ControlledTransport::default()));
        relay.ensure_checkpoint().await.unwrap();
        // Back in the pool (it is pinged first, on a task of its own), so the measurement
        // takes it and its statement is the one the silence holds.
        eventually(Duration::from_secs(10), "the connection is back in the pool", || async {
            (through_proxy.pool().num_idle() == 1).then_some(())
        })
        .await;
        proxy.silence_open_connections();
        let measured = tokio::time::timeout(Duration::from_millis(300), relay.backlog()).await;
        assert!(measured.is_err(), "the silent server answered: {measured:?}");
        tokio::time::timeout(Duration::from_secs(8), through_proxy.pool().acquire())
            .await
            .expect("the pool's one connection is free again")
            .expect("a new connection through the proxy");
    }
}

/// A relay through `db` (publish timeout 200 ms, no `LISTEN`), polling every `poll`, once it
/// has shipped the first event (appended before) and is healthy.
async fn relay_shipping_the_first_event(db: &PgDatabase, poll: Duration) -> RunningRelay {
    let running = RunningRelay::start(|transport| {
        PgOutboxRelay::new(db.clone(), transport)
            .publish_timeout(Duration::from_millis(200))
            .poll_interval(poll)
            .listen(false)
    });
    eventually(
        Duration::from_secs(10),
        "the first event is shipped",
        || async {
            (running.shipped().len() == 1 && running.health.get() == Health::Healthy).then_some(())
        },
    )
    .await;
    running
}
