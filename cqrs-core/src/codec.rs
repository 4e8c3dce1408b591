//! Turning stored records back into typed events: decoders by wire name, upcasters for old
//! schema versions, and a policy for event types this build does not know.

use crate::{AnyEvent, Event, EventEnvelope, EventRecord};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

type Decoder = fn(serde_json::Value) -> Result<Arc<dyn AnyEvent>, serde_json::Error>;
type Upcaster = Arc<dyn Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync>;

fn decode_as<E: Event>(payload: serde_json::Value) -> Result<Arc<dyn AnyEvent>, serde_json::Error> {
    Ok(Arc::new(serde_json::from_value::<E>(payload)?))
}

/// What to do with an event whose type this build does not know, such as one written by a
/// newer instance during a rolling deploy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownEventPolicy {
    /// Skip it, log a warning and count it in the `cqrs_events_unknown_total` metric
    /// (label `event_type`). The consumer moves on.
    #[default]
    Skip,
    /// Fail with [`DecodeError::UnknownType`]; the consumer stops at this event (and retries it)
    /// until a build that knows it is deployed.
    Fail,
}

/// Why a record could not be turned into a typed event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// No type with this wire name is registered (and the policy is `Fail`).
    #[error(
        "unknown event type `{event_type}` (schema version {schema_version}); register it with EventTypes::register, or deploy the build that knows it"
    )]
    UnknownType {
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
    /// No upcaster takes the record's old version to the next one.
    #[error(
        "event `{event_type}` has schema version {found} and no upcaster from it is registered; register one with `EventTypes::upcaster(\"{event_type}\", {found}, ..)`"
    )]
    MissingUpcaster {
        /// The wire name.
        event_type: String,
        /// The version with no upcaster.
        found: u32,
    },
    /// An upcaster failed.
    #[error("upcasting event `{event_type}` from schema version {from} failed: {message}")]
    Upcast {
        /// The wire name.
        event_type: String,
        /// The version it started from.
        from: u32,
        /// What the upcaster said.
        message: String,
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

struct Entry {
    current: u32,
    decode: Decoder,
}

/// The event types a process knows, by wire name, with upcasters for old schema versions.
///
/// ```
/// use cqrs_core::{Event, EventRecord, EventTypes, Message, RecordMetadata, Metadata};
/// use serde::{Deserialize, Serialize};
/// use serde_json::json;
///
/// // Version 2 renamed `text` to `body`.
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// struct Commented { body: String }
/// impl Message for Commented { const NAME: &'static str = "Commented"; }
/// impl Event for Commented { const VERSION: u32 = 2; }
///
/// let mut types = EventTypes::new();
/// types.register::<Commented>();
/// types.upcaster("Commented", 1, |mut v| {
///     let text = v["text"].take();
///     Ok(json!({ "body": text }))
/// });
///
/// let old = EventRecord::new(uuid::Uuid::now_v7(), "Commented", 1, json!({"text": "hi"}),
///     RecordMetadata::from_metadata(&Metadata::new()));
/// let envelope = types.decode(&old).unwrap().expect("a known type");
/// assert_eq!(envelope.downcast_ref::<Commented>().unwrap().body, "hi");
/// ```
#[derive(Default)]
pub struct EventTypes {
    entries: HashMap<String, Entry>,
    upcasters: HashMap<(String, u32), Upcaster>,
    policy: UnknownEventPolicy,
}

impl fmt::Debug for EventTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventTypes")
            .field("types", &self.entries.keys().collect::<Vec<_>>())
            .field("upcasters", &self.upcasters.len())
            .field("policy", &self.policy)
            .finish()
    }
}

impl EventTypes {
    /// No types; unknown events are skipped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers event type `E` under its wire name. Registering it twice is harmless.
    pub fn register<E: Event>(&mut self) -> &mut Self {
        self.entries.insert(
            E::NAME.to_owned(),
            Entry {
                current: E::VERSION,
                decode: decode_as::<E>,
            },
        );
        self
    }

    /// Registers a function that turns a payload of schema version `from` of `event_type` into
    /// version `from + 1`. Chains run until the registered type's version.
    pub fn upcaster<F>(&mut self, event_type: &str, from: u32, upcast: F) -> &mut Self
    where
        F: Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync + 'static,
    {
        self.upcasters
            .insert((event_type.to_owned(), from), Arc::new(upcast));
        self
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

    /// Whether a type with this wire name is registered.
    pub fn knows(&self, event_type: &str) -> bool {
        self.entries.contains_key(event_type)
    }

    /// Decodes a record into an envelope, upcasting old versions. `Ok(None)` is an unknown type
    /// skipped under [`UnknownEventPolicy::Skip`].
    pub fn decode(&self, record: &EventRecord) -> Result<Option<EventEnvelope>, DecodeError> {
        let Some(entry) = self.entries.get(&record.event_type) else {
            return match self.policy {
                UnknownEventPolicy::Skip => {
                    tracing::warn!(
                        event_type = %record.event_type,
                        event_id = %record.event_id,
                        "skipping an event of a type this build does not know"
                    );
                    metrics::counter!("cqrs_events_unknown_total", "event_type" => crate::record::bounded_label(&record.event_type)).increment(1);
                    Ok(None)
                }
                UnknownEventPolicy::Fail => Err(DecodeError::UnknownType {
                    event_type: record.event_type.clone(),
                    schema_version: record.schema_version,
                }),
            };
        };
        if record.schema_version > entry.current {
            return Err(DecodeError::FutureVersion {
                event_type: record.event_type.clone(),
                found: record.schema_version,
                current: entry.current,
            });
        }
        let mut payload = record.payload.clone();
        let mut version = record.schema_version;
        while version < entry.current {
            let upcast = self
                .upcasters
                .get(&(record.event_type.clone(), version))
                .ok_or_else(|| DecodeError::MissingUpcaster {
                    event_type: record.event_type.clone(),
                    found: version,
                })?;
            payload = upcast(payload).map_err(|message| DecodeError::Upcast {
                event_type: record.event_type.clone(),
                from: version,
                message,
            })?;
            version += 1;
        }
        let event = (entry.decode)(payload).map_err(|source| DecodeError::Payload {
            event_type: record.event_type.clone(),
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
