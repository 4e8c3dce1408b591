//! sqlx (0.9) answers a savepoint's `begin()` that fails (in a transaction a failed statement
//! aborted) or is given up in flight with a plain `ROLLBACK`: the enclosing transaction ends,
//! and what follows on the connection commits statement by statement. A unit of work used to
//! go on regardless: the command's later writes and events committed one by one, its earlier
//! ones were gone, and the dispatch succeeded; a projection's inbox entries and checkpoint
//! committed outside the consumer's lock. Now both units notice their transaction is gone and
//! refuse to go on or commit.

use crate::support::tickets::{self, TicketOpened};
use crate::support::{event_count, pg_test};
use cqrs_core::ports::ProjectionStore;
use cqrs_core::{
    Command, CommandBus, CommandContext, CommandHandler, ErrorKind, HandlerError, Message,
    Position, async_trait,
};
use cqrs_postgres::PgUnitOfWork;
use sqlx::{AssertSqlSafe, Connection};

/// Inserts `{id}-a`, runs a statement that fails and ignores it, ignores the failed `begin()`
/// of a savepoint, then inserts `{id}-b`, records an event and succeeds.
#[derive(Debug)]
struct GoOnAfterAFailedSavepoint {
    id: &'static str,
    /// Ask the unit of work for its connection again before the second insert.
    ask_again: bool,
}

impl Message for GoOnAfterAFailedSavepoint {
    const NAME: &'static str = "test.go_on_after_a_failed_savepoint";
}

impl Command for GoOnAfterAFailedSavepoint {
    type Output = ();
}

struct Handler;

#[async_trait]
impl CommandHandler<GoOnAfterAFailedSavepoint> for Handler {
    async fn handle(
        &self,
        cmd: GoOnAfterAFailedSavepoint,
        ctx: &mut CommandContext,
    ) -> Result<(), HandlerError> {
        let uow = PgUnitOfWork::from_context(ctx)?;
        let insert = format!(
            "INSERT INTO \"{}\".tickets (id, title) VALUES ($1, 'a ticket')",
            uow.database().schema()
        );
        let conn = uow.connection().await?;
        sqlx::query(AssertSqlSafe(insert.clone()))
            .bind(format!("{}-a", cmd.id))
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::internal)?;
        sqlx::raw_sql("SELECT 1/0")
            .execute(&mut *conn)
            .await
            .expect_err("a division by zero fails");
        conn.begin()
            .await
            .expect_err("a savepoint in an aborted transaction fails to begin");
        let second = sqlx::query(AssertSqlSafe(insert)).bind(format!("{}-b", cmd.id));
        if cmd.ask_again {
            let conn = uow.connection().await?;
            second.execute(conn).await
        } else {
            second.execute(conn).await
        }
        .map_err(HandlerError::internal)?;
        ctx.record_keyed(
            cmd.id,
            TicketOpened {
                id: cmd.id.to_owned(),
                title: String::new(),
            },
        );
        Ok(())
    }
}

pg_test! {
    async fn a_command_whose_savepoint_failed_to_begin_does_not_succeed(db: PgDatabase) {
        tickets::create_table(&db).await;
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(Handler)
            .build()
            .unwrap();

        let cmd = GoOnAfterAFailedSavepoint { id: "t1", ask_again: true };
        let refused = bus.dispatch(cmd).await.expect_err("the connection is refused");
        assert_eq!(refused.kind(), ErrorKind::Internal, "{refused}");
        assert!(refused.to_string().contains("ended under"), "{refused}");
        assert_eq!(tickets::count(&db).await, 0, "no ticket rows");

        // On the connection it already holds, the handler's own statements commit one by one
        // (sqlx's doing, out of the unit of work's reach); the commit refuses, so neither the
        // events nor the success are reported.
        let cmd = GoOnAfterAFailedSavepoint { id: "t2", ask_again: false };
        let refused = bus.dispatch(cmd).await.expect_err("the commit is refused");
        assert_eq!(refused.kind(), ErrorKind::Internal, "{refused}");
        assert!(refused.to_string().contains("ended under"), "{refused}");
        assert_eq!(event_count(&db).await, 0, "no events");
    }
}

pg_test! {
    async fn a_projection_unit_whose_savepoint_failed_to_begin_writes_nothing(db: PgDatabase) {
        let store = db.projection_store();
        let mut unit = store.begin("p").await.unwrap();
        store
            .save_checkpoint(&mut unit, "p", Position::new(3))
            .await
            .unwrap();
        sqlx::raw_sql("SELECT 1/0")
            .execute(unit.connection())
            .await
            .expect_err("a division by zero fails");
        unit.connection()
            .begin()
            .await
            .expect_err("a savepoint in an aborted transaction fails to begin");

        let refused = store
            .mark_processed(&mut unit, "p", uuid::Uuid::now_v7())
            .await
            .expect_err("no inbox entry outside the unit's transaction");
        assert!(refused.to_string().contains("ended under"), "{refused}");
        let refused = store
            .save_checkpoint(&mut unit, "p", Position::new(4))
            .await
            .expect_err("no checkpoint outside the unit's transaction");
        assert!(refused.to_string().contains("ended under"), "{refused}");
        let refused = store.commit(unit).await.expect_err("nothing to commit");
        assert!(refused.to_string().contains("ended under"), "{refused}");

        let mut unit = store.begin("p").await.unwrap();
        assert_eq!(store.checkpoint(&mut unit, "p").await.unwrap(), None);
        store
            .mark_processed(&mut unit, "p", uuid::Uuid::nil())
            .await
            .expect("a new unit works");
    }
}

pg_test! {
    /// `PgDatabase::begin`'s transaction refuses to commit once a savepoint's failed `begin()`
    /// ended it: sqlx's own `commit` sends nothing at depth 0 and reports success, although
    /// what ran before is rolled back and what ran after committed statement by statement.
    async fn a_transaction_of_your_own_refuses_to_commit_once_a_savepoint_ended_it(db: PgDatabase) {
        let mut tx = db.begin().await.expect("begin");
        sqlx::raw_sql("SELECT 1/0")
            .execute(&mut *tx)
            .await
            .expect_err("a division by zero fails");
        sqlx::Acquire::begin(&mut tx)
            .await
            .expect_err("a savepoint in an aborted transaction fails to begin");
        let error = tx.commit().await.expect_err("nothing of the transaction is committed");
        let message = error.to_string();
        assert!(message.contains("rolled back under it"), "{message}");

        // A savepoint that begins and commits leaves the transaction to commit as usual.
        let mut tx = db.begin().await.expect("begin");
        let savepoint = sqlx::Acquire::begin(&mut tx).await.expect("a savepoint");
        savepoint.commit().await.expect("the savepoint is released");
        tx.commit().await.expect("the transaction commits");
    }
}
