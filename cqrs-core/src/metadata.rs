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
#[derive(Debug)]
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
    pub headers: Headers,
}

impl Clone for Metadata {
    /// Written out to be inlined where it is called: a caller clones metadata per dispatch
    /// (a gateway per request), and a derived clone, grown past the inliner's budget with
    /// `headers`, became a call of its own (about 35 instructions a bare dispatch).
    #[inline(always)]
    fn clone(&self) -> Self {
        Self {
            message_id: self.message_id,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            timestamp: self.timestamp,
            principal: self.principal.clone(),
            actor: self.actor.clone(),
            trace_context: self.trace_context.clone(),
            headers: self.headers.clone(),
        }
    }
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
            headers: Headers::new(),
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
    /// assert_eq!(caused.headers.get("tenant"), Some("acme"));
    /// ```
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key, value);
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

/// A message's own fields, set by the application ([`Metadata::with_header`]): a map from
/// text to text, ordered by key, that serializes as a JSON object.
///
/// Without any (the common case) it holds no map: a message's metadata is cloned and dropped
/// on every dispatch, and an empty map of its own would cost each of them (about 150
/// instructions a bare dispatch, measured when it was a `BTreeMap`).
///
/// ```
/// use cqrs_core::Headers;
///
/// let mut headers = Headers::new();
/// assert!(headers.is_empty());
/// headers.insert("tenant", "acme");
/// assert_eq!(headers.get("tenant"), Some("acme"));
/// assert_eq!(headers.iter().collect::<Vec<_>>(), [("tenant", "acme")]);
/// ```
#[derive(Default, PartialEq, Eq)]
// Boxed: one pointer, not a map's three words, in metadata moved on every dispatch.
#[allow(clippy::box_collection)]
pub struct Headers(Option<Box<BTreeMap<String, String>>>);

impl Clone for Headers {
    /// A test of the pointer when there are none; the map's clone out of line, so the
    /// metadata's own clone stays small enough to be inlined on a dispatch's path (a derived
    /// one, with the map's clone inlined in it, cost a bare dispatch about 35 instructions).
    #[inline]
    fn clone(&self) -> Self {
        #[inline(never)]
        #[allow(clippy::box_collection)]
        fn clone_map(map: &BTreeMap<String, String>) -> Box<BTreeMap<String, String>> {
            Box::new(map.clone())
        }
        Headers(self.0.as_deref().map(clone_map))
    }
}

impl Headers {
    /// No headers.
    pub const fn new() -> Self {
        Self(None)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.as_ref()?.get(key).map(String::as_str)
    }

    /// Sets `key` to `value`, returning the value it had.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into())
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let map = self.0.as_mut()?;
        let removed = map.remove(key);
        if map.is_empty() {
            self.0 = None;
        }
        removed
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|map| map.is_empty())
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |map| map.len())
    }

    /// Each key and value, ordered by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .flat_map(|map| map.iter())
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let mut headers = Headers::new();
        for (key, value) in pairs {
            headers.insert(key, value);
        }
        headers
    }
}

impl serde::Serialize for Headers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Headers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(deserializer)?;
        Ok(Headers((!map.is_empty()).then(|| Box::new(map))))
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
pub struct Principal(Arc<Box<dyn Any + Send + Sync>>);

impl Principal {
    /// Wraps a value.
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        // A thin pointer (8 bytes, not a trait object's 16) keeps `Metadata` within the 128
        // bytes the compiler moves inline: past them every move of the metadata on a
        // dispatch's path became a `memcpy` call (about 100 instructions a bare dispatch,
        // callgrind). A principal is made once per request; the second allocation is its.
        Self(Arc::new(Box::new(value)))
    }

    /// The value, if it is a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        (**self.0).downcast_ref::<T>()
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

    /// Headers with none are one value however they came to be empty, and serialize as a
    /// JSON object either way.
    #[test]
    fn headers_without_any_are_equal_however_they_got_there() {
        let mut emptied = Headers::new();
        emptied.insert("tenant", "acme");
        assert_eq!(emptied.remove("tenant").as_deref(), Some("acme"));
        let parsed: Headers = serde_json::from_str("{}").unwrap();
        assert_eq!(emptied, Headers::new());
        assert_eq!(parsed, Headers::new());
        assert_eq!(serde_json::to_string(&emptied).unwrap(), "{}");
        let two: Headers = [("b", "2"), ("a", "1")].into_iter().collect();
        assert_eq!(serde_json::to_string(&two).unwrap(), r#"{"a":"1","b":"2"}"#);
        assert_eq!(
            serde_json::from_str::<Headers>(r#"{"a":"1","b":"2"}"#).unwrap(),
            two
        );
        assert_eq!(format!("{two:?}"), r#"{"a": "1", "b": "2"}"#);
        assert_eq!(two.clone(), two);
    }

    /// A clone of metadata carries every field, the headers and the principal among them.
    #[test]
    fn a_clone_of_metadata_carries_every_field() {
        let original = Metadata::new()
            .caused()
            .with_actor("user-7")
            .with_principal(Principal::new(7_u32))
            .with_trace_field("traceparent", "00-abc-def-01")
            .with_header("tenant", "acme");
        let clone = original.clone();
        assert_eq!(
            (
                clone.message_id,
                clone.correlation_id,
                clone.causation_id,
                clone.timestamp
            ),
            (
                original.message_id,
                original.correlation_id,
                original.causation_id,
                original.timestamp
            )
        );
        assert_eq!(clone.actor, original.actor);
        assert_eq!(clone.trace_context, original.trace_context);
        assert_eq!(clone.headers, original.headers);
        assert_eq!(clone.principal_as::<u32>(), Some(&7));
    }

    /// The metadata is moved several times on every dispatch's path; past 128 bytes the
    /// compiler moves it with `memcpy` calls instead of inline, which cost a bare dispatch
    /// about 100 instructions (callgrind) when a field took it to 136. A field added here must
    /// keep it within them (box what is rarely set, as `Headers` does).
    #[test]
    fn metadata_stays_within_what_is_moved_inline() {
        assert!(
            std::mem::size_of::<Metadata>() <= 128,
            "Metadata is {} bytes",
            std::mem::size_of::<Metadata>()
        );
    }

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
