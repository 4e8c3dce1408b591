//! `#[derive(Command)]`, `#[derive(Query)]` and `#[derive(Event)]` give the same messages as
//! impls written by hand: through the buses, into records and back.

use cqrs_core::{
    Command, CommandBus, CommandContext, CommandHandler, Event, EventBus, EventContext,
    EventHandler, EventRecord, EventTypes, HandlerError, Message, MessageType, Query, QueryBus,
    QueryContext, QueryHandler, async_trait,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Command)]
#[cqrs(name = "derived.deposit", output = u64)]
struct Deposit {
    cents: u64,
}

#[derive(Command)]
#[cqrs(name = "derived.reset")]
struct Reset;

#[derive(Query)]
#[cqrs(name = "derived.balance", output = u64)]
struct Balance;

/// A generic query, its parameter without bounds: the derive bounds its impls.
#[derive(Query)]
#[cqrs(name = "derived.echo", output = Vec<T>)]
struct Echo<T> {
    value: T,
}

/// A generic event, its parameter without bounds (serde's derives add theirs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[cqrs(name = "derived.wrapped")]
struct Wrapped<T> {
    inner: T,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[cqrs(name = "derived.deposited", version = 2)]
struct Deposited {
    cents: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, Event)]
#[cqrs(name = "derived.reset_done")]
struct ResetDone;

/// cqrs-core under another path, as a crate that re-exports it would offer it.
mod framework {
    pub use cqrs_core as cqrs;
}

#[derive(Command)]
#[cqrs(name = "derived.through_a_path", crate = "framework::cqrs")]
struct ThroughAPath;

#[derive(Default)]
struct Account {
    balance: AtomicU64,
    seen: AtomicU64,
}

#[async_trait]
impl CommandHandler<Deposit> for Arc<Account> {
    async fn handle(&self, cmd: Deposit, ctx: &mut CommandContext) -> Result<u64, HandlerError> {
        ctx.record(Deposited { cents: cmd.cents });
        Ok(self.balance.fetch_add(cmd.cents, Ordering::SeqCst) + cmd.cents)
    }
}

#[async_trait]
impl CommandHandler<Reset> for Arc<Account> {
    async fn handle(&self, _cmd: Reset, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        self.balance.store(0, Ordering::SeqCst);
        ctx.record(ResetDone);
        Ok(())
    }
}

#[async_trait]
impl QueryHandler<Balance> for Arc<Account> {
    async fn handle(&self, _query: Balance, _ctx: &QueryContext) -> Result<u64, HandlerError> {
        Ok(self.balance.load(Ordering::SeqCst))
    }
}

struct EchoTwice;

#[async_trait]
impl QueryHandler<Echo<String>> for EchoTwice {
    async fn handle(
        &self,
        query: Echo<String>,
        _ctx: &QueryContext,
    ) -> Result<Vec<String>, HandlerError> {
        Ok(vec![query.value.clone(), query.value])
    }
}

#[async_trait]
impl EventHandler<Wrapped<u64>> for Arc<Account> {
    async fn handle(
        &self,
        event: &Wrapped<u64>,
        _ctx: EventContext<'_>,
    ) -> Result<(), HandlerError> {
        self.seen.fetch_add(event.inner, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl EventHandler<Deposited> for Arc<Account> {
    async fn handle(&self, event: &Deposited, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.seen.fetch_add(event.cents, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn the_derives_set_the_names_outputs_and_versions_given() {
    assert_eq!(Deposit::NAME, "derived.deposit");
    assert_eq!(Reset::NAME, "derived.reset");
    assert_eq!(Balance::NAME, "derived.balance");
    assert_eq!(<Echo<u8> as Message>::NAME, "derived.echo");
    assert_eq!(<Wrapped<String> as Message>::NAME, "derived.wrapped");
    assert_eq!(<Wrapped<String> as Event>::VERSION, 1);
    assert_eq!(Deposited::NAME, "derived.deposited");
    assert_eq!(<Deposited as Event>::VERSION, 2);
    assert_eq!(<ResetDone as Event>::VERSION, 1, "the trait's default");
    assert_eq!(ThroughAPath::NAME, "derived.through_a_path");
    let _: <Reset as Command>::Output = ();
    let _: <ThroughAPath as Command>::Output = ();
    let _: <Echo<u8> as Query>::Output = vec![1u8];
    assert_eq!(MessageType::command::<Deposit>().name(), "derived.deposit");
    assert_eq!(
        MessageType::event::<Deposited>().name(),
        "derived.deposited"
    );
}

#[tokio::test]
async fn derived_messages_are_dispatched_recorded_and_decoded() {
    let account = Arc::new(Account::default());
    let events = EventBus::builder()
        .handler::<Deposited, _>(account.clone())
        .handler::<Wrapped<u64>, _>(account.clone())
        .build()
        .expect("event bus");
    let commands = CommandBus::builder()
        .handler::<Deposit, _>(account.clone())
        .handler::<Reset, _>(account.clone())
        .event_sink(Arc::new(events.clone()))
        .build()
        .expect("command bus");
    let queries = QueryBus::builder()
        .handler(account.clone())
        .handler(EchoTwice)
        .build()
        .expect("query bus");

    assert_eq!(
        commands.dispatch(Deposit { cents: 250 }).await.unwrap(),
        250
    );
    assert_eq!(commands.dispatch(Deposit { cents: 50 }).await.unwrap(), 300);
    assert_eq!(queries.dispatch(Balance).await.unwrap(), 300);
    assert_eq!(
        account.seen.load(Ordering::SeqCst),
        300,
        "the events reached the bus"
    );
    commands.dispatch(Reset).await.unwrap();
    assert_eq!(queries.dispatch(Balance).await.unwrap(), 0);
    assert_eq!(
        queries
            .dispatch(Echo {
                value: "hi".to_owned()
            })
            .await
            .unwrap(),
        ["hi", "hi"]
    );
    events
        .publish_event(Wrapped { inner: 1_000u64 }, cqrs_core::Metadata::new())
        .await
        .unwrap();
    assert_eq!(
        account.seen.load(Ordering::SeqCst),
        1_300,
        "300 deposited, then 1,000"
    );

    // Recorded under the derived name and version, and decoded back into the type.
    let executed = commands
        .execute(Deposit { cents: 7 }, cqrs_core::Metadata::new())
        .await
        .unwrap();
    let record = EventRecord::from_envelope(&executed.events[0]).unwrap();
    assert_eq!(record.event_type, "derived.deposited");
    assert_eq!(record.schema_version, 2);
    let mut types = EventTypes::new();
    types.register::<Deposited>();
    let decoded = types.decode(&record).unwrap().expect("a known type");
    assert_eq!(
        decoded.downcast_ref::<Deposited>(),
        Some(&Deposited { cents: 7 })
    );
}

#[test]
fn two_instantiations_of_a_generic_message_on_one_bus_are_told_apart() {
    let err = match QueryBus::builder()
        .handler(EchoTwice)
        .handler(EchoNumbers)
        .build()
    {
        Ok(_) => panic!("two types of one wire name were taken"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("share the wire name `derived.echo`"), "{err}");
    assert!(
        err.contains("Echo<std::string::String>`") && err.contains("Echo<u32>`"),
        "{err}"
    );
    assert!(
        err.contains("both are one generic type, whose instantiations share its wire name"),
        "{err}"
    );

    let err = match EventBus::builder()
        .handler::<Wrapped<u64>, _>(Arc::new(Account::default()))
        .handler(CountWrappedText)
        .build()
    {
        Ok(_) => panic!("two types of one wire name were taken"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("Wrapped<u64>` and `"), "{err}");
    assert!(err.contains("both are one generic type"), "{err}");
}

struct EchoNumbers;

#[async_trait]
impl QueryHandler<Echo<u32>> for EchoNumbers {
    async fn handle(
        &self,
        query: Echo<u32>,
        _ctx: &QueryContext,
    ) -> Result<Vec<u32>, HandlerError> {
        Ok(vec![query.value])
    }
}

struct CountWrappedText;

#[async_trait]
impl EventHandler<Wrapped<String>> for CountWrappedText {
    async fn handle(
        &self,
        _event: &Wrapped<String>,
        _ctx: EventContext<'_>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}
