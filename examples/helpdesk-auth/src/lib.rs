//! The helpdesk's auth plugin: `POST /auth/register`, `POST /auth/login`, `POST /auth/logout`,
//! `GET /auth/me`, `GET /users/{id}`.
//!
//! Passwords are hashed with argon2id; tokens are HS256 JWTs. Wrong passwords and unknown
//! emails get the same 401, after the same amount of work (an unknown email is verified against
//! a dummy hash). After too many failed logins for one email from one client address within the
//! window, further attempts get 429 until the window passes; so do all logins from an address
//! after five times as many failures across every email. One client address hashes at most two
//! passwords at a time (logins and registrations together); past that, 429 at once.
//!
//! An email on the agent list registers as an agent only with the agent code
//! ([`AgentCode`]), and a stored agent whose email left the list is a customer. Wrong codes
//! count against the client address as failed logins do: past the limit within the window, its
//! registrations of listed emails get 429, with the right code too.
//!
//! `POST /auth/logout` ends every token the user holds (a token carries the user's count of
//! logouts when it was issued, and the authenticator refuses one whose count has moved on),
//! then closes the user's WebSocket connections on every instance ([`helpdesk_api::LiveSessions`]).
//!
//! A server links it with `use helpdesk_auth as _;`; it registers through `inventory`.

mod agents;
mod commands;
mod hashing;
mod http;
mod postgres;
mod throttle;
mod tokens;
mod users;

pub use agents::{AgentCode, AgentList};
pub use commands::{
    GetUser, LogIn, LogOut, LoggedIn, LoggedOut, RegisterUser, UserCard, ViewUser, canonical_email,
    normalize_email,
};
pub use postgres::{PgLoginThrottle, PgUserStore};
pub use throttle::{Attempt, Counted, DEFAULT_MAX_KEYS, InMemoryLoginThrottle, LoginThrottle};
pub use tokens::{DecodedToken, JwtTokens, UserAuthenticator};
pub use users::{CreateUserError, InMemoryUserStore, UserProfile, UserRecord, UserStore};

use async_trait::async_trait;
use cqrs_core::ports::StoreError;
use cqrs_core::{BoxError, CommandContext, Plugin, PluginRegistrar, register_plugin};
use helpdesk_api::{Authenticator, Backends, BusHandle, HttpApi, Role, Settings, UserDirectory};
use std::sync::Arc;
use throttle::AddressLimit;
use uuid::Uuid;

/// The auth plugin.
#[derive(Debug)]
pub struct AuthPlugin;

impl Plugin for AuthPlugin {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn register(&self, registrar: &mut PluginRegistrar) -> Result<(), BoxError> {
        let backends: Backends = registrar.resource()?;
        let settings: Settings = registrar.resource()?;
        let buses: BusHandle = registrar.resource()?;
        if let Some(db) = &backends.postgres {
            registrar.contribute(postgres::migration(db.schema()));
            registrar.contribute(postgres::logouts_migration(db.schema()));
        }
        let users: Arc<dyn UserStore> = match (
            registrar.try_resource::<Arc<dyn UserStore>>(),
            &backends.postgres,
        ) {
            (Some(users), _) => users,
            (None, Some(db)) => Arc::new(PgUserStore::new(db.clone())),
            (None, None) => Arc::new(InMemoryUserStore::default()),
        };
        // One throttle per limit; both keep their counts in one place (the same table on
        // Postgres), so every instance counts together. A throttle the server provides
        // counts both kinds of key, with its own limit.
        let throttle_of = |limit: u32| -> Arc<dyn LoginThrottle> {
            match (
                registrar.try_resource::<Arc<dyn LoginThrottle>>(),
                &backends.postgres,
            ) {
                (Some(throttle), _) => throttle,
                (None, Some(db)) => Arc::new(PgLoginThrottle::new(
                    db.clone(),
                    backends.clock.clone(),
                    limit,
                    settings.login_window,
                )),
                (None, None) => Arc::new(InMemoryLoginThrottle::new(
                    backends.clock.clone(),
                    limit,
                    settings.login_window,
                )),
            }
        };
        // By client and, for IPv6, by site (a /48) with a larger limit (`AddressLimit`).
        let address_limit = |limit: u32| AddressLimit {
            client: throttle_of(limit),
            site: throttle_of(limit.saturating_mul(throttle::SITE_BUDGET_FACTOR)),
        };
        let address = address_limit(
            settings
                .login_attempts
                .saturating_mul(commands::ADDRESS_BUDGET_FACTOR),
        );
        let code_limit = address_limit(settings.login_attempts);
        // By email and client, and for IPv6 by email and site: `{email}|...` keys.
        let email_limit = address_limit(settings.login_attempts);
        // By account: `signed-in|{email}` keys, which never meet the others in the one table.
        let sign_ins = throttle_of(commands::SIGN_INS_PER_WINDOW);
        let code = registrar.try_resource::<AgentCode>();
        if !settings.agent_emails.is_empty() && code.is_none() {
            return Err("agent emails are configured without an agent code: set \
                        HELPDESK_AGENT_CODE (the server provides it as an `AgentCode` resource), \
                        or nobody could register as an agent"
                .into());
        }
        let agents = AgentList::new(settings.agent_emails.clone(), code);
        let tokens = JwtTokens::new(
            &settings.jwt_secret,
            settings.token_ttl,
            backends.clock.clone(),
        )?;
        let dummy_hash = Arc::new(hashing::dummy_hash()?);
        let hashing = hashing::Hashing::for_this_machine(settings.max_concurrent_hashes);

        registrar.commands().add(commands::RegisterHandler {
            users: users.clone(),
            hashing: hashing.clone(),
            agents: agents.clone(),
            // Its keys (`agentcode|...`) never meet the logins' in the one table.
            code_limit,
            // Its keys (`register|...`) never meet the logins' either.
            register_limit: address.clone(),
            clock: backends.clock.clone(),
        });
        registrar.commands().add(commands::LogInHandler {
            users: users.clone(),
            hashing,
            email_limit,
            address_limit: address,
            sign_ins,
            tokens: tokens.clone(),
            dummy_hash,
            agents: agents.clone(),
        });
        // Filled in by the gateway once its hub is built; a server without one has no
        // realtime connections to close.
        let sessions = registrar
            .try_resource::<helpdesk_api::LiveSessions>()
            .unwrap_or_default();
        registrar.commands().add(commands::LogOutHandler {
            users: users.clone(),
            sessions,
            tell_others_for: commands::TELL_OTHERS_FOR,
        });
        registrar.queries().add(commands::GetUserHandler {
            users: users.clone(),
            agents: agents.clone(),
        });
        registrar.queries().add(commands::ViewUserHandler {
            users: users.clone(),
            agents: agents.clone(),
        });

        registrar.provide::<Arc<dyn Authenticator>>(Arc::new(UserAuthenticator::new(
            tokens,
            users.clone(),
            agents.clone(),
        )));
        registrar.provide::<Arc<dyn UserDirectory>>(Arc::new(Directory { users, agents }));
        registrar.contribute::<HttpApi>(http::api(buses));
        Ok(())
    }
}

register_plugin!(AuthPlugin);

/// Roles as they are now: a stored agent whose email left the agent list is a customer.
struct Directory {
    users: Arc<dyn UserStore>,
    agents: AgentList,
}

#[async_trait]
impl UserDirectory for Directory {
    async fn role_of(&self, id: Uuid) -> Result<Option<Role>, StoreError> {
        let user = self.users.by_id(id).await?;
        Ok(user.map(|u| self.agents.role_of(&u.email, u.role)))
    }

    async fn role_of_in(
        &self,
        id: Uuid,
        ctx: &mut CommandContext,
    ) -> Result<Option<Role>, StoreError> {
        let user = self.users.by_id_in(id, ctx).await?;
        Ok(user.map(|u| self.agents.role_of(&u.email, u.role)))
    }
}
