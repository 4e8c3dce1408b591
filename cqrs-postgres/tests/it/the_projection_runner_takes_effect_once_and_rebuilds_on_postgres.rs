//! The core's projection runner on the Postgres stores: the read model is written in the
//! unit's transaction with the inbox and the checkpoint, a failed batch leaves nothing, and a
//! rebuild from zero waits for a unit that holds the projection's lock, then holds it itself
//! until it commits, so the live runner waits for the rebuild.

use crate::support::tickets::TicketOpened;
use crate::support::{database_url, pg_test};
use cqrs_core::ports::{EventStore, ExpectedVersion, ProjectionStore};
use cqrs_core::projection::{Projection, ProjectionRunner};
use cqrs_core::{EventEnvelope, EventRecord, EventTypes, HandlerError, Metadata, async_trait};
use cqrs_postgres::{PgDatabase, PgOptions, PgProjectionStore, PgProjectionUnit};
use sqlx::AssertSqlSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Counts opened tickets in `{schema}.opened`; fails on a ticket titled `poison` while
/// `poisoned` is set. A reset (the start of a rebuild, inside its unit) raises `resetting`
/// and then waits for `reset_gate`, so a test can hold a rebuild in the middle of its unit.
struct OpenedCount {
    schema: String,
    poisoned: AtomicBool,
    resetting: AtomicBool,
    reset_gate: tokio::sync::Mutex<()>,
}

#[async_trait]
impl Projection<PgProjectionStore> for OpenedCount {
    fn name(&self) -> &str {
        "opened-count"
    }

    async fn apply(
        &self,
        unit: &mut PgProjectionUnit,
        event: &EventEnvelope,
    ) -> Result<(), HandlerError> {
        let Some(opened) = event.downcast_ref::<TicketOpened>() else {
            return Ok(());
        };
        count_opened(&self.schema, unit).await?;
        if opened.title == "poison" && self.poisoned.load(Ordering::SeqCst) {
            return Err(HandlerError::internal("poisoned"));
        }
        Ok(())
    }

    async fn reset(&self, unit: &mut PgProjectionUnit) -> Result<(), HandlerError> {
        self.resetting.store(true, Ordering::SeqCst);
        drop(self.reset_gate.lock().await);
        let reset = format!("UPDATE \"{}\".opened SET n = 0", self.schema);
        sqlx::query(AssertSqlSafe(reset))
            .execute(unit.connection())
            .await
            .map_err(HandlerError::internal)?;
        Ok(())
    }
}

/// Adds one to `{schema}.opened` in the projection's unit.
async fn count_opened(schema: &str, unit: &mut PgProjectionUnit) -> Result<(), HandlerError> {
    let update = format!("UPDATE \"{schema}\".opened SET n = n + 1");
    sqlx::query(AssertSqlSafe(update))
        .execute(unit.connection())
        .await
        .map_err(HandlerError::internal)?;
    Ok(())
}

async fn count(db: &PgDatabase) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT n FROM \"{}\".opened",
        db.schema()
    )))
    .fetch_one(db.pool())
    .await
    .unwrap()
}

async fn open(db: &PgDatabase, id: &str, title: &str) {
    let envelope = EventEnvelope::new(
        TicketOpened {
            id: id.into(),
            title: title.into(),
        },
        Metadata::new(),
    );
    db.event_store()
        .append(
            id,
            ExpectedVersion::NO_STREAM,
            vec![EventRecord::from_envelope(&envelope).unwrap()],
        )
        .await
        .unwrap();
}

/// `OpenedCount`'s table, at zero.
async fn create_read_model(db: &PgDatabase) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE \"{0}\".opened (n bigint NOT NULL); INSERT INTO \"{0}\".opened VALUES (0)",
        db.schema()
    )))
    .execute(db.pool())
    .await
    .expect("create the read model");
}

pg_test! {
    async fn a_projection_applies_each_event_once_and_rebuilds_while_the_live_runner_waits(db: PgDatabase) {
        create_read_model(&db).await;
        let mut types = EventTypes::new();
        types.register::<TicketOpened>();
        let types = Arc::new(types);
        let projection = Arc::new(OpenedCount { schema: db.schema().to_owned(), poisoned: AtomicBool::new(true), resetting: AtomicBool::new(false), reset_gate: tokio::sync::Mutex::new(()) });
        let store = Arc::new(db.projection_store());
        let mut live = ProjectionRunner::from_store(store.clone(), projection.clone(), Arc::new(db.event_store()), types.clone());

        open(&db, "t1", "fine").await;
        open(&db, "t2", "poison").await;
        assert!(live.run_once().await.is_err(), "the poisoned batch fails");
        assert_eq!(
            count(&db).await,
            1,
            "at the poisoned event: t1, before it, took effect in a unit of its own, once"
        );
        assert!(live.run_once().await.is_err(), "the poisoned event fails again");
        assert_eq!(count(&db).await, 1, "and t1 takes effect once");

        projection.poisoned.store(false, Ordering::SeqCst);
        assert_eq!(live.run_once().await.unwrap(), 1, "from the poisoned event on");
        assert_eq!(live.run_once().await.unwrap(), 0, "caught up");
        assert_eq!(count(&db).await, 2);

        // A rebuild while someone holds the projection's unit waits for it...
        // (This test's own sessions carry its id as their application name, so counting its
        // sessions that wait on a lock tells a waiting unit from one not yet started.)
        let mine = format!("cqrs-test {}", db.schema());
        let waiting = || {
            let pool = db.pool().clone();
            let mine = mine.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE cardinality(pg_blocking_pids(pid)) > 0 AND application_name = $1",
                )
                .bind(mine)
                .fetch_one(&pool)
                .await
                .unwrap()
            }
        };
        let held = store.begin("opened-count").await.unwrap();
        // The gate keeps the rebuild inside its unit (in the projection's reset) once it has
        // the lock.
        let gate = projection.reset_gate.lock().await;
        let rebuilder = ProjectionRunner::from_store(store.clone(), projection.clone(), Arc::new(db.event_store()), types.clone());
        let rebuild = tokio::spawn(async move { rebuilder.rebuild().await });
        cqrs_core::testing::eventually(Duration::from_secs(10), "the rebuild waits for the held unit's lock", || async {
            (waiting().await > 0 || rebuild.is_finished()).then_some(())
        })
        .await;
        assert!(!rebuild.is_finished(), "the rebuild took the lock while another unit held it");
        assert!(!projection.resetting.load(Ordering::SeqCst), "the rebuild reset the read model while another unit held the lock");
        store.commit(held).await.unwrap();

        // ...and, once it has the lock, holds it until it commits: the live runner waits.
        cqrs_core::testing::eventually(Duration::from_secs(10), "the rebuild gets the lock and resets", || async {
            (projection.resetting.load(Ordering::SeqCst) || rebuild.is_finished()).then_some(())
        })
        .await;
        assert!(!rebuild.is_finished(), "the rebuild is held at its reset");
        let live = tokio::spawn(async move {
            let applied = live.run_once().await;
            (live, applied)
        });
        cqrs_core::testing::eventually(Duration::from_secs(10), "the live runner waits for the rebuild's lock", || async {
            (waiting().await > 0 || live.is_finished()).then_some(())
        })
        .await;
        assert!(!live.is_finished(), "the live runner ran a batch in the middle of the rebuild");
        drop(gate);
        assert_eq!(rebuild.await.unwrap().unwrap(), 2);
        let (mut live, applied) = live.await.unwrap();
        assert_eq!(applied.unwrap(), 0, "the live runner continues after the rebuild, from its checkpoint");
        assert_eq!(count(&db).await, 2, "rebuilt from zero, not doubled");
        assert_eq!(live.run_once().await.unwrap(), 0, "caught up");
    }
}

pg_test! {
    /// A runner never holds its unit's connection while it waits for another to read events
    /// with: on a pool of one connection it makes progress (reading inside the unit, it
    /// waited for a second connection until the pool's acquire timeout, every batch).
    async fn a_runner_needs_one_connection_at_a_time(db: PgDatabase) {
        create_read_model(&db).await;
        let one = PgOptions::new(database_url())
            .schema(db.schema())
            .max_connections(1)
            // Roomy: a runner that waited for a second connection would wait for ever, and
            // still time out; a loaded machine must not.
            .acquire_timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect with a pool of one");
        let mut types = EventTypes::new();
        types.register::<TicketOpened>();
        let projection = Arc::new(OpenedCount { schema: db.schema().to_owned(), poisoned: AtomicBool::new(false), resetting: AtomicBool::new(false), reset_gate: tokio::sync::Mutex::new(()) });
        let mut runner = ProjectionRunner::from_store(Arc::new(one.projection_store()), projection, Arc::new(one.event_store()), Arc::new(types));

        open(&db, "t1", "first").await;
        open(&db, "t2", "second").await;
        assert_eq!(runner.run_once().await.expect("a batch on one connection"), 2);
        open(&db, "t3", "third").await;
        assert_eq!(runner.run_once().await.expect("the next batch"), 1);
        assert_eq!(runner.run_once().await.expect("caught up"), 0);
        assert_eq!(count(&db).await, 3);
        one.pool().close().await;
    }
}

pg_test! {
    /// The inbox keeps a row per processed event; `purge_inbox` deletes one consumer's rows
    /// older than the given age, and nothing else.
    async fn old_inbox_entries_are_purged_per_consumer(db: PgDatabase) {
        let insert = |consumer: &'static str, days_ago: i32| {
            let sql = format!(
                "INSERT INTO {}.inbox (consumer, message_id, processed_at) \
                 VALUES ($1, $2, now() - make_interval(days => $3))",
                db.schema()
            );
            let pool = db.pool().clone();
            async move {
                sqlx::query(AssertSqlSafe(sql))
                    .bind(consumer)
                    .bind(uuid::Uuid::now_v7())
                    .bind(days_ago)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        };
        insert("c", 2).await;
        insert("c", 0).await;
        insert("d", 2).await;
        let store = db.projection_store();
        let day = Duration::from_secs(86_400);
        assert_eq!(store.purge_inbox("c", day).await.unwrap(), 1);
        assert_eq!(store.purge_inbox("c", day).await.unwrap(), 0);
        assert_eq!(store.purge_inbox("c", Duration::MAX).await.unwrap(), 0, "no overflow");
        let left: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT consumer, count(*) FROM {}.inbox GROUP BY consumer ORDER BY consumer",
            db.schema()
        )))
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(left, [("c".to_owned(), 1), ("d".to_owned(), 1)]);
    }
}

pg_test! {
    /// A backlog larger than one purge statement's batch (5,000 rows) is purged in full, with
    /// the count right, and younger rows stay.
    async fn a_purge_works_off_a_backlog_of_several_batches(db: PgDatabase) {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.inbox (consumer, message_id, processed_at) \
             SELECT 'c', gen_random_uuid(), now() - interval '2 days' FROM generate_series(1, 12001)",
            db.schema()
        )))
        .execute(db.pool())
        .await
        .unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.inbox (consumer, message_id) SELECT 'c', gen_random_uuid() \
             FROM generate_series(1, 3)",
            db.schema()
        )))
        .execute(db.pool())
        .await
        .unwrap();
        let store = db.projection_store();
        let day = Duration::from_secs(86_400);
        assert_eq!(store.purge_inbox("c", day).await.unwrap(), 12_001);
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}.inbox",
            db.schema()
        )))
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(left, 3);
    }
}

pg_test! {
    /// A unit in which a statement failed (a projection that went on after it, taking a
    /// unique violation for "already there") does not commit: Postgres answers `COMMIT` there
    /// with a rollback, which sqlx reports as a commit, so the runner acknowledged a batch
    /// that left nothing (not its effects, nor its inbox entries, nor its checkpoint).
    async fn a_unit_aborted_by_a_failed_statement_does_not_commit(db: PgDatabase) {
        let store = db.projection_store();
        let mut unit = store.begin("aborted").await.unwrap();
        store
            .save_checkpoint(&mut unit, "aborted", cqrs_core::Position::new(7))
            .await
            .unwrap();
        let failed = sqlx::query("SELECT 1 / 0")
            .execute(unit.connection())
            .await;
        assert!(failed.is_err(), "the statement fails");
        let error = store.commit(unit).await.expect_err("nothing committed");
        assert!(error.to_string().contains("aborted"), "{error}");
        let mut unit = store.begin("aborted").await.unwrap();
        assert_eq!(store.checkpoint(&mut unit, "aborted").await.unwrap(), None);
    }
}

/// Counts opened tickets like `OpenedCount`, but on the tickets in `swallowing` runs a
/// statement that fails and goes on as if it had not: the unit is aborted, and every later
/// statement in it fails.
struct GoesOnAfterAFailure {
    schema: String,
    swallowing: std::sync::Mutex<Vec<&'static str>>,
}

#[async_trait]
impl Projection<PgProjectionStore> for GoesOnAfterAFailure {
    fn name(&self) -> &str {
        "goes-on"
    }

    async fn apply(
        &self,
        unit: &mut PgProjectionUnit,
        event: &EventEnvelope,
    ) -> Result<(), HandlerError> {
        let Some(opened) = event.downcast_ref::<TicketOpened>() else {
            return Ok(());
        };
        if self
            .swallowing
            .lock()
            .unwrap()
            .contains(&opened.id.as_str())
        {
            let _ignored = sqlx::query("SELECT 1 / 0").execute(unit.connection()).await;
            return Ok(());
        }
        count_opened(&self.schema, unit).await?;
        Ok(())
    }

    async fn reset(&self, _unit: &mut PgProjectionUnit) -> Result<(), HandlerError> {
        Ok(())
    }
}

pg_test! {
    /// A projection that goes on after a failed statement breaks its unit: the statements
    /// after it fail, the next event's or the store's own. The runner stops at the event that
    /// broke it, naming it and saying what to do, once the events before it took effect; it
    /// rolled the whole batch back at every step with "current transaction is aborted", naming
    /// the event after it or none.
    async fn a_projection_that_goes_on_after_a_failed_statement_is_stopped_at_it(db: PgDatabase) {
        create_read_model(&db).await;
        let mut types = EventTypes::new();
        types.register::<TicketOpened>();
        // One in the middle of the batch, where the next event meets the broken unit; one
        // last, where the checkpoint does.
        let projection = Arc::new(GoesOnAfterAFailure { schema: db.schema().to_owned(), swallowing: std::sync::Mutex::new(vec!["t3", "t6"]) });
        let mut runner = ProjectionRunner::from_store(Arc::new(db.projection_store()), projection.clone(), Arc::new(db.event_store()), Arc::new(types));
        let store = db.event_store();
        let mut ids = std::collections::HashMap::new();
        for stream in ["t1", "t2", "t3", "t4", "t5", "t6"] {
            open(&db, stream, "a title").await;
            ids.insert(stream, store.load(stream, 0).await.unwrap()[0].event_id);
        }
        for (breaking, counted) in [("t3", 2), ("t6", 5)] {
            for _ in 0..2 {
                let error = runner.run_once().await.expect_err("stopped at the event that broke its unit");
                let cqrs_core::projection::ProjectionError::Apply { event_id, .. } = &error else {
                    panic!("expected the event named: {error}");
                };
                assert_eq!(*event_id, ids[breaking], "{breaking}: {error}");
                let message = error.to_string();
                assert!(message.contains("return the error of a failed statement"), "{message}");
                assert_eq!(count(&db).await, counted, "the events before {breaking} took effect, once");
            }
            projection.swallowing.lock().unwrap().retain(|id| *id != breaking);
        }
        assert_eq!(runner.run_once().await.unwrap(), 1, "the last one, fixed");
        assert_eq!(count(&db).await, 6);
    }
}

pg_test! {
    /// A row the event store cannot read back (written around its append functions, without
    /// the metadata an event needs) stops a runner at itself: the events before it in the
    /// page take effect, and the error names its position. It failed the whole page, and the
    /// runner applied none of them.
    async fn an_unreadable_row_holds_back_only_itself_and_what_follows(db: PgDatabase) {
        create_read_model(&db).await;
        let mut types = EventTypes::new();
        types.register::<TicketOpened>();
        let projection = Arc::new(GoesOnAfterAFailure { schema: db.schema().to_owned(), swallowing: std::sync::Mutex::new(Vec::new()) });
        let mut runner = ProjectionRunner::from_store(Arc::new(db.projection_store()), projection, Arc::new(db.event_store()), Arc::new(types));
        open(&db, "t1", "a title").await;
        open(&db, "t2", "a title").await;
        let insert = format!(
            "INSERT INTO \"{}\".events (stream_id, stream_version, event_id, event_type, \
             schema_version, payload, metadata) \
             VALUES ('manual', 1, gen_random_uuid(), 'TicketOpened', 1, '{{}}', '{{}}') \
             RETURNING position",
            db.schema()
        );
        let bad: i64 = sqlx::query_scalar(AssertSqlSafe(insert)).fetch_one(db.pool()).await.unwrap();
        open(&db, "t4", "a title").await;

        // The events before the row take effect, once, and catching up stops at the row: the
        // page cut before it is short, and not taken for the end of the store.
        let error = runner.catch_up().await.expect_err("stopped at the unreadable row");
        assert_eq!(count(&db).await, 2);
        assert!(error.to_string().contains(&format!("the event at position {bad} ")), "{error}");
        runner.run_once().await.expect_err("still stopped at the row");
        assert_eq!(count(&db).await, 2);
    }
}

pg_test! {
    /// A store that refuses the runner's own writes whatever the event (here its inbox table
    /// is gone) fails the step as the store's error, not as the first event's.
    async fn a_store_that_refuses_every_unit_is_not_blamed_on_an_event(db: PgDatabase) {
        create_read_model(&db).await;
        let mut types = EventTypes::new();
        types.register::<TicketOpened>();
        let projection = Arc::new(GoesOnAfterAFailure { schema: db.schema().to_owned(), swallowing: std::sync::Mutex::new(Vec::new()) });
        let mut runner = ProjectionRunner::from_store(Arc::new(db.projection_store()), projection, Arc::new(db.event_store()), Arc::new(types));
        for stream in ["t1", "t2", "t3"] {
            open(&db, stream, "a title").await;
        }
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE \"{}\".inbox", db.schema())))
            .execute(db.pool())
            .await
            .unwrap();
        let error = runner.run_once().await.expect_err("no inbox");
        assert!(matches!(error, cqrs_core::projection::ProjectionError::Store(_)), "{error:?}");
        assert!(error.to_string().contains("run `PgDatabase::migrate()`"), "{error}");
        assert_eq!(count(&db).await, 0);
    }
}

pg_test! {
    /// `skip_after` on Postgres: the event refused at the second step in a row is skipped
    /// in a unit of its own (its failed units left no count), and the runner goes on past it.
    async fn a_projection_skips_an_event_it_keeps_failing_on_when_told_to(db: PgDatabase) {
        create_read_model(&db).await;
        let mut types = EventTypes::new();
        types.register::<TicketOpened>();
        let projection = Arc::new(OpenedCount { schema: db.schema().to_owned(), poisoned: AtomicBool::new(true), resetting: AtomicBool::new(false), reset_gate: tokio::sync::Mutex::new(()) });
        let store = Arc::new(db.projection_store());
        let mut runner = ProjectionRunner::from_store(store.clone(), projection, Arc::new(db.event_store()), Arc::new(types))
            .skip_after(2);
        open(&db, "t1", "fine").await;
        open(&db, "t2", "poison").await;
        open(&db, "t3", "fine").await;

        let err = runner.run_once().await.unwrap_err();
        assert!(err.to_string().contains("poisoned"), "{err}");
        assert_eq!(count(&db).await, 1, "the event before the poison took effect");
        assert_eq!(runner.run_once().await.unwrap(), 0, "the second failure skips it");
        assert_eq!(runner.catch_up().await.unwrap(), 1);
        assert_eq!(count(&db).await, 2, "t1 and t3; the poison's units were rolled back");
        let skipped = db.event_store().load("t2", 0).await.unwrap()[0].event_id;
        let third = db.event_store().load("t3", 0).await.unwrap()[0].position;
        let mut unit = store.begin("opened-count").await.unwrap();
        assert_eq!(store.checkpoint(&mut unit, "opened-count").await.unwrap(), third);
        assert!(!store.mark_processed(&mut unit, "opened-count", skipped).await.unwrap(), "the skipped event is in the inbox");
        drop(unit);
    }
}

pg_test! {
    /// A watch waits until the runner has committed the write to the model, reading the
    /// checkpoint outside the runner's unit (read-your-writes on Postgres).
    async fn a_watch_waits_until_the_runner_committed_the_write(db: PgDatabase) {
        create_read_model(&db).await;
        let mut types = EventTypes::new();
        types.register::<TicketOpened>();
        let projection = Arc::new(OpenedCount { schema: db.schema().to_owned(), poisoned: AtomicBool::new(false), resetting: AtomicBool::new(false), reset_gate: tokio::sync::Mutex::new(()) });
        let store = Arc::new(db.projection_store());
        let mut runner = ProjectionRunner::from_store(store.clone(), projection, Arc::new(db.event_store()), Arc::new(types));
        let watch = runner.watch();
        open(&db, "t1", "fine").await;
        let written = db.event_store().read_all(cqrs_core::Position::START, 10).await.unwrap()[0].position.unwrap();
        assert!(!watch.reached(written).await.unwrap());
        let (seen, ran) = tokio::join!(
            async {
                watch.wait_for(written, Duration::from_secs(30)).await.unwrap();
                count(&db).await
            },
            runner.catch_up()
        );
        assert_eq!(seen, 1, "the write is in the model once the wait ends");
        assert_eq!(ran.unwrap(), 1);
        assert_eq!(watch.checkpoint().await.unwrap(), Some(written));
    }
}
