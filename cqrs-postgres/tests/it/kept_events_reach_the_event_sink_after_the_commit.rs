//! `keep_events(true)`: the events a command recorded go to the bus's event sink once they
//! are committed, through `dispatch` and through `PgCommandExecutor::execute_idempotent`
//! alike (the executor used to return them and give the sink none); without it the sink gets
//! none, and the relay is their only way out. The position of the last event a command
//! stored comes back to its caller, through both ways as well.

use crate::support::pg_test;
use crate::support::tickets::{self, OpenTicket, OpenTicketHandler, Then};
use cqrs_core::ports::StoredResponse;
use cqrs_core::{CommandBus, DispatchError, EventEnvelope, EventSink, Metadata, async_trait};
use cqrs_postgres::{IdempotencyKey, Idempotent, PgCommandExecutor, PgDatabase};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Keeps the partition key of each event it gets, and the number of tickets committed then.
struct Seen {
    db: PgDatabase,
    events: Mutex<Vec<(String, i64)>>,
}

#[async_trait]
impl EventSink for Seen {
    async fn accept(&self, events: Vec<EventEnvelope>) -> Result<(), DispatchError> {
        let committed = tickets::count(&self.db).await;
        let mut seen = self.events.lock().unwrap();
        for event in events {
            seen.push((
                event.partition_key().unwrap_or_default().to_owned(),
                committed,
            ));
        }
        Ok(())
    }
}

fn respond(id: &String) -> StoredResponse {
    StoredResponse::new(201, serde_json::json!({ "id": id }))
}

pg_test! {
    async fn kept_events_reach_the_sink_once_committed(db: PgDatabase) {
        tickets::create_table(&db).await;
        for keep in [true, false] {
            let sink = Arc::new(Seen { db: db.clone(), events: Mutex::default() });
            let bus = CommandBus::builder()
                .layer(db.command_layer().keep_events(keep))
                .handler(OpenTicketHandler::default())
                .event_sink(sink.clone())
                .build()
                .unwrap();
            let executor = PgCommandExecutor::new(bus.clone(), db.clone());
            let (plain, keyed) = if keep { ("k1", "k2") } else { ("n1", "n2") };
            let before = tickets::count(&db).await;

            bus.dispatch(OpenTicket::new(plain, Then::Succeed)).await.unwrap();
            let key = IdempotencyKey::new("POST /tickets", keyed, "fp", Duration::from_secs(60));
            let done = executor
                .execute_idempotent(&key, OpenTicket::new(keyed, Then::Succeed), Metadata::new(), respond)
                .await
                .unwrap();
            let Idempotent::Executed { events, .. } = done else {
                panic!("the first request runs");
            };
            assert_eq!(events.len(), usize::from(keep), "the events the layer kept are returned too");
            // A replay runs nothing and hands nothing on.
            let again = executor
                .execute_idempotent(&key, OpenTicket::new(keyed, Then::Succeed), Metadata::new(), respond)
                .await
                .unwrap();
            assert!(matches!(again, Idempotent::Replayed(_)), "{again:?}");

            let seen = sink.events.lock().unwrap().clone();
            if keep {
                assert_eq!(
                    seen,
                    [(plain.to_owned(), before + 1), (keyed.to_owned(), before + 2)],
                    "each event once, after its command's row committed"
                );
            } else {
                assert_eq!(seen, [], "the layer took them: the relay ships them");
            }
        }
    }
}

/// Holds each `accept` until released, after saying it was entered; then keeps the events'
/// partition keys.
#[derive(Default)]
struct Held {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
    events: Mutex<Vec<String>>,
}

#[async_trait]
impl EventSink for Held {
    async fn accept(&self, events: Vec<EventEnvelope>) -> Result<(), DispatchError> {
        self.entered.notify_one();
        self.release.notified().await;
        let mut seen = self.events.lock().unwrap();
        seen.extend(
            events
                .iter()
                .map(|e| e.partition_key().unwrap_or_default().to_owned()),
        );
        Ok(())
    }
}

pg_test! {
    /// A caller of `execute_idempotent` that stops waiting once the command committed (a
    /// timeout, a client gone) does not take the kept events away from the sink: the commit
    /// and the hand-over finish in a task of their own, as the layer's commit does. They ran
    /// on the caller's task, so the sink's `accept` was dropped half-way.
    async fn kept_events_reach_the_sink_when_the_caller_stops_waiting(db: PgDatabase) {
        tickets::create_table(&db).await;
        let sink = Arc::new(Held::default());
        let bus = CommandBus::builder()
            .layer(db.command_layer().keep_events(true))
            .handler(OpenTicketHandler::default())
            .event_sink(sink.clone())
            .build()
            .unwrap();
        let executor = PgCommandExecutor::new(bus, db.clone());
        let key = IdempotencyKey::new("POST /tickets", "gone", "fp", Duration::from_secs(60));
        let execute = executor.execute_idempotent(
            &key,
            OpenTicket::new("gone", Then::Succeed),
            Metadata::new(),
            respond,
        );
        tokio::select! {
            done = execute => panic!("the sink holds the command: {done:?}"),
            () = sink.entered.notified() => {}
        }
        // The caller gave up (its future is dropped); the sink is released.
        sink.release.notify_one();
        cqrs_core::testing::eventually(Duration::from_secs(10), "the event in the sink", || {
            let seen = sink.events.lock().unwrap().clone();
            async move { (seen == ["gone"]).then_some(()) }
        })
        .await;
    }
}

pg_test! {
    /// A command's position, the last event it stored, comes back from the bus
    /// (`Executed::position`) and from the executor (`Idempotent::Executed::position`): what
    /// a reader waits for before reading a projection of it. A command that stored nothing
    /// has none.
    async fn a_commands_stored_position_comes_back_to_its_caller(db: PgDatabase) {
        use cqrs_core::ports::EventStore;
        tickets::create_table(&db).await;
        let bus = CommandBus::builder()
            .layer(db.command_layer())
            .handler(OpenTicketHandler::default())
            .build()
            .unwrap();
        let last_stored = || async {
            db.event_store()
                .read_all(cqrs_core::Position::START, 100)
                .await
                .unwrap()
                .last()
                .and_then(|record| record.position)
        };
        let executed = bus
            .execute(OpenTicket::new("t1", Then::Succeed), Metadata::new())
            .await
            .unwrap();
        assert!(executed.position().is_some());
        assert_eq!(executed.position(), last_stored().await);

        let executor = PgCommandExecutor::new(bus, db.clone());
        let key = IdempotencyKey::new("POST /tickets", "k", "fp", Duration::from_secs(60));
        let Idempotent::Executed { position, .. } = executor
            .execute_idempotent(&key, OpenTicket::new("t2", Then::Succeed), Metadata::new(), respond)
            .await
            .unwrap()
        else {
            panic!("the first request runs");
        };
        assert!(position > executed.position(), "{position:?}");
        assert_eq!(position, last_stored().await);

        // A command that only records events: one statement, its own transaction.
        let notes = CommandBus::builder()
            .layer(db.command_layer())
            .handler(tickets::NoteHandler)
            .build()
            .unwrap();
        let noted = notes.execute(tickets::Note("n1"), Metadata::new()).await.unwrap();
        assert!(noted.position() > position, "{:?}", noted.position());
        assert_eq!(noted.position(), last_stored().await);

        // Nothing stored: none, also when a position came in with the dispatch (an earlier
        // command's extensions passed on).
        let nothing = CommandBus::builder()
            .layer(db.command_layer())
            .handler(RecordsNothing)
            .build()
            .unwrap();
        let mut handed_in = cqrs_core::Extensions::new();
        handed_in.insert(cqrs_core::StoredPosition(noted.position().unwrap()));
        let executed = nothing
            .execute_with_extensions(Nothing, Metadata::new(), handed_in)
            .await
            .unwrap();
        assert_eq!(executed.position(), None, "nothing stored");
    }
}

/// A command that stores nothing.
#[derive(Debug)]
struct Nothing;

impl cqrs_core::Message for Nothing {
    const NAME: &'static str = "test.nothing";
}

impl cqrs_core::Command for Nothing {
    type Output = ();
}

struct RecordsNothing;

#[async_trait]
impl cqrs_core::CommandHandler<Nothing> for RecordsNothing {
    async fn handle(
        &self,
        _: Nothing,
        _: &mut cqrs_core::CommandContext,
    ) -> Result<(), cqrs_core::HandlerError> {
        Ok(())
    }
}
