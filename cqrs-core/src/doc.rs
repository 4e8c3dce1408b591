//! Fixtures that keep the documentation examples short. Not part of the API.
#![allow(missing_docs, unreachable_pub)]

use crate::{
    Command, CommandContext, CommandHandler, Event, EventContext, EventHandler, HandlerError,
    Message, Query, QueryContext, QueryHandler,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct OpenTicket {
    pub title: String,
}

impl Message for OpenTicket {
    const NAME: &'static str = "tickets.open_ticket";
}

impl Command for OpenTicket {
    type Output = String;
}

#[derive(Debug)]
pub struct OpenTicketHandler;

#[async_trait]
impl CommandHandler<OpenTicket> for OpenTicketHandler {
    async fn handle(
        &self,
        _cmd: OpenTicket,
        ctx: &mut CommandContext,
    ) -> Result<String, HandlerError> {
        ctx.record_keyed(
            "t1",
            TicketOpened {
                ticket_id: "t1".into(),
            },
        );
        Ok("t1".into())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TicketOpened {
    pub ticket_id: String,
}

impl Message for TicketOpened {
    const NAME: &'static str = "TicketOpened";
}

impl Event for TicketOpened {}

#[derive(Debug)]
pub struct CountTickets;

impl Message for CountTickets {
    const NAME: &'static str = "tickets.count";
}

impl Query for CountTickets {
    type Output = u64;
}

#[derive(Debug)]
pub struct CountTicketsHandler;

#[async_trait]
impl QueryHandler<CountTickets> for CountTicketsHandler {
    async fn handle(&self, _q: CountTickets, _ctx: &QueryContext) -> Result<u64, HandlerError> {
        Ok(42)
    }
}

#[derive(Clone, Debug, Default)]
pub struct CountOpened(Arc<AtomicUsize>);

impl CountOpened {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl EventHandler<TicketOpened> for CountOpened {
    async fn handle(&self, _e: &TicketOpened, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn name(&self) -> &str {
        "count_opened"
    }
}

crate::event_set! {
    pub enum TicketEvents {
        Opened(TicketOpened),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ticket {
    pub open: bool,
}

#[derive(Debug)]
pub enum TicketCommand {
    Open,
}

impl crate::Aggregate for Ticket {
    const TYPE: &'static str = "ticket";
    type Event = TicketEvents;
    type Command = TicketCommand;
    type Error = HandlerError;

    fn apply(&mut self, event: &TicketEvents) {
        match event {
            TicketEvents::Opened(_) => self.open = true,
        }
    }

    fn decide(&self, command: TicketCommand) -> Result<Vec<TicketEvents>, HandlerError> {
        match command {
            TicketCommand::Open if self.open => Err(HandlerError::conflict(
                "already_open",
                "the ticket is already open",
            )),
            TicketCommand::Open => Ok(vec![
                TicketOpened {
                    ticket_id: "t1".into(),
                }
                .into(),
            ]),
        }
    }
}
