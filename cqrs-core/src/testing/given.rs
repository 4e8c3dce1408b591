//! Given / when / then for aggregates.

use crate::{
    Aggregate, AggregateRepository, EventEnvelope, EventRecord, EventSet, EventTypes, Metadata,
};
use std::fmt::Debug;

/// Tests an aggregate's decisions without a store: given past events, when a command, then
/// these events or this error.
///
/// ```
/// # use cqrs_core::doc::{Ticket, TicketCommand, TicketOpened};
/// use cqrs_core::testing::AggregateTest;
///
/// AggregateTest::<Ticket>::given_no_events()
///     .when(TicketCommand::Open)
///     .then_expect_events([TicketOpened { ticket_id: "t1".into() }]);
///
/// let err = AggregateTest::<Ticket>::given([TicketOpened { ticket_id: "t1".into() }])
///     .when(TicketCommand::Open)
///     .then_expect_error();
/// assert_eq!(err.code(), "already_open");
/// ```
#[derive(Debug)]
pub struct AggregateTest<A: Aggregate> {
    state: A,
    version: u64,
}

/// The aggregate id an [`AggregateTest`] replays its events under.
pub const TEST_AGGREGATE_ID: &str = "test";

/// `event` as the repository hands it to [`Aggregate::apply_with`]: serialized into a record,
/// stored at `version` in the test aggregate's stream, decoded through the aggregate's event
/// types. A member that does not survive the trip (a field serde skips, a name another member
/// shares) fails the test here, not in production. With no event store there is no global
/// position: the envelope's `position()` is `None`, where the repository's has the store's.
#[track_caller]
fn replayed<A: Aggregate>(
    event: A::Event,
    metadata: Metadata,
    version: u64,
) -> (A::Event, EventEnvelope) {
    let stream = AggregateRepository::<A>::stream_id(TEST_AGGREGATE_ID);
    let envelope = event
        .into_envelope(metadata)
        .with_partition_key(stream.as_str())
        .with_stored(stream.as_str(), version, None);
    let record = EventRecord::from_envelope(&envelope).expect("the event serializes");
    let mut types = EventTypes::new();
    A::Event::register(&mut types);
    let decoded = match types.decode(&record) {
        Ok(Some(decoded)) => decoded,
        Ok(None) => panic!(
            "event `{}` is not among the aggregate's event types: the repository would not replay it",
            record.event_type
        ),
        Err(e) => panic!("event `{}` does not decode: {e}", record.event_type),
    };
    // A `match`, not `unwrap_or_else`: a panic in a closure would name this file, not the
    // caller's test (`#[track_caller]` does not reach into closures).
    let event = match A::Event::from_envelope(&decoded) {
        Some(event) => event,
        None => panic!(
            "event `{}` decodes to no member of the aggregate's event set",
            record.event_type
        ),
    };
    (event, decoded)
}

impl<A: Aggregate> AggregateTest<A> {
    /// An aggregate that has seen nothing.
    pub fn given_no_events() -> Self {
        Self {
            state: A::default(),
            version: 0,
        }
    }

    /// An aggregate that has seen these events, in order, each in an envelope with fresh
    /// metadata: replayed through [`Aggregate::apply_with`] as the repository replays them,
    /// after a round trip through serde and the aggregate's event types, as versions 1, 2, ...
    /// of the stream of aggregate [`TEST_AGGREGATE_ID`].
    #[track_caller]
    pub fn given<E: Into<A::Event>>(events: impl IntoIterator<Item = E>) -> Self {
        Self::given_with(events.into_iter().map(|e| (e, Metadata::new())))
    }

    /// Like [`given`](Self::given), with the metadata each event carries (who acted, when):
    /// for aggregates whose [`apply_with`](Aggregate::apply_with) keeps it.
    #[track_caller]
    pub fn given_with<E: Into<A::Event>>(events: impl IntoIterator<Item = (E, Metadata)>) -> Self {
        let mut test = Self::given_no_events();
        for (event, metadata) in events {
            test.version += 1;
            let (event, envelope) = replayed::<A>(event.into(), metadata, test.version);
            test.state.apply_with(&event, &envelope);
        }
        test
    }

    /// An aggregate that has seen these records, as they are stored (payloads of older schema
    /// versions included), rebuilt as the repository rebuilds its stream: each decoded through
    /// `types`, with its upcasters, as versions 1, 2, ... of the stream of aggregate
    /// [`TEST_AGGREGATE_ID`]. Pass the [`EventTypes`] the repository gets
    /// ([`AggregateRepository::with_types`]) to check that old events still rebuild the
    /// state. A record that does not decode or apply fails the test, with the repository's
    /// error.
    ///
    /// ```
    /// # use cqrs_core::doc::{Ticket, TicketCommand, TicketEvents, TicketOpened};
    /// use cqrs_core::testing::AggregateTest;
    /// use cqrs_core::{EventRecord, EventSet, EventTypes, Metadata, RecordMetadata};
    /// use std::sync::Arc;
    ///
    /// let mut types = EventTypes::new();
    /// TicketEvents::register(&mut types);
    /// // As a store holds it: the wire name, a schema version, the JSON payload.
    /// let metadata = Metadata::new();
    /// let stored = EventRecord::new(
    ///     metadata.message_id,
    ///     "TicketOpened",
    ///     1,
    ///     cqrs_core::reexports::serde_json::json!({ "ticket_id": "t1" }),
    ///     RecordMetadata::from_metadata(&metadata),
    /// );
    /// let err = AggregateTest::<Ticket>::given_records(Arc::new(types), [stored])
    ///     .when(TicketCommand::Open)
    ///     .then_expect_error();
    /// assert_eq!(err.code(), "already_open");
    /// ```
    #[track_caller]
    pub fn given_records(
        types: std::sync::Arc<EventTypes>,
        records: impl IntoIterator<Item = EventRecord>,
    ) -> Self
    where
        A::Error: Debug,
    {
        let stream = AggregateRepository::<A>::stream_id(TEST_AGGREGATE_ID);
        let records: Vec<EventRecord> = records
            .into_iter()
            .enumerate()
            .map(|(i, record)| record.with_stream(stream.as_str(), i as u64 + 1))
            .collect();
        // A repository only to rebuild: its store is never read.
        let repo = AggregateRepository::<A>::with_types(
            std::sync::Arc::new(crate::memory::InMemoryEventStore::new()),
            types,
        );
        match repo.rebuild(TEST_AGGREGATE_ID, records) {
            Ok(loaded) => Self {
                state: loaded.state,
                version: loaded.version,
            },
            Err(e) => panic!("the records do not rebuild the aggregate: {e:?}"),
        }
    }

    /// Decides on `command`, sent with fresh metadata (no actor): see
    /// [`when_with`](Self::when_with).
    #[track_caller]
    pub fn when(self, command: A::Command) -> Then<A> {
        self.when_with(command, &Metadata::new())
    }

    /// Decides on `command`, sent with `metadata`. The decided events are then applied to a
    /// copy of the state (and make the same round trip as [`given`](Self::given)'s), so an
    /// `apply` that panics on them, or an event that would not replay, fails the test. Each
    /// carries what the repository gives it: the command's actor, correlation id and trace
    /// context, the command as its cause, no principal (it is not stored), and the command's
    /// timestamp (set one with [`Metadata::with_timestamp`] for a fixed time; the repository
    /// stamps its clock's now), so an aggregate whose
    /// [`apply_with`](Aggregate::apply_with) keeps who acted or when shows it in
    /// [`Then::state`].
    ///
    /// ```
    /// # use cqrs_core::doc::{Ticket, TicketCommand, TicketOpened};
    /// use cqrs_core::Metadata;
    /// use cqrs_core::testing::AggregateTest;
    ///
    /// AggregateTest::<Ticket>::given_no_events()
    ///     .when_with(TicketCommand::Open, &Metadata::new().with_actor("agent-7"))
    ///     .then_expect_events([TicketOpened { ticket_id: "t1".into() }]);
    /// ```
    #[track_caller]
    pub fn when_with(self, command: A::Command, metadata: &Metadata) -> Then<A> {
        let mut state = self.state;
        let result = state.decide(command);
        if let Ok(events) = &result {
            for (i, event) in events.iter().enumerate() {
                let mut caused = metadata.caused_at(metadata.timestamp);
                caused.principal = None;
                let (event, envelope) =
                    replayed::<A>(event.clone(), caused, self.version + 1 + i as u64);
                state.apply_with(&event, &envelope);
            }
        }
        Then { result, state }
    }
}

/// The outcome of [`AggregateTest::when`].
#[derive(Debug)]
#[must_use = "a test asserts nothing until it calls `then_expect_events`, \
              `then_expect_no_events` or `then_expect_error`"]
pub struct Then<A: Aggregate> {
    result: Result<Vec<A::Event>, A::Error>,
    state: A,
}

impl<A: Aggregate> Then<A> {
    /// The aggregate's state after the command: the given history with the decided events
    /// applied, as a load would rebuild it (the history's state when the command was refused).
    /// Where the repository's answer differs, a load is right: a field of an event that serde
    /// skips is in the state the repository returns (and snapshots), not here nor in a later
    /// load, so keep state out of such fields.
    /// Look at it before `then_expect_events` or `then_expect_error`, which take the outcome.
    ///
    /// ```
    /// # use cqrs_core::doc::{Ticket, TicketCommand, TicketOpened};
    /// use cqrs_core::testing::AggregateTest;
    ///
    /// let then = AggregateTest::<Ticket>::given_no_events().when(TicketCommand::Open);
    /// assert!(then.state().open);
    /// then.then_expect_events([TicketOpened { ticket_id: "t1".into() }]);
    ///
    /// // Refused: the history's state.
    /// let opened = TicketOpened { ticket_id: "t1".into() };
    /// let then = AggregateTest::<Ticket>::given([opened]).when(TicketCommand::Open);
    /// assert!(then.state().open);
    /// assert_eq!(then.then_expect_error().code(), "already_open");
    /// ```
    pub fn state(&self) -> &A {
        &self.state
    }
}

fn comparable<S: EventSet>(events: Vec<S>) -> Vec<(String, serde_json::Value)> {
    events
        .into_iter()
        .map(|e| {
            let record = EventRecord::from_envelope(&e.into_envelope(Metadata::new()))
                .expect("events serialize");
            (record.event_type, record.payload)
        })
        .collect()
}

/// Fails, showing both lists as pretty JSON and the first place they differ, unless the events
/// `got` are the ones `expected` (by type and payload, in order).
#[track_caller]
fn assert_same_events(
    what: &str,
    got: &[(String, serde_json::Value)],
    expected: &[(String, serde_json::Value)],
) {
    if got == expected {
        return;
    }
    let show = |events: &[(String, serde_json::Value)]| -> String {
        if events.is_empty() {
            return "  (none)".to_owned();
        }
        events
            .iter()
            .enumerate()
            .map(|(i, (name, payload))| {
                let payload = serde_json::to_string_pretty(payload)
                    .unwrap_or_else(|_| payload.to_string())
                    .replace('\n', "\n    ");
                format!("  [{i}] {name} {payload}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let first = got
        .iter()
        .zip(expected)
        .position(|(g, e)| g != e)
        .unwrap_or(got.len().min(expected.len()));
    let why = match (got.get(first), expected.get(first)) {
        (Some((g, _)), Some((e, _))) if g != e => format!("[{first}] is a {g}, expected a {e}"),
        (Some(_), Some(_)) => format!("[{first}] has another payload"),
        (Some(_), None) => format!("{} more than expected, from [{first}]", got.len() - first),
        (None, _) => format!(
            "{} fewer than expected, from [{first}]",
            expected.len() - first
        ),
    };
    panic!(
        "{what} differ: {why}\n{what}:\n{}\nexpected:\n{}",
        show(got),
        show(expected)
    );
}

impl<A: Aggregate> Then<A>
where
    A::Error: Debug,
{
    /// Asserts that the command produced exactly these events (compared by type and serialized
    /// payload), and returns them.
    #[track_caller]
    pub fn then_expect_events<E: Into<A::Event>>(
        self,
        expected: impl IntoIterator<Item = E>,
    ) -> Vec<A::Event> {
        let events = match self.result {
            Ok(events) => events,
            Err(e) => panic!("expected events, the aggregate refused: {e:?}"),
        };
        let expected: Vec<A::Event> = expected.into_iter().map(Into::into).collect();
        let got = comparable(events.clone());
        assert_same_events("the decided events", &got, &comparable(expected));
        events
    }

    /// Asserts that the command was accepted and decided no event (a command that changes
    /// nothing, say): `then_expect_events([])` cannot infer the events' type.
    #[track_caller]
    pub fn then_expect_no_events(self) {
        let events: Vec<A::Event> = Vec::new();
        self.then_expect_events(events);
    }

    /// Asserts that the command was refused, and returns the error.
    #[track_caller]
    pub fn then_expect_error(self) -> A::Error {
        match self.result {
            Err(e) => e,
            Ok(events) => panic!(
                "expected a refusal, the aggregate decided {} event(s): {:?}",
                events.len(),
                comparable(events)
            ),
        }
    }
}

/// Tests a command handler without a bus: when this command (with this metadata), then these
/// recorded events, or this error.
///
/// The events compared are those the handler records on its context (`ctx.record`). A
/// handler that appends through an [`AggregateRepository`] records none: test its decisions
/// with [`AggregateTest`], and its successes by loading the aggregate back from the
/// repository's (in-memory) store.
///
/// ```
/// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler, TicketOpened};
/// use cqrs_core::testing::CommandTest;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let output = CommandTest::new(OpenTicketHandler)
///     .when(OpenTicket { title: "Printer on fire".into() })
///     .await
///     .then_expect_events([TicketOpened { ticket_id: "t1".into() }]);
/// assert_eq!(output, "t1");
/// # });
/// ```
pub struct CommandTest<H> {
    handler: H,
    /// `None`: fresh metadata when the command runs, stamped by the clock.
    metadata: Option<Metadata>,
    clock: Option<std::sync::Arc<dyn crate::clock::Clock>>,
}

impl<H: std::fmt::Debug> std::fmt::Debug for CommandTest<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandTest")
            .field("handler", &self.handler)
            .field("metadata", &self.metadata)
            .field(
                "clock",
                &self.clock.as_ref().map_or("system", |_| "injected"),
            )
            .finish()
    }
}

impl<H> CommandTest<H> {
    /// A test of `handler`, with fresh metadata.
    pub fn new(handler: H) -> Self {
        Self {
            handler,
            metadata: None,
            clock: None,
        }
    }

    /// Runs the command with this metadata (a principal, an actor), timestamp included.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Stamps the command's fresh metadata (unless [`with_metadata`](Self::with_metadata) gave
    /// it) and the events the handler records with `clock`'s time, as a bus given that clock
    /// would ([`CommandBusBuilder::clock`](crate::CommandBusBuilder::clock)).
    pub fn with_clock(mut self, clock: std::sync::Arc<dyn crate::clock::Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Runs the handler on `command`.
    pub async fn when<C>(self, command: C) -> CommandOutcome<C::Output>
    where
        C: crate::Command,
        H: crate::CommandHandler<C>,
    {
        let metadata = self.metadata.unwrap_or_else(|| match &self.clock {
            Some(clock) => Metadata::new_at(clock.now()),
            None => Metadata::new(),
        });
        let mut ctx = crate::CommandContext::new(metadata);
        ctx.clock = self.clock;
        let result = self.handler.handle(command, &mut ctx).await;
        CommandOutcome {
            result,
            events: ctx.take_recorded(),
        }
    }
}

/// Runs `handler` on `event` with fresh metadata, as the event bus delivers it: a unit test of
/// an event handler (a read model's, a reaction) without a bus. The event's type picks the
/// handler's impl, so a handler of several event types needs no `EventHandler::<E>::handle`
/// spelled out. [`deliver_with`] takes the metadata.
///
/// The event is handed over as it was made, not through storage: a field a stored event
/// loses (`#[serde(skip)]`, a default that differs) is still there. To test what a handler
/// gets from a store or a transport, decode a record first and use [`deliver_envelope`].
///
/// ```
/// # use cqrs_core::doc::{CountOpened, TicketOpened};
/// use cqrs_core::testing::deliver;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let counter = CountOpened::default();
/// deliver(&counter, TicketOpened { ticket_id: "t1".into() }).await.unwrap();
/// assert_eq!(counter.count(), 1);
/// # });
/// ```
pub async fn deliver<E, H>(handler: &H, event: E) -> Result<(), crate::HandlerError>
where
    E: crate::Event,
    H: crate::EventHandler<E>,
{
    deliver_with(handler, event, Metadata::new()).await
}

/// [`deliver`] with this metadata (a correlation id, a principal).
pub async fn deliver_with<E, H>(
    handler: &H,
    event: E,
    metadata: Metadata,
) -> Result<(), crate::HandlerError>
where
    E: crate::Event,
    H: crate::EventHandler<E>,
{
    deliver_envelope::<E, H>(handler, &EventEnvelope::new(event, metadata)).await
}

/// Runs `handler` on the event `envelope` holds, as a transport delivers a stored one: for a
/// handler that reads where it is stored (its stream, version, position, partition key),
/// which an envelope made here says with
/// [`with_stored`](EventEnvelope::with_stored) and
/// [`with_partition_key`](EventEnvelope::with_partition_key).
///
/// ```
/// # use cqrs_core::doc::{CountOpened, TicketOpened};
/// use cqrs_core::testing::deliver_envelope;
/// use cqrs_core::{EventEnvelope, Metadata};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let counter = CountOpened::default();
/// let stored = EventEnvelope::new(TicketOpened { ticket_id: "t1".into() }, Metadata::new())
///     .with_partition_key("t1")
///     .with_stored("ticket-t1", 1, None);
/// deliver_envelope::<TicketOpened, _>(&counter, &stored).await.unwrap();
/// assert_eq!(counter.count(), 1);
/// # });
/// ```
///
/// # Panics
///
/// When `envelope` holds another event type than `E`: a test's mistake.
#[track_caller]
pub fn deliver_envelope<'a, E, H>(
    handler: &'a H,
    envelope: &'a EventEnvelope,
) -> impl std::future::Future<Output = Result<(), crate::HandlerError>> + 'a
where
    E: crate::Event,
    H: crate::EventHandler<E>,
{
    let event = match envelope.downcast_ref::<E>() {
        Some(event) => event,
        None => panic!(
            "the envelope holds a `{}`, not the `{}` the handler is run for",
            envelope.name(),
            E::NAME
        ),
    };
    handler.handle(event, crate::EventContext::new(envelope))
}

/// Runs `handler` on `query` with fresh metadata, as the query bus would: a unit test of a
/// query handler without a bus. [`ask_with`] takes the metadata.
///
/// ```
/// # use cqrs_core::doc::{CountTickets, CountTicketsHandler};
/// use cqrs_core::testing::ask;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// assert_eq!(ask(&CountTicketsHandler, CountTickets).await.unwrap(), 42);
/// # });
/// ```
pub async fn ask<Q, H>(handler: &H, query: Q) -> Result<Q::Output, crate::HandlerError>
where
    Q: crate::Query,
    H: crate::QueryHandler<Q>,
{
    ask_with(handler, query, Metadata::new()).await
}

/// [`ask`] with this metadata (the principal a query handler checks).
pub async fn ask_with<Q, H>(
    handler: &H,
    query: Q,
    metadata: Metadata,
) -> Result<Q::Output, crate::HandlerError>
where
    Q: crate::Query,
    H: crate::QueryHandler<Q>,
{
    handler
        .handle(query, &crate::QueryContext::new(metadata))
        .await
}

/// The outcome of [`CommandTest::when`].
#[derive(Debug)]
#[must_use = "a test asserts nothing until it calls `then_expect_events`, \
              `then_expect_no_events` or `then_expect_error`"]
pub struct CommandOutcome<O> {
    result: Result<O, crate::HandlerError>,
    events: Vec<crate::EventEnvelope>,
}

impl<O: Debug> CommandOutcome<O> {
    /// The output of a handler that succeeded, and its events as (name, payload); panics,
    /// saying so, when it failed.
    #[track_caller]
    fn succeeded(self) -> (O, Vec<(String, serde_json::Value)>) {
        let output = match self.result {
            Ok(o) => o,
            Err(e) => panic!("expected success, the handler failed: {e:?}"),
        };
        let got = self
            .events
            .iter()
            .map(|e| {
                (
                    e.name().to_owned(),
                    e.payload_json().expect("events serialize"),
                )
            })
            .collect();
        (output, got)
    }

    /// Asserts the handler succeeded and recorded exactly these events (compared by type and
    /// serialized payload, in order); returns its output. The partition key is not compared:
    /// check it on [`events`](Self::events) (`events()[0].partition_key()`) for a handler that
    /// records with `record_keyed`.
    #[track_caller]
    pub fn then_expect_events<E: crate::Event>(self, expected: impl IntoIterator<Item = E>) -> O {
        let (output, got) = self.succeeded();
        let expected: Vec<(String, serde_json::Value)> = expected
            .into_iter()
            .map(|e| {
                (
                    E::NAME.to_owned(),
                    serde_json::to_value(e).expect("events serialize"),
                )
            })
            .collect();
        assert_same_events("the recorded events", &got, &expected);
        output
    }

    /// Like [`then_expect_events`](Self::then_expect_events), for a handler that records
    /// events of several types: the expected ones are members of the event set `S` (an
    /// [`event_set!`](crate::event_set) enum).
    ///
    /// ```
    /// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler, TicketEvents, TicketOpened};
    /// use cqrs_core::testing::CommandTest;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// CommandTest::new(OpenTicketHandler)
    ///     .when(OpenTicket { title: "Printer on fire".into() })
    ///     .await
    ///     .then_expect_events_of::<TicketEvents>([TicketOpened { ticket_id: "t1".into() }]);
    /// # });
    /// ```
    #[track_caller]
    pub fn then_expect_events_of<S: EventSet>(
        self,
        expected: impl IntoIterator<Item = impl Into<S>>,
    ) -> O {
        let (output, got) = self.succeeded();
        let expected = comparable(expected.into_iter().map(Into::into).collect::<Vec<S>>());
        assert_same_events("the recorded events", &got, &expected);
        output
    }

    /// Asserts the handler succeeded and recorded no event; returns its output
    /// (`then_expect_events([])` cannot infer the events' type).
    #[track_caller]
    pub fn then_expect_no_events(self) -> O {
        let (output, got) = self.succeeded();
        assert_same_events("the recorded events", &got, &[]);
        output
    }

    /// Asserts the handler failed; returns the error. Whatever it recorded is discarded, as
    /// the bus would.
    #[track_caller]
    pub fn then_expect_error(self) -> crate::HandlerError {
        match self.result {
            Err(e) => e,
            Ok(o) => panic!("expected an error, the handler returned {o:?}"),
        }
    }

    /// The recorded events, for assertions of your own.
    pub fn events(&self) -> &[crate::EventEnvelope] {
        &self.events
    }

    /// The handler's result and the events it recorded, asserting nothing: for a handler
    /// whose events hold what a test cannot write out in full (an id it generated, a time),
    /// checked field by field.
    ///
    /// ```
    /// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler, TicketOpened};
    /// use cqrs_core::testing::CommandTest;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let (result, events) = CommandTest::new(OpenTicketHandler)
    ///     .when(OpenTicket { title: "Printer on fire".into() })
    ///     .await
    ///     .into_parts();
    /// assert!(result.is_ok());
    /// let opened = events[0].downcast_ref::<TicketOpened>().expect("a TicketOpened");
    /// assert!(!opened.ticket_id.is_empty());
    /// # });
    /// ```
    pub fn into_parts(self) -> (Result<O, crate::HandlerError>, Vec<crate::EventEnvelope>) {
        (self.result, self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, HandlerError, Message};
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct Noted {
        text: String,
        // Lost on the way through the store: a test that applies the event as it was
        // decided would not see it.
        #[serde(skip)]
        secret: Option<String>,
    }
    impl Message for Noted {
        const NAME: &'static str = "test.noted";
    }
    impl Event for Noted {}

    crate::event_set! {
        enum NoteEvents {
            Noted(Noted),
        }
    }

    /// Remembers the stream versions it was replayed at; refuses to note "boom" when
    /// applying it would panic.
    #[derive(Debug, Default)]
    struct Notes {
        versions: Vec<Option<u64>>,
        secrets: Vec<Option<String>>,
        /// Who acted, when, and whether the event carried a principal.
        actors: Vec<(Option<String>, chrono::DateTime<chrono::Utc>, bool)>,
    }

    enum NoteCommand {
        Note(&'static str),
        Report,
        /// Decides nothing.
        Pass,
    }

    impl Aggregate for Notes {
        const TYPE: &'static str = "notes";
        type Event = NoteEvents;
        type Command = NoteCommand;
        type Error = HandlerError;

        fn apply(&mut self, _event: &NoteEvents) {}

        fn apply_with(&mut self, event: &NoteEvents, envelope: &EventEnvelope) {
            let NoteEvents::Noted(noted) = event;
            assert_ne!(noted.text, "boom", "apply cannot take this event");
            self.versions.push(envelope.stream_version());
            self.secrets.push(noted.secret.clone());
            let m = &envelope.metadata;
            self.actors
                .push((m.actor.clone(), m.timestamp, m.principal.is_some()));
        }

        fn decide(&self, command: NoteCommand) -> Result<Vec<NoteEvents>, HandlerError> {
            match command {
                NoteCommand::Note(text) => Ok(vec![
                    Noted {
                        text: text.into(),
                        secret: None,
                    }
                    .into(),
                ]),
                NoteCommand::Report => Err(HandlerError::invalid(
                    "report",
                    format!("{:?} {:?}", self.versions, self.secrets),
                )),
                NoteCommand::Pass => Ok(Vec::new()),
            }
        }
    }

    fn noted(text: &str, secret: Option<&str>) -> Noted {
        Noted {
            text: text.into(),
            secret: secret.map(Into::into),
        }
    }

    /// `then_expect_no_events` passes a command that decided nothing, and fails one that
    /// decided an event or was refused.
    #[test]
    fn then_expect_no_events_holds_only_for_an_accepted_command_that_decided_nothing() {
        AggregateTest::<Notes>::given_no_events()
            .when(NoteCommand::Pass)
            .then_expect_no_events();
        let decided = std::panic::catch_unwind(|| {
            AggregateTest::<Notes>::given_no_events()
                .when(NoteCommand::Note("a"))
                .then_expect_no_events();
        })
        .expect_err("an event decided");
        let message = crate::panic::panic_message(decided.as_ref());
        assert!(message.contains("test.noted"), "{message}");
        std::panic::catch_unwind(|| {
            AggregateTest::<Notes>::given_no_events()
                .when(NoteCommand::Report)
                .then_expect_no_events();
        })
        .expect_err("a refusal");
    }

    /// Records a note when asked to; answers 7.
    struct Touch {
        record: bool,
    }
    impl Message for Touch {
        const NAME: &'static str = "test.touch";
    }
    impl crate::Command for Touch {
        type Output = u8;
    }
    struct Toucher;
    #[async_trait::async_trait]
    impl crate::CommandHandler<Touch> for Toucher {
        async fn handle(
            &self,
            command: Touch,
            ctx: &mut crate::CommandContext,
        ) -> Result<u8, HandlerError> {
            if command.record {
                ctx.record(noted("t", None));
            }
            Ok(7)
        }
    }

    /// `CommandOutcome::then_expect_no_events` returns the output of a handler that recorded
    /// nothing, and fails one that recorded an event.
    #[test]
    fn a_command_outcome_expects_no_events_only_when_none_was_recorded() {
        let run = |record| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(CommandTest::new(Toucher).when(Touch { record }))
        };
        assert_eq!(run(false).then_expect_no_events(), 7);
        let recorded = std::panic::catch_unwind(|| run(true).then_expect_no_events())
            .expect_err("an event recorded");
        let message = crate::panic::panic_message(recorded.as_ref());
        assert!(message.contains("test.noted"), "{message}");
    }

    #[test]
    fn given_events_are_replayed_as_the_repository_replays_them() {
        let error = AggregateTest::<Notes>::given([noted("a", Some("kept?")), noted("b", None)])
            .when(NoteCommand::Report)
            .then_expect_error();
        // Versions 1 and 2 of the stream, and what serde keeps: not the skipped field.
        assert_eq!(error.message(), "[Some(1), Some(2)] [None, None]");
    }

    /// The decided events carry the command's actor and timestamp (and no principal), as the
    /// repository stamps them; `when` sends none.
    #[test]
    fn decided_events_carry_the_commands_actor_and_time() {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let metadata = Metadata::new()
            .with_actor("u1")
            .with_timestamp(at)
            .with_principal(crate::Principal::new("u1"));
        let then = AggregateTest::<Notes>::given([noted("a", None)])
            .when_with(NoteCommand::Note("b"), &metadata);
        assert_eq!(then.state().actors[1], (Some("u1".to_owned()), at, false));
        let then = AggregateTest::<Notes>::given([noted("a", None)]).when(NoteCommand::Note("b"));
        assert_eq!(then.state().actors[1].0, None);
    }

    #[test]
    #[should_panic(expected = "apply cannot take this event")]
    fn a_decided_event_that_apply_cannot_take_fails_the_test() {
        // `when` itself panics, applying the decided event.
        let _ = AggregateTest::<Notes>::given_no_events().when(NoteCommand::Note("boom"));
    }

    #[test]
    fn decided_events_are_compared_with_the_expected_ones() {
        AggregateTest::<Notes>::given([noted("a", None)])
            .when(NoteCommand::Note("b"))
            .then_expect_events([noted("b", None)]);
    }

    /// Version 2 added the currency; version 1 payloads are upcast with "EUR".
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct Priced {
        cents: u64,
        currency: String,
    }
    impl Message for Priced {
        const NAME: &'static str = "test.priced";
    }
    impl Event for Priced {
        const VERSION: u32 = 2;
    }

    crate::event_set! {
        enum PriceEvents {
            Priced(Priced),
        }
    }

    /// The currencies it was priced in; `Tell` refuses with them.
    #[derive(Debug, Default)]
    struct Prices(Vec<String>);

    struct Tell;

    impl Aggregate for Prices {
        const TYPE: &'static str = "prices";
        type Event = PriceEvents;
        type Command = Tell;
        type Error = HandlerError;

        fn apply(&mut self, event: &PriceEvents) {
            let PriceEvents::Priced(priced) = event;
            self.0.push(priced.currency.clone());
        }

        fn decide(&self, _: Tell) -> Result<Vec<PriceEvents>, HandlerError> {
            Err(HandlerError::invalid("told", self.0.join(",")))
        }
    }

    fn stored(version: u32, payload: serde_json::Value) -> EventRecord {
        let metadata = Metadata::new();
        EventRecord::new(
            metadata.message_id,
            "test.priced",
            version,
            payload,
            crate::RecordMetadata::from_metadata(&metadata),
        )
    }

    /// Stored records of an older schema version rebuild the state through the types'
    /// upcasters; without one, the test fails saying the records do not rebuild.
    #[test]
    fn stored_records_rebuild_through_the_upcasters() {
        let mut types = EventTypes::new();
        types.upcaster("test.priced", 1, |mut payload| {
            payload["currency"] = serde_json::json!("EUR");
            Ok(payload)
        });
        let records = [
            stored(1, serde_json::json!({ "cents": 100 })),
            stored(2, serde_json::json!({ "cents": 200, "currency": "USD" })),
        ];
        let told = AggregateTest::<Prices>::given_records(std::sync::Arc::new(types), records)
            .when(Tell)
            .then_expect_error();
        assert_eq!(told.message(), "EUR,USD");

        let failed = std::panic::catch_unwind(|| {
            let old = stored(1, serde_json::json!({ "cents": 100 }));
            AggregateTest::<Prices>::given_records(std::sync::Arc::new(EventTypes::new()), [old]);
        })
        .expect_err("a version-1 record without its upcaster fails");
        let message = crate::panic::panic_message(failed.as_ref());
        assert!(
            message.starts_with("the records do not rebuild the aggregate: "),
            "{message}"
        );
    }

    /// A mismatch says where the lists part and shows both, each event's payload as JSON.
    #[test]
    fn a_mismatch_names_the_first_difference_and_shows_both_lists() {
        let failed = std::panic::catch_unwind(|| {
            AggregateTest::<Notes>::given_no_events()
                .when(NoteCommand::Note("b"))
                .then_expect_events([noted("c", None)]);
        })
        .expect_err("events that differ fail");
        let message = crate::panic::panic_message(failed.as_ref());
        assert!(
            message.starts_with("the decided events differ: [0] has another payload\n"),
            "{message}"
        );
        assert!(message.contains("\"text\": \"b\""), "{message}");
        assert!(
            message.contains("expected:\n  [0] test.noted {"),
            "{message}"
        );
        assert!(message.contains("\"text\": \"c\""), "{message}");

        let failed = std::panic::catch_unwind(|| {
            AggregateTest::<Notes>::given_no_events()
                .when(NoteCommand::Note("b"))
                .then_expect_events(Vec::<Noted>::new());
        })
        .expect_err("an event more fails");
        let message = crate::panic::panic_message(failed.as_ref());
        assert!(
            message.starts_with("the decided events differ: 1 more than expected, from [0]"),
            "{message}"
        );
        assert!(message.ends_with("expected:\n  (none)"), "{message}");
    }

    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct Erased;
    impl Message for Erased {
        const NAME: &'static str = "test.erased";
    }
    impl Event for Erased {}

    /// A handler of two event types, recording what it got and the correlation id it saw.
    #[derive(Default)]
    struct Log(std::sync::Mutex<Vec<(String, uuid::Uuid)>>);

    #[async_trait::async_trait]
    impl crate::EventHandler<Noted> for Log {
        async fn handle(
            &self,
            e: &Noted,
            ctx: crate::EventContext<'_>,
        ) -> Result<(), HandlerError> {
            let id = ctx.metadata().correlation_id;
            self.0.lock().unwrap().push((e.text.clone(), id));
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl crate::EventHandler<Erased> for Log {
        async fn handle(
            &self,
            _: &Erased,
            ctx: crate::EventContext<'_>,
        ) -> Result<(), HandlerError> {
            let id = ctx.metadata().correlation_id;
            self.0.lock().unwrap().push(("erased".into(), id));
            Err(HandlerError::conflict("erased", "already erased"))
        }
    }

    /// The event's type picks the impl, the metadata given reaches the handler, and the
    /// handler's error comes back.
    #[tokio::test]
    async fn an_event_is_delivered_to_the_impl_of_its_type_with_its_metadata() {
        let log = Log::default();
        let metadata = Metadata::new();
        deliver_with(&log, noted("a", None), metadata.clone())
            .await
            .unwrap();
        let error = deliver(&log, Erased).await.unwrap_err();
        assert_eq!(error.code(), "erased");
        let got = log.0.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], ("a".to_owned(), metadata.correlation_id));
        assert_eq!(got[1].0, "erased");
        assert_ne!(got[1].1, metadata.correlation_id, "fresh metadata");
    }
}
