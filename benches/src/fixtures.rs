//! The messages and handlers that every benchmark and allocation check uses.
//!
//! Each handler does trivial work (one arithmetic operation, one relaxed atomic add), so what is
//! measured is the path a message takes to its handler, not the handler.

use async_trait::async_trait;
use cqrs_core::{
    Command, CommandContext, CommandHandler, Event, EventContext, EventHandler, HandlerError,
    Message, Query, QueryContext, QueryHandler,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The benchmarked command: returns `value + 1`.
#[derive(Clone, Copy, Debug)]
pub struct Increment {
    /// The input.
    pub value: u64,
}

impl Message for Increment {
    const NAME: &'static str = "bench.increment";
}

impl Command for Increment {
    type Output = u64;
}

/// Handles [`Increment`]. Records no events, so a dispatch allocates nothing for them.
#[derive(Clone, Copy, Debug, Default)]
pub struct IncrementHandler;

impl IncrementHandler {
    /// The handler's logic as a plain async fn: what the direct-await baseline calls, and what
    /// every other path ends up running.
    pub async fn run(
        &self,
        command: Increment,
        _ctx: &mut CommandContext,
    ) -> Result<u64, HandlerError> {
        Ok(command.value.wrapping_add(1))
    }
}

#[async_trait]
impl CommandHandler<Increment> for IncrementHandler {
    async fn handle(
        &self,
        command: Increment,
        ctx: &mut CommandContext,
    ) -> Result<u64, HandlerError> {
        self.run(command, ctx).await
    }
}

/// Handles [`Increment`] like [`IncrementHandler`], but waits once first
/// (`tokio::task::yield_now`): a dispatch returns `Pending` once and is polled again, so the
/// `*_yielding` cases and checks measure what a layer does for a handler that waits (the timeout
/// layer starts its timer then). Needs a tokio runtime.
#[derive(Clone, Copy, Debug, Default)]
pub struct YieldingIncrementHandler;

impl YieldingIncrementHandler {
    /// The handler's logic as a plain async fn: one yield to the runtime, then `value + 1`.
    pub async fn run(
        &self,
        command: Increment,
        _ctx: &mut CommandContext,
    ) -> Result<u64, HandlerError> {
        tokio::task::yield_now().await;
        Ok(command.value.wrapping_add(1))
    }
}

#[async_trait]
impl CommandHandler<Increment> for YieldingIncrementHandler {
    async fn handle(
        &self,
        command: Increment,
        ctx: &mut CommandContext,
    ) -> Result<u64, HandlerError> {
        self.run(command, ctx).await
    }
}

/// The benchmarked query: returns `key * 31`.
#[derive(Clone, Copy, Debug)]
pub struct Lookup {
    /// The input.
    pub key: u64,
}

impl Message for Lookup {
    const NAME: &'static str = "bench.lookup";
}

impl Query for Lookup {
    type Output = u64;
}

/// Handles [`Lookup`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LookupHandler;

impl LookupHandler {
    /// The handler's logic as a plain async fn.
    pub async fn run(&self, query: Lookup, _ctx: &QueryContext) -> Result<u64, HandlerError> {
        Ok(query.key.wrapping_mul(31))
    }
}

#[async_trait]
impl QueryHandler<Lookup> for LookupHandler {
    async fn handle(&self, query: Lookup, ctx: &QueryContext) -> Result<u64, HandlerError> {
        self.run(query, ctx).await
    }
}

/// The benchmarked event.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Incremented {
    /// What was added.
    pub value: u64,
}

impl Message for Incremented {
    const NAME: &'static str = "bench.incremented";
}

impl Event for Incremented {}

/// Handles [`Incremented`] by adding its value to a shared total. Several of them may handle one
/// event as long as each has its own name.
#[derive(Clone, Debug)]
pub struct SumIncrements {
    name: String,
    total: Arc<AtomicU64>,
}

impl SumIncrements {
    /// A handler called `name` that adds to `total`.
    pub fn new(name: impl Into<String>, total: Arc<AtomicU64>) -> Self {
        Self {
            name: name.into(),
            total,
        }
    }

    /// The handler's logic as a plain async fn.
    pub async fn run(
        &self,
        event: &Incremented,
        _ctx: EventContext<'_>,
    ) -> Result<(), HandlerError> {
        self.total.fetch_add(event.value, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl EventHandler<Incremented> for SumIncrements {
    async fn handle(&self, event: &Incremented, ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.run(event, ctx).await
    }

    fn name(&self) -> &str {
        &self.name
    }
}
