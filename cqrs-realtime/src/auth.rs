//! The hooks a server plugs in: who is connecting, and what they may receive.

use crate::{ErrorCode, PushedEvent, Topic};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

/// Checks the bearer token of a handshake and says who the client is.
///
/// The hub takes the token from `Authorization: Bearer <token>` or, for browsers (which cannot
/// set headers on a WebSocket), from the `token` query parameter. A handshake without a token,
/// or whose token this hook refuses, gets HTTP 401 with a JSON error body and no upgrade.
///
/// ```
/// use cqrs_realtime::{Authenticator, Unauthenticated};
///
/// struct StaticTokens;
///
/// #[cqrs_realtime::async_trait]
/// impl Authenticator for StaticTokens {
///     type Principal = String;
///
///     async fn authenticate(&self, token: &str) -> Result<String, Unauthenticated> {
///         match token {
///             "secret-ada" => Ok("ada".into()),
///             _ => Err(Unauthenticated::new("invalid token")),
///         }
///     }
/// }
/// # let _ = StaticTokens;
/// ```
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Who a connection belongs to: kept for the connection's lifetime and handed to the
    /// [`Authorizer`].
    type Principal: Send + Sync + 'static;

    /// The principal the token stands for, or why it is refused.
    async fn authenticate(&self, token: &str) -> Result<Self::Principal, Unauthenticated>;

    /// Who the principal is, as a stable key (a user id): the hub holds at most
    /// [`max_connections_per_principal`](crate::HubOptions::max_connections_per_principal)
    /// connections per key, so one client cannot take every connection the hub may hold.
    /// `None`, the default, leaves the principal's connections uncounted, and gives each
    /// connection a [`resumes_per_minute`](crate::HubOptions::resumes_per_minute) budget of its
    /// own (refilled by reconnecting): implement it whenever principals have an identity.
    fn connection_key(&self, principal: &Self::Principal) -> Option<String> {
        let _ = principal;
        None
    }

    /// When the principal's credentials stop being valid (a token's `exp`): the hub closes
    /// the connection then, with code 1008 and reason `credentials expired`, so a short-lived
    /// token does not grant a connection that lasts for ever. The close comes at the first
    /// keepalive tick at or after this time (within one
    /// [`ping_interval`](crate::HubOptions::ping_interval)), or at once when the client sends
    /// `subscribe` after it; the time is read from the hub's
    /// [`clock`](crate::HubBuilder::clock). Asked when the connection opens: the handshake is
    /// refused with 401 when the time has already passed. `None`, the default, never expires.
    fn expires_at(&self, principal: &Self::Principal) -> Option<DateTime<Utc>> {
        let _ = principal;
        None
    }
}

/// A refused handshake: the client gets 401 with this message, or 503 when the credentials
/// could not be checked ([`unavailable`](Self::unavailable)).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Unauthenticated {
    message: String,
    unavailable: bool,
}

impl Unauthenticated {
    /// A refusal with a message for the client (say what is wrong, never why a token is
    /// close to valid).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            unavailable: false,
        }
    }

    /// The credentials could not be checked now (the user store is down): the client gets
    /// 503 `unavailable` with `Retry-After`, so it tries again instead of dropping a token that
    /// may well be good.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            unavailable: true,
        }
    }

    /// Whether this is [`unavailable`](Self::unavailable) rather than a refusal.
    pub fn is_unavailable(&self) -> bool {
        self.unavailable
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// An [`Authenticator`] from an async function of the token.
///
/// On its own it leaves the principal's connections uncounted and never expires them (the
/// trait's defaults). For a credential that names a user and runs out (a JWT's `sub` and
/// `exp`), add [`connection_key`](Self::connection_key) and [`expires_at`](Self::expires_at),
/// or the hub holds its connections past the token's life and lets one user take every
/// connection.
///
/// ```
/// use cqrs_realtime::reexports::chrono::{DateTime, Duration, Utc};
/// use cqrs_realtime::{AuthenticateFn, Unauthenticated};
///
/// /// What a verified token says (decode and verify a real one here, a JWT).
/// struct Claims {
///     user_id: String,
///     expires: DateTime<Utc>,
/// }
///
/// let authenticator = AuthenticateFn::new(|token: String| async move {
///     match token.strip_prefix("user-") {
///         Some(id) => Ok(Claims { user_id: id.to_owned(), expires: Utc::now() + Duration::minutes(15) }),
///         None => Err(Unauthenticated::new("invalid token")),
///     }
/// })
/// .connection_key(|claims: &Claims| Some(claims.user_id.clone()))
/// .expires_at(|claims: &Claims| Some(claims.expires));
/// # let _ = authenticator;
/// ```
pub struct AuthenticateFn<F, P> {
    f: F,
    connection_key: Option<PrincipalFn<P, String>>,
    expires_at: Option<PrincipalFn<P, DateTime<Utc>>>,
    _principal: PhantomData<fn() -> P>,
}

/// A question about a principal, asked once per connection.
type PrincipalFn<P, T> = Box<dyn Fn(&P) -> Option<T> + Send + Sync>;

impl<F, P> fmt::Debug for AuthenticateFn<F, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthenticateFn")
            .field("connection_key", &self.connection_key.is_some())
            .field("expires_at", &self.expires_at.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, Fut, P> AuthenticateFn<F, P>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<P, Unauthenticated>> + Send + 'static,
    P: Send + Sync + 'static,
{
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self {
            f,
            connection_key: None,
            expires_at: None,
            _principal: PhantomData,
        }
    }

    /// Answers [`Authenticator::connection_key`] with `key`: the principal's stable key (a
    /// user id), under which the hub counts its connections.
    pub fn connection_key(
        mut self,
        key: impl Fn(&P) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.connection_key = Some(Box::new(key));
        self
    }

    /// Answers [`Authenticator::expires_at`] with `expires`: when the principal's credentials
    /// stop being valid (a token's `exp`), at which the hub closes the connection.
    pub fn expires_at(
        mut self,
        expires: impl Fn(&P) -> Option<DateTime<Utc>> + Send + Sync + 'static,
    ) -> Self {
        self.expires_at = Some(Box::new(expires));
        self
    }
}

#[async_trait]
impl<F, Fut, P> Authenticator for AuthenticateFn<F, P>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<P, Unauthenticated>> + Send + 'static,
    P: Send + Sync + 'static,
{
    type Principal = P;

    async fn authenticate(&self, token: &str) -> Result<P, Unauthenticated> {
        (self.f)(token.to_owned()).await
    }

    fn connection_key(&self, principal: &P) -> Option<String> {
        self.connection_key.as_ref().and_then(|key| key(principal))
    }

    fn expires_at(&self, principal: &P) -> Option<DateTime<Utc>> {
        self.expires_at.as_ref().and_then(|at| at(principal))
    }
}

/// Decides what a principal may receive.
///
/// Two questions, asked at different rates:
///
/// * [`authorize_subscribe`](Self::authorize_subscribe), once per `subscribe` frame. It is
///   async: it may look something up (does this user report this ticket?).
/// * [`may_see`](Self::may_see), once per event per matching subscription: with 10,000
///   subscribers, 10,000 times per event. It is a plain function on purpose: decide from the
///   principal and the event's own routing fields ([`PushedEvent::routing`]), never from a
///   lookup.
///
/// ```
/// use cqrs_realtime::{Authorizer, PushedEvent, Refusal, Topic};
///
/// struct User { id: String, agent: bool }
///
/// struct TicketRules;
///
/// #[cqrs_realtime::async_trait]
/// impl Authorizer<User> for TicketRules {
///     async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
///         match topic.family() {
///             "tickets" => Ok(()),
///             _ if user.agent => Ok(()),
///             _ => Err(Refusal::forbidden("only agents may follow a single ticket here")),
///         }
///     }
///
///     fn may_see(&self, user: &User, _topic: &Topic, event: &PushedEvent) -> bool {
///         user.agent || event.routing_str("reporter_id") == Some(user.id.as_str())
///     }
/// }
/// # let _ = TicketRules;
/// ```
#[async_trait]
pub trait Authorizer<P>: Send + Sync + 'static {
    /// Whether `principal` may subscribe to `topic`. A refusal is sent to the client as an
    /// `error` frame (code `forbidden` unless the refusal says otherwise); the connection
    /// stays open.
    async fn authorize_subscribe(&self, principal: &P, topic: &Topic) -> Result<(), Refusal>;

    /// Whether `principal`, subscribed to `topic`, receives `event`. Must not block.
    fn may_see(&self, principal: &P, topic: &Topic, event: &PushedEvent) -> bool;
}

/// Lets every principal subscribe to every topic and see every event: for public feeds.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

#[async_trait]
impl<P: Send + Sync + 'static> Authorizer<P> for AllowAll {
    async fn authorize_subscribe(&self, _: &P, _: &Topic) -> Result<(), Refusal> {
        Ok(())
    }

    fn may_see(&self, _: &P, _: &Topic, _: &PushedEvent) -> bool {
        true
    }
}

/// A refused subscription.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    /// The principal may not subscribe (code `forbidden`).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Forbidden,
            message: message.into(),
        }
    }

    /// The topic does not exist (code `unknown_topic`), for servers that would rather not say
    /// whether a thing exists than say it is forbidden.
    pub fn unknown_topic(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::UnknownTopic,
            message: message.into(),
        }
    }

    /// The check could not be made now (code `unavailable`): the client may try again.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Unavailable,
            message: message.into(),
        }
    }

    /// The error code sent to the client.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The message sent to the client.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Who a handshake comes from, for
/// [`max_connections_per_client`](crate::HubOptions::max_connections_per_client): a stable
/// key such as the client's IP address (or an IPv6 address's /64). Only the server knows
/// which proxies to believe, so its middleware puts this in the request's extensions; the
/// hub's [`route`](crate::Hub::route) reads it from there, and a handshake without one is not
/// counted per client.
///
/// ```
/// use axum::{Router, extract::Request, middleware::Next};
/// use cqrs_realtime::{AllowAll, ClientKey, Hub};
/// use std::net::IpAddr;
///
/// /// An IPv4 address (also one a dual-stack listener shows as `::ffff:a.b.c.d`), or an
/// /// IPv6 address's /64: one client rotating addresses within its /64 is one client.
/// fn key_of(ip: IpAddr) -> String {
///     match ip.to_canonical() {
///         IpAddr::V4(v4) => v4.to_string(),
///         IpAddr::V6(v6) => {
///             let s = v6.segments();
///             format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
///         }
///     }
/// }
///
/// # fn demo(hub: Hub<String>) -> Router {
/// async fn client_key(mut request: Request, next: Next) -> axum::response::Response {
///     // The peer's address. Behind a reverse proxy that is the proxy's, and every client
///     // would share one key: take the address the proxy forwarded instead (from a header
///     // only that proxy can set).
///     let peer = request
///         .extensions()
///         .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
///         .map(|info| key_of(info.0.ip()));
///     if let Some(peer) = peer {
///         request.extensions_mut().insert(ClientKey(peer));
///     }
///     next.run(request).await
/// }
/// Router::new().route("/ws", hub.route().layer(axum::middleware::from_fn(client_key)))
/// # }
///
/// // `ConnectInfo` is in the request only when the server is made with it; without it the
/// // middleware finds no address, puts in no key, and the per-client limit never applies.
/// # async fn serve(app: Router, listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// axum::serve(
///     listener,
///     app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
/// )
/// .await
/// # }
/// # let _ = AllowAll;
/// assert_eq!(key_of("::ffff:192.0.2.7".parse().unwrap()), key_of("192.0.2.7".parse().unwrap()));
/// assert_eq!(
///     key_of("2001:db8:1:2::a".parse().unwrap()),
///     key_of("2001:db8:1:2:ffff::b".parse().unwrap())
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(pub String);
