//! A hub on a loopback port, a ticket routing like the helpdesk's, and a WebSocket client.

use async_trait::async_trait;
use axum::Router;
use cqrs_core::memory::{InMemoryEventStore, InMemoryPubSub};
use cqrs_core::ports::{EventStore, PubSub};
use cqrs_core::{EventRecord, ExpectedVersion, Metadata, RecordMetadata};
use cqrs_realtime::{
    Authenticator, Authorizer, EventRouting, Hub, HubBuilder, HubOptions, PushedEvent, Refusal,
    Routed, ServerFrame, Topic, Unauthenticated,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a client waits for a frame before failing the test.
pub(crate) const FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// The upstream subscription each hub makes, at its first handshake, to hear revocations from
/// other instances (`Hub::close_connections_everywhere`), counted by the pub/sub with the
/// topics' channels.
pub(crate) const REVOCATION_LISTENER: u64 = 1;

/// A test's time limit.
pub(crate) const TEST_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub(crate) struct User {
    pub(crate) id: String,
    pub(crate) agent: bool,
}

/// Tokens `agent-<id>` and `user-<id>`; anything else is refused. Connections are counted per
/// id.
pub(crate) fn authenticator() -> impl Authenticator<Principal = User> {
    TestTokens
}

pub(crate) struct TestTokens;

/// The user `agent-<id>` or `user-<id>` names (a token, or a session's user); `None` for
/// anything else.
fn user_named(name: &str) -> Option<User> {
    let (agent, id) = if let Some(id) = name.strip_prefix("agent-") {
        (true, id)
    } else {
        (false, name.strip_prefix("user-")?)
    };
    Some(User {
        id: id.to_owned(),
        agent,
    })
}

#[async_trait]
impl Authenticator for TestTokens {
    type Principal = User;

    async fn authenticate(&self, token: &str) -> Result<User, Unauthenticated> {
        user_named(token).ok_or_else(|| Unauthenticated::new("invalid token"))
    }

    fn connection_key(&self, user: &User) -> Option<String> {
        Some(user.id.clone())
    }
}

/// `tickets` and `ticket:<id>` on channel `tickets`, like the helpdesk.
pub(crate) struct TicketRouting;

impl EventRouting for TicketRouting {
    fn channel(&self, topic: &Topic) -> Option<String> {
        match (topic.family(), topic.key()) {
            ("tickets", None) | ("ticket", Some(_)) => Some("tickets".into()),
            _ => None,
        }
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
        let ticket_id = record.payload.get("ticket_id")?.as_str()?;
        Some(
            Routed::new(json!({
                "event_id": record.event_id,
                "type": record.event_type,
                "ticket_id": ticket_id,
                "version": record.stream_version,
                "data": record.payload,
            }))
            .topic(Topic::parse("tickets").ok()?)
            .topic(Topic::with_key("ticket", ticket_id).ok()?)
            .routing(
                "reporter_id",
                record
                    .payload
                    .get("reporter_id")
                    .cloned()
                    .unwrap_or_default(),
            ),
        )
    }
}

/// Agents see every ticket; customers the tickets they reported. Subscribing to
/// `ticket:<id>` looks the reporter up (once, at subscribe time).
#[derive(Clone, Default)]
pub(crate) struct TicketRules {
    pub(crate) reporters: Arc<Mutex<HashMap<String, String>>>,
}

#[async_trait]
impl Authorizer<User> for TicketRules {
    async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
        match (topic.family(), topic.key()) {
            ("tickets", None) => Ok(()),
            ("ticket", Some(id)) => {
                let reporter = self.reporters.lock().unwrap().get(id).cloned();
                if user.agent || reporter.as_deref() == Some(user.id.as_str()) {
                    Ok(())
                } else {
                    Err(Refusal::forbidden("you may not see this ticket"))
                }
            }
            _ => Err(Refusal::forbidden("no")),
        }
    }

    fn may_see(&self, user: &User, _: &Topic, event: &PushedEvent) -> bool {
        user.agent || event.routing_str("reporter_id") == Some(user.id.as_str())
    }
}

/// A hub served on `127.0.0.1:0`.
pub(crate) struct TestHub {
    pub(crate) hub: Hub<User>,
    pub(crate) addr: SocketAddr,
    pub(crate) store: Arc<InMemoryEventStore>,
    pub(crate) rules: TicketRules,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The client key a test handshake names in `x-test-client` (a server would take its
/// address), as a server's middleware gives it to the hub.
async fn client_key_from_header(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let key = request
        .headers()
        .get("x-test-client")
        .and_then(|v| v.to_str().ok())
        .map(|v| cqrs_realtime::ClientKey(v.to_owned()));
    if let Some(key) = key {
        request.extensions_mut().insert(key);
    }
    next.run(request).await
}

/// A server's own handshake for principals it authenticated itself: the user named in
/// `x-session-user` (`agent-<id>` or `user-<id>`, as a session cookie would stand for), handed
/// to `Hub::handle_authenticated`; 401 without one.
async fn session_handshake(
    axum::Extension(hub): axum::Extension<Hub<User>>,
    headers: axum::http::HeaderMap,
    upgrade: Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let user = headers
        .get("x-session-user")
        .and_then(|v| v.to_str().ok())
        .and_then(user_named);
    match user {
        Some(user) => hub.handle_authenticated(upgrade, user, None).await,
        None => axum::http::StatusCode::UNAUTHORIZED.into_response(),
    }
}

impl TestHub {
    /// A hub on an in-memory pub/sub and event store.
    pub(crate) async fn start(options: HubOptions) -> Self {
        Self::start_on(Arc::new(InMemoryPubSub::new()), options, |b| b).await
    }

    /// A hub on `pubsub`, with an in-memory event store, `configure` applied last.
    pub(crate) async fn start_on(
        pubsub: Arc<dyn PubSub>,
        options: HubOptions,
        configure: impl FnOnce(HubBuilder<User>) -> HubBuilder<User>,
    ) -> Self {
        Self::start_with(pubsub, options, true, configure).await
    }

    /// A hub whose events are stored (but not replayable) when `replay` is false.
    pub(crate) async fn start_with(
        pubsub: Arc<dyn PubSub>,
        options: HubOptions,
        replay: bool,
        configure: impl FnOnce(HubBuilder<User>) -> HubBuilder<User>,
    ) -> Self {
        let store = Arc::new(InMemoryEventStore::new());
        let replay_from = replay.then(|| store.clone() as Arc<dyn EventStore>);
        Self::start_full(pubsub, options, store, replay_from, configure).await
    }

    /// A hub whose events go to `store`, and whose replays read `replay_from`.
    pub(crate) async fn start_full(
        pubsub: Arc<dyn PubSub>,
        options: HubOptions,
        store: Arc<InMemoryEventStore>,
        replay_from: Option<Arc<dyn EventStore>>,
        configure: impl FnOnce(HubBuilder<User>) -> HubBuilder<User>,
    ) -> Self {
        Self::start_authenticated(
            authenticator(),
            pubsub,
            options,
            store,
            replay_from,
            configure,
        )
        .await
    }

    /// A hub on in-memory ports whose handshakes `authenticator` checks.
    pub(crate) async fn start_with_authenticator(
        authenticator: impl Authenticator<Principal = User>,
        options: HubOptions,
        configure: impl FnOnce(HubBuilder<User>) -> HubBuilder<User>,
    ) -> Self {
        let store = Arc::new(InMemoryEventStore::new());
        Self::start_authenticated(
            authenticator,
            Arc::new(InMemoryPubSub::new()),
            options,
            store.clone(),
            Some(store),
            configure,
        )
        .await
    }

    pub(crate) async fn start_authenticated(
        authenticator: impl Authenticator<Principal = User>,
        pubsub: Arc<dyn PubSub>,
        options: HubOptions,
        store: Arc<InMemoryEventStore>,
        replay_from: Option<Arc<dyn EventStore>>,
        configure: impl FnOnce(HubBuilder<User>) -> HubBuilder<User>,
    ) -> Self {
        let rules = TicketRules::default();
        let mut builder = Hub::builder(authenticator)
            .authorizer(rules.clone())
            .routing(TicketRouting)
            .pubsub(pubsub.clone())
            .options(options);
        if let Some(replay_from) = replay_from {
            builder = builder.event_store(replay_from);
        }
        let hub = configure(builder).build().expect("valid hub");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route(
                "/ws",
                hub.route()
                    .layer(axum::middleware::from_fn(client_key_from_header)),
            )
            .route("/ws-session", axum::routing::get(session_handshake))
            .layer(axum::Extension(hub.clone()));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            hub,
            addr,
            store,

            rules,
            server,
        }
    }

    pub(crate) fn url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    pub(crate) async fn connect(&self, token: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(self.url(token))
            .await
            .expect("handshake accepted");
        Client { ws }
    }

    /// The handshake of `/ws-session`, the server's own, as `user` (`agent-<id>` or
    /// `user-<id>`), with no token: the response when refused.
    pub(crate) async fn connect_session(
        &self,
        user: &str,
    ) -> Result<Client, tungstenite::http::Response<Option<Vec<u8>>>> {
        use tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}/ws-session", self.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("x-session-user", user.parse().unwrap());
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(tungstenite::Error::Http(response)) => Err(*response),
            Err(other) => panic!("handshake failed: {other}"),
        }
    }

    /// Connects with a 4 KiB socket receive buffer, so a client that stops reading backs up
    /// quickly.
    pub(crate) async fn connect_small_buffer(&self, token: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(self.addr).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(self.url(token), MaybeTlsStream::Plain(stream))
                .await
                .expect("handshake accepted");
        Client { ws }
    }

    /// Stores event `seq` of ticket `ticket` (reported by `reporter`) and publishes it.
    pub(crate) async fn publish(&self, ticket: &str, reporter: &str, seq: u64) -> EventRecord {
        self.publish_padded(ticket, reporter, seq, 0).await
    }

    /// Like [`publish`](Self::publish), with `pad` bytes of filler in the payload.
    pub(crate) async fn publish_padded(
        &self,
        ticket: &str,
        reporter: &str,
        seq: u64,
        pad: usize,
    ) -> EventRecord {
        let record = self.store_padded(ticket, reporter, seq, pad).await;
        self.hub.publisher().publish(&record).await.unwrap();
        record
    }

    /// Stores event `seq` of ticket `ticket` without publishing it (a missed live push).
    pub(crate) async fn store(&self, ticket: &str, reporter: &str, seq: u64) -> EventRecord {
        self.store_padded(ticket, reporter, seq, 0).await
    }

    async fn store_padded(
        &self,
        ticket: &str,
        reporter: &str,
        seq: u64,
        pad: usize,
    ) -> EventRecord {
        let mut event = record(ticket, reporter, seq);
        if pad > 0 {
            event.payload["pad"] = Value::String("x".repeat(pad));
        }
        self.rules
            .reporters
            .lock()
            .unwrap()
            .insert(ticket.to_owned(), reporter.to_owned());
        let mut stored = self
            .store
            .append(
                &format!("ticket-{ticket}"),
                ExpectedVersion::Any,
                vec![event],
            )
            .await
            .unwrap();
        stored.remove(0)
    }
}

/// A `TicketChanged` record; `seq` lets tests check order, gaps and duplicates.
pub(crate) fn record(ticket: &str, reporter: &str, seq: u64) -> EventRecord {
    EventRecord::new(
        uuid::Uuid::now_v7(),
        "TicketChanged",
        1,
        json!({ "ticket_id": ticket, "reporter_id": reporter, "seq": seq }),
        RecordMetadata::from_metadata(&Metadata::new()),
    )
}

/// A real WebSocket client.
pub(crate) struct Client {
    pub(crate) ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a client read: a server frame, or the close.
#[derive(Debug)]
pub(crate) enum Read {
    Frame(ServerFrame),
    Closed(Option<CloseFrame>),
}

impl Client {
    pub(crate) async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    pub(crate) async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// The next server frame or the close, skipping WebSocket pings.
    pub(crate) async fn read(&mut self) -> Read {
        loop {
            let next = tokio::time::timeout(FRAME_DEADLINE, self.ws.next())
                .await
                .expect("a frame within the deadline");
            match next {
                Some(Ok(Message::Text(text))) => {
                    let frame = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("not a server frame: {text}: {e}"));
                    // The hub never sends a frame its own version does not know.
                    assert_ne!(frame, ServerFrame::Unknown, "not a server frame: {text}");
                    return Read::Frame(frame);
                }
                Some(Ok(Message::Close(frame))) => return Read::Closed(frame),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
                Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                    return Read::Closed(None);
                }
                Some(Err(error)) => panic!("read failed: {error}"),
            }
        }
    }

    /// The next server frame; fails on a close.
    pub(crate) async fn frame(&mut self) -> ServerFrame {
        match self.read().await {
            Read::Frame(frame) => frame,
            Read::Closed(close) => panic!("closed while waiting for a frame: {close:?}"),
        }
    }

    /// Reads until the close frame and returns its code, failing after `limit` frames.
    pub(crate) async fn closed_with(&mut self, limit: usize) -> u16 {
        self.close_frame(limit).await.0
    }

    /// Reads until the close frame and returns its code (0 without one) and reason, failing
    /// after `limit` frames.
    pub(crate) async fn close_frame(&mut self, limit: usize) -> (u16, String) {
        for _ in 0..limit {
            if let Read::Closed(close) = self.read().await {
                // Reading on sends tungstenite's reply to the close, completing the handshake
                // (the server waits for it before dropping the connection).
                let _ = tokio::time::timeout(FRAME_DEADLINE, self.ws.next()).await;
                return close.map_or((0, String::new()), |c| {
                    (u16::from(c.code), c.reason.as_str().to_owned())
                });
            }
        }
        panic!("no close frame within {limit} frames");
    }

    pub(crate) async fn subscribe(&mut self, topic: &str) {
        self.send(json!({"type": "subscribe", "topic": topic}))
            .await;
        self.expect_subscribed(topic).await;
    }

    pub(crate) async fn expect_subscribed(&mut self, topic: &str) {
        match self.frame().await {
            ServerFrame::Subscribed { topic: t, .. } if t == topic => {}
            other => panic!("expected subscribed to {topic}, got {other:?}"),
        }
    }

    /// The next frame, which must be an `error`: its code.
    pub(crate) async fn error_code(&mut self) -> String {
        match self.frame().await {
            ServerFrame::Error { code, .. } => code,
            other => panic!("expected an error frame, got {other:?}"),
        }
    }

    /// The next frame, which must be an `event`: its topic, `seq`, ticket and position.
    pub(crate) async fn event(&mut self) -> Event {
        match self.frame().await {
            ServerFrame::Event {
                topic,
                event,
                position,
                ..
            } => Event {
                topic,
                seq: event["data"]["seq"].as_u64().expect("seq"),
                ticket: event["ticket_id"].as_str().expect("ticket_id").to_owned(),
                position,
                event,
            },
            other => panic!("expected an event frame, got {other:?}"),
        }
    }

    /// `ping` answered by `pong`: the connection is open and the frames before it were read.
    pub(crate) async fn ping_pong(&mut self) {
        self.send(json!({"type": "ping"})).await;
        match self.frame().await {
            ServerFrame::Pong => {}
            other => panic!("expected pong, got {other:?}"),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) topic: String,
    pub(crate) seq: u64,
    pub(crate) ticket: String,
    pub(crate) position: Option<String>,
    pub(crate) event: Value,
}
