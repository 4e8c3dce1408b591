//! A command's commit runs on a task of its own (so a caller that stops waiting does not cut
//! it off), through `dispatch` and through `PgCommandExecutor::execute_idempotent` alike; its
//! statements, the events' append among them, are still logged inside the caller's span, so a
//! command's trace holds its writes.

use crate::support::tickets::{self, OpenTicket, OpenTicketHandler, Then};
use crate::support::{logs, pg_test};
use cqrs_core::ports::StoredResponse;
use cqrs_core::{CommandBus, Metadata};
use cqrs_postgres::{IdempotencyKey, PgCommandExecutor};
use std::time::Duration;
use tracing::Instrument;

/// The span each dispatch runs in.
const SPAN: &str = "command_under_test";

pg_test! {
    async fn a_commands_statements_are_logged_inside_its_span(db: PgDatabase) {
        tickets::create_table(&db).await;
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(OpenTicketHandler::default())
            .build()
            .unwrap();
        bus.dispatch(OpenTicket::new("t1", Then::Succeed))
            .instrument(tracing::info_span!("command_under_test"))
            .await
            .unwrap();
        let executor = PgCommandExecutor::new(bus, db.clone());
        let key = IdempotencyKey::new("POST /tickets", "k", "fp", Duration::from_secs(60));
        let respond = |id: &String| StoredResponse::new(201, serde_json::json!({ "id": id }));
        executor
            .execute_idempotent(&key, OpenTicket::new("t2", Then::Succeed), Metadata::new(), respond)
            .instrument(tracing::info_span!("command_under_test"))
            .await
            .unwrap();

        // This test's appends: the statements that name its schema's append function, the
        // migration that creates it aside.
        let appends: Vec<_> = logs::kept()
            .iter()
            .filter(|line| {
                line.target == "sqlx::query"
                    && line.fields.contains(db.schema())
                    && line.fields.contains("append_event")
                    && !line.fields.contains("CREATE FUNCTION")
            })
            .cloned()
            .collect();
        assert_eq!(appends.len(), 2, "one append per command: {appends:#?}");
        for append in appends {
            assert!(
                append.spans.contains(&SPAN),
                "an append was logged outside the command's span: {append:?}"
            );
        }
    }
}
