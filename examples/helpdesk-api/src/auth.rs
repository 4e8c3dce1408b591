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
