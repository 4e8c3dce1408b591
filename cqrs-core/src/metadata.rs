//! What travels with every message: ids, time, the acting principal, trace context.

use chrono::{DateTime, Utc};
use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use uuid::Uuid;

/// A new message id: a UUID v7 from this thread's own context, increasing on the thread.
/// `Uuid::now_v7` draws from one context for the process, behind a mutex every id takes (every
/// dispatch with fresh metadata, every recorded event): threads minting ids at once queue on
/// it. Ids of two threads in one millisecond are then unordered, as they are between
/// processes anyway (and after the system clock steps back, a thread's ids may sort before
/// those another thread made earlier). Each context reseeds its 42-bit counter with random
/// bits every millisecond, and each id has 32 random bits more: two threads' ids collide no
/// more often than two random v7 ids do.
pub(crate) fn new_message_id() -> Uuid {
    message_id_at(std::time::SystemTime::now())
}

/// [`new_message_id`] for `now`, the system clock read by the caller: a caller that also
/// stamps the message with the system clock reads it once (a read costs ~85 ns on the
/// benchmark VM, a third of making fresh metadata).
fn message_id_at(now: std::time::SystemTime) -> Uuid {
    thread_local! {
        static CONTEXT: uuid::ContextV7 = const { uuid::ContextV7::new() };
    }
    // Before 1970 (a clock set far back): the epoch (uuid's own `Timestamp::now` panics).
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    CONTEXT.with(|context| {
        Uuid::new_v7(uuid::Timestamp::from_unix(
            context,
            since.as_secs(),
            since.subsec_nanos(),
        ))
    })
}

/// The metadata of one message.
///
/// * `message_id`: a UUID v7 (time-ordered to the millisecond; in the order made on one
///   thread, not one task: a task that moves threads between two ids may get them out of
///   order within a millisecond), unique per message. Order events by their version or
///   position, never by id.
/// * `correlation_id`: shared by everything that one original request caused.
/// * `causation_id`: the id of the message that directly caused this one, if any.
/// * `timestamp`: when the message was created.
/// * `principal`: who is acting; opaque to the core (see [`Principal`]); in process only.
/// * `actor`: the acting principal's stable id, stored and sent with the message.
/// * `trace_context`: propagation headers such as `traceparent`, carried across processes.
/// * `headers`: the application's own fields (a tenant, the client's address, the source
///   system), stored and sent with the message and passed on to the messages it causes, so
///   an audit field needs no change to every event type.
///
/// ```
/// use cqrs_core::Metadata;
///
/// let request = Metadata::new();
/// let caused = request.caused();
/// assert_eq!(caused.correlation_id, request.correlation_id);
/// assert_eq!(caused.causation_id, Some(request.message_id));
/// assert_ne!(caused.message_id, request.message_id);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Metadata {
    /// This message's id (UUID v7).
    pub message_id: Uuid,
    /// The id shared by every message of one original request.
    pub correlation_id: Uuid,
    /// The id of the message that caused this one.
    pub causation_id: Option<Uuid>,
    /// When the message was created.
    pub timestamp: DateTime<Utc>,
    /// Who is acting, if anyone. Stays in process: it is not stored or sent.
    pub principal: Option<Principal>,
    /// A stable id of who is acting (a user id), stored and sent with the message, unlike
    /// `principal`.
    pub actor: Option<String>,
    /// Trace propagation fields (for example `traceparent`).
    pub trace_context: BTreeMap<String, String>,
    /// The application's own fields ([`with_header`](Self::with_header)), stored and sent
    /// with the message like `actor`, and passed on to the messages it causes.
    pub headers: BTreeMap<String, String>,
}

impl Metadata {
    /// Fresh metadata for a message that starts a new flow: a new id, which is also the
    /// correlation id, no causation, the current time.
    pub fn new() -> Self {
        // One read of the clock for the id and the timestamp.
        let now = std::time::SystemTime::now();
        Self::with_id_at(message_id_at(now), DateTime::<Utc>::from(now))
    }

    /// [`new`](Self::new), created at `at` rather than the system clock's now: for a caller
    /// with an injected clock ([`Clock`](crate::clock::Clock)).
    pub fn new_at(at: DateTime<Utc>) -> Self {
        Self::with_id_at(new_message_id(), at)
    }

    /// Fresh metadata with message (and correlation) id `id`, created at `at`.
    fn with_id_at(id: Uuid, at: DateTime<Utc>) -> Self {
        Self {
            message_id: id,
            correlation_id: id,
            causation_id: None,
            timestamp: at,
            principal: None,
            actor: None,
            trace_context: BTreeMap::new(),
            headers: BTreeMap::new(),
        }
    }

    /// Metadata for a message caused by this one: a new id, the same correlation id, principal,
    /// actor, trace context and headers, and this message's id as causation id.
    pub fn caused(&self) -> Self {
        let now = std::time::SystemTime::now();
        self.caused_with_id_at(message_id_at(now), DateTime::<Utc>::from(now))
    }

    /// [`caused`](Self::caused), created at `at` rather than the system clock's now: for a
    /// caller with an injected clock ([`Clock`](crate::clock::Clock)).
    ///
    /// ```
    /// use cqrs_core::reexports::chrono::{TimeZone, Utc};
    /// use cqrs_core::Metadata;
    ///
    /// let at = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    /// let caused = Metadata::new().caused_at(at);
    /// assert_eq!(caused.timestamp, at);
    /// ```
    pub fn caused_at(&self, at: DateTime<Utc>) -> Self {
        self.caused_with_id_at(new_message_id(), at)
    }

    /// Metadata caused by this message, with id `id`, created at `at`.
    fn caused_with_id_at(&self, id: Uuid, at: DateTime<Utc>) -> Self {
        Self {
            message_id: id,
            correlation_id: self.correlation_id,
            causation_id: Some(self.message_id),
            timestamp: at,
            principal: self.principal.clone(),
            actor: self.actor.clone(),
            trace_context: self.trace_context.clone(),
            headers: self.headers.clone(),
        }
    }

    /// Sets the acting principal.
    pub fn with_principal(mut self, principal: Principal) -> Self {
        self.principal = Some(principal);
        self
    }

    /// Sets the actor id that is stored and sent with the message.
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the correlation id (for example from an incoming `X-Request-Id`).
    pub fn with_correlation_id(mut self, correlation_id: Uuid) -> Self {
        self.correlation_id = correlation_id;
        self
    }

    /// Sets the message id.
    pub fn with_message_id(mut self, message_id: Uuid) -> Self {
        self.message_id = message_id;
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, causation_id: Option<Uuid>) -> Self {
        self.causation_id = causation_id;
        self
    }

    /// Sets the timestamp (tests, replays).
    pub fn with_timestamp(mut self, timestamp: DateTime<Utc>) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// Adds one trace-context field.
    pub fn with_trace_field(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.trace_context.insert(key.into(), value.into());
        self
    }

    /// Sets one of the application's own fields, stored and sent with the message (in the
    /// event store's `metadata` and the transport's entries) and passed on to the messages it
    /// causes: a tenant, the client's address, the system a request came from. Like every
    /// text of an event, a key or value must not hold U+0000, which Postgres cannot store.
    ///
    /// ```
    /// use cqrs_core::Metadata;
    ///
    /// let request = Metadata::new().with_header("tenant", "acme");
    /// let caused = request.caused();
    /// assert_eq!(caused.headers.get("tenant").map(String::as_str), Some("acme"));
    /// ```
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// The principal downcast to the server's own type, if it is one.
    pub fn principal_as<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.principal.as_ref().and_then(|p| p.downcast_ref::<T>())
    }
}

impl Default for Metadata {
    fn default() -> Self {
        Self::new()
    }
}

/// Who is acting: a value of the server's own type, which the core carries without looking at.
///
/// ```
/// use cqrs_core::Principal;
///
/// #[derive(Debug, PartialEq)]
/// struct User { id: u64 }
///
/// let principal = Principal::new(User { id: 7 });
/// assert_eq!(principal.downcast_ref::<User>(), Some(&User { id: 7 }));
/// assert!(principal.downcast_ref::<String>().is_none());
/// ```
#[derive(Clone)]
pub struct Principal(Arc<dyn Any + Send + Sync>);

impl Principal {
    /// Wraps a value.
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        Self(Arc::new(value))
    }

    /// The value, if it is a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Principal(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Ids are version 7, stamped with the time they were made, increase on one thread (also
    /// many within one millisecond), and are unique across threads minting at once.
    #[test]
    fn message_ids_are_v7_increase_on_a_thread_and_are_unique() {
        let before = Utc::now().timestamp_millis() as u64;
        let ids: Vec<Uuid> = (0..10_000).map(|_| new_message_id()).collect();
        let after = Utc::now().timestamp_millis() as u64;
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids of one thread increase"
        );
        for id in [ids[0], ids[ids.len() - 1]] {
            let (seconds, nanos) = id.get_timestamp().expect("a v7 id has a time").to_unix();
            let millis = seconds * 1000 + u64::from(nanos) / 1_000_000;
            assert!(
                (before..=after).contains(&millis),
                "{millis} in {before}..={after}"
            );
        }

        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..10_000).map(|_| new_message_id()).collect::<Vec<_>>())
            })
            .collect();
        let mut unique: HashSet<Uuid> = ids.into_iter().collect();
        for thread in threads {
            unique.extend(thread.join().expect("the thread mints ids"));
        }
        assert_eq!(unique.len(), 50_000, "every id is unique");
    }
}
