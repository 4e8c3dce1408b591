//! Where users live.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::ports::StoreError;
use helpdesk_api::Role;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// A stored user.
#[derive(Clone)]
pub struct UserRecord {
    /// The id.
    pub id: Uuid,
    /// Trimmed, lower-case.
    pub email: String,
    /// The role.
    pub role: Role,
    /// The display name, as sent (trimmed).
    pub display_name: Option<String>,
    /// The argon2id PHC string.
    pub password_hash: String,
    /// When the user registered.
    pub created_at: DateTime<Utc>,
    /// How many times the user logged out ([`UserStore::log_out`]). A token carries the count
    /// it was issued at, and is refused once the count has moved on.
    pub logouts: u64,
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("role", &self.role)
            .field("display_name", &self.display_name)
            .field("password_hash", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("logouts", &self.logouts)
            .finish()
    }
}

/// A user as other plugins and the routes see one: a [`UserRecord`] without its password
/// hash, which stays behind the [`UserStore`] (a plugin that dispatched
/// [`GetUser`](crate::GetUser) could otherwise copy it into an event, a response or a log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserProfile {
    /// The id.
    pub id: Uuid,
    /// Trimmed, lower-case.
    pub email: String,
    /// The role.
    pub role: Role,
    /// The display name, as sent (trimmed).
    pub display_name: Option<String>,
    /// When the user registered.
    pub created_at: DateTime<Utc>,
}

impl From<UserRecord> for UserProfile {
    fn from(record: UserRecord) -> Self {
        Self {
            id: record.id,
            email: record.email,
            role: record.role,
            display_name: record.display_name,
            created_at: record.created_at,
        }
    }
}

/// Why a user could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateUserError {
    /// The email is registered already.
    #[error("the email is already registered")]
    EmailTaken,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Users by id and by email (unique, compared lower-case).
#[async_trait]
pub trait UserStore: Send + Sync + 'static {
    /// Adds a user; a taken email is [`CreateUserError::EmailTaken`].
    async fn create(&self, user: UserRecord) -> Result<(), CreateUserError>;
    /// The user with this (lower-case) email.
    async fn by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError>;
    /// The user with this id.
    async fn by_id(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError>;
    /// Counts a logout of user `id` ([`UserRecord::logouts`] goes up by one, in one step
    /// however many instances log the user out at once): from then on every token issued
    /// before is refused. Returns the new count, or `None` when there is no such user.
    async fn log_out(&self, id: Uuid) -> Result<Option<u64>, StoreError>;
    /// [`by_id`](Self::by_id) from inside a command handler: on the command's own connection
    /// where the store shares its database (see `UserDirectory::role_of_in`).
    async fn by_id_in(
        &self,
        id: Uuid,
        ctx: &mut cqrs_core::CommandContext,
    ) -> Result<Option<UserRecord>, StoreError> {
        let _ = ctx;
        self.by_id(id).await
    }
}

/// Users by id, and ids by email.
type Users = (HashMap<Uuid, UserRecord>, HashMap<String, Uuid>);

/// Users in process memory.
#[derive(Clone, Debug, Default)]
pub struct InMemoryUserStore {
    users: Arc<Mutex<Users>>,
}

#[async_trait]
impl UserStore for InMemoryUserStore {
    async fn create(&self, mut user: UserRecord) -> Result<(), CreateUserError> {
        // Lower-case, as the trait says and Postgres stores it, whatever the caller sent.
        user.email = user.email.to_lowercase();
        let mut guard = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let (by_id, by_email) = &mut *guard;
        if by_email.contains_key(&user.email) {
            return Err(CreateUserError::EmailTaken);
        }
        by_email.insert(user.email.clone(), user.id);
        by_id.insert(user.id, user);
        Ok(())
    }

    async fn by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
        let guard = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let email = email.to_lowercase();
        Ok(guard.1.get(&email).and_then(|id| guard.0.get(id)).cloned())
    }

    async fn by_id(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError> {
        let guard = self.users.lock().unwrap_or_else(|p| p.into_inner());
        Ok(guard.0.get(&id).cloned())
    }

    async fn log_out(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
        let mut guard = self.users.lock().unwrap_or_else(|p| p.into_inner());
        Ok(guard.0.get_mut(&id).map(|user| {
            user.logouts = user.logouts.saturating_add(1);
            user.logouts
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A customer with this email, who never logged out.
    fn user(email: &str) -> UserRecord {
        UserRecord {
            id: Uuid::now_v7(),
            email: email.to_owned(),
            role: Role::Customer,
            display_name: None,
            password_hash: String::new(),
            created_at: Utc::now(),
            logouts: 0,
        }
    }

    /// Emails compare lower-case whatever case the caller gives, as in Postgres.
    #[tokio::test]
    async fn emails_compare_lower_case() {
        let store = InMemoryUserStore::default();
        store.create(user("Ada@Example.com")).await.unwrap();
        let found = store.by_email("ada@example.com").await.unwrap().unwrap();
        assert_eq!(found.email, "ada@example.com");
        assert!(store.by_email("ADA@EXAMPLE.COM").await.unwrap().is_some());
        assert!(matches!(
            store.create(user("ada@example.COM")).await,
            Err(CreateUserError::EmailTaken)
        ));
    }

    /// A logout counts once per call, for that user only; an unknown id counts nothing.
    #[tokio::test]
    async fn a_logout_counts_for_its_user_only() {
        let store = InMemoryUserStore::default();
        let (ada, bob) = (user("ada@example.com"), user("bob@example.com"));
        let (ada_id, bob_id) = (ada.id, bob.id);
        store.create(ada).await.unwrap();
        store.create(bob).await.unwrap();
        assert_eq!(store.log_out(ada_id).await.unwrap(), Some(1));
        assert_eq!(store.log_out(ada_id).await.unwrap(), Some(2));
        assert_eq!(store.by_id(ada_id).await.unwrap().unwrap().logouts, 2);
        assert_eq!(store.by_id(bob_id).await.unwrap().unwrap().logouts, 0);
        assert_eq!(store.log_out(Uuid::now_v7()).await.unwrap(), None);
    }
}
