//! One WebSocket connection: a reader that handles client frames (this task) and a writer
//! that drains the send queue to the socket (a task of its own, so a slow subscribe or replay
//! never stalls the delivery of events on other subscriptions).

use crate::hub::{ConnectionSlot, HubInner};
use crate::queue::Outgoing;
use crate::registry::{Conn, Slot};
use crate::signal::Ending;
use crate::{ClientFrame, ErrorCode, ServerFrame, Topic};
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chrono::{DateTime, Utc};
use cqrs_core::Position;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite;
use tracing::Instrument;

/// The longest error message sent, as JSON writes it: with the longest topic and the frame's
/// own fields, an error frame stays within the write room the options keep free
/// (`MIN_WRITE_ROOM`).
const MAX_ERROR_MESSAGE_LEN: usize = 256;

/// Frames the writer takes from the queue per flush.
const WRITE_BATCH: u64 = 64;

pub(crate) async fn run<P: Send + Sync + 'static>(
    hub: Arc<HubInner<P>>,
    conn: Arc<Conn<P>>,
    socket: WebSocket,
    slot: ConnectionSlot<P>,
    expires_at: Option<DateTime<Utc>>,
) {
    let (sink, mut stream) = socket.split();
    // Listed since its handshake was accepted (`Hub::admit`): a shutdown either saw this connection, or is
    // seen here.
    if hub.is_stopping() {
        conn.close.close(Ending::SHUTDOWN);
    }
    let mut writer = tokio::spawn({
        let (hub, conn) = (hub.clone(), conn.clone());
        async move {
            let mut sink = sink;
            // A writer that panics (a metrics recorder's bug, say) must not leave the
            // connection open with nobody draining its queue: it is closed with 1011, and the
            // reader, told so, cleans up as for any other ending.
            let ending = AssertUnwindSafe(write_loop(&hub, &conn, &mut sink))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!(
                        connection = conn.id,
                        "the realtime connection's writer panicked; connection closed with 1011"
                    );
                    conn.close.close(Ending::INTERNAL);
                    conn.close.get().unwrap_or(Ending::INTERNAL)
                });
            finish(&hub, &mut sink, ending).await;
        }
        // In the connection's span, as the reader.
        .in_current_span()
    });
    let resumes = hub.resume_budget(slot.key.as_deref());
    let changes = {
        let per_second = hub.options.subscription_changes_per_second;
        TokenBucket::new(per_second, f64::from(per_second))
    };
    let mut session = Session {
        hub,
        conn,
        subscriptions: HashMap::new(),
        resumes,
        changes,
        expires_at,
    };

    // A hook (routing, authorizer) that panics on what a client sent must not leave the
    // connection half alive: its subscriptions registered and its writer detached, but out of
    // the connection limits. Close it with 1011 and clean up as for any other ending.
    let read = AssertUnwindSafe(session.read_loop(&mut stream)).catch_unwind();
    let (ending, drain) = read.await.unwrap_or_else(|_| {
        tracing::error!(
            connection = session.conn.id,
            "a realtime hook panicked on a client frame; connection closed with 1011"
        );
        (Ending::INTERNAL, true)
    });
    session.conn.close.close(ending);
    let ending = session.conn.close.get().unwrap_or(ending);
    // A panic here (a metrics recorder's bug) must not skip the rest of the clean-up: what a
    // subscription still held when it panicked is given back as it is dropped (`Held`).
    if AssertUnwindSafe(session.unsubscribe_all())
        .catch_unwind()
        .await
        .is_err()
    {
        tracing::error!(
            connection = session.conn.id,
            "the realtime connection's clean-up panicked; its subscriptions were released"
        );
    }

    // Wait (bounded) for the writer's close frame and the client's reply, so the server is
    // the one to close the TCP connection, as RFC 6455 asks.
    // `None`: a close timeout too long for the clock (`Duration::MAX`) waits as long as it
    // takes.
    let deadline = Instant::now().checked_add(session.hub.options.close_timeout);
    if drain && ending != Ending::Peer {
        let _ = before(deadline, async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    if before(deadline, &mut writer).await.is_none() {
        writer.abort();
    }
    // Its entry in the hub's list goes with the slot.
    drop(slot);
}

/// `future`'s output, or `None` when `deadline` passed first; no deadline waits as long as it
/// takes.
async fn before<F: std::future::Future>(deadline: Option<Instant>, future: F) -> Option<F::Output> {
    match deadline {
        Some(deadline) => timeout_at(deadline, future).await.ok(),
        None => Some(future.await),
    }
}

/// The reader's side of a connection.
struct Session<P: Send + Sync + 'static> {
    hub: Arc<HubInner<P>>,
    conn: Arc<Conn<P>>,
    /// This connection's subscriptions, each with what it holds.
    subscriptions: HashMap<Topic, Held<P>>,
    /// Resumes (`since`) this connection may still start now, refilled over time.
    /// Shared by the principal's connections (see [`HubInner::resume_budget`]).
    resumes: Arc<std::sync::Mutex<ResumeBudget>>,
    /// The subscribes and unsubscribes this connection may still make now: each takes the
    /// registry's lock and may ask the authorizer, so a client that keeps changing its
    /// subscriptions must not be able to do so as fast as it can send.
    changes: TokenBucket,
    /// When the principal's credentials expire; the keepalive closes the connection then.
    expires_at: Option<DateTime<Utc>>,
}

/// A token bucket: `capacity` tokens, full at first, refilled at `per_second`.
pub(crate) struct TokenBucket {
    capacity: u32,
    per_second: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

/// The resumes (`since`) a principal may start: `resumes_per_minute`, one back every
/// `60 s / resumes_per_minute`.
pub(crate) type ResumeBudget = TokenBucket;

impl TokenBucket {
    pub(crate) fn new(capacity: u32, per_second: f64) -> Self {
        Self {
            capacity,
            per_second,
            tokens: f64::from(capacity),
            at: tokio::time::Instant::now(),
        }
    }

    /// `per_minute` tokens, one back every `60 s / per_minute`.
    pub(crate) fn per_minute(per_minute: u32) -> Self {
        Self::new(per_minute, f64::from(per_minute) / 60.0)
    }

    /// Tops the bucket up for the time since the last look.
    fn refill(&mut self) {
        let now = tokio::time::Instant::now();
        let refill = (now - self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(f64::from(self.capacity));
        self.at = now;
    }

    /// Takes one token if one is available now. For a bucket shared by a principal's
    /// connections, checked and taken under one lock, so connections racing for the last
    /// one get it once between them: the budget is exact.
    fn try_take(&mut self) -> bool {
        self.refill();
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Gives back a token taken for something that was refused (a resume's `since`).
    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(f64::from(self.capacity));
    }

    /// Whether it is full again (nothing to remember once no connection holds it).
    pub(crate) fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= f64::from(self.capacity)
    }
}

/// What one subscription of a connection holds: its place in the registry, a reference on its
/// upstream channel, its count in the subscriptions gauge. [`end`](Self::end) gives them back
/// in order; dropped before that (a panic on the way, in a hook or a metrics recorder, or a
/// cancelled subscribe), it gives back what it still holds, so nothing leaks.
struct Held<P: Send + Sync + 'static> {
    hub: Arc<HubInner<P>>,
    topic: Topic,
    connection: u64,
    /// In the registry (or being put there).
    registered: bool,
    /// The upstream channel it holds a reference on.
    channel: Option<String>,
    /// Counted in the subscriptions gauge.
    counted: bool,
}

impl<P: Send + Sync + 'static> Held<P> {
    /// Ends the subscription: uncounted, out of the registry (`then` runs under its lock,
    /// before any later event is dispatched), its upstream reference released.
    async fn end(mut self, then: impl FnOnce()) {
        if std::mem::take(&mut self.counted) {
            self.hub.metrics.unsubscribed();
        }
        if std::mem::take(&mut self.registered) {
            self.hub.registry.remove(&self.topic, self.connection, then);
        } else {
            then();
        }
        // Taken only once released: dropped while it waits (for the channel's lock), the
        // reference is still held, and the drop gives it back.
        if let Some(channel) = self.channel.clone() {
            self.hub.upstreams.release(&channel).await;
            self.channel = None;
        }
    }
}

impl<P: Send + Sync + 'static> Drop for Held<P> {
    fn drop(&mut self) {
        if std::mem::take(&mut self.registered) {
            self.hub
                .registry
                .remove(&self.topic, self.connection, || {});
        }
        if let Some(channel) = self.channel.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let hub = self.hub.clone();
            runtime.spawn(async move { hub.upstreams.release(&channel).await });
        }
        if std::mem::take(&mut self.counted) {
            // Already unwinding, maybe from this very recorder: a second panic would abort.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.hub.metrics.unsubscribed();
            }));
        }
    }
}

/// A resume taken from a [`ResumeBudget`] for one `subscribe` with `since`: given back when
/// dropped before [`keep`](Self::keep) (the subscribe was refused, failed, or was cancelled by
/// the connection's end), so a `since` that does not start a replay costs nothing.
struct ResumeTicket {
    budget: Option<Arc<std::sync::Mutex<ResumeBudget>>>,
}

impl ResumeTicket {
    /// The subscription it was taken for is registered: the resume is used.
    fn keep(mut self) {
        self.budget = None;
    }
}

impl Drop for ResumeTicket {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.lock().unwrap_or_else(|p| p.into_inner()).give_back();
        }
    }
}

impl<P: Send + Sync + 'static> Session<P> {
    /// Reads client frames until the connection ends. Returns how, and whether the stream
    /// can still be read (to wait for the client's close reply).
    async fn read_loop(&mut self, stream: &mut SplitStream<WebSocket>) -> (Ending, bool) {
        let idle = self.hub.options.idle_timeout;
        loop {
            let next = tokio::select! {
                biased;
                ending = self.conn.close.reader_closed() => return (ending, true),
                next = timeout(idle, stream.next()) => next,
            };
            let message = match next {
                Err(_) => {
                    if self.conn.close.close(Ending::IDLE) {
                        self.hub.metrics.idle_close();
                    }
                    return (Ending::IDLE, true);
                }
                Ok(None) => return (Ending::Peer, false),
                Ok(Some(Err(error))) => return (ending_for(error), false),
                Ok(Some(Ok(message))) => message,
            };
            if matches!(message, Message::Text(_) | Message::Binary(_)) {
                // Each client frame is answered with a frame. Frames that came in one burst
                // are decoded without waiting on the socket, so wait for room for the answer
                // instead of filling the queue: a client that reads everything must not be
                // closed as slow for the answers to its own frames. It waits, unread, in TCP.
                // Room for two, so the answer leaves a slot for the next event (as a keepalive
                // ping and a replay do): taking the last one, a burst of answers would keep
                // the queue full, and the next event would close the client as slow.
                // A client that takes nothing for the idle timeout meanwhile is slow after all
                // (as during a replay): closed, not waited for without end. One that kept
                // reading while live events kept the queue one short is not: its answer may
                // take the last slot then.
                tokio::select! {
                    biased;
                    ending = self.conn.close.reader_closed() => return (ending, true),
                    room = self.conn.queue.room_for_an_answer(idle) => {
                        if !room {
                            self.conn.close_slow();
                            return (Ending::SLOW, true);
                        }
                    }
                }
            }
            match message {
                Message::Text(text) => match ClientFrame::parse(text.as_str()) {
                    // Before the rate limit: stale credentials close at once, limited or not.
                    Ok(ClientFrame::Subscribe { .. }) if self.expired() => self.close_expired(),
                    // A subscribe may wait on the authorizer and the pub/sub (up to the
                    // operation timeout each): an ending (shutdown, expiry, slow) stops it
                    // rather than waiting for it. Dropping it there is safe: the subscription
                    // is registered with no await between, and `unsubscribe_all` releases it.
                    // Not an unsubscribe: it has taken the subscription out before it
                    // releases the channel, and dropped there it would never be released.
                    Ok(
                        ClientFrame::Subscribe { topic, .. } | ClientFrame::Unsubscribe { topic },
                    ) if !self.changes.try_take() => {
                        let per_second = self.hub.options.subscription_changes_per_second;
                        self.send_error(
                            ErrorCode::TooManySubscriptionChanges,
                            &format!(
                                "at most {per_second} subscribes and unsubscribes a second: this one is ignored; wait, then send it again"
                            ),
                            Some(&topic),
                        );
                    }
                    Ok(ClientFrame::Subscribe { topic, since }) => {
                        let conn = self.conn.clone();
                        // Boxed: the subscribe path is large and rare; the idle connection's
                        // future stays small.
                        tokio::select! {
                            biased;
                            ending = conn.close.reader_closed() => return (ending, true),
                            () = Box::pin(self.subscribe(topic, since)) => {}
                        }
                    }
                    Ok(ClientFrame::Unsubscribe { topic }) => self.unsubscribe(topic).await,
                    Ok(ClientFrame::Ping) => self.send(&ServerFrame::Pong),
                    Err(error) => self.send_error(error.code(), &error.to_string(), None),
                },
                Message::Binary(_) => self.send_error(
                    ErrorCode::BinaryFrame,
                    "binary frames are not supported: send JSON text frames",
                    None,
                ),
                // Any frame counts as activity; tungstenite answers pings itself.
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Close(_) => return (Ending::Peer, false),
            }
        }
    }

    fn send(&self, frame: &ServerFrame) {
        self.conn.push(Utf8Bytes::from(frame.to_json()));
    }

    fn send_error(&self, code: ErrorCode, message: &str, topic: Option<&str>) {
        // The client's topic is echoed back, cut to the longest a topic can be, as JSON writes
        // it (escapes included): an invalid one may be as long as a client message, and a
        // frame longer than the write buffer takes would fail the write and drop a connection
        // that an error frame leaves open.
        let topic = topic.map(|name| crate::topic::cut_for_json(name, crate::MAX_TOPIC_LEN));
        // So is the message: an authorizer's refusal may quote anything at any length (a
        // database error), and the hub's own room for its frames is bounded.
        let message = crate::topic::cut_for_json(message, MAX_ERROR_MESSAGE_LEN);
        self.send(&ServerFrame::error(code, message, topic));
    }

    /// Whether the principal's credentials have expired.
    fn expired(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= self.hub.clock.now())
    }

    fn close_expired(&self) {
        if self.conn.close.close(Ending::EXPIRED) {
            self.hub.metrics.expired(1);
        }
    }

    async fn subscribe(&mut self, name: String, since: Option<String>) {
        // The keepalive closes an expired connection within a ping interval; a subscribe
        // before that must not add to what the stale credentials reach.
        if self.expired() {
            return self.close_expired();
        }
        let topic = match Topic::parse(&name) {
            Ok(topic) => topic,
            Err(error) => {
                return self.send_error(ErrorCode::InvalidTopic, &error.to_string(), Some(&name));
            }
        };
        if self.subscriptions.contains_key(&topic) {
            return self.send_error(
                ErrorCode::AlreadySubscribed,
                "already subscribed to this topic",
                Some(&name),
            );
        }
        let max = self.hub.options.max_subscriptions;
        if self.subscriptions.len() >= max {
            return self.send_error(
                ErrorCode::TooManySubscriptions,
                &format!(
                    "a connection may hold at most {max} subscriptions: unsubscribe from one first"
                ),
                Some(&name),
            );
        }
        let Some(channel) = self.hub.routing.channel(&topic) else {
            return self.send_error(
                ErrorCode::UnknownTopic,
                "this server has no such topic",
                Some(&name),
            );
        };
        let since = match since {
            None => None,
            Some(_) if self.hub.store.is_none() => {
                return self.send_error(
                    ErrorCode::ResumeUnavailable,
                    "this server keeps no event log to resume from: subscribe without `since`",
                    Some(&name),
                );
            }
            Some(since) => match since.parse::<Position>() {
                Ok(position) => {
                    let taken = self
                        .resumes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .try_take();
                    if !taken {
                        let per_minute = self.hub.options.resumes_per_minute;
                        return self.send_error(
                            ErrorCode::TooManyResumes,
                            &format!(
                                "at most {per_minute} subscriptions with `since` a minute: subscribe without `since` and reload the state over HTTP, or wait"
                            ),
                            Some(&name),
                        );
                    }
                    Some((
                        position,
                        ResumeTicket {
                            budget: Some(self.resumes.clone()),
                        },
                    ))
                }
                Err(error) => {
                    return self.send_error(
                        ErrorCode::InvalidPosition,
                        &error.to_string(),
                        Some(&name),
                    );
                }
            },
        };
        let budget = self.hub.options.operation_timeout;
        let authorized = timeout(
            budget,
            self.hub
                .registry
                .authorizer
                .authorize_subscribe(&self.conn.principal, &topic),
        )
        .await;
        match authorized {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => {
                return self.send_error(refusal.code(), refusal.message(), Some(&name));
            }
            Err(_) => {
                return self.send_error(
                    ErrorCode::Unavailable,
                    "authorization did not answer in time; try again",
                    Some(&name),
                );
            }
        }
        match timeout(budget, self.hub.upstreams.acquire(&channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                // Every client subscribing meets a feed that is down: said once a minute.
                static SAID: cqrs_core::throttled::Throttled =
                    cqrs_core::throttled::Throttled::every(cqrs_core::throttled::A_MINUTE);
                if let Some(unsaid) = SAID.may_say() {
                    tracing::warn!(%channel, %error, unsaid, "realtime upstream subscribe failed (`unsaid`: as many since the last such line)");
                }
                return self.send_error(
                    ErrorCode::Unavailable,
                    "the event feed is unavailable; try again",
                    Some(&name),
                );
            }
            Err(_) => {
                return self.send_error(
                    ErrorCode::Unavailable,
                    "the event feed did not answer in time; try again",
                    Some(&name),
                );
            }
        }
        // The upstream reference is held from here on, and given back whatever happens next
        // (a panicking metrics recorder included).
        let mut held = Held {
            hub: self.hub.clone(),
            topic: topic.clone(),
            connection: self.conn.id,
            registered: false,
            channel: Some(channel.clone()),
            counted: false,
        };
        // A replay reads the store only with one of the hub's permits, the first taken before
        // the subscription registers (so no live event is held meanwhile). Refused, the
        // resume is given back with the ticket, and the upstream with `held`.
        let replay_permit = match since {
            None => None,
            Some(_) => match self.hub.replay_permit().await {
                Some(permit) => Some(permit),
                None => {
                    return self.send_error(
                        ErrorCode::Unavailable,
                        "too many resumes are replaying on this server: try again in a \
                         moment (or subscribe without `since` and reload over HTTP)",
                        Some(&name),
                    );
                }
            },
        };
        // The resume is kept once the subscription is registered (below): refused or failed
        // before that (a panicking metrics recorder), the ticket gives it back.
        let (since, ticket) = match since {
            Some((position, ticket)) => (Some(position), Some(ticket)),
            None => (None, None),
        };
        // Live upstream from here on: every event published after `subscribed` reaches the
        // registry, and the registry has this subscription before `subscribed` is queued.
        let slot = Arc::new(Slot::new(
            self.conn.clone(),
            since.is_some(),
            self.hub.options.replay_buffer,
        ));
        let subscribed = Utf8Bytes::from(
            ServerFrame::Subscribed {
                topic: name.clone(),
            }
            .to_json(),
        );
        // The waits above (the authorizer, the upstream, a replay permit) may have outlasted
        // the credentials: nothing reaches a subscription made with expired ones. (`held`, the
        // ticket and the permit give back what they hold.)
        if self.expired() {
            return self.close_expired();
        }
        // Counted first, so a client that read `subscribed` sees it in the stats; marked
        // counted before the recorder is called, so a recorder that panics there leaves a count
        // that the guard takes back.
        held.counted = true;
        self.hub.metrics.subscribed();
        // Marked before: a panic inside takes it out again (a no-op if it never got in).
        held.registered = true;
        self.hub
            .registry
            .insert(&topic, &channel, slot.clone(), || {
                self.conn.push(subscribed);
            });
        self.subscriptions.insert(topic.clone(), held);
        // Registered: the resume is used from here on.
        if let Some(ticket) = ticket {
            ticket.keep();
        }
        if let Some(since) = since {
            crate::replay::replay(&self.hub, &self.conn, &slot, &topic, since, replay_permit).await;
        }
    }

    async fn unsubscribe(&mut self, name: String) {
        // A topic that is not well-formed gets the answer `subscribe` gives it.
        let topic = match Topic::parse(&name) {
            Ok(topic) => topic,
            Err(error) => {
                return self.send_error(ErrorCode::InvalidTopic, &error.to_string(), Some(&name));
            }
        };
        let Some(held) = self.subscriptions.remove(&topic) else {
            return self.send_error(
                ErrorCode::NotSubscribed,
                "not subscribed to this topic",
                Some(&name),
            );
        };
        // Queued under the registry lock: no event of this topic follows `unsubscribed`.
        let unsubscribed = Utf8Bytes::from(ServerFrame::Unsubscribed { topic: name }.to_json());
        held.end(|| {
            self.conn.push(unsubscribed);
        })
        .await;
    }

    /// Ends every subscription. Panicking part way (a metrics recorder's bug), the ones left
    /// are dropped, which releases them too.
    async fn unsubscribe_all(&mut self) {
        for (_, held) in std::mem::take(&mut self.subscriptions) {
            held.end(|| {}).await;
        }
    }
}

/// How a read error ends the connection.
fn ending_for(error: axum::Error) -> Ending {
    let Ok(error) = error.into_inner().downcast::<tungstenite::Error>() else {
        return Ending::Peer;
    };
    match *error {
        tungstenite::Error::Capacity(_) => Ending::TOO_BIG,
        tungstenite::Error::Utf8(_) => Ending::INVALID_UTF8,
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => Ending::Peer,
        tungstenite::Error::Protocol(_) => Ending::PROTOCOL,
        _ => Ending::Peer,
    }
}

/// Drains the send queue to the socket until the connection ends; returns how it ended.
async fn write_loop<P: Send + Sync + 'static>(
    hub: &HubInner<P>,
    conn: &Conn<P>,
    sink: &mut SplitSink<WebSocket, Message>,
) -> Ending {
    // One future for the whole loop, polled on every frame: with 10,000 connections an event
    // costs 10,000 of these polls.
    let closing = conn.close.writer_closed();
    tokio::pin!(closing);
    loop {
        let first = tokio::select! {
            biased;
            ending = &mut closing => break ending,
            next = conn.queue.pop() => next,
        };
        let write = async {
            let mut next = Some(first);
            let mut frames = 0;
            while let Some(outgoing) = next.take() {
                match outgoing {
                    Outgoing::Frame(frame) => {
                        sink.feed(Message::Text(frame)).await?;
                        frames += 1;
                    }
                    Outgoing::Ping => sink.feed(Message::Ping(Bytes::new())).await?,
                }
                // Not past a close decided meanwhile (by another thread: a full queue, a
                // revocation): the frames still queued then are dropped, not written.
                if frames < WRITE_BATCH && conn.close.get().is_none() {
                    next = conn.queue.try_pop();
                }
            }
            sink.flush().await?;
            Ok::<u64, axum::Error>(frames)
        };
        // A write blocked on a client that does not read must not keep the connection from
        // closing once its queue overflows.
        let written = tokio::select! {
            biased;
            ending = &mut closing => break ending,
            written = write => written,
        };
        match written {
            Ok(frames) => hub.metrics.sent(frames),
            Err(error) => {
                tracing::debug!(connection = conn.id, %error, "WebSocket write failed");
                conn.close.close(Ending::Peer);
                break Ending::Peer;
            }
        }
    }
}

/// Ends the connection's writing: the close frame of `ending`, or, when the peer ended it,
/// the reply to its close.
async fn finish<P>(hub: &HubInner<P>, sink: &mut SplitSink<WebSocket, Message>, ending: Ending) {
    let grace = hub.options.close_timeout;
    match ending {
        Ending::Close { code, reason } => {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = timeout(grace, sink.send(Message::Close(Some(frame)))).await;
        }
        // Flushes the reply to the client's close, if there was one.
        Ending::Peer => {
            let _ = timeout(grace, sink.close()).await;
        }
    }
}

#[cfg(test)]
mod token_bucket_tests {
    use super::TokenBucket;
    use std::time::Duration;

    /// Full at first, one back every `1 / per_second` s, never above its capacity.
    #[tokio::test(start_paused = true)]
    async fn a_bucket_refills_at_its_rate_up_to_its_capacity() {
        let mut bucket = TokenBucket::new(2, 2.0);
        assert!(bucket.try_take() && bucket.try_take());
        assert!(!bucket.try_take(), "spent");
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(!bucket.try_take(), "not yet one back");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(bucket.try_take(), "one back after half a second");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(bucket.is_full());
        assert!(bucket.try_take() && bucket.try_take());
        assert!(
            !bucket.try_take(),
            "a minute refills no more than the capacity"
        );
        bucket.give_back();
        assert!(bucket.try_take());
    }
}
