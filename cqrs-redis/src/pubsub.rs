//! [`RedisPubSub`]: the core's pub/sub port on Redis pub/sub.

use crate::connection::{self, quit_later};
use crate::error::{ConnectError, client_error};
use crate::options::RedisPubSubOptions;
use async_trait::async_trait;
use cqrs_core::ports::{Fanout, PubSub, Subscription, TransportError};
use cqrs_core::runtime::{Health, HealthCheck};
use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::prelude::Options;
use fred::types::{ClusterHash, Value};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::task::JoinHandle;

/// How many channels the warning about payloads that are not UTF-8 remembers before it
/// starts over (and may warn about a channel again).
const MAX_WARNED_CHANNELS: usize = 1024;

/// Fan-out to every live subscriber of a channel, across processes, on Redis pub/sub.
///
/// * One Redis subscription per channel per process, on one subscriber connection (fred's
///   subscriber client), however many local subscribers: [`Fanout`] shares it and unsubscribes
///   once the last local subscriber is gone.
/// * [`subscribe`](PubSub::subscribe) returns once Redis confirmed the subscription, so every
///   message published after it returns reaches the subscriber (on Redis Cluster, and for a
///   refusal fred drops, it confirms less: see `docs/redis.md`). A channel that already has a
///   local subscriber is joined without asking Redis. While the subscriber connection is down
///   it fails with `Unavailable`: at once, or, when the connection dropped under a
///   resubscription or an unsubscribe holding the subscribe lock, after that (about one or two
///   command timeouts).
/// * After a reconnect every channel with local subscribers is subscribed again by itself,
///   and every subscription counts two possible losses in [`Subscription::missed`]: one
///   before the channels are live again (messages published while the connection was down
///   are gone), one once its channel is, before the channel's first message (a subscriber
///   that resumed in between may have missed more); three when a message arrives before
///   the resubscription is done (the second is then counted again).
///   A connection that died silently (no FIN or RST) is noticed by a `PING` every
///   [`ping_interval`](crate::ConnectionOptions::ping_interval) left unanswered for the
///   [`unresponsive_timeout`](crate::ConnectionOptions::unresponsive_timeout), and replaced
///   the same way; the health check reports it unhealthy while it reconnects.
/// * Channel names are `{prefix}:{channel}`: pub/sub ignores the database number, so the
///   prefix is what keeps applications and tests apart on one server.
/// * Payloads are text. A message whose payload is not UTF-8 (published by another client) is
///   not delivered: it is counted in [`Subscription::missed`] by the subscriptions of its
///   channel and logged at `warn`, once per channel.
///
/// # Why at-most-once is right here
///
/// Pub/sub carries realtime pushes (a ticket changed: refresh the view), not facts the system
/// relies on. A message nobody is subscribed to, or that arrives while the connection is down,
/// is gone; a subscriber too slow for its buffer misses messages and counts them in
/// [`Subscription::missed`], and a reconnect of the subscriber connection adds two there (see
/// above; the realtime hub then tells its clients to resume). Making this durable would mean a buffer per
/// client that may never come back. Instead the durable record is elsewhere (the event store and the
/// [`RedisStreamTransport`](crate::RedisStreamTransport)), and a client closes a gap by
/// resuming: it reconnects with the last position it saw and the realtime hub replays what it
/// missed from the store, then switches to live pushes.
#[derive(Clone)]
pub struct RedisPubSub {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Client,
    subscriber: SubscriberClient,
    fanout: Fanout,
    prefix: String,
    options: RedisPubSubOptions,
    /// Serializes SUBSCRIBE and UNSUBSCRIBE, so an unsubscribe of an idle channel cannot pass
    /// a new subscriber's subscribe to the same channel.
    upstream: Arc<tokio::sync::Mutex<()>>,
    /// How many upstream subscriptions each channel has (0 or 1).
    subscribed: Arc<Mutex<HashMap<String, usize>>>,
    /// How many channels Redis refused at the last resubscription (0 once it succeeded).
    refused: Arc<AtomicUsize>,
    /// A resubscription after a reconnect has not gone through yet (one failed, say a timeout
    /// on a connection still up): the channels may be unsubscribed with both connections up.
    resubscribing: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        quit_later(self.publisher.clone());
        quit_later(self.subscriber.clone());
    }
}

impl fmt::Debug for RedisPubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPubSub")
            .field(
                "url",
                &crate::options::redacted_url(&self.inner.options.connection.url),
            )
            .field("channel_prefix", &self.inner.prefix)
            .field("fanout", &self.inner.fanout)
            .finish_non_exhaustive()
    }
}

impl RedisPubSubOptions {
    /// Validates the options (reporting every problem at once), connects a publishing and a
    /// subscribing client, and checks that the server is Redis 7.0 or later.
    pub async fn connect(self) -> Result<RedisPubSub, ConnectError> {
        self.validate()?;
        // Each quits if the connect fails or is given up before both are kept.
        let publisher = connection::client(&self.connection).await?;
        connection::check_version(&publisher, false).await?;
        let subscriber = connection::subscriber(&self.connection, self.capacity).await?;
        let (publisher, subscriber) = (publisher.keep(), subscriber.keep());
        let (fanout, mut idle) = Fanout::new(self.capacity);
        let prefix = format!("{}:", self.channel_prefix);
        let upstream = Arc::new(tokio::sync::Mutex::new(()));
        let subscribed: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let mut tasks = Vec::new();

        // Upstream messages to local subscribers.
        let mut messages = subscriber.message_rx();
        let (deliver_to, strip) = (fanout.clone(), prefix.clone());
        let gaps = Arc::new(Gaps::default());
        let gap_before = gaps.clone();
        tasks.push(tokio::spawn(async move {
            // Channels a message that is not UTF-8 was dropped on, warned about once each.
            let mut warned: HashSet<String> = HashSet::new();
            loop {
                match messages.recv().await {
                    Ok(message) => {
                        let Some(channel) = message.channel.strip_prefix(strip.as_str()) else {
                            continue;
                        };
                        gap_before.close(channel, &deliver_to);
                        if let Some(payload) = message.value.as_str() {
                            deliver_to.deliver(channel, Arc::from(&*payload));
                        } else if deliver_to.lost_on(channel, 1) {
                            // The port carries text: a payload that is not UTF-8 (another
                            // client published bytes) cannot be delivered. Counted as missed
                            // by the channel's subscriptions, so the loss is seen.
                            if warned.len() >= MAX_WARNED_CHANNELS {
                                warned.clear();
                            }
                            if warned.insert(channel.to_owned()) {
                                tracing::warn!(
                                    channel = %message.channel,
                                    "redis pub/sub message dropped: its payload is not UTF-8 \
                                     (counted as missed; further ones on this channel are \
                                     counted without a warning)"
                                );
                            }
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "redis pub/sub messages dropped: the fan-out fell behind"
                        );
                        deliver_to.lost(n);
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        }));

        // Unsubscribe upstream from channels without local subscribers.
        let (client, watch, lock, counts, full) = (
            subscriber.clone(),
            fanout.clone(),
            upstream.clone(),
            subscribed.clone(),
            prefix.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while let Some(channel) = idle.recv().await {
                let _guard = lock.lock().await;
                if watch.is_subscribed(&channel) {
                    continue;
                }
                let name = format!("{full}{channel}");
                // Forgotten either way: a failed unsubscribe means the connection is down, and
                // the resubscription after the reconnect covers only channels with subscribers.
                counts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
                // A connection that is down has no subscriptions left to end, and fred would
                // hold the UNSUBSCRIBE (and the lock, and every subscribe behind it) until a
                // reconnect or the command timeout.
                if !client.is_connected() {
                    continue;
                }
                // Confirmed like a subscribe: a refusal (an ACL) has no command of its own to
                // answer in fred, and would otherwise be taken as the reply to the next one
                // (another channel's confirming PING).
                let unsubscribed = async {
                    client.unsubscribe(name.as_str()).await?;
                    client.ping::<Value>(None).await
                };
                if let Err(e) = unsubscribed.await {
                    tracing::debug!(channel = %name, error = %e, "unsubscribe failed");
                }
            }
        }));

        // Subscribe again after a reconnect: a new connection has no subscriptions. A refused
        // resubscription (the connection is still up: no reconnect will come to retry it) is
        // tried again with growing delays. fred completes SUBSCRIBE unanswered, and a refusal
        // that arrives before the confirming PING is queued is lost, so success is checked
        // with Redis's own count of the connection's subscriptions (`CLIENT LIST`, `sub=`).
        let mut reconnects = subscriber.reconnect_rx();
        let refused = Arc::new(AtomicUsize::new(0));
        let resubscribing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pending = resubscribing.clone();
        let (client, checker, watch, lock, full, refused_too) = (
            subscriber.clone(),
            publisher.clone(),
            fanout.clone(),
            upstream.clone(),
            prefix.clone(),
            refused.clone(),
        );
        let (min_delay, max_delay) = (
            self.connection.reconnect_min_delay,
            self.connection.reconnect_max_delay,
        );
        tasks.push(tokio::spawn(async move {
            let refused = refused_too;
            // Failed attempts since the last success; a retry is due while it is above 0.
            let mut failures = 0u32;
            loop {
                if failures == 0 {
                    match reconnects.recv().await {
                        // Unhealthy from the reconnect on, not from when the lock is free
                        // (a subscribe may hold it for a command timeout): the new connection
                        // has no subscriptions until the resubscription below.
                        Ok(_) | Err(RecvError::Lagged(_)) => pending.store(true, Ordering::Relaxed),
                        Err(RecvError::Closed) => return,
                    }
                } else {
                    tokio::select! {
                        event = reconnects.recv() => match event {
                            Ok(_) | Err(RecvError::Lagged(_)) => {
                                failures = 0;
                                pending.store(true, Ordering::Relaxed);
                            }
                            Err(RecvError::Closed) => return,
                        },
                        () = tokio::time::sleep(retry_delay(min_delay, max_delay, failures)) => {}
                    }
                }
                let _guard = lock.lock().await;
                let channels = watch.channels();
                if channels.is_empty() {
                    failures = 0;
                    refused.store(0, Ordering::Relaxed);
                    pending.store(false, Ordering::Relaxed);
                    gaps.close_all(&watch);
                    continue;
                }
                pending.store(true, Ordering::Relaxed);
                if failures == 0 {
                    // A reconnect: what was published while the connection was down never
                    // arrives. Recorded before the channels are live again, so the hub's
                    // notice goes out before any message from after the gap.
                    watch.lost(1);
                    // And again once each channel is live, before its first message: a
                    // subscriber that resumed meanwhile, before the channel was live, may
                    // have missed more. Open until then, through retries.
                    gaps.open(&channels);
                }
                // Every channel, also on a retry: subscribing again to a live one is harmless.
                let outcome = resubscribe(&client, &checker, &full, &channels).await;
                // A connection that failed meanwhile says nothing new about refusals.
                match &outcome {
                    Ok(()) => {
                        refused.store(0, Ordering::Relaxed);
                        pending.store(false, Ordering::Relaxed);
                    }
                    Err(Resubscribe::Refused { held, of }) => {
                        refused.store(of - held, Ordering::Relaxed);
                        // Redis answered: the count says what is missing.
                        pending.store(false, Ordering::Relaxed);
                    }
                    // Still pending: health says so until an attempt goes through.
                    Err(Resubscribe::Failed(_)) => {}
                }
                match outcome {
                    Ok(()) => {
                        failures = 0;
                        // Live channels no message has reached yet. (A subscription already
                        // told and not resumed since is not told twice.)
                        gaps.close_all(&watch);
                        tracing::debug!(channels = channels.len(), "redis pub/sub resubscribed");
                    }
                    Err(error) => {
                        if failures > 0 && matches!(error, Resubscribe::Refused { .. }) {
                            // Still refused: a refused channel gets no message, so its gap
                            // never closes, and whoever subscribed (or resumed) since the
                            // notice above would wait on a channel that delivers nothing,
                            // untold. Told again at each retry; which channels Redis refuses
                            // it does not always say, so every subscription is.
                            watch.lost(1);
                        }
                        failures = failures.saturating_add(1);
                        tracing::warn!(%error, attempt = failures, "redis pub/sub could not resubscribe; trying again");
                    }
                }
            }
        }));

        // A PING now and then on both connections: a subscriber connection that died silently
        // would otherwise never be noticed (it sends nothing), so nothing would resubscribe
        // and no loss would be counted. A forced reconnect resubscribes as above. The
        // subscriber's pings hold the upstream lock: one landing between a SUBSCRIBE and its
        // confirming PING would take a refusal meant for the subscribe.
        tasks.push(connection::watchdog(
            subscriber.clone(),
            &self.connection,
            Some(upstream.clone()),
        ));
        tasks.push(connection::watchdog(
            publisher.clone(),
            &self.connection,
            None,
        ));

        Ok(RedisPubSub {
            inner: Arc::new(Inner {
                publisher,
                subscriber,
                fanout,
                prefix,
                options: self,
                upstream,
                subscribed,
                refused,
                resubscribing,
                tasks,
            }),
        })
    }
}

impl RedisPubSub {
    /// The options this pub/sub was made with.
    pub fn options(&self) -> &RedisPubSubOptions {
        &self.inner.options
    }

    /// How many upstream (Redis) subscriptions this instance holds for `channel`: 1 while it
    /// has local subscribers, else 0.
    pub fn upstream_subscriptions(&self, channel: &str) -> usize {
        let name = format!("{}{channel}", self.inner.prefix);
        self.inner
            .subscribed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .copied()
            .unwrap_or(0)
    }

    /// The server-side ids (`CLIENT ID`) of the publishing and the subscribing connection, as
    /// `CLIENT LIST` shows them (each connection is named after its fred client).
    pub async fn client_ids(&self) -> Result<Vec<i64>, TransportError> {
        connection::client_ids(
            &self.inner.publisher,
            &[self.inner.publisher.id(), self.inner.subscriber.id()],
            ClusterHash::Random,
        )
        .await
    }
}

#[async_trait]
impl PubSub for RedisPubSub {
    /// Publishes to `{prefix}:{channel}`; fails fast with `Unavailable` while Redis is away.
    async fn publish(&self, channel: &str, payload: Arc<str>) -> Result<(), TransportError> {
        let options = Options {
            fail_fast: true,
            timeout: Some(self.inner.options.connection.command_timeout),
            ..Options::default()
        };
        let name = format!("{}{channel}", self.inner.prefix);
        let _receivers: i64 = self
            .inner
            .publisher
            .with_options(&options)
            .publish(name, payload.as_ref())
            .await
            .map_err(|e| client_error(&self.inner.publisher, e))?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, TransportError> {
        let inner = &self.inner;
        let name = format!("{}{channel}", inner.prefix);
        inner
            .fanout
            // Boxed: fred's futures are large (clippy::large_futures).
            .subscribe(
                channel,
                Box::pin(async {
                    let _guard = inner.upstream.lock().await;
                    // fred would queue the SUBSCRIBE until a reconnect or the command
                    // timeout, with the lock held: each new channel's subscribe would wait a
                    // whole timeout behind the one before.
                    if !inner.subscriber.is_connected() {
                        return Err(TransportError::Unavailable {
                            backend: "redis",
                            source: "the pub/sub's subscriber connection is down (reconnecting)"
                                .into(),
                        });
                    }
                    // A reconnect while SUBSCRIBE is in flight loses it, while the PING behind
                    // it is resent and answered on the new connection: subscribe again then.
                    let mut reconnects = inner.subscriber.reconnect_rx();
                    loop {
                        confirmed_subscribe(&inner.subscriber, vec![name.clone()])
                            .await
                            .map_err(|e| client_error(&inner.subscriber, e))?;
                        match reconnects.try_recv() {
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Closed) => return Err(TransportError::Closed),
                            Ok(_) | Err(TryRecvError::Lagged(_)) => {
                                tracing::debug!(channel = %name, "reconnected while subscribing; subscribing again");
                                reconnects = reconnects.resubscribe();
                            }
                        }
                    }
                    // One Redis subscription per channel, however often it was asked for.
                    inner
                        .subscribed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), 1);
                    Ok(())
                }),
            )
            .await
    }
}

/// Channels resubscribed after a reconnect whose second loss is still to be recorded: once
/// a channel is live again, before its first message. Recorded only after the whole
/// resubscription (a `CLIENT LIST` round trip after Redis confirmed it), a message published
/// meanwhile reached a subscriber that had resumed during the outage first, and the notice
/// after it sent it to resume from that message, past one published during the outage.
#[derive(Default)]
struct Gaps {
    /// Whether any channel is in `open`: the message path's only cost otherwise.
    any: std::sync::atomic::AtomicBool,
    state: Mutex<GapState>,
}

#[derive(Default)]
struct GapState {
    /// Channels whose loss is still to be recorded.
    open: HashSet<Arc<str>>,
    /// Channels whose loss a message recorded before the resubscription was done: that
    /// message may have been one from the old connection, which the message task took late,
    /// before the channel was live. Recorded again when the resubscription is done (at worst
    /// a second notice to a subscriber that resumed in between).
    early: HashSet<Arc<str>>,
}

impl Gaps {
    fn state(&self) -> std::sync::MutexGuard<'_, GapState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before resubscribing `channels`.
    fn open(&self, channels: &[Arc<str>]) {
        self.state().open.extend(channels.iter().cloned());
        self.any.store(true, Ordering::Release);
    }

    /// Before a message of `channel` is delivered: records the loss if its gap is open. Under
    /// the lock, so a [`close_all`](Self::close_all) that found the gap records it before
    /// this message is delivered.
    fn close(&self, channel: &str, fanout: &Fanout) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state();
        if let Some(channel) = state.open.take(channel) {
            fanout.lost_on(&channel, 1);
            state.early.insert(channel);
        }
        if state.open.is_empty() {
            self.any.store(false, Ordering::Release);
        }
    }

    /// Once the resubscription is done: records the loss on every channel still open, and
    /// again on those a message closed meanwhile.
    fn close_all(&self, fanout: &Fanout) {
        let mut state = self.state();
        let GapState { open, early } = &mut *state;
        // Once each, though a channel closed early may have been opened again since (a new
        // reconnect during a failing resubscription).
        let channels: HashSet<Arc<str>> = open.drain().chain(early.drain()).collect();
        for channel in channels {
            fanout.lost_on(&channel, 1);
        }
        self.any.store(false, Ordering::Release);
    }
}

/// Subscribes and waits for Redis to confirm. fred answers SUBSCRIBE once it is written; Redis
/// runs a connection's commands in order, so the PING's reply is the confirmation, and a refusal
/// (`NOPERM`), which has no command of its own to answer in fred, comes back as the PING's reply.
/// Callers hold the upstream lock, which the subscriber's watchdog takes for each of its pings:
/// no other command may come between the two.
async fn confirmed_subscribe(
    client: &SubscriberClient,
    names: Vec<String>,
) -> Result<(), fred::error::Error> {
    client.subscribe(names).await?;
    client.ping::<Value>(None).await?;
    Ok(())
}

/// Why a resubscription failed.
enum Resubscribe {
    /// Redis holds `held` of the channels: it refused the others (an ACL).
    Refused { held: usize, of: usize },
    /// The connection failed or timed out.
    Failed(fred::error::Error),
}

impl fmt::Display for Resubscribe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resubscribe::Refused { held, of } => {
                write!(
                    f,
                    "Redis holds {held} of the {of} subscriptions (refused: an ACL?)"
                )
            }
            Resubscribe::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Subscribes the connection to every channel, in one `SUBSCRIBE`, and checks Redis's count.
/// Redis refuses a whole `SUBSCRIBE` when it refuses one of its channels, so when it fell
/// short each channel is subscribed by itself: one refused channel leaves the others live.
async fn resubscribe(
    client: &SubscriberClient,
    checker: &Client,
    prefix: &str,
    channels: &[Arc<str>],
) -> Result<(), Resubscribe> {
    let all = names(prefix, channels);
    let of = all.len();
    match confirmed_subscribe(client, all.clone()).await {
        Ok(()) => match held_all(client, checker, of, 0).await {
            Ok(()) => return Ok(()),
            Err(refused) if of == 1 => return Err(refused),
            Err(_) => {}
        },
        // The refusal came back as the PING's reply.
        Err(e) if is_refusal(&e) && of == 1 => return held_all(client, checker, 1, 1).await,
        Err(e) if is_refusal(&e) => {}
        Err(e) => return Err(Resubscribe::Failed(e)),
    }
    let mut refusals = 0;
    for name in all {
        match confirmed_subscribe(client, vec![name]).await {
            Ok(()) => {}
            Err(e) if is_refusal(&e) => refusals += 1,
            Err(e) => return Err(Resubscribe::Failed(e)),
        }
    }
    held_all(client, checker, of, refusals).await
}

/// Whether Redis holds `of` subscriptions for the connection, by its own count; when it
/// cannot tell (the user may not run `CLIENT LIST`), by the `refusals` seen.
async fn held_all(
    client: &SubscriberClient,
    checker: &Client,
    of: usize,
    refusals: usize,
) -> Result<(), Resubscribe> {
    let held = subscription_count(checker, client)
        .await
        .unwrap_or(of.saturating_sub(refusals));
    if held < of {
        Err(Resubscribe::Refused { held, of })
    } else {
        Ok(())
    }
}

/// Whether Redis answered with an error (a refusal), rather than the connection failing.
fn is_refusal(error: &fred::error::Error) -> bool {
    !matches!(
        error.kind(),
        fred::error::ErrorKind::IO
            | fred::error::ErrorKind::Timeout
            | fred::error::ErrorKind::Canceled
    )
}

/// How many channels the subscriber's connection is subscribed to, as Redis counts them
/// (`CLIENT LIST`, `sub=`); `None` when it cannot tell (the connection is not listed, or the
/// user may not run `CLIENT LIST`). On a cluster it asks the node fred sends the subscriber's
/// `SUBSCRIBE`s to (the slot of the client's id), where its subscriptions are.
async fn subscription_count(admin: &Client, subscriber: &SubscriberClient) -> Option<usize> {
    let node = ClusterHash::Custom(fred::util::redis_keyslot(subscriber.id().as_bytes()));
    connection::client_field(admin, &[subscriber.id()], "sub", node)
        .await
        .ok()?
        .first()?
        .parse()
        .ok()
}

fn names(prefix: &str, channels: &[Arc<str>]) -> Vec<String> {
    channels.iter().map(|c| format!("{prefix}{c}")).collect()
}

/// The delay before retry `failures + 1`: `min` doubled per failure, at most `max`.
fn retry_delay(min: Duration, max: Duration, failures: u32) -> Duration {
    min.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1)))
        .min(max)
}

#[async_trait]
impl HealthCheck for RedisPubSub {
    /// Healthy while both connections are up and Redis took every channel at the last
    /// resubscription (unhealthy while it refuses some, naming how many, or while a
    /// resubscription after a reconnect has not gone through). Pub/sub is at-most-once, so a
    /// runtime usually registers this check as not critical.
    async fn check(&self) -> Health {
        if !(self.inner.publisher.is_connected() && self.inner.subscriber.is_connected()) {
            return Health::Unhealthy("redis pub/sub is reconnecting".into());
        }
        if self.inner.resubscribing.load(Ordering::Relaxed) {
            return Health::Unhealthy(
                "redis pub/sub has not subscribed its channels again since a reconnect; retrying"
                    .into(),
            );
        }
        match self.inner.refused.load(Ordering::Relaxed) {
            0 => Health::Healthy,
            refused => Health::Unhealthy(format!(
                "redis refused {refused} pub/sub channel subscription(s) after a reconnect \
                 (an ACL? give the user its channels, `&{}*`); retrying",
                self.inner.prefix
            )),
        }
    }
}
