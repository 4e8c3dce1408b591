//! Aggregates: state rebuilt from a stream's events, which decides on commands.

use crate::clock::{Clock, SystemClock};
use crate::ports::{EventStore, ExpectedVersion, Snapshot, SnapshotStore, StoreError};
use crate::{
    DecodeError, EventEnvelope, EventRecord, EventTypes, HandlerError, Metadata, Position,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use tracing::Instrument;

/// The events of one aggregate: an enum with one variant per event type, each wrapping an
/// [`Event`](crate::Event) struct. Declare it with [`event_set!`](crate::event_set).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an `EventSet`",
    note = "declare an aggregate's events with `cqrs_core::event_set!`, which writes the enum and its `EventSet` impl"
)]
pub trait EventSet: Sized + Clone + Send + Sync + 'static {
    /// The member whose payload this envelope carries, if any.
    fn from_envelope(envelope: &EventEnvelope) -> Option<Self>;
    /// Wraps the member in an envelope with this metadata.
    fn into_envelope(self, metadata: Metadata) -> EventEnvelope;
    /// Registers every member type for decoding.
    fn register(types: &mut EventTypes);
}

/// Declares an enum of event types that implements [`EventSet`], `From` each member, and
/// `Clone` / `Debug`: so every member must be `Clone` and `Debug` too (derive them beside
/// `Event`, which does not ask for them; without, the error points into this macro's
/// expansion). Do not derive `Clone` or `Debug` on the enum yourself (E0119: two impls).
/// A variant's attributes (doc comments) go on the enum's variant only: a `#[cfg]` on a
/// variant is not supported, since the impls still name it; write one `event_set!` per
/// configuration instead, each under its `#[cfg]`.
///
/// ```
/// use cqrs_core::{event_set, Event};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
/// #[cqrs(name = "Opened")]
/// pub struct Opened { pub title: String }
///
/// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
/// #[cqrs(name = "Closed")]
/// pub struct Closed;
///
/// event_set! {
///     /// Everything that happens to a ticket.
///     pub enum TicketEvent {
///         Opened(Opened),
///         Closed(Closed),
///     }
/// }
///
/// let e: TicketEvent = Closed.into();
/// assert!(matches!(e, TicketEvent::Closed(_)));
/// ```
#[macro_export]
macro_rules! event_set {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident($ty:ty)),+ $(,)? }) => {
        $(#[$meta])*
        // Paths, not names: a `Debug` derive of another crate in scope where the macro is
        // called must not take the place of the standard one.
        #[derive(::core::clone::Clone, ::core::fmt::Debug)]
        $vis enum $name {
            $($(#[$vmeta])* $variant($ty),)+
        }

        impl $crate::EventSet for $name {
            fn from_envelope(envelope: &$crate::EventEnvelope) -> ::std::option::Option<Self> {
                $(
                    if let ::std::option::Option::Some(e) = envelope.downcast_ref::<$ty>() {
                        return ::std::option::Option::Some($name::$variant(::std::clone::Clone::clone(e)));
                    }
                )+
                ::std::option::Option::None
            }

            fn into_envelope(self, metadata: $crate::Metadata) -> $crate::EventEnvelope {
                match self {
                    $($name::$variant(e) => $crate::EventEnvelope::new(e, metadata),)+
                }
            }

            fn register(types: &mut $crate::EventTypes) {
                $(types.register::<$ty>();)+
            }
        }

        $(
            impl ::std::convert::From<$ty> for $name {
                fn from(e: $ty) -> Self {
                    $name::$variant(e)
                }
            }
        )+
    };
}

/// State rebuilt from a stream's events, which decides what a command does.
///
/// The state a command returns (and the snapshot saved with it) is built from the events as
/// decided; a later load builds it from the events as stored and decoded. The two agree only
/// when every event survives its serde round trip: a `#[serde(skip)]` field that `apply` reads
/// makes a snapshot and a replay disagree. Keep what `apply` reads in the serialized form. A
/// float JSON cannot carry (NaN, an infinity) is refused when the event is recorded
/// ([`AggregateError::Encode`], nothing stored), since `serde_json` would store it as `null`
/// and no later load could decode it; a state holding one gets no snapshot (a warning says
/// why), so its loads replay the stream.
///
/// ```
/// use cqrs_core::{Aggregate, Event, HandlerError, event_set};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
/// #[cqrs(name = "TicketOpened")]
/// pub struct TicketOpened { pub ticket_id: String }
///
/// event_set! { pub enum Events { Opened(TicketOpened) } }
///
/// #[derive(Default)]
/// struct Ticket { open: bool }
///
/// enum TicketCommand { Open { id: String } }
///
/// impl Aggregate for Ticket {
///     const TYPE: &'static str = "ticket";
///     type Event = Events;
///     type Command = TicketCommand;
///     type Error = HandlerError;
///
///     fn apply(&mut self, event: &Events) {
///         match event { Events::Opened(_) => self.open = true }
///     }
///
///     fn decide(&self, command: TicketCommand) -> Result<Vec<Events>, HandlerError> {
///         match command {
///             TicketCommand::Open { .. } if self.open => Err(HandlerError::conflict("already_open", "the ticket is open")),
///             TicketCommand::Open { id } => Ok(vec![TicketOpened { ticket_id: id }.into()]),
///         }
///     }
/// }
/// ```
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The aggregate type; streams are named `{TYPE}-{id}`. Keep one type's name from being
    /// another's followed by a dash (`ticket` and `ticket-comment`): the `ticket` with id
    /// `comment-1` and the `ticket-comment` with id `1` would share the stream
    /// `ticket-comment-1`.
    const TYPE: &'static str;
    /// Its events.
    type Event: EventSet;
    /// What it decides on.
    type Command: Send;
    /// Why it refuses a command.
    type Error: Send;

    /// Applies one event to the state. Must not fail: the event happened.
    fn apply(&mut self, event: &Self::Event);

    /// Applies one event, knowing its envelope: when it happened, who caused it (its `actor`),
    /// its stream version. Defaults to [`apply`](Aggregate::apply); override it when the state
    /// keeps timestamps or actors. Not its global position: an event just decided has none yet
    /// (`envelope.position()` is `None`), so a state that kept it would differ between the
    /// command's answer (and its snapshot) and a later load. Nor the in-process `principal`,
    /// which is not stored: it is `None` here, also for an event just decided.
    fn apply_with(&mut self, event: &Self::Event, envelope: &EventEnvelope) {
        let _ = envelope;
        self.apply(event);
    }

    /// Decides what a command does: the events to record, or a refusal.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// The version of the state's shape and logic in snapshots (see
    /// [`AggregateRepository::with_snapshots`]). Raise it when a snapshot saved before would
    /// load another state than a replay of the stream now gives: a field added (which old
    /// snapshots still decode, with its default), `apply` changed, an upcaster changed. A
    /// snapshot of another version is passed over (the stream is replayed) until one of this
    /// version replaces it. Default 1.
    const SNAPSHOT_VERSION: u32 = 1;
}

/// An aggregate's state and the stream version it includes.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The id.
    pub id: String,
    /// The state.
    pub state: A,
    /// The stream version (0 when the stream does not exist).
    pub version: u64,
}

/// Why executing a command on an aggregate failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError<E> {
    /// The aggregate refused the command.
    #[error("the command was refused: {0}")]
    Rejected(E),
    /// The event store failed. [`StoreError::Conflict`]: the stream changed since it was
    /// loaded, or the caller's expected version is stale; retry (load and decide again, as
    /// [`execute_retrying`](AggregateRepository::execute_retrying) does) or report a conflict.
    /// Any other store error is no conflict: after a `Timeout` the append may have gone
    /// through, so deciding again could apply the command twice (reload and look first). The
    /// repository never retries by itself.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored event could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream holds an event of a type the repository's [`EventTypes`] do not know: a newer
    /// build wrote it during a rolling deploy (or the type was removed from the aggregate's
    /// event set, which the default types are made of, or another handler recorded an event
    /// keyed by this stream's id, which a retry will not mend). Loading fails rather than skip it: the
    /// aggregate would decide on incomplete state, and its append at the stream's version
    /// would succeed. `unavailable` as a handler error: retry once the newer build runs.
    #[error(
        "stream `{stream}` holds an event of type `{event_type}` at version {version} that this build does not know; deploy the build that wrote it here too (or add the type back to the aggregate's event set; if no build of this aggregate knows it, a handler recorded it keyed with this stream's id by mistake: repair the stream): deciding without it would decide on incomplete state"
    )]
    UnknownEvent {
        /// The stream.
        stream: String,
        /// The event's stream version.
        version: u64,
        /// Its wire name.
        event_type: String,
    },
    /// The stream holds an event of a type the repository's [`EventTypes`] know (shared with
    /// other consumers) that is not among the aggregate's events: removed from its event set,
    /// or appended under the stream by mistake. No build of this aggregate will ever load it,
    /// so this is `internal` as a handler error, not something to retry: put the type back in
    /// the event set, or repair the stream.
    #[error(
        "stream `{stream}` holds an event of type `{event_type}` at version {version} that is not among the aggregate's events; add it back to the aggregate's event set or repair the stream: deciding without it would decide on incomplete state"
    )]
    ForeignEvent {
        /// The stream.
        stream: String,
        /// The event's stream version.
        version: u64,
        /// Its wire name.
        event_type: String,
    },
    /// The records skip a version: a tail given to [`rebuild`](AggregateRepository::rebuild)
    /// (which takes the whole stream), records out of order, or a stream that lost events (a
    /// partial restore). Deciding on them would decide on incomplete state, and the append at
    /// the last version would succeed. `internal` as a handler error: repair the stream, or
    /// pass it whole.
    #[error(
        "the records of stream `{stream}` go from version {after} to {found}; a decision needs every event: pass the whole stream in order (`rebuild` starts at version 1), or repair the stream"
    )]
    VersionGap {
        /// The stream.
        stream: String,
        /// The last version applied (0 before the first).
        after: u64,
        /// The version the next record holds.
        found: u64,
    },
    /// An event could not be serialized: its `Serialize` failed, or it holds a float JSON cannot
    /// carry (NaN, an infinity), which the error names by field. Nothing was stored.
    #[error(
        "could not serialize event `{event_type}` for stream `{stream}`: {source}; nothing was stored (fix the event's `Serialize`, or keep floats finite)"
    )]
    Encode {
        /// The event's wire name.
        event_type: &'static str,
        /// The stream it was for.
        stream: String,
        /// Why serde_json refused it.
        #[source]
        source: serde_json::Error,
    },
    /// The aggregate's id is empty. Every empty id would name one stream (`{TYPE}-`), shared
    /// by whatever commands came without an id: refused before anything is read or decided.
    /// The caller's input is at fault: `invalid` as a handler error (`empty_aggregate_id`).
    #[error(
        "the id of the `{aggregate}` aggregate is empty; give the aggregate's id (an empty one would name one stream shared by every command that came without an id)"
    )]
    EmptyId {
        /// The aggregate's type ([`Aggregate::TYPE`]).
        aggregate: &'static str,
    },
}

impl<E: Into<HandlerError>> From<AggregateError<E>> for HandlerError {
    fn from(error: AggregateError<E>) -> Self {
        match error {
            AggregateError::Rejected(e) => e.into(),
            AggregateError::Store(e) => e.into(),
            // A newer build that can read the stream is on its way: retry then. Other decode
            // failures (a missing upcaster among them) wait for no build: internal.
            AggregateError::Decode(e) if e.waits_for_another_build() => {
                HandlerError::unavailable("this build cannot load the aggregate; retry later", e)
            }
            AggregateError::Decode(e) => HandlerError::internal(e),
            AggregateError::UnknownEvent {
                stream,
                version,
                event_type,
            } => HandlerError::unavailable(
                "this build cannot load the aggregate; retry later",
                // `E` need not be an error type: the source is rebuilt without it.
                AggregateError::<std::convert::Infallible>::UnknownEvent {
                    stream,
                    version,
                    event_type,
                },
            ),
            // No build of this aggregate will load the stream: retrying cannot help.
            AggregateError::ForeignEvent {
                stream,
                version,
                event_type,
            } => HandlerError::internal(AggregateError::<std::convert::Infallible>::ForeignEvent {
                stream,
                version,
                event_type,
            }),
            AggregateError::VersionGap {
                stream,
                after,
                found,
            } => HandlerError::internal(AggregateError::<std::convert::Infallible>::VersionGap {
                stream,
                after,
                found,
            }),
            AggregateError::Encode {
                event_type,
                stream,
                source,
            } => HandlerError::internal(AggregateError::<std::convert::Infallible>::Encode {
                event_type,
                stream,
                source,
            }),
            AggregateError::EmptyId { aggregate } => HandlerError::invalid(
                "empty_aggregate_id",
                AggregateError::<std::convert::Infallible>::EmptyId { aggregate }.to_string(),
            ),
        }
    }
}

struct SnapshotConfig<A> {
    store: Arc<dyn SnapshotStore>,
    every: u64,
    /// Saves begun and not finished, which a stuck store would pile up: past
    /// [`MOST_SAVES_IN_FLIGHT`], a due snapshot is skipped.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    encode: fn(&A) -> Result<serde_json::Value, serde_json::Error>,
    decode: fn(serde_json::Value) -> Result<A, SnapshotMismatch>,
}

/// How long a command waits for the save of the snapshot it made due, by default (see
/// [`AggregateRepository::with_snapshot_wait`]).
pub const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most snapshot saves of one repository (and its clones) under way at once: a stuck store
/// leaves each save's task waiting, and a snapshot due past this many is skipped (a later one
/// replaces it) rather than left to pile up.
const MOST_SAVES_IN_FLIGHT: usize = 16;

/// The key under which a snapshot of [`Aggregate::SNAPSHOT_VERSION`] 2 or more records its
/// version: `{"cqrs_snapshot_version": 2, "state": ..}`. A snapshot of version 1 is the state
/// alone, as builds before the version existed saved it (and still read it).
const SNAPSHOT_VERSION_KEY: &str = "cqrs_snapshot_version";

/// Why a stored snapshot is not used.
#[derive(Debug, thiserror::Error)]
enum SnapshotMismatch {
    #[error("it is of snapshot version {found}, and the aggregate's is {wanted}")]
    Version { found: u64, wanted: u32 },
    #[error("it no longer decodes: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("it is at stream version 0, so it includes no event")]
    NoEvent,
    #[error("the state's Deserialize panicked on it: {0}")]
    Panicked(String),
}

/// `state` as stored: alone at snapshot version 1, else under its version. A state holding a
/// NaN or an infinite float is refused (and no snapshot saved): `serde_json` would store it as
/// `null`, which no load could decode, and every load would replay the whole stream.
fn encode_snapshot<A: Aggregate + Serialize>(
    state: &A,
) -> Result<serde_json::Value, serde_json::Error> {
    // A `Serialize` that panics saves no snapshot, like one that fails: the events are
    // stored by now, and the command must not fail (or unwind) after it took effect.
    let state = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::json::to_value(state)
    }))
    .unwrap_or_else(|panic| {
        Err(<serde_json::Error as serde::ser::Error>::custom(
            format_args!(
                "the state's Serialize panicked: {}",
                crate::panic::into_message(panic)
            ),
        ))
    })?;
    Ok(match A::SNAPSHOT_VERSION {
        1 => state,
        version => serde_json::json!({ SNAPSHOT_VERSION_KEY: version, "state": state }),
    })
}

/// The state of a stored snapshot of the aggregate's snapshot version.
fn decode_snapshot<A: Aggregate + DeserializeOwned>(
    stored: serde_json::Value,
) -> Result<A, SnapshotMismatch> {
    let (found, state) = match stored {
        serde_json::Value::Object(mut object)
            if object.len() == 2
                && object.contains_key("state")
                && object.get(SNAPSHOT_VERSION_KEY).is_some_and(|v| v.is_u64()) =>
        {
            let found = object
                .remove(SNAPSHOT_VERSION_KEY)
                .and_then(|v| v.as_u64())
                .unwrap_or_default();
            (found, object.remove("state").unwrap_or_default())
        }
        state => (1, state),
    };
    if found != u64::from(A::SNAPSHOT_VERSION) {
        return Err(SnapshotMismatch::Version {
            found,
            wanted: A::SNAPSHOT_VERSION,
        });
    }
    // A `Deserialize` that panics on a stored state (a `deserialize_with` that unwraps, on a
    // state another build saved) passes the snapshot over like one that does not decode: else
    // every load of the aggregate panicked, and no command could save a newer one.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serde_json::from_value(state)
    }))
    .map_err(|panic| SnapshotMismatch::Panicked(crate::panic::into_message(panic)))?
    .map_err(SnapshotMismatch::Decode)
}

/// Loads aggregates from an [`EventStore`], runs commands on them, and appends the events with
/// the loaded version as the expected one.
///
/// With the ticket of the [`Aggregate`] example:
///
/// ```
/// use cqrs_core::memory::InMemoryEventStore;
/// use cqrs_core::{Aggregate, AggregateRepository, Event, HandlerError, Metadata, event_set};
/// use serde::{Deserialize, Serialize};
/// use std::sync::Arc;
///
/// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
/// #[cqrs(name = "TicketOpened")]
/// pub struct TicketOpened { pub ticket_id: String }
///
/// event_set! { pub enum Events { Opened(TicketOpened) } }
///
/// #[derive(Default)]
/// struct Ticket { open: bool }
///
/// enum TicketCommand { Open { id: String } }
///
/// impl Aggregate for Ticket {
///     const TYPE: &'static str = "ticket";
///     type Event = Events;
///     type Command = TicketCommand;
///     type Error = HandlerError;
///
///     fn apply(&mut self, event: &Events) {
///         match event { Events::Opened(_) => self.open = true }
///     }
///
///     fn decide(&self, command: TicketCommand) -> Result<Vec<Events>, HandlerError> {
///         match command {
///             TicketCommand::Open { .. } if self.open => Err(HandlerError::conflict("already_open", "the ticket is open")),
///             TicketCommand::Open { id } => Ok(vec![TicketOpened { ticket_id: id }.into()]),
///         }
///     }
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let repo = AggregateRepository::<Ticket>::new(Arc::new(InMemoryEventStore::new()));
///     let open = || TicketCommand::Open { id: "t1".into() };
///
///     // Loads stream `ticket-t1` (empty), decides, appends at the loaded version.
///     let committed = repo.execute("t1", None, open(), &Metadata::new()).await?;
///     assert_eq!(committed.records[0].stream_version, Some(1));
///     assert!(committed.state.open);
///     assert_eq!(repo.load("t1").await?.version, 1);
///
///     // Opening again is refused by the aggregate.
///     assert!(repo.execute("t1", None, open(), &Metadata::new()).await.is_err());
///     Ok(())
/// }
/// ```
pub struct AggregateRepository<A: Aggregate> {
    store: Arc<dyn EventStore>,
    types: Arc<EventTypes>,
    snapshots: Option<SnapshotConfig<A>>,
    /// How long a command waits for its snapshot's save ([`SNAPSHOT_WAIT`] by default); kept
    /// apart from `snapshots` so it holds whichever of the two setters is called first.
    snapshot_wait: std::time::Duration,
    /// Stamps the events `decide` and `execute` make.
    clock: Arc<dyn Clock>,
    _aggregate: PhantomData<fn() -> A>,
}

/// A clone shares the store, the types, the clock and the bound on snapshot saves under way:
/// one per axum handler or task, with no `Arc` around it.
impl<A: Aggregate> Clone for AggregateRepository<A> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            types: self.types.clone(),
            snapshots: self.snapshots.as_ref().map(|s| SnapshotConfig {
                store: s.store.clone(),
                every: s.every,
                in_flight: s.in_flight.clone(),
                encode: s.encode,
                decode: s.decode,
            }),
            snapshot_wait: self.snapshot_wait,
            clock: self.clock.clone(),
            _aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate> fmt::Debug for AggregateRepository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateRepository")
            .field("aggregate", &A::TYPE)
            .field("snapshots", &self.snapshots.as_ref().map(|s| s.every))
            .finish()
    }
}

impl<A: Aggregate> AggregateRepository<A> {
    /// A repository over `store` that decodes the aggregate's own event types, with no
    /// upcasters: once an event's `VERSION` went up, build it with
    /// [`with_types`](Self::with_types) and types holding the upcasters.
    ///
    /// # Panics
    ///
    /// When two of the aggregate's event types share a wire name (as
    /// [`EventTypes::register`](crate::EventTypes::register) does): give each a unique `NAME`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self::with_types(store, Arc::new(EventTypes::of::<A::Event>()))
    }

    /// A repository that decodes with `types` (which hold the upcasters of old schema
    /// versions: [`EventTypes::upcaster`], checked by [`EventTypes::validate`], which call at
    /// start-up). Its unknown-event policy
    /// does not apply here: loading fails with [`AggregateError::UnknownEvent`] on an event of
    /// the stream that `types` does not know, and with [`AggregateError::ForeignEvent`] on one
    /// it knows that is not one of the aggregate's events.
    ///
    /// The aggregate's own event types are added to `types` (a copy) when it lacks any: left
    /// out, its events would fail every load as unknown, from a build that knows them.
    ///
    /// # Panics
    ///
    /// When `types` has another Rust type under the wire name of one of the aggregate's
    /// events (as [`EventTypes::merge`] does): its records would decode as the other type.
    pub fn with_types(store: Arc<dyn EventStore>, types: Arc<EventTypes>) -> Self {
        let own = EventTypes::of::<A::Event>();
        let types = if types.covers(&own) {
            types
        } else {
            let mut merged = EventTypes::clone(&types);
            merged.merge(&own);
            Arc::new(merged)
        };
        Self {
            store,
            types,
            snapshots: None,
            snapshot_wait: SNAPSHOT_WAIT,
            clock: Arc::new(SystemClock),
            _aggregate: PhantomData,
        }
    }

    /// Stamps the events [`decide`](Self::decide) and [`execute`](Self::execute) make with
    /// `clock`'s now (the system clock by default), so a server with an injected clock (a
    /// test's [`ManualClock`](crate::clock::ManualClock)) records its events at its time;
    /// [`decide_on`](Self::decide_on) too.
    ///
    /// ```
    /// # use cqrs_core::doc::{Ticket, TicketCommand};
    /// use cqrs_core::reexports::chrono::{TimeZone, Utc};
    /// use cqrs_core::clock::{Clock, ManualClock};
    /// use cqrs_core::{AggregateRepository, Metadata, memory::InMemoryEventStore};
    /// use std::sync::Arc;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let clock = ManualClock::at(Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap());
    /// let repo = AggregateRepository::<Ticket>::new(Arc::new(InMemoryEventStore::new()))
    ///     .with_clock(Arc::new(clock.clone()));
    /// let committed = repo.execute("t1", None, TicketCommand::Open, &Metadata::new()).await?;
    /// assert_eq!(committed.records[0].metadata.occurred_at, clock.now());
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Now, by the repository's clock (see [`with_clock`](Self::with_clock)): the time to
    /// pass [`decide_on_at`](Self::decide_on_at).
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Saves a snapshot every `every` versions and loads from the latest one. A snapshot
    /// records its [`Aggregate::SNAPSHOT_VERSION`]; one of another version (or one that no
    /// longer decodes) is passed over: the stream is replayed.
    pub fn with_snapshots(mut self, store: Arc<dyn SnapshotStore>, every: u64) -> Self
    where
        A: Serialize + DeserializeOwned,
    {
        self.snapshots = Some(SnapshotConfig {
            store,
            every: every.max(1),
            in_flight: Arc::default(),
            encode: encode_snapshot::<A>,
            decode: decode_snapshot::<A>,
        });
        self
    }

    /// How long a command whose events made a snapshot due waits for its save
    /// ([`SNAPSHOT_WAIT`], 1 s, by default; no effect without
    /// [`with_snapshots`](Self::with_snapshots), called before or after it).
    ///
    /// The save runs after the events are stored, in a task of its own: a command returns
    /// once it is saved, or once `wait` has passed, the save going on without it. So a slow
    /// or stuck snapshot store delays a command that has taken effect by `wait` at most,
    /// rather than holding it until a time-out layer reports it failed (and its client, told to
    /// retry, runs it twice); and a command given up during the save does not cut it off.
    /// Keep `wait` well under the command's time budget. The wait needs tokio's time driver
    /// (`enable_time`); without it, or outside a tokio runtime, see
    /// [`append_decided`](Self::append_decided).
    ///
    /// ```
    /// # use cqrs_core::doc::Ticket;
    /// # use cqrs_core::memory::{InMemoryEventStore, InMemorySnapshotStore};
    /// use cqrs_core::AggregateRepository;
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// let repo = AggregateRepository::<Ticket>::new(Arc::new(InMemoryEventStore::new()))
    ///     .with_snapshots(Arc::new(InMemorySnapshotStore::new()), 100)
    ///     .with_snapshot_wait(Duration::from_millis(200));
    /// # let _ = repo;
    /// ```
    pub fn with_snapshot_wait(mut self, wait: std::time::Duration) -> Self {
        self.snapshot_wait = wait;
        self
    }

    /// Refuses an empty aggregate id ([`AggregateError::EmptyId`]).
    fn check_id(id: &str) -> Result<(), AggregateError<A::Error>> {
        if id.is_empty() {
            return Err(AggregateError::EmptyId { aggregate: A::TYPE });
        }
        Ok(())
    }

    /// The stream id of aggregate `id`: `{TYPE}-{id}`.
    pub fn stream_id(id: &str) -> String {
        format!("{}-{id}", A::TYPE)
    }

    /// Rebuilds the aggregate from its snapshot (if any) and events. Fails with
    /// [`AggregateError::UnknownEvent`] or [`AggregateError::ForeignEvent`] on an event it
    /// cannot apply, and with [`AggregateError::VersionGap`] when the stream skips a version
    /// (it lost an event: a partial restore). A snapshot that cannot be loaded or decoded, one at version 0, or one
    /// whose last event the stream no longer has at its version (events restored from a
    /// backup older than the snapshots; for a snapshot that names no event, a stream shorter
    /// than its version), is logged and passed over: the whole stream is replayed.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, AggregateError<A::Error>> {
        Self::check_id(id)?;
        let stream = Self::stream_id(id);
        let (mut state, mut version) = (A::default(), 0);
        let mut last_event_id = None;
        if let Some(snapshots) = &self.snapshots
            && let Some(snapshot) = match snapshots.store.load(&stream).await {
                Ok(snapshot) => snapshot,
                // A snapshot is only a shortcut: a snapshot store that is down must not fail
                // the command while the event store works.
                Err(e) => {
                    tracing::warn!(stream = %stream, error = %e, "could not load a snapshot; replaying the whole stream");
                    None
                }
            }
        {
            // Of no event (the repository never saves one): not even decoded, as its state
            // would have the whole stream replayed on top of it.
            let decoded = match snapshot.version {
                0 => Err(SnapshotMismatch::NoEvent),
                _ => (snapshots.decode)(snapshot.state),
            };
            match decoded {
                Ok(s) => {
                    (state, version) = (s, snapshot.version);
                    last_event_id = snapshot.last_event_id;
                }
                // A snapshot of another shape is not an error: replay the whole stream.
                Err(e) => {
                    tracing::warn!(stream = %stream, reason = %e, "ignoring a snapshot; replaying the whole stream")
                }
            }
        }
        let records = if version > 0 {
            // Read from the snapshot's own last event: the stream must still have an event at
            // that version, and the snapshot's own when it names it. After events were
            // restored from a backup older than the snapshots, it has another there or none,
            // and the snapshot is of a history the stream no longer has (trusted, it would
            // load a version the stream lacks, so every append would conflict and no newer
            // snapshot would replace it; or once new events caught up, decide on lost
            // history). A snapshot that names no event (saved by an older build, or by a
            // store that keeps no id) is checked as far as it can be: the version.
            let mut records = self.store.load(&stream, version - 1).await?;
            match records.first() {
                Some(first)
                    if first.stream_version == Some(version)
                        && last_event_id.is_none_or(|id| first.event_id == id) =>
                {
                    records.remove(0);
                    records
                }
                _ => {
                    tracing::warn!(stream = %stream, snapshot_version = version, "ignoring a snapshot of another history than the stream's (were events restored without their snapshots?); replaying the whole stream");
                    (state, version) = (A::default(), 0);
                    self.store.load(&stream, 0).await?
                }
            }
        } else {
            self.store.load(&stream, 0).await?
        };
        self.apply_records(
            Loaded {
                id: id.to_owned(),
                state,
                version,
            },
            records,
        )
    }

    /// Rebuilds aggregate `id` from its stream's records, read elsewhere: by a caller that
    /// reads them inside its own unit of work (a database transaction), so a command holds one
    /// connection, not two. `records` must be the whole stream, in version order: records
    /// that skip a version are refused ([`AggregateError::VersionGap`]; only records that
    /// carry their `stream_version`, as every store's do, are checked).
    pub fn rebuild(
        &self,
        id: &str,
        records: Vec<EventRecord>,
    ) -> Result<Loaded<A>, AggregateError<A::Error>> {
        Self::check_id(id)?;
        self.apply_records(
            Loaded {
                id: id.to_owned(),
                state: A::default(),
                version: 0,
            },
            records,
        )
    }

    fn apply_records(
        &self,
        mut loaded: Loaded<A>,
        records: Vec<EventRecord>,
    ) -> Result<Loaded<A>, AggregateError<A::Error>> {
        for record in records {
            let next = loaded.version.saturating_add(1);
            if let Some(found) = record.stream_version
                && found != next
            {
                return Err(AggregateError::VersionGap {
                    stream: Self::stream_id(&loaded.id),
                    after: loaded.version,
                    found,
                });
            }
            loaded.version = next;
            // Whatever the unknown-event policy: skipping an event would let the aggregate
            // decide on incomplete state, and the append at this version would succeed.
            let unknown = || AggregateError::UnknownEvent {
                stream: Self::stream_id(&loaded.id),
                version: loaded.version,
                event_type: record.event_type.clone(),
            };
            if !self.types.knows(&record.event_type) {
                return Err(unknown());
            }
            let envelope = self.types.decode(&record)?.ok_or_else(unknown)?;
            // A type `types` knows (shared with other consumers) but not the aggregate's.
            let event =
                A::Event::from_envelope(&envelope).ok_or_else(|| AggregateError::ForeignEvent {
                    stream: Self::stream_id(&loaded.id),
                    version: loaded.version,
                    event_type: record.event_type.clone(),
                })?;
            loaded.state.apply_with(&event, &envelope);
        }
        Ok(loaded)
    }

    /// Loads the aggregate and lets it decide on `command`, without storing anything: returns
    /// the new state and the records to append at `ExpectedVersion::Exactly(version)`, for a
    /// caller that appends them in a unit of work of its own (a database transaction that also
    /// holds its read models). With `expected_version`, a stream at another version is a
    /// [`StoreError::Conflict`] before anything is decided.
    pub async fn decide(
        &self,
        id: &str,
        expected_version: Option<u64>,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Decided<A>, AggregateError<A::Error>> {
        let loaded = self.load(id).await?;
        Self::decide_on_at(loaded, expected_version, command, metadata, self.now())
    }

    /// Lets an already loaded aggregate decide on `command` (a caller that loaded it to check
    /// something first does not load it twice). No I/O: returns what [`decide`](Self::decide)
    /// returns. A new aggregate is `Loaded { id, state: A::default(), version: 0 }`. The
    /// events are stamped with the repository's clock ([`now`](Self::now)).
    pub fn decide_on(
        &self,
        loaded: Loaded<A>,
        expected_version: Option<u64>,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Decided<A>, AggregateError<A::Error>> {
        Self::decide_on_at(loaded, expected_version, command, metadata, self.now())
    }

    /// [`decide_on`](Self::decide_on), with the new events stamped at `at` instead of the
    /// repository's now, and without a repository: code that holds only a clock (a test's
    /// [`ManualClock`](crate::clock::ManualClock)) passes its `now()`, so the times its
    /// aggregates derive from their events follow that clock.
    pub fn decide_on_at(
        loaded: Loaded<A>,
        expected_version: Option<u64>,
        command: A::Command,
        metadata: &Metadata,
        at: DateTime<Utc>,
    ) -> Result<Decided<A>, AggregateError<A::Error>> {
        let Loaded {
            id,
            mut state,
            version,
        } = loaded;
        // A `Loaded` made by hand (a new aggregate) passed no load.
        Self::check_id(&id)?;
        let stream = Self::stream_id(&id);
        if let Some(expected) = expected_version
            && expected != version
        {
            return Err(StoreError::Conflict {
                stream,
                expected: ExpectedVersion::Exactly(expected),
                actual: version,
            }
            .into());
        }
        let events = state.decide(command).map_err(AggregateError::Rejected)?;
        let mut records = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            // As a load will see it: the principal stays in process and is not stored, so a
            // state (and its snapshot) that kept it would differ from the replayed one.
            let mut caused = metadata.caused_at(at);
            caused.principal = None;
            // Keyed by the stream (`order-42`), not the bare id: aggregates of two types that
            // share an id (`order-42`, `invoice-42`) are two chains to a transport, and one's
            // failing event holds up only its own.
            let envelope = event
                .clone()
                .into_envelope(caused)
                .with_partition_key(stream.as_str())
                .with_stored(stream.as_str(), version + 1 + i as u64, None);
            state.apply_with(&event, &envelope);
            let record =
                EventRecord::from_envelope(&envelope).map_err(|source| AggregateError::Encode {
                    event_type: envelope.name(),
                    stream: stream.clone(),
                    source,
                })?;
            records.push(record);
        }
        Ok(Decided {
            state,
            version,
            stream_id: stream,
            records,
        })
    }

    /// Loads the aggregate, lets it decide on `command`, and appends the events at the loaded
    /// version. With `expected_version`, a stream at another version is a
    /// [`StoreError::Conflict`] before anything is decided. Returns the new state and the
    /// stored records.
    ///
    /// The events' metadata is caused by `metadata`; their partition key is the stream's id
    /// (`{TYPE}-{id}`), so each aggregate's events are one chain to a transport, whatever
    /// other aggregate types share its id.
    ///
    /// It appends through the repository's own event store, in a transaction of its own: inside
    /// a handler running in a unit of work (`cqrs-postgres`'s command layer), the events then
    /// commit even if the handler fails afterwards, apart from the handler's other writes.
    /// There, use the unit of work's own `execute` (`cqrs-postgres`'s `PgUnitOfWork::execute`),
    /// or load and decide with the repository and stage the events on the unit of work (as the
    /// helpdesk's tickets plugin does), then, once it committed, call
    /// [`snapshot_decided`](Self::snapshot_decided) when the repository keeps snapshots.
    ///
    /// The events do not go through the command bus's
    /// [`event_sink`](crate::CommandBusBuilder::event_sink): they are stored already, and reach
    /// consumers through the store's relay. Do not record them on the handler's context as
    /// well, or a sink that stores them (an [`EventStoreSink`](crate::EventStoreSink)) keeps a
    /// second copy, with other ids.
    pub async fn execute(
        &self,
        id: &str,
        expected_version: Option<u64>,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Committed<A>, AggregateError<A::Error>> {
        let decided = self.decide(id, expected_version, command, metadata).await?;
        self.append_decided(decided).await
    }

    /// [`execute`](Self::execute) without an expected version that, when another writer
    /// appended first (a version conflict at the append), loads the aggregate again and lets
    /// it decide `command()` anew on what the other writer did, up to `attempts` times in all
    /// (at least once), each after a short jittered pause (a few milliseconds, longer for each
    /// attempt; a tokio timer, so the runtime needs its time driver: `enable_time` or
    /// `enable_all`), so writers that collided do not collide again at once. Of writers racing on
    /// one aggregate, each then decides on the others' effects: the loser of a race to spend
    /// the last of a balance gets the aggregate's refusal, not a version conflict. After
    /// `attempts` conflicts the last one is returned.
    ///
    /// For a command that may be decided on state its caller did not see: a client that
    /// pinned a version passes it to [`execute`](Self::execute) instead, and gets the conflict.
    ///
    /// ```
    /// # use cqrs_core::doc::{Ticket, TicketCommand};
    /// # use cqrs_core::memory::InMemoryEventStore;
    /// use cqrs_core::{AggregateRepository, Metadata};
    /// use std::sync::Arc;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let repo = AggregateRepository::<Ticket>::new(Arc::new(InMemoryEventStore::new()));
    /// let open = || TicketCommand::Open;
    /// let committed = repo.execute_retrying("t-1", open, &Metadata::new(), 10).await?;
    /// assert_eq!(committed.version, 1);
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn execute_retrying(
        &self,
        id: &str,
        command: impl Fn() -> A::Command,
        metadata: &Metadata,
        attempts: u32,
    ) -> Result<Committed<A>, AggregateError<A::Error>> {
        // The same steps with nothing to prepare: `execute`'s load, decide and append.
        // Moved in: a borrowed `command` held across the awaits would need to be `Sync`.
        let prepare = move |_: &Loaded<A>| std::future::ready(Ok(command()));
        self.execute_retrying_prepared(id, prepare, metadata, attempts)
            .await
    }

    /// [`execute_retrying`](Self::execute_retrying) for a command that needs I/O before the
    /// aggregate decides (a fraud check, a price from another service): on each attempt it
    /// loads the aggregate, awaits `prepare` on what it loaded for the command, lets the
    /// aggregate decide on it, and appends. A conflict at the append loads again and prepares
    /// again (the service is asked again, on the state the other writer left), up to
    /// `attempts` times in all. `decide` itself stays free of I/O, so the testing kit's
    /// `AggregateTest` tests it as before.
    ///
    /// `prepare`'s error (the service refused, or failed) ends the call as
    /// [`AggregateError::Rejected`], nothing appended and no retry: it is the aggregate's
    /// error type, into which a service's error converts with `?`. A service that is away
    /// comes back as `Rejected` too, holding what `prepare` returned: with `HandlerError` as
    /// the aggregate's error, its kind (`Unavailable`) tells an outage from a refusal, and
    /// survives the conversion into the handler's error. The future `prepare`
    /// returns owns what it needs: take what it reads of the loaded state before its `async`
    /// block.
    ///
    /// ```
    /// # use cqrs_core::doc::{Ticket, TicketCommand};
    /// # use cqrs_core::memory::InMemoryEventStore;
    /// use cqrs_core::{AggregateRepository, HandlerError, Metadata};
    /// use std::sync::Arc;
    ///
    /// /// A service with I/O of its own: may this principal open tickets?
    /// async fn may_open(actor: Option<String>) -> Result<(), HandlerError> {
    ///     match actor {
    ///         Some(_) => Ok(()),
    ///         None => Err(HandlerError::forbidden("sign in to open a ticket")),
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let repo = AggregateRepository::<Ticket>::new(Arc::new(InMemoryEventStore::new()));
    /// let metadata = Metadata::new().with_actor("user-1");
    /// let committed = repo
    ///     .execute_retrying_prepared(
    ///         "t-1",
    ///         |_loaded| {
    ///             let actor = metadata.actor.clone();
    ///             async move {
    ///                 may_open(actor).await?;
    ///                 Ok(TicketCommand::Open)
    ///             }
    ///         },
    ///         &metadata,
    ///         10,
    ///     )
    ///     .await?;
    /// assert_eq!(committed.version, 1);
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn execute_retrying_prepared<F, Fut>(
        &self,
        id: &str,
        prepare: F,
        metadata: &Metadata,
        attempts: u32,
    ) -> Result<Committed<A>, AggregateError<A::Error>>
    where
        F: Fn(&Loaded<A>) -> Fut,
        Fut: std::future::Future<Output = Result<A::Command, A::Error>>,
    {
        let mut attempt = 1;
        loop {
            let loaded = self.load(id).await?;
            let command = prepare(&loaded).await.map_err(AggregateError::Rejected)?;
            let decided = self.decide_on(loaded, None, command, metadata)?;
            match self.append_decided(decided).await {
                Err(AggregateError::Store(StoreError::Conflict { .. })) if attempt < attempts => {
                    // A few milliseconds, longer for each attempt, jittered so writers that
                    // collided do not collide again at once.
                    let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0] % 8);
                    let pause = std::time::Duration::from_millis(u64::from(attempt) + jitter);
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Appends what [`decide`](Self::decide) or [`decide_on`](Self::decide_on) returned, at the
    /// version it was decided at, and saves a snapshot when one is due.
    ///
    /// The snapshot is saved in a task of its own, waited for up to
    /// [`with_snapshot_wait`](Self::with_snapshot_wait); its failure or panic is logged, never
    /// returned: the events are stored, and a snapshot is only a shortcut. Outside a tokio
    /// runtime it is saved in place, without a bound; on a runtime without the time driver,
    /// it is not waited for.
    pub async fn append_decided(
        &self,
        decided: Decided<A>,
    ) -> Result<Committed<A>, AggregateError<A::Error>> {
        let Decided {
            state,
            version,
            records,
            stream_id: stream,
        } = decided;
        if records.is_empty() {
            return Ok(Committed {
                state,
                version,
                records,
            });
        }
        let stored = self
            .store
            .append(&stream, ExpectedVersion::Exactly(version), records)
            .await?;
        self.save_snapshot_if_due(&stream, version, &stored, &state)
            .await;
        Ok(Committed {
            state,
            version: version + stored.len() as u64,
            records: stored,
        })
    }
}

impl<A: Aggregate> AggregateRepository<A> {
    /// Saves a snapshot of `decided`'s state when one is due, after its records were stored
    /// by the caller (staged on a unit of work of its own, and committed): the repository
    /// saves snapshots on its own appends only, so with the events appended elsewhere its
    /// snapshots went stale and every load replayed a longer tail. Call it once the events
    /// are committed, never before (a snapshot of events that are not stored is passed over,
    /// but costs a save). Does nothing without snapshots or when nothing was decided; a
    /// failure is logged, as for [`append_decided`](Self::append_decided): a snapshot is only
    /// a shortcut.
    ///
    /// ```
    /// # use cqrs_core::doc::{Ticket, TicketCommand};
    /// # use cqrs_core::memory::{InMemoryEventStore, InMemorySnapshotStore};
    /// # use cqrs_core::ports::{EventStore, ExpectedVersion, SnapshotStore};
    /// use cqrs_core::{AggregateRepository, Metadata};
    /// use std::sync::Arc;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let (events, snapshots) = (Arc::new(InMemoryEventStore::new()), Arc::new(InMemorySnapshotStore::new()));
    /// let repo = AggregateRepository::<Ticket>::new(events.clone()).with_snapshots(snapshots.clone(), 1);
    /// let decided = repo.decide("t-1", None, TicketCommand::Open, &Metadata::new()).await?;
    /// // A unit of work of the caller's own stores the events (here, the store itself).
    /// let stream = decided.stream_id.clone();
    /// events.append(&stream, ExpectedVersion::Exactly(decided.version), decided.records.clone()).await?;
    /// repo.snapshot_decided(&decided).await;
    /// assert_eq!(snapshots.load(&stream).await?.map(|s| s.version), Some(1));
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn snapshot_decided(&self, decided: &Decided<A>) {
        self.save_snapshot_if_due(
            &decided.stream_id,
            decided.version,
            &decided.records,
            &decided.state,
        )
        .await;
    }

    /// Saves `state`, the stream's after `stored` (appended at `version`), when the stream
    /// crossed a multiple of the snapshot interval.
    async fn save_snapshot_if_due(
        &self,
        stream: &str,
        version: u64,
        stored: &[EventRecord],
        state: &A,
    ) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        let new_version = version + stored.len() as u64;
        if new_version / snapshots.every <= version / snapshots.every {
            return;
        }
        match (snapshots.encode)(state) {
            Ok(json) => {
                let mut snapshot = Snapshot::new(new_version, json);
                if let Some(last) = stored.last() {
                    snapshot = snapshot.with_last_event(last.event_id);
                }
                save_snapshot(snapshots, self.snapshot_wait, stream.to_owned(), snapshot).await;
            }
            Err(e) => {
                tracing::warn!(stream = %stream, error = %e, "could not encode a snapshot")
            }
        }
    }
}

/// Saves `snapshot` in a task of its own, waiting `wait` at most: its command has taken
/// effect (the events are stored), so neither a slow store nor the command being given up may
/// hold or undo that. A failure only costs longer loads: it is logged.
async fn save_snapshot<A>(
    snapshots: &SnapshotConfig<A>,
    wait: std::time::Duration,
    stream: String,
    snapshot: Snapshot,
) {
    use std::sync::atomic::Ordering;
    let in_flight = snapshots.in_flight.clone();
    if in_flight.fetch_add(1, Ordering::Relaxed) >= MOST_SAVES_IN_FLIGHT {
        in_flight.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(stream = %stream, "a snapshot is skipped: too many saves are still under way");
        return;
    }
    // Made now, and moved into the save: counted down however the save ends, a panic, or a
    // runtime shut down before the task was first polled (a captured value is dropped with
    // a future that never ran) included.
    let done = InFlight(in_flight);
    let save = {
        let (store, stream) = (snapshots.store.clone(), stream.clone());
        async move {
            let _done = done;
            if let Err(e) = store.save(&stream, snapshot).await {
                tracing::warn!(stream = %stream, error = %e, "could not save a snapshot");
            }
        }
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return save.await;
    };
    let task = runtime.spawn(save.in_current_span());
    if wait.is_zero() {
        // Not waited for: no timer to make.
        return;
    }
    // The timer made inside the guard: without tokio's time driver it panics as it is made;
    // the save then goes on, not waited for.
    let waited = crate::CatchUnwind::new(async move { tokio::time::timeout(wait, task).await });
    match waited.await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) if e.is_panic() => {
            let panic = crate::panic::into_message(e.into_panic());
            tracing::warn!(stream = %stream, panic = %panic, "the snapshot store panicked saving a snapshot");
        }
        // The runtime is shutting down: the save was cut off, which only costs longer loads.
        Ok(Ok(Err(_))) => {}
        Ok(Err(_)) => tracing::warn!(
            stream = %stream,
            wait = ?wait,
            "saving a snapshot takes longer than the command waits for it: it goes on without the command"
        ),
        Err(_) => {}
    }
}

/// A save under way, counted down when dropped.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The outcome of [`AggregateRepository::decide`]: nothing is stored yet.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Decided<A> {
    /// The state after the new events.
    pub state: A,
    /// The stream version the decision was made at: append at exactly this version.
    pub version: u64,
    /// The stream to append to.
    pub stream_id: String,
    /// The records to append (empty when the aggregate decided nothing).
    pub records: Vec<EventRecord>,
}

impl<A> Decided<A> {
    /// The stream's version once the records are appended: [`version`](Self::version) plus
    /// their count, what [`Committed::version`] says after an
    /// [`execute`](AggregateRepository::execute).
    ///
    /// ```
    /// # use cqrs_core::doc::{Ticket, TicketCommand};
    /// # use cqrs_core::memory::InMemoryEventStore;
    /// use cqrs_core::{AggregateRepository, Metadata};
    /// use std::sync::Arc;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let repo = AggregateRepository::<Ticket>::new(Arc::new(InMemoryEventStore::new()));
    /// let decided = repo.decide("t-1", None, TicketCommand::Open, &Metadata::new()).await?;
    /// assert_eq!((decided.version, decided.version_after()), (0, 1));
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn version_after(&self) -> u64 {
        self.version + self.records.len() as u64
    }
}

/// The outcome of [`AggregateRepository::execute`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Committed<A> {
    /// The state after the new events.
    pub state: A,
    /// The stream version after them.
    pub version: u64,
    /// The stored records (with versions and positions); empty when the aggregate decided
    /// nothing.
    pub records: Vec<EventRecord>,
}

impl<A> Committed<A> {
    /// The position of the last event stored, `None` when the aggregate decided nothing: what
    /// to wait for before reading a projection of it
    /// ([`ProjectionWatch::wait_for`](crate::projection::ProjectionWatch::wait_for)).
    pub fn position(&self) -> Option<Position> {
        self.records
            .iter()
            .filter_map(|record| record.position)
            .max()
    }
}
