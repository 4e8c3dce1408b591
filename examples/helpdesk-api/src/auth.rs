//! Who is calling.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees and acts on every ticket.
    Agent,
    /// Sees the tickets they reported.
    Customer,
}

impl Role {
    /// `agent` or `customer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Customer => "customer",
        }
    }
}

/// An authenticated user: the principal of every request after authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// The user's id.
    pub id: Uuid,
    /// The role.
    pub role: Role,
}

impl User {
    /// Whether the user is an agent.
    pub fn is_agent(&self) -> bool {
        self.role == Role::Agent
    }
}

/// Why a token was refused. Every variant but [`Unavailable`](AuthError::Unavailable) is a 401;
/// the message says which.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credentials.
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    /// Not a bearer token, or not a token at all.
    #[error("malformed authorization: expected `Authorization: Bearer <token>`")]
    Malformed,
    /// More than one `Authorization` header: which one counts is not for the server to guess
    /// (a proxy in front may read another one than it would).
    #[error("send one `Authorization` header, not several")]
    Repeated,
    /// The token is invalid: not a token, a bad signature, another algorithm, or made for a
    /// later time.
    #[error(
        "the token is not valid here (malformed, not signed by this server or with a secret it \
         no longer has, or not valid yet); log in again"
    )]
    Invalid,
    /// The token is well signed, but has expired. Told apart from [`Invalid`](Self::Invalid)
    /// only once the signature holds, so it says nothing about tokens the server did not
    /// make.
    #[error("the token has expired; log in again")]
    Expired,
    /// The token is well signed, but its user does not exist here (deleted, or a token of
    /// another server sharing the secret).
    #[error("the token's user does not exist; log in again")]
    UnknownUser,
    /// The token is well signed, but its user logged out (`POST /auth/logout`) after it was
    /// issued: a logout ends every token issued before it.
    #[error("the token was ended by a logout; log in again")]
    LoggedOut,
    /// The user could not be looked up (the user store is down): 503, try again.
    #[error("the user store is busy or unavailable; try again shortly")]
    Unavailable,
}

impl AuthError {
    /// Whether the client should try again later rather than send other credentials.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuthError::Unavailable)
    }
}

/// Verifies bearer tokens. The auth plugin provides one as a resource; the gateway uses it for
/// every authenticated route and the WebSocket handshake.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// The user a token belongs to.
    async fn verify(&self, token: &str) -> Result<User, AuthError>;

    /// The user a token belongs to, and when the token stops being valid (a long-lived
    /// WebSocket connection is closed then). Defaults to [`verify`](Self::verify) with no
    /// expiry.
    async fn verify_session(
        &self,
        token: &str,
    ) -> Result<(User, Option<chrono::DateTime<chrono::Utc>>), AuthError> {
        Ok((self.verify(token).await?, None))
    }
}

/// Closes a user's realtime connections on every instance: the gateway's WebSocket hub, which
/// it provides to plugins through a [`LiveSessions`] resource. A plugin that ends a user's
/// sessions (the auth plugin's logout) refuses the user's credentials first, then calls it.
#[async_trait]
pub trait CloseSessions: Send + Sync + 'static {
    /// Closes `user`'s connections here and asks every other instance to close theirs.
    async fn close_everywhere(&self, user: Uuid) -> ClosedSessions;

    /// Asks the other instances again to close `user`'s connections, without closing this
    /// one's: to try again after [`close_everywhere`](Self::close_everywhere) could not ask
    /// them. `None` when nothing is left here to ask from (the hub stopped).
    async fn tell_others(&self, user: Uuid) -> Option<Result<(), cqrs_core::BoxError>>;
}

/// What [`CloseSessions::close_everywhere`] did.
#[derive(Debug)]
pub struct ClosedSessions {
    /// How many connections it closed on this instance.
    pub here: usize,
    /// Whether the other instances were asked to close theirs: an `Err` when they could not
    /// be (the pub/sub unreachable). Theirs then stay open until their credentials expire.
    pub elsewhere: Result<(), cqrs_core::BoxError>,
}

/// The gateway's [`CloseSessions`], filled in once its hub is built (after the plugins
/// registered, so it is a handle, as [`BusHandle`](crate::BusHandle) is). Until then, and in
/// a server with no hub, there are no realtime connections to close.
#[derive(Clone, Default)]
pub struct LiveSessions(std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn CloseSessions>>>);

impl LiveSessions {
    /// An empty handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets what closes the connections; a second call is ignored.
    pub fn set(&self, sessions: std::sync::Arc<dyn CloseSessions>) {
        let _ = self.0.set(sessions);
    }

    /// [`CloseSessions::tell_others`], or `None` while nothing is set.
    pub async fn tell_others(&self, user: Uuid) -> Option<Result<(), cqrs_core::BoxError>> {
        self.0.get()?.tell_others(user).await
    }

    /// [`CloseSessions::close_everywhere`], or none closed while nothing is set.
    pub async fn close_everywhere(&self, user: Uuid) -> ClosedSessions {
        match self.0.get() {
            Some(sessions) => sessions.close_everywhere(user).await,
            None => ClosedSessions {
                here: 0,
                elsewhere: Ok(()),
            },
        }
    }
}

impl std::fmt::Debug for LiveSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSessions")
            .field("set", &self.0.get().is_some())
            .finish()
    }
}

/// Looks users up by id, for plugins that need another user's role (the tickets plugin checks
/// that an assignee is an agent). The auth plugin provides one as a resource.
#[async_trait]
pub trait UserDirectory: Send + Sync + 'static {
    /// The role of user `id`, or `None` when there is no such user.
    async fn role_of(&self, id: Uuid) -> Result<Option<Role>, cqrs_core::ports::StoreError>;

    /// [`role_of`](Self::role_of) from inside a command handler. A directory on the command's
    /// database reads on the command's own connection (its unit of work), so the command takes
    /// one pool connection, not two: with as many commands in flight as the pool has
    /// connections, a second one would never come. Defaults to `role_of`.
    async fn role_of_in(
        &self,
        id: Uuid,
        ctx: &mut cqrs_core::CommandContext,
    ) -> Result<Option<Role>, cqrs_core::ports::StoreError> {
        let _ = ctx;
        self.role_of(id).await
    }
}

/// Whether `given` is the secret `expected` (an agent code, a metrics token). Every byte of
/// `expected` is compared whatever `given` holds and however long it is, so the time taken
/// tells nothing about how much of it was right.
///
/// ```
/// use helpdesk_api::same_secret;
/// assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
/// assert!(!same_secret(b"0123456789abcdef", b"0123456789abcde"));
/// assert!(!same_secret(b"0123456789abcdef", b""));
/// ```
pub fn same_secret(expected: &[u8], given: &[u8]) -> bool {
    let mut differ = u8::from(given.len() != expected.len());
    for (i, byte) in expected.iter().enumerate() {
        differ |= byte ^ given.get(i).copied().unwrap_or(0);
    }
    // Kept from folding the loop into an early exit.
    std::hint::black_box(differ) == 0
}
