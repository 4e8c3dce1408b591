//! Messages and handlers shared by the tests.

use async_trait::async_trait;
use cqrs_core::memory::InMemoryEventStore;
use cqrs_core::ports::{EventStore, StoreError};
use cqrs_core::{
    Command, CommandContext, CommandHandler, Event, EventContext, EventEnvelope, EventHandler,
    EventRecord, ExpectedVersion, HandlerError, Message, Metadata, Position, Query, QueryContext,
    QueryHandler,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Adds two numbers; records `Added` when `record` is set; panics when `panic` is set.
#[derive(Debug, Default)]
pub struct Add {
    pub a: u64,
    pub b: u64,
    pub record: bool,
    pub panic: bool,
    pub fail: bool,
}

impl Message for Add {
    const NAME: &'static str = "test.add";
}

impl Command for Add {
    type Output = u64;
}

pub struct AddHandler;

#[async_trait]
impl CommandHandler<Add> for AddHandler {
    async fn handle(&self, cmd: Add, ctx: &mut CommandContext) -> Result<u64, HandlerError> {
        let sum = cmd.a + cmd.b;
        if cmd.record {
            ctx.record_keyed("sums", Added { sum });
            ctx.record_keyed("sums", Added { sum: sum + 1 });
        }
        if cmd.panic {
            panic!("the add handler was told to panic");
        }
        if cmd.fail {
            return Err(HandlerError::invalid(
                "told_to_fail",
                "the add handler was told to fail",
            ));
        }
        Ok(sum)
    }
}

pub struct OtherAddHandler;

#[async_trait]
impl CommandHandler<Add> for OtherAddHandler {
    async fn handle(&self, cmd: Add, _ctx: &mut CommandContext) -> Result<u64, HandlerError> {
        Ok(cmd.a * cmd.b)
    }
}

/// Never handled anywhere.
pub struct Orphan;

impl Message for Orphan {
    const NAME: &'static str = "test.orphan";
}

impl Command for Orphan {
    type Output = ();
}

impl Query for Orphan {
    type Output = ();
}

/// Waits forever.
pub struct Hang;

impl Message for Hang {
    const NAME: &'static str = "test.hang";
}

impl Command for Hang {
    type Output = ();
}

pub struct HangHandler;

#[async_trait]
impl CommandHandler<Hang> for HangHandler {
    async fn handle(&self, _cmd: Hang, _ctx: &mut CommandContext) -> Result<(), HandlerError> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// Doubles a number.
pub struct Double(pub u64);

impl Message for Double {
    const NAME: &'static str = "test.double";
}

impl Query for Double {
    type Output = u64;
}

pub struct DoubleHandler;

#[async_trait]
impl QueryHandler<Double> for DoubleHandler {
    async fn handle(&self, q: Double, _ctx: &QueryContext) -> Result<u64, HandlerError> {
        if q.0 == 13 {
            panic!("thirteen is unlucky");
        }
        Ok(q.0 * 2)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Added {
    pub sum: u64,
}

impl Message for Added {
    const NAME: &'static str = "test.added";
}

impl Event for Added {}

/// Counts the events it sees; fails or panics on the sums it is told to.
#[derive(Clone, Default)]
pub struct Counter {
    pub name: &'static str,
    pub seen: Arc<AtomicUsize>,
    pub fail_on: Option<u64>,
    pub panic_on: Option<u64>,
}

impl Counter {
    pub fn named(name: &'static str) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl EventHandler<Added> for Counter {
    async fn handle(&self, event: &Added, _ctx: EventContext<'_>) -> Result<(), HandlerError> {
        self.seen.fetch_add(1, Ordering::SeqCst);
        if self.fail_on == Some(event.sum) {
            // Retryable, as any failure not marked `permanent()`.
            return Err(HandlerError::internal(format!(
                "{} fails on {}",
                self.name, event.sum
            )));
        }
        if self.panic_on == Some(event.sum) {
            panic!("{} panics on {}", self.name, event.sum);
        }
        Ok(())
    }

    fn name(&self) -> &str {
        self.name
    }
}

/// Runs a test body on a current-thread runtime with a deadline, so a hang fails the test.
pub fn run<F: std::future::Future>(body: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), body)
                .await
                .expect("the test finished within 10 s")
        })
}

/// Runs a test body on a current-thread runtime whose clock is paused (time moves only while
/// the runtime is idle), in a thread of its own with a wall-clock deadline: a body that keeps
/// the runtime busy, and so never lets time move, fails instead of hanging.
pub fn run_paused<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (done, finished) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime")
            .block_on(body());
        let _ = done.send(());
    });
    match finished.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
            "not finished within 20 s of wall-clock time: something kept the paused runtime busy"
        ),
    }
}

/// Panics when dropped outside a panic: a guard that checks, on drop, that its work finished
/// (a handler's future holding one panics when it is cancelled).
pub struct PanicsWhenDropped;

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("dropped before the work was finished");
        }
    }
}

/// The `sum` of each event on topic `out` of `transport`, in order, as a fresh group reads
/// them (what a relay under test shipped).
pub async fn shipped_sums(transport: &cqrs_core::memory::InMemoryTransport) -> Vec<u64> {
    use cqrs_core::ports::{ConsumerOptions, EventTransport};
    let mut consumer = transport
        .consumer(
            "out",
            "check",
            ConsumerOptions::default().block(std::time::Duration::from_millis(10)),
        )
        .await
        .unwrap();
    let got = consumer.fetch(100).await.unwrap();
    got.iter()
        .map(|d| d.record.payload["sum"].as_u64().unwrap())
        .collect()
}

/// An event store that gets one more event (an `Added { sum: 1 }`) after each of the first
/// `arrivals` reads of the global order: events keep arriving while a reader pages through it.
/// Its reads of the global order fail while `failing` is set (the store away).
pub struct ArrivesWhileRead {
    pub inner: Arc<InMemoryEventStore>,
    pub arrivals: AtomicUsize,
    pub failing: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl EventStore for ArrivesWhileRead {
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.append(stream_id, expected, events).await
    }

    async fn load(
        &self,
        stream_id: &str,
        after_version: u64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.load(stream_id, after_version).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                backend: "test",
                source: "told to fail its reads".into(),
            });
        }
        let page = self.inner.read_all(after, limit).await?;
        let arrived = self
            .arrivals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if arrived {
            self.inner
                .append("arrivals", ExpectedVersion::Any, vec![added(1)])
                .await?;
        }
        Ok(page)
    }

    async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(stream_id).await
    }
}

/// A stored `Added { sum }` with a fresh id.
pub fn added(sum: u64) -> EventRecord {
    EventRecord::from_envelope(&EventEnvelope::new(Added { sum }, Metadata::new())).unwrap()
}
