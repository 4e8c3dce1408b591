//! Given / when / then for aggregates.

use crate::{Aggregate, EventRecord, EventSet, Metadata};
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
}

impl<A: Aggregate> AggregateTest<A> {
    /// An aggregate that has seen nothing.
    pub fn given_no_events() -> Self {
        Self {
            state: A::default(),
        }
    }

    /// An aggregate that has seen these events, in order, each in an envelope with fresh
    /// metadata: replayed through [`Aggregate::apply_with`], as the repository replays them.
    pub fn given<E: Into<A::Event>>(events: impl IntoIterator<Item = E>) -> Self {
        Self::given_with(events.into_iter().map(|e| (e, Metadata::new())))
    }

    /// Like [`given`](Self::given), with the metadata each event carries (who acted, when):
    /// for aggregates whose [`apply_with`](Aggregate::apply_with) keeps it.
    pub fn given_with<E: Into<A::Event>>(events: impl IntoIterator<Item = (E, Metadata)>) -> Self {
        let mut state = A::default();
        for (event, metadata) in events {
            let event = event.into();
            let envelope = event.clone().into_envelope(metadata);
            state.apply_with(&event, &envelope);
        }
        Self { state }
    }

    /// Decides on `command`.
    pub fn when(self, command: A::Command) -> Then<A> {
        Then {
            result: self.state.decide(command),
        }
    }
}

/// The outcome of [`AggregateTest::when`].
#[derive(Debug)]
pub struct Then<A: Aggregate> {
    result: Result<Vec<A::Event>, A::Error>,
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
        assert_eq!(got, comparable(expected), "the events differ");
        events
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
#[derive(Debug)]
pub struct CommandTest<H> {
    handler: H,
    metadata: Metadata,
}

impl<H> CommandTest<H> {
    /// A test of `handler`, with fresh metadata.
    pub fn new(handler: H) -> Self {
        Self {
            handler,
            metadata: Metadata::new(),
        }
    }

    /// Runs the command with this metadata (a principal, an actor).
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Runs the handler on `command`.
    pub async fn when<C>(self, command: C) -> CommandOutcome<C::Output>
    where
        C: crate::Command,
        H: crate::CommandHandler<C>,
    {
        let mut ctx = crate::CommandContext::new(self.metadata);
        let result = self.handler.handle(command, &mut ctx).await;
        CommandOutcome {
            result,
            events: ctx.take_recorded(),
        }
    }
}

/// The outcome of [`CommandTest::when`].
#[derive(Debug)]
pub struct CommandOutcome<O> {
    result: Result<O, crate::HandlerError>,
    events: Vec<crate::EventEnvelope>,
}

impl<O: Debug> CommandOutcome<O> {
    /// Asserts the handler succeeded and recorded exactly these events (compared by type and
    /// serialized payload); returns its output.
    #[track_caller]
    pub fn then_expect_events<E: crate::Event>(self, expected: impl IntoIterator<Item = E>) -> O {
        let output = match self.result {
            Ok(o) => o,
            Err(e) => panic!("expected success, the handler failed: {e:?}"),
        };
        let got: Vec<(String, serde_json::Value)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.name().to_owned(),
                    e.payload_json().expect("events serialize"),
                )
            })
            .collect();
        let expected: Vec<(String, serde_json::Value)> = expected
            .into_iter()
            .map(|e| {
                (
                    E::NAME.to_owned(),
                    serde_json::to_value(e).expect("events serialize"),
                )
            })
            .collect();
        assert_eq!(got, expected, "the recorded events differ");
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
}
