//! The auth plugin's messages and handlers.

use crate::throttle::LoginThrottle;
use crate::tokens::JwtTokens;
use crate::users::{CreateUserError, UserRecord, UserStore};
use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use async_trait::async_trait;
use cqrs_core::clock::Clock;
use cqrs_core::{
    Command, CommandContext, CommandHandler, ErrorKind, HandlerError, Message, Query, QueryContext,
    QueryHandler,
};
use helpdesk_api::{Role, User};
use serde_json::json;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use uuid::Uuid;

/// The part of a client's address the login throttle counts by: an IPv4 address, or an IPv6
/// address's /64 (one host can pick any address in its /64, so counting whole addresses would
/// give it as many guesses as it likes).
fn client_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// Registers a user.
pub struct RegisterUser {
    /// As sent; trimmed and lower-cased by the handler.
    pub email: String,
    /// 8 to 128 characters.
    pub password: String,
    /// Optional, at most 100 characters after trimming.
    pub display_name: Option<String>,
}

// Written out: a derived `Debug` would print the password wherever a command is logged.
impl std::fmt::Debug for RegisterUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterUser")
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("display_name", &self.display_name)
            .finish()
    }
}

impl Message for RegisterUser {
    const NAME: &'static str = "auth.register_user";
}

impl Command for RegisterUser {
    type Output = UserRecord;
}

/// Logs in: checks the password and issues a token.
pub struct LogIn {
    /// As sent.
    pub email: String,
    /// As sent.
    pub password: String,
    /// The client's address, for throttling.
    pub client: Option<IpAddr>,
}

impl std::fmt::Debug for LogIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogIn")
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("client", &self.client)
            .finish()
    }
}

impl Message for LogIn {
    const NAME: &'static str = "auth.log_in";
}

/// A successful login.
#[derive(Clone)]
pub struct LoggedIn {
    /// The bearer token.
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// Who logged in.
    pub user: User,
}

impl std::fmt::Debug for LoggedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedIn")
            .field("token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .field("user", &self.user)
            .finish()
    }
}

impl Command for LogIn {
    type Output = LoggedIn;
}

/// Reads a user by id.
#[derive(Debug)]
pub struct GetUser(pub Uuid);

impl Message for GetUser {
    const NAME: &'static str = "auth.get_user";
}

impl Query for GetUser {
    type Output = Option<UserRecord>;
}

/// Trims and lower-cases an email, or says why it is not one.
pub fn normalize_email(raw: &str) -> Result<String, &'static str> {
    let email = raw.trim().to_lowercase();
    if email.is_empty() {
        return Err("the email is empty");
    }
    if email.len() > 254 {
        return Err("the email is longer than 254 characters");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err("the email has no @");
    };
    let looks_right = !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && domain.contains('.')
        && domain.split('.').all(|label| !label.is_empty())
        && !email.chars().any(|c| {
            c.is_whitespace()
                || c.is_control()
                || matches!(
                    c,
                    '<' | '>' | '(' | ')' | ',' | ';' | ':' | '\\' | '"' | '[' | ']'
                )
        });
    if looks_right {
        Ok(email)
    } else {
        Err("the email does not look like an address")
    }
}

use helpdesk_api::{invalid_field as invalid, reject_nul};

fn internal(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::internal(e.to_string())
}

/// Password hashing and checking, on blocking threads (argon2 takes tens of milliseconds and
/// ~19 MiB on purpose), at most `permits` at a time. Login and registration need no token, so
/// without a bound a burst of them would queue hundreds of hashes (gigabytes) on the blocking
/// pool, and a request's timeout does not stop a hash already running. Past the bound, a
/// request waits up to `wait` for a turn, then gets 503 `busy` with `Retry-After`.
#[derive(Clone, Debug)]
pub(crate) struct Hashing {
    permits: Arc<tokio::sync::Semaphore>,
    wait: std::time::Duration,
}

impl Hashing {
    pub(crate) fn new(permits: usize, wait: std::time::Duration) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(permits.max(1))),
            wait,
        }
    }

    /// Two hashes per core, waiting up to 2 s for a turn.
    pub(crate) fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::new(2 * cores, std::time::Duration::from_secs(2))
    }

    /// A turn to hash, waiting up to the bound; `busy` past it. A login takes its turn before
    /// it counts an attempt, so a refusal for being busy never counts as a failed login.
    pub(crate) async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, HandlerError> {
        tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                HandlerError::new(
                    ErrorKind::Unavailable,
                    "busy",
                    "the server is checking too many passwords at once; try again in a moment",
                )
            })
    }

    /// Runs `work` on a blocking thread in the turn `permit` holds. The permit goes with the
    /// work, so a request dropped meanwhile (a timeout) keeps counting until its hash is done.
    async fn run<T: Send + 'static>(
        permit: tokio::sync::OwnedSemaphorePermit,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HandlerError> {
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(internal)
    }

    async fn hash_password(&self, password: String) -> Result<String, HandlerError> {
        let permit = self.permit().await?;
        Self::run(permit, move || argon2_hash(password.as_bytes())).await?
    }

    /// Checks `password` against `hash` in the turn `permit` holds.
    async fn verify_password(
        permit: tokio::sync::OwnedSemaphorePermit,
        password: String,
        hash: String,
    ) -> Result<bool, HandlerError> {
        Self::run(permit, move || {
            Argon2::default()
                .verify_password(password.as_bytes(), hash.as_str())
                .is_ok()
        })
        .await
    }
}

/// Handles [`RegisterUser`].
pub(crate) struct RegisterHandler {
    pub(crate) users: Arc<dyn UserStore>,
    pub(crate) hashing: Hashing,
    pub(crate) agents: Arc<HashSet<String>>,
    pub(crate) clock: Arc<dyn Clock>,
}

#[async_trait]
impl CommandHandler<RegisterUser> for RegisterHandler {
    async fn handle(
        &self,
        cmd: RegisterUser,
        _ctx: &mut CommandContext,
    ) -> Result<UserRecord, HandlerError> {
        let email = normalize_email(&cmd.email).map_err(|p| invalid("email", p))?;
        let chars = cmd.password.chars().count();
        if !(8..=128).contains(&chars) {
            return Err(invalid(
                "password",
                "the password must be 8 to 128 characters",
            ));
        }
        let display_name = cmd
            .display_name
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        if display_name
            .as_ref()
            .is_some_and(|n| n.chars().count() > 100)
        {
            return Err(invalid(
                "display_name",
                "the display name must be at most 100 characters",
            ));
        }
        if let Some(name) = &display_name {
            reject_nul("display_name", name)?;
        }
        // Cheap check first, so a taken email does not cost a hash; the store decides for real.
        if self.users.by_email(&email).await?.is_some() {
            return Err(email_taken());
        }
        let role = if self.agents.contains(&email) {
            Role::Agent
        } else {
            Role::Customer
        };
        let user = UserRecord {
            id: Uuid::now_v7(),
            email,
            role,
            display_name,
            password_hash: self.hashing.hash_password(cmd.password).await?,
            created_at: self.clock.now(),
        };
        match self.users.create(user.clone()).await {
            Ok(()) => Ok(user),
            Err(CreateUserError::EmailTaken) => Err(email_taken()),
            Err(CreateUserError::Store(e)) => Err(e.into()),
        }
    }
}

fn email_taken() -> HandlerError {
    HandlerError::conflict("email_taken", "an account with this email already exists")
}

/// Handles [`LogIn`].
pub(crate) struct LogInHandler {
    pub(crate) users: Arc<dyn UserStore>,
    pub(crate) hashing: Hashing,
    pub(crate) throttle: Arc<dyn LoginThrottle>,
    pub(crate) tokens: JwtTokens,
    /// Verified against when the email is unknown, so both failures take as long.
    pub(crate) dummy_hash: Arc<String>,
}

#[async_trait]
impl CommandHandler<LogIn> for LogInHandler {
    async fn handle(
        &self,
        cmd: LogIn,
        _ctx: &mut CommandContext,
    ) -> Result<LoggedIn, HandlerError> {
        let invalid_credentials = || {
            HandlerError::unauthorized("the email or the password is wrong")
                .with_code("invalid_credentials")
        };
        // No account has an email that does not pass the registration's checks; such input
        // (a NUL, say) is not looked up or stored at all.
        let Ok(email) = normalize_email(&cmd.email) else {
            return Err(invalid_credentials());
        };
        let key = format!(
            "{email}|{}",
            cmd.client.map_or_else(|| "unknown".to_owned(), client_key)
        );
        // The turn to hash comes first: a login refused as `busy` is no attempt.
        let turn = self.hashing.permit().await?;
        if let Some(seconds) = self.throttle.attempt(&key).await? {
            return Err(HandlerError::new(
                ErrorKind::RateLimited,
                "too_many_attempts",
                "too many failed logins; try again later",
            )
            .with_details(json!({ "retry_after": seconds })));
        }
        let user = self.users.by_email(&email).await?;
        let hash = user
            .as_ref()
            .map_or_else(|| self.dummy_hash.to_string(), |u| u.password_hash.clone());
        let ok = Hashing::verify_password(turn, cmd.password, hash).await? && user.is_some();
        // A failure stays counted.
        let Some(user) = user.filter(|_| ok) else {
            return Err(invalid_credentials());
        };
        self.throttle.succeeded(&key).await?;
        let principal = User {
            id: user.id,
            role: user.role,
        };
        let token = self.tokens.issue(&principal).map_err(internal)?;
        Ok(LoggedIn {
            token,
            expires_in: self.tokens.ttl_seconds(),
            user: principal,
        })
    }
}

/// Handles [`GetUser`].
pub(crate) struct GetUserHandler {
    pub(crate) users: Arc<dyn UserStore>,
}

#[async_trait]
impl QueryHandler<GetUser> for GetUserHandler {
    async fn handle(
        &self,
        q: GetUser,
        _ctx: &QueryContext,
    ) -> Result<Option<UserRecord>, HandlerError> {
        Ok(self.users.by_id(q.0).await?)
    }
}

/// A hash of a random password, made once at start-up.
pub(crate) fn dummy_hash() -> Result<String, HandlerError> {
    argon2_hash(Uuid::new_v4().to_string().as_bytes())
}

/// The argon2 hash of `password`, with a fresh salt, as a PHC string.
fn argon2_hash(password: &[u8]) -> Result<String, HandlerError> {
    Argon2::default()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(internal)
}

#[cfg(test)]
mod tests {
    use super::Hashing;
    use cqrs_core::ErrorKind;
    use std::time::Duration;

    /// With every permit taken, a request waits its turn up to the bound, then is told the
    /// server is busy (retryable); once a permit is free, checks run again.
    // Real time: paused time does not advance while a blocking task runs.
    #[tokio::test]
    async fn past_the_bound_a_request_waits_then_hears_the_server_is_busy() {
        let wait = Duration::from_millis(100);
        let hashing = Hashing::new(1, wait);
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = hashing.clone();
        let running = tokio::spawn(async move {
            let permit = busy.permit().await?;
            Hashing::run(permit, move || {
                let _ = hold.recv();
            })
            .await
        });
        while hashing.permits.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let started = std::time::Instant::now();
        let refused = hashing.permit().await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert_eq!(refused.code(), "busy");
        assert!(refused.kind().is_retryable());
        assert!(started.elapsed() >= wait, "waited its turn first");

        release.send(()).unwrap();
        running.await.unwrap().unwrap();
        let turn = hashing.permit().await.unwrap();
        let checked = Hashing::verify_password(turn, "pw".into(), "not a hash".into())
            .await
            .unwrap();
        assert!(!checked, "a free permit lets the check run");
    }
}
