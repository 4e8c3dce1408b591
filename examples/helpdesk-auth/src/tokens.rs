//! HS256 bearer tokens.

use crate::agents::AgentList;
use crate::users::UserStore;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::clock::Clock;
use helpdesk_api::{AuthError, Authenticator, Role, User};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    role: Role,
    exp: i64,
    iat: i64,
    /// Not before: this server never sets it, but honours it in a token made elsewhere with
    /// the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
}

/// How far ahead of this server's clock a token's `iat` or `nbf` may be: the clocks of the
/// instances that share the secret differ a little.
const CLOCK_SKEW_SECONDS: i64 = 60;

/// Issues and verifies HS256 JWTs (`sub`, `role`, `exp`, `iat`; an `nbf` is honoured). Only
/// HS256 is accepted: a token signed with another algorithm, or `none`, is invalid.
#[derive(Clone)]
pub struct JwtTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for JwtTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtTokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl JwtTokens {
    /// Tokens signed with `secret`, living `ttl` (at most a century: a longer one counts as a
    /// century, where its seconds past `i64::MAX` made tokens born expired).
    pub fn new(
        secret: &[u8],
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, jsonwebtoken::errors::Error> {
        Ok(Self {
            encoding: EncodingKey::from_secret(secret)?,
            decoding: DecodingKey::from_secret(secret)?,
            ttl: ttl.min(crate::throttle::LONGEST_WINDOW),
            clock,
        })
    }

    /// How long a token lives, in seconds.
    pub fn ttl_seconds(&self) -> u64 {
        self.ttl.as_secs()
    }

    /// A token for `user`.
    pub fn issue(&self, user: &User) -> Result<String, jsonwebtoken::errors::Error> {
        let now = self.clock.now().timestamp();
        let claims = Claims {
            sub: user.id,
            role: user.role,
            iat: now,
            // A century at most (`new`): fits, and stays a time a JWT library reads.
            exp: now.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)),
            nbf: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }
}

impl JwtTokens {
    /// Checks a token's signature, algorithm and times against the injected clock: expired to
    /// the second, with no leeway; issued (`iat`) or valid from (`nbf`) more than a minute in
    /// the future, refused too (only a holder of the secret makes such a token, but one made
    /// for later is not meant for now). Returns the user it was issued to, and when it
    /// expires. The user store is not asked; [`UserAuthenticator`] does that.
    pub fn decode(&self, token: &str) -> Result<(User, DateTime<Utc>), AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims = ["exp", "sub"].into_iter().map(String::from).collect();
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(|e| {
                // Why, for whoever debugs a client; the client is told only that it is invalid.
                tracing::debug!(reason = ?e.kind(), "a token was refused");
                AuthError::Invalid
            })?;
        let now = self.clock.now().timestamp();
        if data.claims.exp <= now {
            return Err(AuthError::Expired);
        }
        let too_early = |at: i64| at > now.saturating_add(CLOCK_SKEW_SECONDS);
        if too_early(data.claims.iat) || data.claims.nbf.is_some_and(too_early) {
            return Err(AuthError::Invalid);
        }
        let expires_at = DateTime::from_timestamp(data.claims.exp, 0).ok_or(AuthError::Invalid)?;
        let user = User {
            id: data.claims.sub,
            role: data.claims.role,
        };
        Ok((user, expires_at))
    }
}

/// The gateway's [`Authenticator`]: a valid token, whose user still exists in the user store,
/// with the role stored there, as the agent list allows it now. A token outlives nothing it was
/// issued for: a deleted user's token is refused, a changed role takes effect at the next
/// request (an agent whose email left the agent list is a customer), and a token of another
/// server that shares the secret names no user here.
#[derive(Clone)]
pub struct UserAuthenticator {
    tokens: JwtTokens,
    users: Arc<dyn UserStore>,
    agents: AgentList,
}

impl std::fmt::Debug for UserAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserAuthenticator")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl UserAuthenticator {
    /// Verifies `tokens`, then looks their users up in `users`, agents only while `agents`
    /// lists them.
    pub fn new(tokens: JwtTokens, users: Arc<dyn UserStore>, agents: AgentList) -> Self {
        Self {
            tokens,
            users,
            agents,
        }
    }
}

#[async_trait]
impl Authenticator for UserAuthenticator {
    async fn verify(&self, token: &str) -> Result<User, AuthError> {
        Ok(self.verify_session(token).await?.0)
    }

    async fn verify_session(
        &self,
        token: &str,
    ) -> Result<(User, Option<DateTime<Utc>>), AuthError> {
        let (claimed, expires_at) = self.tokens.decode(token)?;
        let stored = self.users.by_id(claimed.id).await.map_err(|e| {
            // A failed backend, as the docs class it: the request gets a 503 (its access line
            // says so). Said once a minute: every signed-in request comes here while it is down.
            static SAID: cqrs_core::throttled::Throttled =
                cqrs_core::throttled::Throttled::every(cqrs_core::throttled::A_MINUTE);
            if let Some(unsaid) = SAID.may_say() {
                tracing::error!(error = %e, unsaid, "could not look up a token's user (`unsaid`: as many since the last such line)");
            }
            AuthError::Unavailable
        })?;
        let stored = stored.ok_or(AuthError::UnknownUser)?;
        let user = User {
            id: stored.id,
            role: self.agents.role_of(&stored.email, stored.role),
        };
        Ok((user, Some(expires_at)))
    }
}

#[cfg(test)]
mod tests {
    use super::{Claims, JwtTokens};
    use cqrs_core::clock::{Clock, ManualClock};
    use helpdesk_api::{AuthError, Role, User};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use std::sync::Arc;
    use std::time::Duration;

    /// A token signed with the secret, with these times relative to the clock's now.
    fn signed(clock: &ManualClock, iat: i64, nbf: Option<i64>) -> String {
        let now = clock.now().timestamp();
        let claims = Claims {
            sub: uuid::Uuid::now_v7(),
            role: Role::Customer,
            exp: now + 7200,
            iat: now + iat,
            nbf: nbf.map(|nbf| now + nbf),
        };
        let key = EncodingKey::from_secret(&[7; 32]).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    /// A token made for later (its `iat` or `nbf` past the clock skew) is refused until then;
    /// one a minute ahead, an instance whose clock runs ahead, is taken.
    #[test]
    fn a_token_issued_or_valid_only_in_the_future_is_refused_until_then() {
        let clock = Arc::new(ManualClock::default());
        let tokens = JwtTokens::new(&[7; 32], Duration::from_secs(60), clock.clone()).unwrap();
        let cases = [
            ("issued now", 0, None, true),
            ("issued a minute ahead", 60, None, true),
            ("issued an hour ahead", 3600, None, false),
            ("valid from a minute ahead", 0, Some(60), true),
            ("valid from an hour ahead", 0, Some(3600), false),
            ("valid from before", 0, Some(-60), true),
        ];
        for (what, iat, nbf, taken) in cases {
            let token = signed(&clock, iat, nbf);
            let decoded = tokens.decode(&token);
            assert_eq!(decoded.is_ok(), taken, "{what}: {decoded:?}");
            if !taken {
                assert!(matches!(decoded, Err(AuthError::Invalid)), "{what}");
            }
        }
        let later = signed(&clock, 0, Some(3600));
        clock.advance(Duration::from_secs(3600));
        assert!(tokens.decode(&later).is_ok(), "taken once its time came");
        // What this server issues decodes as it was issued.
        let user = User {
            id: uuid::Uuid::now_v7(),
            role: Role::Agent,
        };
        let issued = tokens.issue(&user).unwrap();
        let (decoded, _) = tokens.decode(&issued).unwrap();
        assert_eq!((decoded.id, decoded.role), (user.id, user.role));
        // Expired to the second, and told so.
        clock.advance(Duration::from_secs(60));
        assert!(matches!(tokens.decode(&issued), Err(AuthError::Expired)));
    }

    /// A lifetime past a century counts as a century: its seconds cast to `i64` made every
    /// token born expired (or overflowed), so a login "worked" and the next request was 401.
    #[test]
    fn a_ttl_past_a_century_counts_as_a_century() {
        let clock = Arc::new(ManualClock::default());
        let user = User {
            id: uuid::Uuid::now_v7(),
            role: Role::Customer,
        };
        for ttl in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
            let tokens = JwtTokens::new(&[7; 32], ttl, clock.clone()).unwrap();
            assert_eq!(tokens.ttl_seconds(), 100 * 365 * 24 * 3600, "{ttl:?}");
            let token = tokens.issue(&user).unwrap();
            assert!(tokens.decode(&token).is_ok(), "{ttl:?}: taken");
        }
    }
}
