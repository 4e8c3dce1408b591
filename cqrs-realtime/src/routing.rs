//! How a server's events map to topics, channels, the pushed JSON and the routing fields that
//! authorization reads.

use crate::Topic;
use cqrs_core::{EventRecord, Position};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::fmt;

/// The server's mapping from its events to the realtime protocol. The hub uses it for live
/// events and for replays, and the [`Publisher`](crate::Publisher) uses it to publish, so one
/// implementation serves both sides.
///
/// ```
/// use cqrs_core::EventRecord;
/// use cqrs_realtime::{EventRouting, Routed, Topic};
///
/// /// `tickets` (every ticket event) and `ticket:<id>` (one ticket), both on channel `tickets`.
/// struct TicketRouting;
///
/// impl EventRouting for TicketRouting {
///     fn channel(&self, topic: &Topic) -> Option<String> {
///         match (topic.family(), topic.key()) {
///             ("tickets", None) | ("ticket", Some(_)) => Some("tickets".into()),
///             _ => None,
///         }
///     }
///
///     fn route(&self, record: &EventRecord) -> Option<Routed> {
///         // The ticket events alone, by type: the log carries every event, and another type
///         // with a `ticket_id` must not be pushed with whatever else it holds.
///         if !record.event_type.starts_with("Ticket") {
///             return None;
///         }
///         let ticket_id = record.payload.get("ticket_id")?.as_str()?;
///         Some(
///             Routed::new(serde_json::json!({
///                 "event_id": record.event_id,
///                 "type": record.event_type,
///                 "ticket_id": ticket_id,
///                 "data": record.payload,
///             }))
///             .topic(Topic::parse("tickets").ok()?)
///             .topic(Topic::with_key("ticket", ticket_id).ok()?)
///             .routing("reporter_id", record.payload.get("reporter_id").cloned().unwrap_or_default()),
///         )
///     }
/// }
/// # let _ = TicketRouting;
/// ```
pub trait EventRouting: Send + Sync + 'static {
    /// The pub/sub channel that carries `topic`, or `None` when the server does not serve it
    /// (the client gets `unknown_topic`).
    ///
    /// Channels should be coarse, one per topic family or per kind of aggregate (`tickets` for
    /// `tickets` and every `ticket:<id>`): a hub holds one upstream subscription per channel
    /// it needs, whatever the number of topics and connections.
    fn channel(&self, topic: &Topic) -> Option<String>;

    /// How `record` is pushed: its topics, the `event` object clients receive, and the
    /// routing fields [`Authorizer::may_see`](crate::Authorizer::may_see) decides on. `None`
    /// means the event is not pushed.
    ///
    /// Called once per published event, and once per stored event a replay reads: keep it a
    /// pure function of the record.
    fn route(&self, record: &EventRecord) -> Option<Routed>;
}

/// What [`EventRouting::route`] makes of an event.
#[derive(Clone, Debug, PartialEq)]
pub struct Routed {
    topics: Vec<Topic>,
    event: Value,
    routing: Map<String, Value>,
}

impl Routed {
    /// Pushes `event` (the `event` object of the frames) to no topic yet.
    pub fn new(event: Value) -> Self {
        Self {
            topics: Vec::new(),
            event,
            routing: Map::new(),
        }
    }

    /// Adds a topic the event is pushed on.
    pub fn topic(mut self, topic: Topic) -> Self {
        if !self.topics.contains(&topic) {
            self.topics.push(topic);
        }
        self
    }

    /// Adds a routing field: a value authorization decides on (the reporter's id, a tenant).
    /// Routing fields travel with the event through the pub/sub but are not sent to clients.
    pub fn routing(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.routing.insert(name.to_owned(), value.into());
        self
    }

    /// The topics.
    pub fn topics(&self) -> &[Topic] {
        &self.topics
    }

    /// Keeps the topics `keep` says yes to.
    pub(crate) fn retain_topics(&mut self, keep: impl FnMut(&Topic) -> bool) {
        self.topics.retain(keep);
    }
}

/// An event as the hub pushes it: what the authorizer sees for each subscriber.
///
/// ```
/// use cqrs_core::Position;
/// use cqrs_realtime::{PushedEvent, Routed, Topic};
///
/// let routed = Routed::new(serde_json::json!({"type": "TicketOpened"}))
///     .topic(Topic::parse("tickets").unwrap())
///     .routing("reporter_id", "u1");
/// let event = PushedEvent::new(routed, Some(Position::new(7))).unwrap();
/// assert_eq!(event.routing_str("reporter_id"), Some("u1"));
/// assert_eq!(event.position(), Some(Position::new(7)));
/// assert_eq!(event.event_json(), r#"{"type":"TicketOpened"}"#);
/// ```
pub struct PushedEvent {
    topics: Vec<Topic>,
    position: Option<Position>,
    routing: Map<String, Value>,
    event: Box<RawValue>,
}

impl fmt::Debug for PushedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushedEvent")
            .field("topics", &self.topics)
            .field("position", &self.position)
            .field("routing", &self.routing)
            .finish_non_exhaustive()
    }
}

impl PushedEvent {
    /// The pushed form of a routed event at `position`.
    pub fn new(routed: Routed, position: Option<Position>) -> Result<Self, serde_json::Error> {
        Ok(Self {
            topics: routed.topics,
            // `Position::START` is no event's (hubs refuse it): pushed without a position.
            position: position.filter(|p| *p != Position::START),
            routing: routed.routing,
            event: serde_json::value::to_raw_value(&routed.event)?,
        })
    }

    /// The topics it is pushed on.
    pub fn topics(&self) -> &[Topic] {
        &self.topics
    }

    /// Its position in the durable log, when it was stored.
    pub fn position(&self) -> Option<Position> {
        self.position
    }

    /// The routing fields.
    pub fn routing(&self) -> &Map<String, Value> {
        &self.routing
    }

    /// One routing field, when it is a string.
    pub fn routing_str(&self, name: &str) -> Option<&str> {
        self.routing.get(name).and_then(Value::as_str)
    }

    /// The `event` object clients receive, as JSON text.
    pub fn event_json(&self) -> &str {
        self.event.get()
    }

    pub(crate) fn event_raw(&self) -> &RawValue {
        &self.event
    }

    /// The message published on a channel: this event restricted to `topics`.
    pub(crate) fn encode(&self, topics: &[&Topic]) -> Result<String, serde_json::Error> {
        serde_json::to_string(&WireEvent {
            v: WIRE_VERSION,
            topics: topics.iter().map(|t| t.as_str()).collect(),
            position: self.position.map(|p| p.to_string()),
            routing: &self.routing,
            event: &self.event,
        })
    }

    /// A message from a channel. Topics that are not well-formed are dropped, and so is a
    /// topic named again (its subscribers would get the event twice).
    pub(crate) fn decode(payload: &str) -> Result<Self, DecodeError> {
        let wire: WireEventOwned = serde_json::from_str(payload).map_err(DecodeError::Json)?;
        if wire.v != WIRE_VERSION {
            return Err(DecodeError::Version(wire.v));
        }
        // `0` is `Position::START`, before the first event: no stored event has it, and every
        // subscription would drop it as one already sent, without a word. Refused, the
        // subscriptions of its channel are told they may have missed an event.
        let position = match wire.position {
            Some(p) => Some(
                p.parse()
                    .ok()
                    .filter(|p| *p != Position::START)
                    .ok_or_else(|| DecodeError::Position(p.clone()))?,
            ),
            None => None,
        };
        let mut topics: Vec<Topic> = Vec::with_capacity(wire.topics.len());
        for topic in wire.topics.iter().filter_map(|t| Topic::parse(t).ok()) {
            // A handful of topics per event: a linear check costs less than a set.
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        Ok(Self {
            topics,
            position,
            routing: wire.routing,
            event: wire.event,
        })
    }
}

/// The version of the channel message format, so a newer publisher's messages are refused
/// instead of misread.
const WIRE_VERSION: u32 = 1;

#[derive(Serialize)]
struct WireEvent<'a> {
    v: u32,
    topics: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<String>,
    routing: &'a Map<String, Value>,
    event: &'a RawValue,
}

#[derive(Deserialize)]
struct WireEventOwned {
    v: u32,
    topics: Vec<String>,
    #[serde(default)]
    position: Option<String>,
    #[serde(default)]
    routing: Map<String, Value>,
    event: Box<RawValue>,
}

/// A channel message the hub could not read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("not a realtime event message: {0}")]
    Json(#[source] serde_json::Error),
    #[error(
        "unsupported realtime message version {0} (this hub reads version {WIRE_VERSION}): run the same cqrs-realtime release on every instance that shares the channels"
    )]
    Version(u32),
    #[error("the message's position `{0}` is not a position the event store issued")]
    Position(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Position 0 is the start of the log, before any event: a message with it is refused,
    /// as a position no store issued, not taken and then dropped by every subscription as
    /// one they had already.
    #[test]
    fn a_channel_message_at_position_zero_is_refused() {
        let error =
            PushedEvent::decode(r#"{"v":1,"topics":[],"position":"0","routing":{},"event":{}}"#)
                .expect_err("position 0");
        assert!(
            matches!(error, DecodeError::Position(ref p) if p == "0"),
            "{error}"
        );
        assert!(
            PushedEvent::decode(r#"{"v":1,"topics":[],"position":"1","routing":{},"event":{}}"#)
                .is_ok()
        );
        // Nor does a publisher send it: an event at `START` goes without a position.
        let at_start =
            PushedEvent::new(Routed::new(serde_json::json!({})), Some(Position::START)).unwrap();
        assert_eq!(at_start.position(), None);
        let sent = PushedEvent::decode(&at_start.encode(&[]).unwrap()).unwrap();
        assert_eq!(sent.position(), None);
    }

    #[test]
    fn an_undecodable_channel_message_says_what_was_wrong() {
        let error =
            PushedEvent::decode(r#"{"v":1,"topics":[],"position":"x7","routing":{},"event":{}}"#)
                .expect_err("a bad position");
        assert!(error.to_string().contains("`x7`"), "{error}");
        let error = PushedEvent::decode(r#"{"v":9,"topics":[],"routing":{},"event":{}}"#)
            .expect_err("a newer version");
        let text = error.to_string();
        assert!(
            text.contains("version 9") && text.contains("reads version 1"),
            "{text}"
        );
    }

    /// A message naming a topic twice (a publisher's bug) pushes the event once per topic.
    #[test]
    fn a_topic_named_twice_in_a_message_is_read_once() {
        let event = PushedEvent::decode(
            r#"{"v":1,"topics":["t","u","t","bad topic","u"],"routing":{},"event":{}}"#,
        )
        .unwrap();
        let names: Vec<&str> = event.topics().iter().map(Topic::as_str).collect();
        assert_eq!(names, ["t", "u"]);
    }
}
