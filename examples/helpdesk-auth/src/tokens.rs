//! HS256 bearer tokens.

use async_trait::async_trait;
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
}

/// Issues and verifies HS256 JWTs (`sub`, `role`, `exp`). Only HS256 is accepted: a token
/// signed with another algorithm, or `none`, is invalid.
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
    /// Tokens signed with `secret`, living `ttl`.
    pub fn new(
        secret: &[u8],
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, jsonwebtoken::errors::Error> {
        Ok(Self {
            encoding: EncodingKey::from_secret(secret)?,
            decoding: DecodingKey::from_secret(secret)?,
            ttl,
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
            exp: now + self.ttl.as_secs() as i64,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }
}

#[async_trait]
impl Authenticator for JwtTokens {
    async fn verify(&self, token: &str) -> Result<User, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked below against the injected clock, to the second, with no leeway.
        validation.validate_exp = false;
        validation.required_spec_claims = ["exp", "sub"].into_iter().map(String::from).collect();
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|_| AuthError::Invalid)?;
        if data.claims.exp <= self.clock.now().timestamp() {
            return Err(AuthError::Invalid);
        }
        Ok(User {
            id: data.claims.sub,
            role: data.claims.role,
        })
    }
}
