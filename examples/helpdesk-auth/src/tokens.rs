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
    /// The user's logouts when it was issued ([`UserRecord::logouts`](crate::UserRecord)):
    /// once the user logs out again, the count differs and the token is refused. Absent
    /// (a token issued before logouts were counted) counts as 0.
    #[serde(default)]
    logouts: u64,
}

/// What a token says, once [`JwtTokens::decode`] checked it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DecodedToken {
    /// The user it was issued to, with the role it was issued with.
    pub user: User,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// The user's logouts when it was issued.
    pub logouts: u64,
}

/// How far ahead of this server's clock a token's `iat` or `nbf` may be: the clocks of the
/// instances that share the secret differ a little.
const CLOCK_SKEW_SECONDS: i64 = 60;

/// Issues and verifies HS256 JWTs (`sub`, `role`, `exp`, `iat`, `logouts`; an `nbf` is
/// honoured). Only
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

    /// A token for `user`, who has logged out `logouts` times so far.
    pub fn issue(&self, user: &User, logouts: u64) -> Result<String, jsonwebtoken::errors::Error> {
        let now = self.clock.now().timestamp();
        let claims = Claims {
            sub: user.id,
            role: user.role,
            iat: now,
            // A century at most (`new`): fits, and stays a time a JWT library reads.
            exp: now.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)),
            nbf: None,
            logouts,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }
}

impl JwtTokens {
    /// Checks a token's signature, algorithm and times against the injected clock: expired to
    /// the second, with no leeway; issued (`iat`) or valid from (`nbf`) more than a minute in
    /// the future, refused too (only a holder of the secret makes such a token, but one made
    /// for later is not meant for now). Returns what it says. The user store is not asked
    /// (whether the user still exists, or logged out since): [`UserAuthenticator`] does that.
    pub fn decode(&self, token: &str) -> Result<DecodedToken, AuthError> {
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
        Ok(DecodedToken {
            user: User {
                id: data.claims.sub,
                role: data.claims.role,
            },
            expires_at,
            logouts: data.claims.logouts,
        })
    }
}

/// The gateway's [`Authenticator`]: a valid token, whose user still exists in the user store
/// and has not logged out since it was issued, with the role stored there, as the agent list
/// allows it now. A token outlives nothing it was issued for: a deleted user's token is
/// refused, so is every token issued before a logout ([`AuthError::LoggedOut`]), a changed
/// role takes effect at the next request (an agent whose email left the agent list is a
/// customer), and a token of another server that shares the secret names no user here.
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
        let claimed = self.tokens.decode(token)?;
        let stored = self.users.by_id(claimed.user.id).await.map_err(|e| {
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
        if stored.logouts != claimed.logouts {
            return Err(AuthError::LoggedOut);
        }
        let user = User {
            id: stored.id,
            role: self.agents.role_of(&stored.email, stored.role),
        };
        Ok((user, Some(claimed.expires_at)))
    }
}

#[cfg(test)]
mod tests {
    use super::{Claims, JwtTokens, UserAuthenticator};
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
            logouts: 0,
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
        let issued = tokens.issue(&user, 3).unwrap();
        let decoded = tokens.decode(&issued).unwrap();
        assert_eq!((&decoded.user, decoded.logouts), (&user, 3));
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
            let token = tokens.issue(&user, 0).unwrap();
            assert!(tokens.decode(&token).is_ok(), "{ttl:?}: taken");
        }
    }

    /// A logout ends every token issued before it, and only those: one issued after it is
    /// taken, and so is another user's. A token without the `logouts` claim (issued before
    /// logouts were counted) counts as issued at none.
    #[tokio::test]
    async fn a_token_issued_before_its_users_logout_is_refused() {
        use crate::users::{InMemoryUserStore, UserRecord, UserStore};
        use helpdesk_api::Authenticator;
        let clock = Arc::new(ManualClock::default());
        let tokens = JwtTokens::new(&[7; 32], Duration::from_secs(3600), clock.clone()).unwrap();
        let users = Arc::new(InMemoryUserStore::default());
        let record = |email: &str| UserRecord {
            id: uuid::Uuid::now_v7(),
            email: email.to_owned(),
            role: Role::Customer,
            display_name: None,
            password_hash: String::new(),
            created_at: clock.now(),
            logouts: 0,
        };
        let (ada, bob) = (record("ada@example.com"), record("bob@example.com"));
        let user = |r: &UserRecord| User {
            id: r.id,
            role: r.role,
        };
        let (ada_user, bob_user) = (user(&ada), user(&bob));
        users.create(ada).await.unwrap();
        users.create(bob).await.unwrap();
        let auth = UserAuthenticator::new(
            tokens.clone(),
            users.clone(),
            crate::AgentList::new(Arc::default(), None),
        );
        let before = tokens.issue(&ada_user, 0).unwrap();
        let bobs = tokens.issue(&bob_user, 0).unwrap();
        // As a server that did not count logouts signed it.
        let unversioned = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({
                "sub": ada_user.id,
                "role": "customer",
                "iat": clock.now().timestamp(),
                "exp": clock.now().timestamp() + 600,
            }),
            &EncodingKey::from_secret(&[7; 32]).unwrap(),
        )
        .unwrap();
        for token in [&before, &unversioned, &bobs] {
            assert_eq!(auth.verify(token).await.unwrap().role, Role::Customer);
        }

        assert_eq!(users.log_out(ada_user.id).await.unwrap(), Some(1));
        for token in [&before, &unversioned] {
            let refused = auth.verify(token).await;
            assert!(matches!(refused, Err(AuthError::LoggedOut)), "{refused:?}");
        }
        assert_eq!(auth.verify(&bobs).await.unwrap(), bob_user);
        let after = tokens.issue(&ada_user, 1).unwrap();
        assert_eq!(auth.verify(&after).await.unwrap(), ada_user);
    }
}
