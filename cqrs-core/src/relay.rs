//! Relaying the event store's global order to a durable transport.

use crate::ports::{EventStore, EventTransport, ProjectionStore, StoreError, TransportError};
use crate::runtime::{Health, Worker, WorkerContext};
use crate::{BoxError, Position};
use async_trait::async_trait;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Why a relay batch failed. Nothing was marked relayed; the batch is retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Reading the store or the checkpoint failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Publishing failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Ships every event of an [`EventStore`], in global order, to a topic of an
/// [`EventTransport`], recording how far it got as a checkpoint in a [`ProjectionStore`].
///
/// Each batch: take the relay's lock (`ProjectionStore::begin`, so only one relay of a name
/// ships at a time, even across instances sharing the store), read the events after the
/// checkpoint, publish them in order, then commit the new checkpoint. A relay that dies after
/// publishing and before committing publishes the batch again: delivery is at-least-once and
/// consumers dedupe by event id. Order holds per stream (the global order includes each
/// stream's order); an event without a partition key is published with its stream id as the
/// key, so an ordered transport keeps each aggregate's events in order. When the transport is down, the batch fails and the worker retries with
/// exponential backoff; nothing is lost, since the checkpoint did not move.
///
/// Servers whose events live in an event store without a separate outbox use this; an adapter
/// may ship its own outbox relay instead.
pub struct StoreRelay<S: ProjectionStore> {
    name: String,
    events: Arc<dyn EventStore>,
    checkpoints: Arc<S>,
    transport: Arc<dyn EventTransport>,
    topic: String,
    batch: usize,
    idle: Duration,
    max_backoff: Duration,
}

impl<S: ProjectionStore> fmt::Debug for StoreRelay<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreRelay")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl<S: ProjectionStore> StoreRelay<S> {
    /// A relay named `name` (its checkpoint key) from `events` to `topic`.
    pub fn new(
        name: &str,
        events: Arc<dyn EventStore>,
        checkpoints: Arc<S>,
        transport: Arc<dyn EventTransport>,
        topic: &str,
    ) -> Self {
        Self {
            name: name.to_owned(),
            events,
            checkpoints,
            transport,
            topic: topic.to_owned(),
            batch: 100,
            idle: Duration::from_millis(50),
            max_backoff: Duration::from_secs(10),
        }
    }

    /// Events per batch (default 100).
    pub fn batch_size(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How long to wait when caught up (default 50 ms), and the longest backoff after
    /// failures (default 10 s). Both at least 1 ms (zero would query the store, or retry a
    /// failing one, in a tight loop), and `max_backoff` at least `idle`.
    pub fn intervals(mut self, idle: Duration, max_backoff: Duration) -> Self {
        self.idle = idle.max(Duration::from_millis(1));
        self.max_backoff = max_backoff.max(self.idle);
        self
    }

    /// Ships one batch. Returns how many events were published (0 when caught up).
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        let mut unit = self.checkpoints.begin(&self.name).await?;
        let after = self
            .checkpoints
            .checkpoint(&mut unit, &self.name)
            .await?
            .unwrap_or(Position::START);
        let mut records = self.events.read_all(after, self.batch).await?;
        let Some(last) = records.last().and_then(|r| r.position) else {
            return Ok(0);
        };
        for record in &mut records {
            // An aggregate's events keep their order on an ordered transport, and consumers
            // handle them one after another, even when the handler recorded no key.
            if record.partition_key.is_none() {
                record.partition_key.clone_from(&record.stream_id);
            }
        }
        self.transport.publish(&self.topic, &records).await?;
        self.checkpoints
            .save_checkpoint(&mut unit, &self.name, last)
            .await?;
        self.checkpoints.commit(unit).await?;
        for record in &records {
            metrics::counter!(
                "cqrs_events_published_total",
                "relay" => self.name.clone(),
                "event_type" => crate::record::bounded_label(&record.event_type)
            )
            .increment(1);
        }
        Ok(records.len())
    }

    /// How many events the relay has not shipped yet.
    pub async fn backlog(&self) -> Result<u64, RelayError> {
        let mut unit = self.checkpoints.begin(&self.name).await?;
        let mut after = self
            .checkpoints
            .checkpoint(&mut unit, &self.name)
            .await?
            .unwrap_or(Position::START);
        drop(unit);
        let mut count = 0;
        loop {
            let page = self.events.read_all(after, 1000).await?;
            let Some(last) = page.last().and_then(|r| r.position) else {
                return Ok(count);
            };
            count += page.len() as u64;
            after = last;
        }
    }
}

#[async_trait]
impl<S: ProjectionStore> Worker for StoreRelay<S> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        let mut backoff = self.idle;
        while !ctx.shutdown.is_requested() {
            let wait = match self.relay_once().await {
                Ok(n) => {
                    ctx.health.set(Health::Healthy);
                    backoff = self.idle;
                    if n == self.batch {
                        continue;
                    }
                    self.idle
                }
                Err(e) => {
                    tracing::warn!(relay = %self.name, error = %e, ?backoff, "relay batch failed; retrying");
                    ctx.health.set(Health::Degraded(e.to_string()));
                    let wait = backoff;
                    // At least 1 ms: a zero start would never slow down.
                    backoff = backoff
                        .saturating_mul(2)
                        .max(Duration::from_millis(1))
                        .min(self.max_backoff);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = ctx.shutdown.requested() => {}
            }
        }
        Ok(())
    }
}
