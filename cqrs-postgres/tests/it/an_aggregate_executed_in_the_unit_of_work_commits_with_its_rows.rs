//! `PgUnitOfWork::execute` loads an aggregate in the command's transaction, decides, and
//! stages its events: they commit with the handler's own rows, or not at all, and a writer
//! that appended to the stream after the load fails the command with a conflict.

use crate::support::tickets;
use crate::support::{event_count, pg_test};
use cqrs_core::doc::{Ticket, TicketCommand};
use cqrs_core::ports::{EventStore, ExpectedVersion};
use cqrs_core::{
    AggregateRepository, Command, CommandBus, CommandContext, CommandHandler, ErrorKind,
    HandlerError, Message, async_trait,
};
use cqrs_postgres::{PgDatabase, PgUnitOfWork};
use sqlx::AssertSqlSafe;
use std::sync::Arc;

/// Opens ticket `id` and writes its row; then fails, or lets another writer append to the
/// ticket's stream first, on request.
#[derive(Debug)]
struct OpenAndList {
    id: &'static str,
    then: Then,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Then {
    Succeed,
    Fail,
    AnotherWriterAppends,
    /// Appends the ticket's opening in the transaction before `execute`: its load sees it.
    OpenedInTheTransactionFirst,
    /// Executes a second time on the same ticket.
    ExecuteTwice,
    /// Stages a guard (no events at version 0) on the ticket's stream first.
    GuardedFirst,
}

impl Message for OpenAndList {
    const NAME: &'static str = "test.open_and_list";
}

impl Command for OpenAndList {
    type Output = u64;
}

struct Handler {
    db: PgDatabase,
    repo: AggregateRepository<Ticket>,
}

#[async_trait]
impl CommandHandler<OpenAndList> for Handler {
    async fn handle(
        &self,
        cmd: OpenAndList,
        ctx: &mut CommandContext,
    ) -> Result<u64, HandlerError> {
        let metadata = ctx.metadata().clone();
        let uow = PgUnitOfWork::from_context(ctx)?;
        if cmd.then == Then::OpenedInTheTransactionFirst {
            let opened = self
                .repo
                .decide(cmd.id, None, TicketCommand::Open, &metadata)
                .await
                .map_err(HandlerError::from)?;
            let stream = AggregateRepository::<Ticket>::stream_id(cmd.id);
            self.db
                .event_store()
                .append_in(
                    uow.connection().await?,
                    &stream,
                    ExpectedVersion::Exactly(0),
                    opened.records,
                )
                .await?;
        }
        if cmd.then == Then::GuardedFirst {
            let stream = AggregateRepository::<Ticket>::stream_id(cmd.id);
            uow.append(&stream, ExpectedVersion::Exactly(0), Vec::new());
        }
        let decided = uow
            .execute(&self.repo, cmd.id, None, TicketCommand::Open, &metadata)
            .await?;
        assert!(decided.state.open);
        let insert = format!(
            "INSERT INTO \"{}\".tickets (id, title) VALUES ($1, 'listed')",
            self.db.schema()
        );
        sqlx::query(AssertSqlSafe(insert))
            .bind(cmd.id)
            .execute(uow.connection().await?)
            .await
            .map_err(HandlerError::internal)?;
        match cmd.then {
            Then::Succeed | Then::OpenedInTheTransactionFirst | Then::GuardedFirst => {}
            Then::ExecuteTwice => {
                uow.execute(&self.repo, cmd.id, None, TicketCommand::Open, &metadata)
                    .await?;
            }
            Then::Fail => return Err(HandlerError::invalid("refused", "after the writes")),
            Then::AnotherWriterAppends => {
                // On a connection of its own, committed at once: the stream moves past the
                // version this command loaded.
                let other = self
                    .repo
                    .decide(
                        "elsewhere",
                        None,
                        TicketCommand::Open,
                        &cqrs_core::Metadata::new(),
                    )
                    .await
                    .map_err(HandlerError::from)?;
                let stream = AggregateRepository::<Ticket>::stream_id(cmd.id);
                self.db
                    .event_store()
                    .append(&stream, ExpectedVersion::Any, other.records)
                    .await?;
            }
        }
        Ok(decided.version + decided.records.len() as u64)
    }
}

pg_test! {
    async fn an_aggregate_executed_in_the_unit_of_work_commits_with_its_rows(db: PgDatabase) {
        tickets::create_table(&db).await;
        let store: Arc<dyn EventStore> = Arc::new(db.event_store());
        let handler = Handler { db: db.clone(), repo: AggregateRepository::new(store) };
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(handler)
            .build()
            .unwrap();

        let version = bus.dispatch(OpenAndList { id: "t1", then: Then::Succeed }).await.unwrap();
        assert_eq!(version, 1);
        assert_eq!((tickets::count(&db).await, event_count(&db).await), (1, 1));

        // Loaded in the transaction, it has its event: the aggregate refuses a second open.
        let again = bus.dispatch(OpenAndList { id: "t1", then: Then::Succeed }).await;
        let again = again.expect_err("already open");
        assert_eq!((again.kind(), again.to_string().contains("already open")), (ErrorKind::Conflict, true), "{again}");

        // A handler that fails after it: neither the row nor the event.
        let failed = bus.dispatch(OpenAndList { id: "t2", then: Then::Fail }).await;
        assert_eq!(failed.expect_err("fails").kind(), ErrorKind::Invalid);
        assert_eq!((tickets::count(&db).await, event_count(&db).await), (1, 1));

        // Another writer got in after the load: a conflict at commit, nothing of this command.
        let raced = bus.dispatch(OpenAndList { id: "t3", then: Then::AnotherWriterAppends }).await;
        assert_eq!(raced.expect_err("conflicts").kind(), ErrorKind::Conflict);
        assert_eq!(tickets::count(&db).await, 1, "no row of the raced command");
        assert_eq!(event_count(&db).await, 2, "the other writer's event alone");

        // The load runs in the transaction: it sees what the handler stored there before.
        let seen = bus.dispatch(OpenAndList { id: "t4", then: Then::OpenedInTheTransactionFirst }).await;
        let seen = seen.expect_err("already open in the transaction");
        assert_eq!(seen.kind(), ErrorKind::Conflict, "{seen}");
        assert!(seen.to_string().contains("already open"), "{seen}");

        // A second execute on an aggregate with events staged is refused, saying why.
        let twice = bus.dispatch(OpenAndList { id: "t5", then: Then::ExecuteTwice }).await;
        let twice = twice.expect_err("refused");
        assert_eq!(twice.kind(), ErrorKind::Internal, "{twice}");
        assert!(twice.to_string().contains("already has events staged"), "{twice}");
        assert_eq!((tickets::count(&db).await, event_count(&db).await), (1, 2), "nothing more");

        // A guard staged first (no events) hides nothing from the load: not refused.
        let guarded = bus.dispatch(OpenAndList { id: "t6", then: Then::GuardedFirst }).await;
        assert_eq!(guarded.unwrap(), 1);
        assert_eq!((tickets::count(&db).await, event_count(&db).await), (2, 3));
    }
}
