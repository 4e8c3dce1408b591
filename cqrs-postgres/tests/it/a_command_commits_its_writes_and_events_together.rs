//! What a command's transaction holds: the handler's rows, the events it appends at an
//! expected version and those it records, written once each and committed together; a
//! version conflict found at commit rolls all of it back. A unit of work the caller opened
//! holds the command too.

use crate::support::pg_test;
use crate::support::tickets::{self, TicketOpened};
use cqrs_core::DispatchError;
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::{
    Command, CommandBus, CommandContext, CommandHandler, ErrorKind, EventRecord, Extensions,
    HandlerError, Message, Metadata, Query, QueryBus, QueryContext, QueryHandler, async_trait,
};
use cqrs_postgres::{PgDatabase, PgUnitOfWork};
use sqlx::AssertSqlSafe;

/// Writes a ticket row, appends `Noted` to `ticket-{id}` at `expected`, and records the same
/// event again plus an unkeyed one.
#[derive(Debug)]
struct Rename {
    id: String,
    expected: u64,
}

impl Message for Rename {
    const NAME: &'static str = "test.rename";
}

impl Command for Rename {
    type Output = ();
}

struct RenameHandler;

#[async_trait]
impl CommandHandler<Rename> for RenameHandler {
    async fn handle(&self, cmd: Rename, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        let uow = PgUnitOfWork::from_context(ctx)?;
        let insert = format!(
            "INSERT INTO \"{}\".tickets (id, title) VALUES ($1, 'renamed')",
            uow.database().schema()
        );
        sqlx::query(AssertSqlSafe(insert))
            .bind(&cmd.id)
            .execute(uow.connection().await?)
            .await
            .map_err(HandlerError::internal)?;
        ctx.record(TicketOpened {
            id: cmd.id.clone(),
            title: "unkeyed".into(),
        });
        let keyed = ctx
            .record_keyed(
                cmd.id.clone(),
                TicketOpened {
                    id: cmd.id.clone(),
                    title: "keyed".into(),
                },
            )
            .clone();
        // The keyed event also goes to the aggregate's stream at an expected version; recorded
        // too, it is stored once.
        let uow = PgUnitOfWork::from_context(ctx)?;
        uow.append(
            &format!("ticket-{}", cmd.id),
            ExpectedVersion::Exactly(cmd.expected),
            vec![EventRecord::from_envelope(&keyed).map_err(HandlerError::internal)?],
        );
        Ok(())
    }
}

#[derive(Debug)]
struct Ping;

impl Message for Ping {
    const NAME: &'static str = "test.ping";
}

impl Query for Ping {
    type Output = bool;
}

struct PingHandler;

#[async_trait]
impl QueryHandler<Ping> for PingHandler {
    async fn handle(&self, _q: Ping, ctx: &QueryContext) -> Result<bool, HandlerError> {
        Ok(ctx.extensions().get::<PgUnitOfWork>().is_none())
    }
}

pg_test! {
    async fn appended_and_recorded_events_commit_once_with_the_rows(db: PgDatabase) {
        tickets::create_table(&db).await;
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(RenameHandler)
            .build()
            .unwrap();
        bus.dispatch(Rename { id: "t1".into(), expected: 0 }).await.unwrap();

        let store = db.event_store();
        let aggregate = store.load("ticket-t1", 0).await.unwrap();
        assert_eq!(aggregate.len(), 1, "the appended event, once");
        assert_eq!(aggregate[0].payload["title"], "keyed");
        let unkeyed = store.load("TicketOpened", 0).await.unwrap();
        assert_eq!(unkeyed.len(), 1, "an unkeyed recorded event goes to its type's stream");
        assert_eq!(crate::support::event_count(&db).await, 2);
        assert_eq!(tickets::count(&db).await, 1);

        // Stale: the conflict at commit rolls back the row and every event.
        let err = bus.dispatch(Rename { id: "t2".into(), expected: 5 }).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
        assert_eq!(tickets::count(&db).await, 1);
        assert_eq!(crate::support::event_count(&db).await, 2);
        assert_eq!(store.stream_version("ticket-t2").await.unwrap(), 0);
    }
}

pg_test! {
    /// Two layers on one bus (a plugin's beside the server's) run the command in one
    /// transaction; two for different schemas, or with different settings, refuse it, and
    /// nothing is written.
    async fn a_second_command_layer_joins_the_first(db: PgDatabase) {
        tickets::create_table(&db).await;
        let handler = tickets::OpenTicketHandler::default();
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .layer(db.command_layer())
            .handler(handler.clone())
            .build()
            .unwrap();
        let id = bus.dispatch(tickets::OpenTicket::new("t1", tickets::Then::Succeed)).await.unwrap();
        assert_eq!(id, "t1");
        assert_eq!(tickets::count(&db).await, 1);
        assert_eq!(crate::support::event_count(&db).await, 1, "the event is stored once");
        bus.dispatch(tickets::OpenTicket::new("t2", tickets::Then::Fail)).await.unwrap_err();
        assert_eq!(tickets::count(&db).await, 1, "a failure rolls back through both");

        // A second layer with settings of its own would see them ignored: refused instead.
        let custom = db.command_layer().stream_for(|r| format!("custom-{}", r.event_type));
        let differing = [
            (db.command_layer(), db.command_layer().keep_events(true)),
            (db.command_layer(), custom.clone()),
            (custom.clone(), db.command_layer().stream_for(|r| format!("custom-{}", r.event_type))),
        ];
        for (outer, inner) in differing {
            let bus = CommandBus::builder()
                .layer(outer)
                .layer(inner)
                .handler(handler.clone())
                .build()
                .unwrap();
            let runs = handler.runs.load(std::sync::atomic::Ordering::SeqCst);
            let err = bus.dispatch(tickets::OpenTicket::new("t3", tickets::Then::Succeed)).await.unwrap_err();
            assert!(matches!(err, DispatchError::Middleware(_)), "{err:?}");
            assert!(err.to_string().contains("different settings"), "{err}");
            assert_eq!(handler.runs.load(std::sync::atomic::Ordering::SeqCst), runs, "the handler did not run");
        }
        // Clones of one layer agree.
        let bus = CommandBus::builder()
            .layer(custom.clone())
            .layer(custom)
            .handler(handler.clone())
            .build()
            .unwrap();
        bus.dispatch(tickets::OpenTicket::new("t4", tickets::Then::Succeed)).await.unwrap();
        let stored = db.event_store().load("custom-TicketOpened", 0).await.unwrap();
        assert_eq!(stored.len(), 1, "the event is stored once, where the layers name");
        assert_eq!(tickets::count(&db).await, 2);
        assert_eq!(crate::support::event_count(&db).await, 2);

        let other_id = cqrs_core::testing::test_id("second_layer_other");
        let Some(other) = crate::support::schema(&other_id).await else {
            return;
        };
        let mixed = CommandBus::builder()
            .layer(db.command_layer())
            .layer(other.command_layer())
            .handler(handler.clone())
            .build()
            .unwrap();
        let runs = handler.runs.load(std::sync::atomic::Ordering::SeqCst);
        let err = mixed.dispatch(tickets::OpenTicket::new("t3", tickets::Then::Succeed)).await.unwrap_err();
        assert!(matches!(err, DispatchError::Middleware(_)), "{err:?}");
        assert!(err.to_string().contains(other.schema()), "{err}");
        assert_eq!(handler.runs.load(std::sync::atomic::Ordering::SeqCst), runs, "the handler did not run");
        assert_eq!(tickets::count(&db).await, 2);
        assert_eq!(crate::support::event_count(&db).await, 2);
        other.drop_schema().await.unwrap();
    }
}

pg_test! {
    async fn recorded_events_go_to_the_stream_the_layer_names(db: PgDatabase) {
        tickets::create_table(&db).await;
        let bus = CommandBus::builder()
            .layer(db.command_layer().stream_for(|r| format!("custom-{}", r.event_type)))
            .handler(tickets::OpenTicketHandler::default())
            .build()
            .unwrap();
        bus.dispatch(tickets::OpenTicket::new("t1", tickets::Then::Succeed)).await.unwrap();
        bus.dispatch(tickets::OpenTicket::new("t2", tickets::Then::Succeed)).await.unwrap();
        let stream = db.event_store().load("custom-TicketOpened", 0).await.unwrap();
        assert_eq!(
            stream.iter().map(|r| r.stream_version).collect::<Vec<_>>(),
            [Some(1), Some(2)]
        );
    }
}

pg_test! {
    async fn queries_pass_through_and_a_bus_without_the_layer_is_explained(db: PgDatabase) {
        let queries = QueryBus::builder().handler(PingHandler).build().unwrap();
        assert!(queries.dispatch(Ping).await.unwrap(), "queries get no unit of work");

        let bare = CommandBus::builder().handler(RenameHandler).build().unwrap();
        let err = bare.dispatch(Rename { id: "t1".into(), expected: 0 }).await.unwrap_err();
        assert_eq!(err.handler_error().map(|e| e.code()), Some("no_unit_of_work"));
        assert_eq!(crate::support::event_count(&db).await, 0, "the refused command stored no events");
    }
}

pg_test! {
    /// A unit of work the caller opened and put in the dispatch holds the caller's write and
    /// the command's, and commits both; a bus without the layer refuses it to the handler.
    async fn a_command_runs_in_the_unit_of_work_its_caller_opened(db: PgDatabase) {
        tickets::create_table(&db).await;
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(tickets::OpenTicketHandler::default())
            .build()
            .unwrap();
        open_after_callers_write(&bus, &db, "t0", "t1", tickets::Then::Succeed)
            .await
            .unwrap();
        assert_eq!(tickets::count(&db).await, 2);
        assert_eq!(crate::support::event_count(&db).await, 1);

        // The same with a failing handler: the caller's write rolls back too.
        open_after_callers_write(&bus, &db, "t2", "t3", tickets::Then::Fail)
            .await
            .unwrap_err();
        assert_eq!(tickets::count(&db).await, 2);
        assert_eq!(crate::support::event_count(&db).await, 1);

        let bare = CommandBus::builder().handler(RenameHandler).build().unwrap();
        let mut extensions = Extensions::new();
        extensions.insert(PgUnitOfWork::new(db.clone()));
        let err = bare
            .execute_with_extensions(Rename { id: "t4".into(), expected: 0 }, Metadata::new(), extensions)
            .await
            .unwrap_err();
        assert_eq!(err.handler_error().map(|e| e.code()), Some("no_unit_of_work"));
    }
}

/// Opens a unit of work, writes ticket `written` in it as the caller would, then opens ticket
/// `opened` through `bus` in that same unit of work.
async fn open_after_callers_write(
    bus: &CommandBus,
    db: &PgDatabase,
    written: &str,
    opened: &str,
    then: tickets::Then,
) -> Result<(), DispatchError> {
    let mut uow = PgUnitOfWork::new(db.clone());
    let insert = format!(
        "INSERT INTO \"{}\".tickets (id, title) VALUES ('{written}', 'by the caller')",
        db.schema()
    );
    sqlx::query(AssertSqlSafe(insert))
        .execute(uow.connection().await.unwrap())
        .await
        .unwrap();
    let mut extensions = Extensions::new();
    extensions.insert(uow);
    bus.execute_with_extensions(
        tickets::OpenTicket::new(opened, then),
        Metadata::new(),
        extensions,
    )
    .await
    .map(|_| ())
}

/// Runs a statement in the command's transaction and records one event.
#[derive(Debug)]
struct Open {
    id: String,
}

impl Message for Open {
    const NAME: &'static str = "test.open";
}

impl Command for Open {
    type Output = ();
}

struct OpenHandler;

#[async_trait]
impl CommandHandler<Open> for OpenHandler {
    async fn handle(&self, cmd: Open, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        // The transaction begins here (a command that writes nothing else would append in
        // one autocommitted statement).
        let uow = PgUnitOfWork::from_context(ctx)?;
        sqlx::query("SELECT 1")
            .execute(uow.connection().await?)
            .await
            .map_err(HandlerError::internal)?;
        ctx.record(TicketOpened {
            id: cmd.id,
            title: "opened".into(),
        });
        Ok(())
    }
}

pg_test! {
    /// Once its handler succeeded, a command commits even if its caller stops waiting during
    /// the commit (a timeout, a client gone): its outcome does not depend on whether COMMIT
    /// had reached the server when the caller gave up.
    async fn a_command_whose_caller_stops_waiting_during_its_commit_still_commits(db: PgDatabase) {
        let store = db.event_store();
        // Another writer holds the append lock, so the command's commit waits for it.
        let mut held = db.pool().begin().await.unwrap();
        let held_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *held)
            .await
            .unwrap();
        store
            .append_in(&mut held, "other", ExpectedVersion::NO_STREAM, vec![crate::support::record(1)])
            .await
            .unwrap();
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(OpenHandler)
            .build()
            .unwrap();
        let dispatch = tokio::spawn(async move { bus.dispatch(Open { id: "t9".into() }).await });

        // Until the command's commit waits on this test's held lock (tests in other schemas
        // wait on locks of their own meanwhile).
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind(held_pid)
            .fetch_one(db.pool())
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the commit never waited on the lock");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The caller gives up.
        dispatch.abort();
        let _ = dispatch.await;
        held.commit().await.unwrap();

        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let streams: Vec<String> = store
                .read_all(cqrs_core::Position::START, 10)
                .await
                .unwrap()
                .into_iter()
                .filter_map(|r| r.stream_id)
                .collect();
            if streams.len() == 2 {
                assert_eq!(streams[0], "other");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the command's event was never committed: {streams:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
