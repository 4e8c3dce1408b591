//! A command's commit runs on a task of its own (so a caller that stops waiting does not cut
//! it off), through `dispatch` and through `PgCommandExecutor::execute_idempotent` alike; its
//! statements, the events' append among them, are still logged inside the caller's span, so a
//! command's trace holds its writes.

use crate::support::pg_test;
use crate::support::tickets::{self, OpenTicket, OpenTicketHandler, Then};
use cqrs_core::ports::StoredResponse;
use cqrs_core::{CommandBus, Metadata};
use cqrs_postgres::{IdempotencyKey, PgCommandExecutor};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tracing::subscriber::Interest;
use tracing::{Event, Instrument, Metadata as CallsiteMetadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// The span each dispatch runs in.
const SPAN: &str = "command_under_test";

/// sqlx's logs of appends (target `sqlx::query`): each one's fields, and whether a span named
/// [`SPAN`] encloses it.
type Statements = Mutex<Vec<(String, bool)>>;

struct Collect(&'static Statements);

fn wanted(metadata: &CallsiteMetadata<'_>) -> bool {
    metadata.target() == "sqlx::query" || metadata.name() == SPAN
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Collect {
    fn register_callsite(&self, metadata: &'static CallsiteMetadata<'static>) -> Interest {
        if wanted(metadata) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &CallsiteMetadata<'_>, _: Context<'_, S>) -> bool {
        wanted(metadata)
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        // Only appends are asked about: the other statements of the binary's tests are not kept.
        if !fields.0.contains("append_event") {
            return;
        }
        let inside = ctx
            .event_scope(event)
            .is_some_and(|mut scope| scope.any(|span| span.name() == SPAN));
        self.0.lock().unwrap().push((fields.0, inside));
    }
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

/// The binary's global subscriber, installed once: a thread's default would not see the
/// commit's task, which may run on another worker thread.
fn statements() -> &'static Statements {
    static STATEMENTS: OnceLock<&'static Statements> = OnceLock::new();
    STATEMENTS.get_or_init(|| {
        let statements: &'static Statements = Box::leak(Box::default());
        let subscriber = tracing_subscriber::registry().with(Collect(statements));
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other test of this binary installs a global subscriber");
        statements
    })
}

pg_test! {
    async fn a_commands_statements_are_logged_inside_its_span(db: PgDatabase) {
        let statements = statements();
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

        // This test's appends: the statements that name its schema's append function.
        let appends: Vec<_> = statements
            .lock()
            .unwrap()
            .iter()
            .filter(|(fields, _)| fields.contains(db.schema()) && fields.contains("append_event"))
            .cloned()
            .collect();
        assert_eq!(appends.len(), 2, "one append per command: {appends:#?}");
        for (fields, inside) in appends {
            assert!(inside, "an append was logged outside the command's span: {fields}");
        }
    }
}
