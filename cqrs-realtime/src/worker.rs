//! A worker that feeds the publisher from the durable event transport.

use crate::Publisher;
use async_trait::async_trait;
use cqrs_core::BoxError;
use cqrs_core::ports::{Consumer, ConsumerOptions, EventTransport};
use cqrs_core::projection::{ConsumeLoop, Handled, consume_until_shutdown};
use cqrs_core::runtime::{Worker, WorkerContext};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// Consumes a topic of the durable [`EventTransport`] in a consumer group and publishes every
/// event to the realtime channels, acknowledging it once published.
///
/// Run one group for the whole deployment (every instance in the same group), so each event is
/// published once and reaches every instance's hub through the pub/sub. With a transport
/// that is `ordered_per_key`, the events of one aggregate are published in order.
///
/// **Only in order per aggregate.** With [`concurrency`](Self::concurrency) above 1 (the
/// default is 8), or with several instances in the group, events of different aggregates are
/// published in parallel, so they reach the hubs out of position order: a client subscribed
/// to a topic spanning aggregates (`tickets`) may see position 12 before 11, and if it
/// disconnects then and resumes with `"since": "12"`, it never gets 11. For topics clients
/// resume, publish from a relay instead, through [`Publisher::into_transport`]
/// ([`PublisherTransport`](crate::PublisherTransport)): one relay is active at a time and
/// reads the event store in position order. This worker suits topics of one aggregate each,
/// or clients that never resume.
///
/// ```
/// # use cqrs_realtime::doc::TicketRouting;
/// use cqrs_core::memory::{InMemoryPubSub, InMemoryTransport};
/// use cqrs_core::ports::ConsumerOptions;
/// use cqrs_core::runtime::Runtime;
/// use cqrs_realtime::{PublishWorker, Publisher};
/// use std::sync::Arc;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let publisher = Publisher::new(Arc::new(InMemoryPubSub::new()), Arc::new(TicketRouting));
/// let worker = PublishWorker::new(
///     publisher,
///     Arc::new(InMemoryTransport::new()),
///     "events",
///     "realtime",
///     ConsumerOptions::default(),
/// );
/// let runtime = Runtime::builder().worker(worker).start();
/// runtime.shutdown(std::time::Duration::from_secs(5)).await.unwrap();
/// # });
/// ```
pub struct PublishWorker {
    name: String,
    publisher: Publisher,
    transport: Arc<dyn EventTransport>,
    topic: String,
    group: String,
    options: ConsumerOptions,
    consume: ConsumeLoop,
    /// Made at the first run and kept across restarts (as an `EventBusConsumer`'s is): what a
    /// run ended by an error could not release is taken over by the next run, not reclaimed
    /// after the redelivery delay with a delivery counted that nothing published.
    consumer: Option<Box<dyn Consumer>>,
    /// Kept across restarts too: a retry after one still skips the channels reached.
    partly: PartlyPublished,
}

impl fmt::Debug for PublishWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishWorker")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl PublishWorker {
    /// Publishes what `transport` carries on `topic`, consuming in group `group`.
    pub fn new(
        publisher: Publisher,
        transport: Arc<dyn EventTransport>,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Self {
        Self {
            name: format!("realtime-publisher:{topic}:{group}"),
            publisher,
            transport,
            topic: topic.to_owned(),
            group: group.to_owned(),
            options,
            consume: ConsumeLoop::default(),
            consumer: None,
            partly: PartlyPublished::default(),
        }
    }

    /// Deliveries fetched at a time. Default 64.
    pub fn batch(mut self, batch: usize) -> Self {
        self.consume = self.consume.batch(batch);
        self
    }

    /// Events published at once: events of different keys in parallel, of one key in order.
    /// Default 8.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.consume = self.consume.concurrency(concurrency);
        self
    }

    /// Every setting of the consume loop at once, its handler timeout and the bound past
    /// which a running batch is reported as stalled included (see [`ConsumeLoop`]); replaces
    /// what [`batch`](Self::batch) and [`concurrency`](Self::concurrency) set before it.
    ///
    /// ```
    /// # use cqrs_realtime::doc::TicketRouting;
    /// use cqrs_core::memory::{InMemoryPubSub, InMemoryTransport};
    /// use cqrs_core::ports::ConsumerOptions;
    /// use cqrs_core::projection::ConsumeLoop;
    /// use cqrs_realtime::{PublishWorker, Publisher};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// let publisher = Publisher::new(Arc::new(InMemoryPubSub::new()), Arc::new(TicketRouting));
    /// let worker = PublishWorker::new(
    ///     publisher,
    ///     Arc::new(InMemoryTransport::new()),
    ///     "events",
    ///     "realtime",
    ///     ConsumerOptions::default(),
    /// )
    /// .consume_loop(ConsumeLoop::default().handler_timeout(Duration::from_secs(5)));
    /// # let _ = worker;
    /// ```
    pub fn consume_loop(mut self, consume: ConsumeLoop) -> Self {
        self.consume = consume;
        self
    }
}

#[async_trait]
impl Worker for PublishWorker {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        let consumer = match &mut self.consumer {
            Some(consumer) => consumer,
            None => {
                let made = self
                    .transport
                    .consumer(&self.topic, &self.group, self.options.clone())
                    .await?;
                self.consumer.insert(made)
            }
        };
        let publisher = &self.publisher;
        // The channels each partly published event already reached: its retry here skips
        // them, so their clients do not get it twice.
        let partly = &self.partly;
        consume_until_shutdown(
            consumer.as_mut(),
            &ctx,
            self.consume,
            |delivery| async move {
                let event_id = delivery.record.event_id;
                let mut published = partly.take(event_id);
                match publisher
                    .publish_skipping(&delivery.record, &mut published)
                    .await
                {
                    Ok(_) => Handled::Done,
                    Err(error @ crate::PublishError::Encode { .. }) => {
                        // Retrying cannot help an event the routing cannot encode. A bug of
                        // the routing, the same for each such event: said once a minute.
                        static SAID: cqrs_core::throttled::Throttled =
                            cqrs_core::throttled::Throttled::every(cqrs_core::throttled::A_MINUTE);
                        metrics::counter!(crate::metrics::names::PUSH_FAILURES).increment(1);
                        if let Some(unsaid) = SAID.may_say() {
                            tracing::error!(%error, unsaid, "event cannot be pushed; skipped (`unsaid`: as many since the last such line)");
                        }
                        Handled::Done
                    }
                    Err(error) => {
                        partly.keep(event_id, published);
                        Handled::Retry(error.to_string())
                    }
                }
            },
        )
        .await?;
        Ok(())
    }
}

/// Events whose publish reached some of their channels and failed on others, with the channels
/// reached. Bounded: past [`PARTLY_PUBLISHED_LIMIT`] events (retries that never succeed, or
/// went to another instance) it starts over, and such a retry may reach a channel twice.
#[derive(Default)]
struct PartlyPublished(Mutex<HashMap<Uuid, Vec<String>>>);

const PARTLY_PUBLISHED_LIMIT: usize = 4096;

impl PartlyPublished {
    fn take(&self, event_id: Uuid) -> Vec<String> {
        self.lock().remove(&event_id).unwrap_or_default()
    }

    fn keep(&self, event_id: Uuid, published: Vec<String>) {
        if published.is_empty() {
            return;
        }
        let mut partly = self.lock();
        if partly.len() >= PARTLY_PUBLISHED_LIMIT {
            partly.clear();
        }
        partly.insert(event_id, published);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<String>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
