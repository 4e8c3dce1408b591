//! The helpdesk's auth plugin: `POST /auth/register`, `POST /auth/login`, `GET /auth/me`.
//!
//! Passwords are hashed with argon2id; tokens are HS256 JWTs. Wrong passwords and unknown
//! emails get the same 401, after the same amount of work (an unknown email is verified against
//! a dummy hash). After too many failed logins for one email from one client address within the
//! window, further attempts get 429 until the window passes.
//!
//! A server links it with `use helpdesk_auth as _;`; it registers through `inventory`.

mod commands;
mod http;
mod postgres;
mod throttle;
mod tokens;
mod users;

pub use commands::{GetUser, LogIn, LoggedIn, RegisterUser, normalize_email};
pub use postgres::{PgLoginThrottle, PgUserStore};
pub use throttle::{InMemoryLoginThrottle, LoginThrottle};
pub use tokens::{JwtTokens, UserAuthenticator};
pub use users::{CreateUserError, InMemoryUserStore, UserRecord, UserStore};

use async_trait::async_trait;
use cqrs_core::ports::StoreError;
use cqrs_core::{BoxError, CommandContext, Plugin, PluginRegistrar, register_plugin};
use helpdesk_api::{Authenticator, Backends, BusHandle, HttpApi, Role, Settings, UserDirectory};
use std::sync::Arc;
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
        }
        let users: Arc<dyn UserStore> = match (
            registrar.try_resource::<Arc<dyn UserStore>>(),
            &backends.postgres,
        ) {
            (Some(users), _) => users,
            (None, Some(db)) => Arc::new(PgUserStore::new(db.clone())),
            (None, None) => Arc::new(InMemoryUserStore::default()),
        };
        let throttle: Arc<dyn LoginThrottle> = match (
            registrar.try_resource::<Arc<dyn LoginThrottle>>(),
            &backends.postgres,
        ) {
            (Some(throttle), _) => throttle,
            (None, Some(db)) => Arc::new(PgLoginThrottle::new(
                db.clone(),
                backends.clock.clone(),
                settings.login_attempts,
                settings.login_window,
            )),
            (None, None) => Arc::new(InMemoryLoginThrottle::new(
                backends.clock.clone(),
                settings.login_attempts,
                settings.login_window,
            )),
        };
        let tokens = JwtTokens::new(
            &settings.jwt_secret,
            settings.token_ttl,
            backends.clock.clone(),
        )?;
        let dummy_hash = Arc::new(commands::dummy_hash()?);
        let hashing = commands::Hashing::for_this_machine();

        registrar.commands().add(commands::RegisterHandler {
            users: users.clone(),
            hashing: hashing.clone(),
            agents: settings.agent_emails.clone(),
            clock: backends.clock.clone(),
        });
        registrar.commands().add(commands::LogInHandler {
            users: users.clone(),
            hashing,
            throttle,
            tokens: tokens.clone(),
            dummy_hash,
        });
        registrar.queries().add(commands::GetUserHandler {
            users: users.clone(),
        });

        registrar.provide::<Arc<dyn Authenticator>>(Arc::new(UserAuthenticator::new(
            tokens,
            users.clone(),
        )));
        registrar.provide::<Arc<dyn UserDirectory>>(Arc::new(Directory(users)));
        registrar.contribute::<HttpApi>(http::api(buses));
        Ok(())
    }
}

register_plugin!(AuthPlugin);

struct Directory(Arc<dyn UserStore>);

#[async_trait]
impl UserDirectory for Directory {
    async fn role_of(&self, id: Uuid) -> Result<Option<Role>, StoreError> {
        Ok(self.0.by_id(id).await?.map(|u| u.role))
    }

    async fn role_of_in(
        &self,
        id: Uuid,
        ctx: &mut CommandContext,
    ) -> Result<Option<Role>, StoreError> {
        Ok(self.0.by_id_in(id, ctx).await?.map(|u| u.role))
    }
}
