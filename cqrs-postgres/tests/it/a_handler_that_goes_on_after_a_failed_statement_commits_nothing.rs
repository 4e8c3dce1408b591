//! A handler that goes on after one of its statements failed (a unique violation taken as
//! "already there") commits nothing, and its command fails: Postgres answers `COMMIT` in an
//! aborted transaction with a rollback and no error, so the command used to report success
//! with nothing stored. A statement run in a savepoint may fail without that.

use crate::support::tickets::{self, TicketOpened};
use crate::support::{event_count, pg_test};
use cqrs_core::{
    Command, CommandBus, CommandContext, CommandHandler, ErrorKind, HandlerError, Message,
    async_trait,
};
use cqrs_postgres::PgUnitOfWork;
use sqlx::{AssertSqlSafe, Connection};

/// Inserts the ticket `id` twice (the second insert violates the primary key), then succeeds.
#[derive(Debug)]
struct InsertTwice {
    id: &'static str,
    /// Record an event too (its append then runs in the transaction before `COMMIT`).
    record: bool,
    /// Run the second insert in a savepoint, as a handler that expects it to fail should.
    savepoint: bool,
}

impl Message for InsertTwice {
    const NAME: &'static str = "test.insert_twice";
}

impl Command for InsertTwice {
    type Output = ();
}

struct InsertTwiceHandler;

#[async_trait]
impl CommandHandler<InsertTwice> for InsertTwiceHandler {
    async fn handle(&self, cmd: InsertTwice, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        let uow = PgUnitOfWork::from_context(ctx)?;
        let insert = format!(
            "INSERT INTO \"{}\".tickets (id, title) VALUES ($1, 'a ticket')",
            uow.database().schema()
        );
        let conn = uow.connection().await?;
        sqlx::query(AssertSqlSafe(insert.clone()))
            .bind(cmd.id)
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::internal)?;
        let again = if cmd.savepoint {
            let mut savepoint = conn.begin().await.map_err(HandlerError::internal)?;
            let again = sqlx::query(AssertSqlSafe(insert))
                .bind(cmd.id)
                .execute(&mut *savepoint)
                .await;
            // Dropped: rolled back to the savepoint, the transaction goes on.
            drop(savepoint);
            again
        } else {
            sqlx::query(AssertSqlSafe(insert))
                .bind(cmd.id)
                .execute(&mut *conn)
                .await
        };
        let violation = again.expect_err("the second insert violates the primary key");
        assert!(
            violation
                .as_database_error()
                .is_some_and(|e| e.is_unique_violation()),
            "{violation}"
        );
        if cmd.record {
            ctx.record_keyed(
                cmd.id,
                TicketOpened {
                    id: cmd.id.to_owned(),
                    title: String::new(),
                },
            );
        }
        Ok(())
    }
}

pg_test! {
    async fn a_handler_that_ignores_a_failed_statement_does_not_succeed(db: PgDatabase) {
        tickets::create_table(&db).await;
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(InsertTwiceHandler)
            .build()
            .unwrap();

        for (id, record) in [("t1", false), ("t2", true)] {
            let cmd = InsertTwice { id, record, savepoint: false };
            let failed = bus.dispatch(cmd).await.expect_err("nothing was committed");
            assert_eq!(failed.kind(), ErrorKind::Internal, "{failed}");
            if !record {
                assert!(failed.to_string().contains("aborted"), "{failed}");
            }
        }
        assert_eq!(tickets::count(&db).await, 0, "no ticket rows");
        assert_eq!(event_count(&db).await, 0, "no events");

        // The failed statement in a savepoint: the rest commits.
        for (id, record) in [("t3", false), ("t4", true)] {
            let cmd = InsertTwice { id, record, savepoint: true };
            bus.dispatch(cmd).await.unwrap();
        }
        assert_eq!(tickets::count(&db).await, 2);
        assert_eq!(event_count(&db).await, 1);
    }
}
