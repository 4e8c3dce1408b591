//! Turning stored records back into typed events: decoders by wire name, upcasters for old
//! schema versions, and a policy for event types this build does not know.

use crate::{AnyEvent, BoxError, Event, EventEnvelope, EventRecord, EventSet};
use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock};

type Decoder = fn(&serde_json::Value) -> Result<Arc<dyn AnyEvent>, serde_json::Error>;
type Upcaster = Arc<dyn Fn(serde_json::Value) -> Result<serde_json::Value, BoxError> + Send + Sync>;

/// Deserializes from a borrowed payload: a record's JSON is not cloned to be decoded.
fn decode_as<E: Event>(
    payload: &serde_json::Value,
) -> Result<Arc<dyn AnyEvent>, serde_json::Error> {
    Ok(Arc::new(E::deserialize(payload)?))
}

/// The `event_type` labels of `cqrs_events_unknown_total`: 64 distinct unknown names at most,
/// then `other`.
static UNKNOWN_TYPE_LABELS: crate::record::EventTypeLabels<64> =
    crate::record::EventTypeLabels::new();

/// What to do with an event whose type this build does not know, such as one written by a
/// newer instance during a rolling deploy.
///
/// Consumers follow it. An [`AggregateRepository`](crate::AggregateRepository) does not: it
/// fails on any event of its stream it cannot apply, whatever the policy, since deciding
/// without it would decide on incomplete state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownEventPolicy {
    /// Skip it, log a warning (at most once a minute per type, with how many were left
    /// unsaid) and count it in the `cqrs_events_unknown_total` metric
    /// (label `event_type`: the type's name for the first 64 distinct unknown names this
    /// process sees, `other` for later ones, `invalid` for a name that does not look like a
    /// wire name). The consumer moves on.
    #[default]
    Skip,
    /// Skip it like [`Skip`](Self::Skip), counted the same, but logged at `debug` only: for
    /// a consumer of a topic that carries other plugins' events too, where an unknown type is
    /// most often meant for someone else, and a warning per type each minute would bury the
    /// real ones.
    /// An event of a newer build is then skipped without a warning too.
    Ignore,
    /// Fail with [`DecodeError::UnknownType`]; the consumer stops at this event (and retries it)
    /// until a build that knows it is deployed.
    Fail,
    /// Skip an event whose type another part of this build knows (another plugin's event on
    /// a shared topic or store), at `debug` and uncounted, as not meant for this reader; and
    /// wait on one whose type no part of this build knows, with
    /// [`DecodeError::NotInThisBuild`], as [`Fail`](Self::Fail) waits: during a rolling deploy
    /// that is a newer build's event, and an instance of that build takes it (a group's
    /// pending entry it claims, a shared checkpoint it moves on from). So adding an event type
    /// together with its readers takes one release, where `Skip` and `Ignore` would have an
    /// old instance skip the new type for every instance. (A new reader of a type the old build
    /// already has still takes two: the old instances pass such events over as known.)
    ///
    /// "This build" is every type `#[derive(Event)]` implements and every name
    /// [`register_event_type!`](crate::register_event_type) lists
    /// ([`EventTypes::in_this_build`]), decided at link time, whatever this process has built
    /// so far. Name with the macro what a reader under this policy meets and must pass over
    /// but this build has no derived type for: a hand-written `impl Event`, a retired type
    /// whose events stay stored (`register_event_type!(name = "...")`), another binary's
    /// type on a shared topic. Otherwise the reader waits on those events for ever (a rebuild
    /// that replays the store, too), saying which name to list.
    ///
    /// ```
    /// use cqrs_core::{Event, EventRecord, EventTypes, Metadata, RecordMetadata, UnknownEventPolicy};
    /// use cqrs_core::reexports::serde_json::json;
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
    /// #[cqrs(name = "billing.invoice_sent")]
    /// struct InvoiceSent { invoice_id: String }
    ///
    /// // The tickets plugin's reader: the billing plugin's events are not for it.
    /// let mut types = EventTypes::new();
    /// types.unknown_events(UnknownEventPolicy::AwaitNewerBuild);
    /// let record = |name: &str| EventRecord::new(
    ///     cqrs_core::reexports::uuid::Uuid::now_v7(), name, 1, json!({"invoice_id": "i1"}),
    ///     RecordMetadata::from_metadata(&Metadata::new()));
    /// assert!(types.decode(&record("billing.invoice_sent"))?.is_none(), "skipped");
    /// let newer = types.decode(&record("billing.invoice_paid")).unwrap_err();
    /// assert!(newer.to_string().contains("in no part of this build"), "waits: {newer}");
    /// # Ok::<_, cqrs_core::DecodeError>(())
    /// ```
    AwaitNewerBuild,
}

/// An event type compiled into this build: what `#[derive(Event)]` and
/// [`register_event_type!`](crate::register_event_type) hand to `inventory`. Not for direct
/// use.
#[doc(hidden)]
#[derive(Debug)]
pub struct EventTypeOfTheBuild(pub &'static str);

inventory::collect!(EventTypeOfTheBuild);

/// Names event types as part of this build, for [`UnknownEventPolicy::AwaitNewerBuild`] (see
/// [`EventTypes::in_this_build`]): by type, for a hand-written `impl Event`
/// (`#[derive(Event)]` lists its type by itself); by name, for a type this build no longer
/// has whose events stay stored, or another binary's on a shared topic. Readers under that
/// policy then pass such events over instead of waiting on them as a newer build's.
///
/// ```
/// use cqrs_core::{Event, EventTypes, Message};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// struct AuditNoted { note: String }
/// impl Message for AuditNoted { const NAME: &'static str = "audit.noted"; }
/// impl Event for AuditNoted {}
///
/// cqrs_core::register_event_type!(AuditNoted);
/// // Retired in an earlier release; its events stay in the store.
/// cqrs_core::register_event_type!(name = "audit.flagged");
/// assert!(EventTypes::in_this_build("audit.noted"));
/// assert!(EventTypes::in_this_build("audit.flagged"));
/// ```
#[macro_export]
macro_rules! register_event_type {
    (name = $name:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::__private::EventTypeOfTheBuild($name)
        }
    };
    ($($event:ty),+ $(,)?) => {
        $(
            $crate::__private::inventory::submit! {
                $crate::__private::EventTypeOfTheBuild(<$event as $crate::Message>::NAME)
            }
        )+
    };
}

/// The names handed to `inventory`, collected at the first look.
fn submitted() -> &'static HashSet<&'static str> {
    static SUBMITTED: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SUBMITTED.get_or_init(|| {
        inventory::iter::<EventTypeOfTheBuild>
            .into_iter()
            .map(|t| t.0)
            .collect()
    })
}

/// Why a record could not be turned into a typed event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// No type with this wire name is registered, and the policy is `Fail`.
    #[error(
        "unknown event type `{event_type}` (schema version {schema_version}); register it with EventTypes::register, or deploy the build that knows it"
    )]
    UnknownType {
        /// The wire name.
        event_type: String,
        /// Its schema version.
        schema_version: u32,
    },
    /// No type with this wire name is registered, the policy is
    /// [`AwaitNewerBuild`](UnknownEventPolicy::AwaitNewerBuild), and no part of this build
    /// knows the name ([`EventTypes::in_this_build`]): a newer build's event, which waits for
    /// an instance of that build; or a name this build should list and does not.
    #[error(
        "event type `{event_type}` (schema version {schema_version}) is in no part of this build: if a newer build wrote it, it waits for an instance of that build; if it is a type this build no longer has (its events still stored), another binary's, or a hand-written `impl Event`, list it with `cqrs_core::register_event_type!(name = \"{event_type}\")` so that readers pass it over"
    )]
    NotInThisBuild {
        /// The wire name.
        event_type: String,
        /// Its schema version.
        schema_version: u32,
    },
    /// The record's schema version is newer than this build's and no upcaster can help.
    #[error(
        "event `{event_type}` has schema version {found}, newer than this build's {current}; it was written by a newer build: deploy a build that knows version {found} here too"
    )]
    FutureVersion {
        /// The wire name.
        event_type: String,
        /// The record's version.
        found: u32,
        /// This build's version.
        current: u32,
    },
    /// No upcaster takes the record's old version to the next one: a gap in this build's
    /// upcasters, or a record whose schema version is wrong. [`EventTypes::validate`] finds a
    /// gap inside a registered chain at start-up, but not a type whose version went up with
    /// no upcaster registered at all. Consumers dead-letter it, as any other decode failure
    /// but `UnknownType` and `FutureVersion` (which wait for a newer build): an
    /// `EventBusConsumer` and a transport-fed `ProjectionRunner` at once (no attempt mends
    /// it), others after `max_deliveries`; there it can be seen and replayed once a build
    /// with the upcaster runs. Waiting instead would block its key for ever without a trace.
    #[error(
        "event `{event_type}` has schema version {found} and no upcaster from it is registered; register one with `EventTypes::upcaster(\"{event_type}\", {found}, ..)` on the types this reader decodes with (`AggregateRepository::with_types`, the projection runner's or the event-bus consumer's) and deploy that build"
    )]
    MissingUpcaster {
        /// The wire name.
        event_type: String,
        /// The version with no upcaster.
        found: u32,
    },
    /// A registered chain of upcasters skips a version: none takes `missing` to the next one,
    /// between the lowest version an upcaster is registered for and the type's current one.
    /// Found by [`EventTypes::validate`] at start-up, before any event of that version comes
    /// (which would then fail with [`DecodeError::MissingUpcaster`]).
    #[error(
        "the upcasters of event `{event_type}` have a gap: none takes schema version {missing} to the next (they start from version {lowest}, and the type is at version {current}); register `EventTypes::upcaster(\"{event_type}\", {missing}, ..)`"
    )]
    UpcasterGap {
        /// The wire name.
        event_type: String,
        /// The version no upcaster takes further.
        missing: u32,
        /// The lowest version an upcaster is registered for.
        lowest: u32,
        /// The type's current version.
        current: u32,
    },
    /// An upcaster is registered from a version at or above the type's current one: it never
    /// runs (an upcaster takes version `from` to `from + 1`, up to the current version). The
    /// type's `VERSION` did not go up with the change it was written for, or the upcaster's
    /// `from` is off by one. Found by [`EventTypes::validate`].
    #[error(
        "the upcaster of event `{event_type}` from schema version {from} never runs: the type's current version is {current}, and upcasters take older versions up to it; raise the type's VERSION to {next} if the upcaster is for a new version, or register it from the version it reads", next = u64::from(*from) + 1
    )]
    UnreachableUpcaster {
        /// The wire name.
        event_type: String,
        /// The version the upcaster reads.
        from: u32,
        /// The type's current version.
        current: u32,
    },
    /// A rename ([`EventTypes::rename`]) that can never apply or never ends: its old name is
    /// registered as a type of its own (events stored under it decode as that type), or
    /// renames lead back to it. Found by [`EventTypes::validate`].
    #[error("the rename of event type `{from}` to `{to}` is refused: {reason}")]
    InvalidRename {
        /// The old wire name.
        from: String,
        /// The name it is renamed to.
        to: String,
        /// Why, and what to do.
        reason: &'static str,
    },
    /// An upcaster failed on this event.
    #[error("upcasting event `{event_type}` from schema version {from} failed: {source}")]
    Upcast {
        /// The wire name.
        event_type: String,
        /// The version it started from.
        from: u32,
        /// The upcaster's error.
        #[source]
        source: BoxError,
    },
    /// The payload does not match the type.
    #[error("event `{event_type}` does not match its type: {source}")]
    Payload {
        /// The wire name.
        event_type: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
}

impl DecodeError {
    /// Whether a newer build must decode this record, not this one: a type it does not know
    /// (under [`UnknownEventPolicy::Fail`], or no part of it knows under
    /// [`UnknownEventPolicy::AwaitNewerBuild`]) or a schema version above its own, written by a
    /// newer build during a rolling deploy, which is on its way. Neither is the record's fault:
    /// it waits without counting an attempt. A missing upcaster is not among them: no build
    /// may ever come (see [`DecodeError::MissingUpcaster`]).
    pub(crate) fn waits_for_another_build(&self) -> bool {
        matches!(
            self,
            DecodeError::UnknownType { .. }
                | DecodeError::NotInThisBuild { .. }
                | DecodeError::FutureVersion { .. }
        )
    }
}

#[derive(Clone, Copy)]
struct Entry {
    current: u32,
    decode: Decoder,
    /// Which Rust type has the name, so that another one registered under it is caught.
    type_id: TypeId,
    type_name: &'static str,
}

/// The event types a process knows, by wire name, with upcasters for old schema versions.
///
/// Register an aggregate's or a projection's whole [`EventSet`] with
/// [`of`](EventTypes::of) or [`register_set`](EventTypes::register_set) rather than type by
/// type: a type left out is unknown, and skipped under the default policy. Call
/// [`validate`](EventTypes::validate) at start-up to find a gap in the upcasters.
///
/// ```
/// use cqrs_core::{Event, EventRecord, EventTypes, RecordMetadata, Metadata};
/// use serde::{Deserialize, Serialize};
/// use cqrs_core::reexports::serde_json::json;
///
/// // Version 2 renamed `text` to `body`.
/// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
/// #[cqrs(name = "Commented", version = 2)]
/// struct Commented { body: String }
///
/// let mut types = EventTypes::new();
/// types.register::<Commented>();
/// types.upcaster("Commented", 1, |mut v| {
///     let text = v["text"].take();
///     Ok(json!({ "body": text }))
/// });
/// types.validate()?;
///
/// let old = EventRecord::new(cqrs_core::reexports::uuid::Uuid::now_v7(), "Commented", 1, json!({"text": "hi"}),
///     RecordMetadata::from_metadata(&Metadata::new()));
/// let envelope = types.decode(&old).unwrap().expect("a known type");
/// assert_eq!(envelope.downcast_ref::<Commented>().unwrap().body, "hi");
/// # Ok::<_, cqrs_core::DecodeError>(())
/// ```
#[derive(Clone, Default)]
pub struct EventTypes {
    entries: HashMap<String, Entry>,
    upcasters: HashMap<(String, u32), Upcaster>,
    /// Old wire names, to the names their events are read as now.
    renamed: HashMap<String, String>,
    policy: UnknownEventPolicy,
    /// The allowance of the warnings about unknown types under `Skip`, shared by the clones:
    /// once a minute per type for each reader's types, not for the whole process.
    unknown_said: Arc<crate::throttled::ThrottledPerKey>,
}

impl fmt::Debug for EventTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventTypes")
            .field("types", &self.entries.keys().collect::<Vec<_>>())
            .field("upcasters", &self.upcasters.len())
            .field("renamed", &self.renamed)
            .field("policy", &self.policy)
            .finish()
    }
}

impl EventTypes {
    /// No types; unknown events are skipped.
    pub fn new() -> Self {
        Self::default()
    }

    /// The types of event set `S` (an aggregate's events, or those a projection reads).
    pub fn of<S: EventSet>() -> Self {
        let mut types = Self::new();
        types.register_set::<S>();
        types
    }

    /// Registers event type `E` under its wire name. Registering it twice is harmless.
    ///
    /// # Panics
    ///
    /// When another Rust type is registered under the same wire name: records of one would
    /// decode as the other. Give each event type a unique `NAME`.
    pub fn register<E: Event>(&mut self) -> &mut Self {
        self.insert(
            E::NAME,
            Entry {
                current: E::VERSION,
                decode: decode_as::<E>,
                type_id: TypeId::of::<E>(),
                type_name: std::any::type_name::<E>(),
            },
        );
        self
    }

    /// Registers every member of event set `S` (see [`register`](Self::register), whose panic
    /// it shares).
    pub fn register_set<S: EventSet>(&mut self) -> &mut Self {
        S::register(self);
        self
    }

    /// Adds the types, upcasters and renames of `other` (not its policy). An upcaster `other`
    /// has for a version this one has one for too replaces it.
    ///
    /// # Panics
    ///
    /// When a wire name is registered for different Rust types here and in `other`, as
    /// [`register`](Self::register) does; and when one old name is renamed to different names
    /// here and in `other`, as [`rename`](Self::rename) does.
    pub fn merge(&mut self, other: &EventTypes) -> &mut Self {
        for (name, entry) in &other.entries {
            self.insert(name, *entry);
        }
        self.upcasters
            .extend(other.upcasters.iter().map(|(k, v)| (k.clone(), v.clone())));
        for (from, to) in &other.renamed {
            self.rename(from, to);
        }
        self
    }

    /// Whether every type of `other` is registered here, as the same Rust type.
    pub(crate) fn covers(&self, other: &EventTypes) -> bool {
        other.entries.iter().all(|(name, theirs)| {
            self.entries
                .get(name)
                .is_some_and(|ours| ours.type_id == theirs.type_id)
        })
    }

    fn insert(&mut self, name: &str, entry: Entry) {
        if let Some(existing) = self.entries.get(name) {
            // Two types under one name: one would silently replace the other, and its records
            // would decode as the wrong type, or not at all.
            assert!(
                existing.type_id == entry.type_id,
                "two event types share the wire name `{name}`: `{}` and `{}`; give each a unique NAME",
                existing.type_name,
                entry.type_name,
            );
        }
        self.entries.insert(name.to_owned(), entry);
    }

    /// Registers a function that turns a payload of schema version `from` of `event_type` into
    /// version `from + 1`. Chains run until the registered type's version; register one for
    /// every version from the oldest stored one on ([`validate`](Self::validate) checks).
    ///
    /// An error fails the event's decoding with [`DecodeError::Upcast`], which keeps it as its
    /// source; `?` on a serde error works. So does a panic, with its message (unless the build
    /// aborts on panic, `panic = "abort"`).
    pub fn upcaster<F>(&mut self, event_type: &str, from: u32, upcast: F) -> &mut Self
    where
        F: Fn(serde_json::Value) -> Result<serde_json::Value, BoxError> + Send + Sync + 'static,
    {
        self.upcasters
            .insert((event_type.to_owned(), from), Arc::new(upcast));
        self
    }

    /// Reads events stored under the wire name `from` as the type registered under `to`: for
    /// an event type whose `NAME` changed, since stored events keep the name they were written
    /// with. Their schema versions count in the new name's chain: a rename that also changed
    /// the payload raises the type's version and registers an upcaster under the new name, as
    /// for any change. Renames chain (`a` to `b`, `b` to `c` reads `a` as `c`).
    /// [`validate`](Self::validate) refuses a rename whose old name is registered as a type too
    /// (it would never apply) and renames that lead back to their start.
    ///
    /// Only decoding follows it: a record read keeps its stored `event_type` (what routes by
    /// it, as a realtime routing, and the dead-letter and skip metrics, see the old name), and
    /// what is written from now on carries the new name. Keep the rename as long as events
    /// under the old name are stored (or read from a transport), and name the old one for the
    /// build with [`register_event_type!(name = "old")`](crate::register_event_type), as for a
    /// retired type: readers elsewhere in the build that do not take the type, under
    /// [`UnknownEventPolicy::AwaitNewerBuild`], then pass its old events over instead of
    /// waiting on them as a newer build's.
    ///
    /// # Panics
    ///
    /// When `from` is renamed to another name already: its events would decode as one type or
    /// the other depending on which was given last.
    ///
    /// ```
    /// use cqrs_core::{Event, EventRecord, EventTypes, Metadata, RecordMetadata};
    /// use cqrs_core::reexports::serde_json::json;
    /// use serde::{Deserialize, Serialize};
    ///
    /// /// Was `tickets.closed` until the names took their aggregate's prefix.
    /// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
    /// #[cqrs(name = "tickets.ticket_closed")]
    /// struct TicketClosed { ticket_id: String }
    ///
    /// // Its events written before are still stored: named for the build, for readers that
    /// // do not take the type.
    /// cqrs_core::register_event_type!(name = "tickets.closed");
    ///
    /// let mut types = EventTypes::new();
    /// types.register::<TicketClosed>().rename("tickets.closed", "tickets.ticket_closed");
    /// types.validate().unwrap();
    ///
    /// let m = Metadata::new();
    /// let old = EventRecord::new(m.message_id, "tickets.closed", 1,
    ///     json!({ "ticket_id": "t1" }), RecordMetadata::from_metadata(&m));
    /// let event = types.decode(&old).unwrap().expect("read as the renamed type");
    /// assert_eq!(event.downcast_ref::<TicketClosed>(), Some(&TicketClosed { ticket_id: "t1".into() }));
    /// ```
    pub fn rename(&mut self, from: &str, to: &str) -> &mut Self {
        if let Some(existing) = self.renamed.get(from) {
            assert!(
                existing == to,
                "event type `{from}` is renamed twice: to `{existing}` and to `{to}`; keep one"
            );
        }
        self.renamed.insert(from.to_owned(), to.to_owned());
        self
    }

    /// `event_type`, then each name the renames lead it to in turn: at most one step per
    /// rename, so a cycle ends.
    fn rename_chain<'a>(&'a self, event_type: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        std::iter::successors(Some(event_type), |name| {
            self.renamed.get(*name).map(String::as_str)
        })
        .take(self.renamed.len() + 1)
    }

    /// The name the renames lead `event_type` to, registered here or not (itself when none
    /// applies).
    fn renamed_to<'a>(&'a self, event_type: &'a str) -> &'a str {
        self.rename_chain(event_type).last().unwrap_or(event_type)
    }

    /// The name `event_type` is read as and its registration: its own, else the first one
    /// renames lead it to.
    fn resolve<'a>(&'a self, event_type: &'a str) -> Option<(&'a str, &'a Entry)> {
        self.rename_chain(event_type)
            .find_map(|name| self.entries.get(name).map(|entry| (name, entry)))
    }

    /// Sets the policy for unknown event types.
    pub fn unknown_events(&mut self, policy: UnknownEventPolicy) -> &mut Self {
        self.policy = policy;
        self
    }

    /// The policy for unknown event types.
    pub fn policy(&self) -> UnknownEventPolicy {
        self.policy
    }

    /// Whether a type with this wire name is registered, or one the renames lead it to.
    pub fn knows(&self, event_type: &str) -> bool {
        self.resolve(event_type).is_some()
    }

    /// Whether this build knows an event type of this wire name, registered here or not: one
    /// `#[derive(Event)]` implements, or one [`register_event_type!`](crate::register_event_type)
    /// lists. Decided at link time (`inventory`): registering a type in an `EventTypes` does
    /// not add it. What [`UnknownEventPolicy::AwaitNewerBuild`] tells a newer build's events
    /// by.
    ///
    /// ```
    /// use cqrs_core::{Event, EventTypes, Message};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
    /// #[cqrs(name = "tickets.ticket_closed")]
    /// struct TicketClosed { ticket_id: String }
    ///
    /// // Written by hand: named for the build with `register_event_type!`.
    /// #[derive(Clone, Debug, Serialize, Deserialize)]
    /// struct TicketReopened { ticket_id: String }
    /// impl Message for TicketReopened { const NAME: &'static str = "tickets.ticket_reopened"; }
    /// impl Event for TicketReopened {}
    /// cqrs_core::register_event_type!(TicketReopened);
    ///
    /// assert!(EventTypes::in_this_build("tickets.ticket_closed"));
    /// assert!(EventTypes::in_this_build("tickets.ticket_reopened"));
    /// assert!(!EventTypes::in_this_build("tickets.ticket_merged"));
    /// ```
    pub fn in_this_build(event_type: &str) -> bool {
        submitted().contains(event_type)
    }

    /// Whether this build knows `event_type`, or the name these types' renames lead it to.
    fn of_this_build(&self, event_type: &str) -> bool {
        Self::in_this_build(event_type) || Self::in_this_build(self.renamed_to(event_type))
    }

    /// Whether a reader with these types waits on an event of this unregistered type (its
    /// policy is `Fail`, or `AwaitNewerBuild` and no part of this build knows it), rather
    /// than skipping it.
    pub(crate) fn holds_unregistered(&self, event_type: &str) -> bool {
        match self.policy {
            UnknownEventPolicy::Fail => true,
            UnknownEventPolicy::AwaitNewerBuild => !self.of_this_build(event_type),
            UnknownEventPolicy::Skip | UnknownEventPolicy::Ignore => false,
        }
    }

    /// Checks that every registered type's upcasters form a complete chain, from the lowest
    /// version one is registered for up to the type's current version. Call it at start-up:
    /// a gap otherwise shows only when an event of the missing version comes, and that event
    /// then fails ([`DecodeError::MissingUpcaster`], counted as an attempt, dead-lettered after
    /// `max_deliveries`; by the event-bus consumer and a transport-fed projection runner, at
    /// once). Projection runners and the
    /// event-bus consumer call it when they start as workers.
    ///
    /// It cannot tell which old versions are stored: a type with no upcaster at all passes,
    /// whatever its version (a type first written at version 2 needs none).
    ///
    /// Fails with [`DecodeError::UpcasterGap`] naming the first gap, or with
    /// [`DecodeError::UnreachableUpcaster`] for an upcaster from the current version or above
    /// (it would never run). Upcasters of types not registered here are not checked: a
    /// catalogue shared by several consumers may hold some for types one of them skips.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let mut renames: Vec<(&String, &String)> = self.renamed.iter().collect();
        renames.sort();
        for (from, to) in renames {
            let refused = |reason| {
                Err(DecodeError::InvalidRename {
                    from: from.clone(),
                    to: to.clone(),
                    reason,
                })
            };
            if self.entries.contains_key(from) {
                return refused(
                    "the old name is registered as a type too, so its events decode as that type and the rename never applies: drop the rename or that type's registration",
                );
            }
            if self.rename_chain(to).any(|name| name == from) {
                return refused(
                    "the renames lead back to the old name: make the chain end at a registered type",
                );
            }
        }
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        for name in names {
            let current = self.entries[name].current;
            if let Some(&(_, from)) = self
                .upcasters
                .keys()
                .filter(|(event_type, from)| event_type == name && *from >= current)
                .min_by_key(|(_, from)| *from)
            {
                return Err(DecodeError::UnreachableUpcaster {
                    event_type: name.clone(),
                    from,
                    current,
                });
            }
            let Some(lowest) = self
                .upcasters
                .keys()
                .filter(|(event_type, _)| event_type == name)
                .map(|&(_, from)| from)
                .min()
            else {
                continue;
            };
            if let Some(missing) =
                (lowest..current).find(|&v| !self.upcasters.contains_key(&(name.clone(), v)))
            {
                return Err(DecodeError::UpcasterGap {
                    event_type: name.clone(),
                    missing,
                    lowest,
                    current,
                });
            }
        }
        Ok(())
    }

    /// Decodes a record into an envelope, upcasting old versions. `Ok(None)` is an unknown type
    /// skipped under [`UnknownEventPolicy::Skip`] or [`UnknownEventPolicy::Ignore`], or, under
    /// [`UnknownEventPolicy::AwaitNewerBuild`], one another part of this build knows.
    pub fn decode(&self, record: &EventRecord) -> Result<Option<EventEnvelope>, DecodeError> {
        let Some((name, entry)) = self.resolve(&record.event_type) else {
            match self.policy {
                UnknownEventPolicy::Fail => {
                    return Err(DecodeError::UnknownType {
                        event_type: record.event_type.clone(),
                        schema_version: record.schema_version,
                    });
                }
                UnknownEventPolicy::AwaitNewerBuild => {
                    if !self.of_this_build(&record.event_type) {
                        return Err(DecodeError::NotInThisBuild {
                            event_type: record.event_type.clone(),
                            schema_version: record.schema_version,
                        });
                    }
                    // Another part of this build's: not new, so not counted as unknown.
                    tracing::debug!(
                        event_type = %record.event_type.escape_debug(),
                        event_id = %record.event_id,
                        "skipping an event of a type another part of this build reads"
                    );
                    return Ok(None);
                }
                // The type is read from a peer's entry or a stored row: escaped, so a line
                // break in it cannot start a forged line of a plain-text log. Once a minute
                // per type and reader at most: during a rolling deploy every event of a type
                // the new build added comes here, and `cqrs_events_unknown_total` counts them
                // all.
                UnknownEventPolicy::Skip => {
                    if let Some(unsaid) = self.unknown_said.may_say(&record.event_type) {
                        tracing::warn!(
                            event_type = %record.event_type.escape_debug(),
                            event_id = %record.event_id,
                            unsaid,
                            "skipping an event of a type these event types do not register: \
                             the consumer or projection reading it takes no such type (give \
                             its bus a handler, or its types the type, to handle it), or a \
                             newer build wrote it (`UnknownEventPolicy::Ignore` skips without \
                             a warning, for a reader of a log or topic that carries other \
                             types by design: a projection of one aggregate over a store \
                             shared with others, a topic of other plugins' events; `unsaid`: \
                             as many skipped since the last such line)"
                        );
                    }
                }
                UnknownEventPolicy::Ignore => tracing::debug!(
                    event_type = %record.event_type.escape_debug(),
                    event_id = %record.event_id,
                    "ignoring an event of a type not registered here"
                ),
            }
            metrics::counter!("cqrs_events_unknown_total", "event_type" => UNKNOWN_TYPE_LABELS.label(&record.event_type)).increment(1);
            return Ok(None);
        };
        if record.schema_version > entry.current {
            return Err(DecodeError::FutureVersion {
                event_type: name.to_owned(),
                found: record.schema_version,
                current: entry.current,
            });
        }
        // Cloned only when upcasters have to change it.
        let mut upcast: Option<serde_json::Value> = None;
        let mut version = record.schema_version;
        while version < entry.current {
            let upcaster = self
                .upcasters
                .get(&(name.to_owned(), version))
                .ok_or_else(|| DecodeError::MissingUpcaster {
                    event_type: name.to_owned(),
                    found: version,
                })?;
            let payload = upcast.take().unwrap_or_else(|| record.payload.clone());
            // An upcaster that panics (an `unwrap` on a field an old payload lacks) fails this
            // event like one that returns an error: no panic reaches the aggregate's loader or
            // a consumer, which would blame its handler.
            let upcasted =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| upcaster(payload)))
                    .unwrap_or_else(|panic| {
                        Err(format!(
                            "the upcaster panicked: {}",
                            crate::panic::into_message(panic)
                        )
                        .into())
                    });
            upcast = Some(upcasted.map_err(|source| DecodeError::Upcast {
                event_type: name.to_owned(),
                from: version,
                source,
            })?);
            version += 1;
        }
        let payload = upcast.as_ref().unwrap_or(&record.payload);
        // A `Deserialize` that panics (a `deserialize_with` or `TryFrom` that unwraps) fails
        // this event like a payload that does not match: every reader (a relay feeding the
        // event bus, a projection, a consumer, an aggregate's loader) skips or reports it
        // rather than unwinding and stopping at it again after each restart.
        let decoded =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (entry.decode)(payload)))
                .unwrap_or_else(|panic| {
                    Err(<serde_json::Error as serde::de::Error>::custom(
                        format_args!(
                            "its Deserialize panicked: {}",
                            crate::panic::into_message(panic)
                        ),
                    ))
                });
        let event = decoded.map_err(|source| DecodeError::Payload {
            event_type: name.to_owned(),
            source,
        })?;
        let mut envelope = EventEnvelope::from_arc(event, record.to_metadata());
        if let Some(key) = &record.partition_key {
            envelope = envelope.with_partition_key(key.as_str());
        }
        if let (Some(stream_id), Some(version)) = (&record.stream_id, record.stream_version) {
            envelope = envelope.with_stored(stream_id.as_str(), version, record.position);
        }
        Ok(Some(envelope))
    }
}
