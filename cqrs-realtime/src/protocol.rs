//! The wire protocol: JSON text frames from the client and from the server, error codes and
//! close codes. `docs/realtime.md` describes every frame with an example.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A frame a client sends.
///
/// ```
/// use cqrs_realtime::ClientFrame;
///
/// let frame = ClientFrame::parse(r#"{"type": "subscribe", "topic": "tickets", "since": "41"}"#)?;
/// assert_eq!(frame, ClientFrame::subscribe("tickets", Some("41")));
/// assert_eq!(ClientFrame::parse(r#"{"type": "ping"}"#)?, ClientFrame::Ping);
/// assert_eq!(
///     serde_json::to_string(&ClientFrame::unsubscribe("tickets")).unwrap(),
///     r#"{"type":"unsubscribe","topic":"tickets"}"#,
/// );
/// // Read, a frame is matched with `..`: later versions may add fields.
/// let ClientFrame::Subscribe { topic, since, .. } = frame else { unreachable!() };
/// assert_eq!((topic.as_str(), since.as_deref()), ("tickets", Some("41")));
/// # Ok::<_, cqrs_realtime::FrameError>(())
/// ```
///
/// Non-exhaustive, as are its frames' fields: the protocol may gain frames and fields (a
/// client of an older version leaves out what it does not know); a Rust client builds frames
/// with [`subscribe`](Self::subscribe) and [`unsubscribe`](Self::unsubscribe).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClientFrame {
    /// Subscribe to a topic; with `since`, first replay the events after that position.
    #[non_exhaustive]
    Subscribe {
        /// The topic.
        topic: String,
        /// The `position` of the last event the client has; the hub replays what came after.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
    },
    /// Stop receiving a topic.
    #[non_exhaustive]
    Unsubscribe {
        /// The topic.
        topic: String,
    },
    /// Ask for a `pong` (an application-level liveness check).
    Ping,
}

/// Why a client's text frame is not a [`ClientFrame`]. The hub answers it with an `error`
/// frame and keeps the connection open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FrameError {
    code: ErrorCode,
    message: String,
}

impl FrameError {
    /// [`ErrorCode::MalformedFrame`] or [`ErrorCode::UnknownType`].
    pub fn code(&self) -> ErrorCode {
        self.code
    }
}

impl ClientFrame {
    /// A `subscribe` frame for `topic`, replaying the events after `since` (the `position` of
    /// the last event the client has) first, when given.
    pub fn subscribe(topic: impl Into<String>, since: Option<&str>) -> Self {
        ClientFrame::Subscribe {
            topic: topic.into(),
            since: since.map(str::to_owned),
        }
    }

    /// An `unsubscribe` frame for `topic`.
    pub fn unsubscribe(topic: impl Into<String>) -> Self {
        ClientFrame::Unsubscribe {
            topic: topic.into(),
        }
    }

    /// The client frame in a text message.
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        let malformed = |message: String| FrameError {
            code: ErrorCode::MalformedFrame,
            message,
        };
        // An object, its keys checked for repeats on the way: JSON readers disagree on which
        // of two `type`s or `topic`s counts (serde_json keeps the last), so a proxy or log
        // could read another frame than the hub. Anything else is parsed again as a value,
        // for the messages below.
        let value = match serde_json::from_str::<UniqueKeys>(text) {
            Ok(UniqueKeys {
                map,
                repeated: None,
            }) => serde_json::Value::Object(map),
            Ok(UniqueKeys {
                repeated: Some(key),
                ..
            }) => {
                return Err(malformed(format!(
                    "the field `{}` appears twice: send each field once",
                    key.chars().take(64).collect::<String>()
                )));
            }
            Err(_) => serde_json::from_str(text).map_err(|e| malformed(not_json(&e)))?,
        };
        let Some(kind) = value.get("type") else {
            return Err(malformed(
                "the frame is not a JSON object with a string `type`".into(),
            ));
        };
        let Some(kind) = kind.as_str().map(str::to_owned) else {
            return Err(malformed("`type` must be a string".into()));
        };
        let fields: &[&str] = match kind.as_str() {
            "subscribe" => &["type", "topic", "since"],
            "unsubscribe" => &["type", "topic"],
            "ping" => &["type"],
            _ => {
                return Err(FrameError {
                    code: ErrorCode::UnknownType,
                    message: format!(
                        "unknown frame type `{}`: expected subscribe, unsubscribe or ping",
                        kind.chars().take(64).collect::<String>()
                    ),
                });
            }
        };
        // Unknown fields are refused, not ignored: a misspelled `since` would otherwise
        // subscribe without the replay, and the events missed while away would be lost.
        if let Some(unknown) = value
            .as_object()
            .and_then(|object| object.keys().find(|key| !fields.contains(&key.as_str())))
        {
            return Err(malformed(format!(
                "unknown field `{}` in a `{kind}` frame: expected {}",
                unknown.chars().take(64).collect::<String>(),
                fields.join(", ")
            )));
        }
        // `"since": null` would read as no `since` at all: a client whose last position was
        // lost by a bug would subscribe without its replay, and miss the gap silently.
        if value.get("since").is_some_and(serde_json::Value::is_null) {
            return Err(malformed(
                "`since` must be a position string; leave it out to subscribe without a replay"
                    .into(),
            ));
        }
        // serde's own message names neither the field nor a position ("invalid type: integer
        // `41`, expected a string"), and a position sent as a number is a likely slip.
        for (field, what) in [
            ("topic", "a topic name"),
            (
                "since",
                "the position string of the last event frame, as sent (`\"41\"`)",
            ),
        ] {
            if let Some(sent) = value.get(field).filter(|v| !v.is_string()) {
                return Err(malformed(format!(
                    "`{field}` must be {what}, not {}",
                    json_kind(sent)
                )));
            }
        }
        serde_json::from_value(value).map_err(|e| malformed(format!("invalid `{kind}` frame: {e}")))
    }
}

/// The kind of a JSON value, as a message names it.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        serde_json::Value::Null => "null",
        serde_json::Value::String(_) => "a string",
    }
}

/// A JSON object read with the first key it repeats, if any (`serde_json::Value` keeps the
/// last of two silently).
struct UniqueKeys {
    map: serde_json::Map<String, serde_json::Value>,
    repeated: Option<String>,
}

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = UniqueKeys;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut map = serde_json::Map::new();
                let mut repeated = None;
                while let Some(key) = access.next_key::<String>()? {
                    let value = access.next_value()?;
                    if map.contains_key(&key) {
                        repeated.get_or_insert(key);
                    } else {
                        map.insert(key, value);
                    }
                }
                Ok(UniqueKeys { map, repeated })
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// A frame the server sends.
///
/// `Event` frames are built once per topic and shared by every connection, so the hub writes
/// them itself; this type gives clients (and tests) a way to read them.
///
/// ```
/// use cqrs_realtime::ServerFrame;
///
/// let frame: ServerFrame = serde_json::from_str(
///     r#"{"type": "event", "topic": "tickets", "event": {"type": "TicketOpened"}, "position": "7"}"#,
/// ).unwrap();
/// let ServerFrame::Event { topic, position, .. } = frame else { panic!() };
/// assert_eq!((topic.as_str(), position.as_deref()), ("tickets", Some("7")));
/// assert_eq!(serde_json::to_string(&ServerFrame::Pong).unwrap(), r#"{"type":"pong"}"#);
///
/// // A frame a newer server sends, of a type this version does not know, still parses.
/// let newer: ServerFrame = serde_json::from_str(r#"{"type": "hello", "server": "v9"}"#).unwrap();
/// assert_eq!(newer, ServerFrame::Unknown);
/// ```
///
/// Non-exhaustive: later versions may add frame types (a client matches them with a wildcard
/// arm, and reads them as [`Unknown`](Self::Unknown) until it is built with that version), and
/// fields to its frames (a client matches them with `..`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerFrame {
    /// The subscription is live: every event published on the topic from now on is delivered.
    #[non_exhaustive]
    Subscribed {
        /// The topic.
        topic: String,
    },
    /// The subscription is gone.
    #[non_exhaustive]
    Unsubscribed {
        /// The topic.
        topic: String,
    },
    /// The answer to a `ping`.
    Pong,
    /// An event on a subscribed topic; one frame per matching subscription.
    #[non_exhaustive]
    Event {
        /// The subscription it is for.
        topic: String,
        /// The event object, shaped by the server ([`Routed::new`](crate::Routed::new)).
        event: serde_json::Value,
        /// The event's place in the durable log: pass it back as `since` to resume. Absent for
        /// events published without a store.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<String>,
    },
    /// A client frame was refused or could not be handled. The connection stays open.
    #[non_exhaustive]
    Error {
        /// One of [`ErrorCode`]'s names (a client should tolerate codes it does not know).
        code: String,
        /// For humans.
        message: String,
        /// The topic the error is about, when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
    },
    /// A frame of a type this version does not know (sent by a newer server): a client
    /// should pass over it. The hub never sends it.
    #[serde(other)]
    Unknown,
}

impl ServerFrame {
    /// A `subscribed` frame for `topic` (for a fake server in a client's tests, say: the
    /// frames are non-exhaustive, so built here).
    pub fn subscribed(topic: impl Into<String>) -> Self {
        ServerFrame::Subscribed {
            topic: topic.into(),
        }
    }

    /// An `unsubscribed` frame for `topic`.
    pub fn unsubscribed(topic: impl Into<String>) -> Self {
        ServerFrame::Unsubscribed {
            topic: topic.into(),
        }
    }

    /// An `event` frame: `event` on `topic`, at `position` in the durable log when it has one.
    ///
    /// ```
    /// use cqrs_realtime::ServerFrame;
    ///
    /// let frame = ServerFrame::event("tickets", serde_json::json!({"type": "TicketOpened"}), Some("7"));
    /// assert_eq!(
    ///     serde_json::to_value(&frame).unwrap(),
    ///     serde_json::json!({"type": "event", "topic": "tickets", "event": {"type": "TicketOpened"}, "position": "7"}),
    /// );
    /// ```
    pub fn event(
        topic: impl Into<String>,
        event: serde_json::Value,
        position: Option<&str>,
    ) -> Self {
        ServerFrame::Event {
            topic: topic.into(),
            event,
            position: position.map(str::to_owned),
        }
    }

    /// An `error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>, topic: Option<&str>) -> Self {
        ServerFrame::Error {
            code: code.as_str().to_owned(),
            message: message.into(),
            topic: topic.map(str::to_owned),
        }
    }

    pub(crate) fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: every key is a string.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The `code` of an `error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not JSON, not an object with a string `type`, or a known type with missing or
    /// mistyped fields.
    MalformedFrame,
    /// A `type` the hub does not know.
    UnknownType,
    /// A binary frame: the protocol is JSON text.
    BinaryFrame,
    /// The topic name is not well-formed ([`Topic`](crate::Topic)).
    InvalidTopic,
    /// A well-formed topic this server does not serve.
    UnknownTopic,
    /// The principal may not subscribe to this topic.
    Forbidden,
    /// The connection already has this subscription.
    AlreadySubscribed,
    /// `unsubscribe` for a topic the connection is not subscribed to.
    NotSubscribed,
    /// The connection has as many subscriptions as it may have.
    TooManySubscriptions,
    /// `since` was given, but the hub has no event store to replay from.
    ResumeUnavailable,
    /// `since` is not a position at all (not a whole number in canonical form). A well-formed
    /// position is not checked against the log: one past its end gets
    /// [`ResumeFailed`](Self::ResumeFailed), and one from another log is taken as it is.
    InvalidPosition,
    /// The replay could not close the gap (the store failed, or the gap is longer than the
    /// replay limit). The subscription is live, but events between `since` and now may be
    /// missing: reload the state another way.
    ResumeFailed,
    /// The principal started more subscriptions with `since` than
    /// [`resumes_per_minute`](crate::HubOptions::resumes_per_minute) allows: subscribe without
    /// `since` (and reload the state another way), or wait.
    TooManyResumes,
    /// The connection sent more `subscribe` and `unsubscribe` frames than
    /// [`subscription_changes_per_second`](crate::HubOptions::subscription_changes_per_second)
    /// allows: this one was ignored; wait, then send it again.
    TooManySubscriptionChanges,
    /// A backend (the pub/sub, the authorizer's) failed or timed out, or a `since` found the
    /// hub's [`max_concurrent_replays`](crate::HubOptions::max_concurrent_replays) busy for
    /// the whole [`operation_timeout`](crate::HubOptions::operation_timeout); try again.
    Unavailable,
    /// An event on a subscribed topic is larger than the hub sends (its frame would not fit
    /// the write buffer, [`max_write_buffer_size`](crate::HubOptions::max_write_buffer_size)):
    /// it is not delivered, and this frame, naming the topic and the event's position, takes
    /// its place. The subscription stays live; fetch the event another way.
    EventTooLarge,
    /// The hub may have missed live events on the named topic: it fell behind the pub/sub,
    /// or the pub/sub lost messages (a reconnect). The subscription stays open, but events
    /// may be missing from it: to close the gap, `unsubscribe` and `subscribe` again with
    /// `since` set to the last position received (or reload the state another way).
    EventsMissed,
}

/// `ErrorCode`'s wire names, one line a code: `as_str`, whose match is exhaustive (a new
/// variant fails to compile until it has its line), `FromStr`, and the list the tests walk are
/// all made of it, so they cannot disagree.
macro_rules! error_code_names {
    ($($variant:ident => $name:literal,)*) => {
        impl ErrorCode {
            /// The snake_case name sent on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $name,)*
                }
            }
        }

        /// Reads the `code` of an `error` frame back into an [`ErrorCode`], for a Rust client
        /// to match on; a code this version does not know (a newer server's) is an
        /// [`UnknownErrorCode`], which a client should treat as an error it cannot act on.
        ///
        /// ```
        /// use cqrs_realtime::{ErrorCode, ServerFrame};
        ///
        /// let frame: ServerFrame = serde_json::from_str(
        ///     r#"{"type": "error", "code": "events_missed", "message": "...", "topic": "tickets"}"#,
        /// ).unwrap();
        /// let ServerFrame::Error { code, .. } = frame else { panic!() };
        /// assert_eq!(code.parse::<ErrorCode>(), Ok(ErrorCode::EventsMissed));
        /// assert!("a_newer_code".parse::<ErrorCode>().is_err());
        /// ```
        impl std::str::FromStr for ErrorCode {
            type Err = UnknownErrorCode;

            fn from_str(code: &str) -> Result<Self, UnknownErrorCode> {
                match code {
                    $($name => Ok(ErrorCode::$variant),)*
                    _ => Err(UnknownErrorCode(code.to_owned())),
                }
            }
        }

        /// Every code.
        #[cfg(test)]
        const ERROR_CODES: &[ErrorCode] = &[$(ErrorCode::$variant,)*];
    };
}

error_code_names! {
    MalformedFrame => "malformed_frame",
    UnknownType => "unknown_type",
    BinaryFrame => "binary_frame",
    InvalidTopic => "invalid_topic",
    UnknownTopic => "unknown_topic",
    Forbidden => "forbidden",
    AlreadySubscribed => "already_subscribed",
    NotSubscribed => "not_subscribed",
    TooManySubscriptions => "too_many_subscriptions",
    ResumeUnavailable => "resume_unavailable",
    InvalidPosition => "invalid_position",
    ResumeFailed => "resume_failed",
    TooManyResumes => "too_many_resumes",
    TooManySubscriptionChanges => "too_many_subscription_changes",
    Unavailable => "unavailable",
    EventTooLarge => "event_too_large",
    EventsMissed => "events_missed",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `error` frame's code this version does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown realtime error code `{0}`")]
pub struct UnknownErrorCode(pub String);

/// The WebSocket close codes the hub sends.
pub mod close_code {
    /// 1000: the connection was idle for longer than the idle timeout.
    pub const NORMAL: u16 = 1000;
    /// 1001: the server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: the client broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1007: a text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// 1008: the client was too slow to take its events (its send queue filled up), or its
    /// credentials expired ([`Authenticator::expires_at`](crate::Authenticator::expires_at)).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// 1009: a client frame or message was larger than the configured limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// 1011: the server failed while handling the client's frame (a hook panicked).
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// Why `text` is no JSON value, with what the parser says in its own words (its recursion
/// limit, a `\u` escape of half a surrogate pair) said in the protocol's, its position kept.
fn not_json(error: &serde_json::Error) -> String {
    let said = error.to_string();
    let at = said.find(" at line ").map_or("", |i| &said[i..]);
    let why = if said.starts_with("recursion limit exceeded") {
        "the frame nests arrays or objects more than 127 deep"
    } else if said.starts_with("unexpected end of hex escape")
        || said.starts_with("lone leading surrogate in hex escape")
    {
        "a string holds half a surrogate pair (a `\\u` escape from D800 to DFFF without its \
         other half), which is no text"
    } else {
        return format!("the frame is not valid JSON: {said}");
    };
    format!("the frame is not valid JSON: {why}{at}")
}

#[cfg(test)]
mod tests {
    use super::{ClientFrame, ErrorCode};

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let refused = ClientFrame::parse(r#"{"type":"subscribe","topic":"tickets","sinse":"41"}"#)
            .unwrap_err();
        assert_eq!(refused.code(), ErrorCode::MalformedFrame);
        assert!(refused.to_string().contains("`sinse`"), "{refused}");
        assert!(refused.to_string().contains("topic, since"), "{refused}");
        assert!(ClientFrame::parse(r#"{"type":"ping","x":1}"#).is_err());
        assert!(ClientFrame::parse(r#"{"type":"unsubscribe","topic":"t","since":"1"}"#).is_err());
        assert_eq!(
            ClientFrame::parse(r#"{"type":"subscribe","topic":"t","since":"1"}"#).unwrap(),
            ClientFrame::Subscribe {
                topic: "t".into(),
                since: Some("1".into())
            }
        );
    }

    /// A field of the wrong kind is named, with what it must be: serde's message named
    /// neither ("invalid type: integer `41`, expected a string").
    #[test]
    fn a_field_of_the_wrong_kind_is_named() {
        for (frame, says) in [
            (
                r#"{"type":"subscribe","topic":"tickets","since":41}"#,
                "`since` must be the position string of the last event frame, as sent (`\"41\"`), not a number",
            ),
            (
                r#"{"type":"subscribe","topic":["tickets"]}"#,
                "`topic` must be a topic name, not an array",
            ),
            (
                r#"{"type":"unsubscribe","topic":null}"#,
                "`topic` must be a topic name, not null",
            ),
        ] {
            let refused = ClientFrame::parse(frame).unwrap_err();
            assert_eq!(refused.code(), ErrorCode::MalformedFrame);
            assert_eq!(refused.to_string(), says, "{frame}");
        }
    }

    /// A field sent twice was taken from its last copy (serde_json's choice; other readers
    /// take the first): `{"type":"ping","type":"subscribe",...}` subscribed. Refused, naming
    /// the field; what is not an object keeps its own message.
    #[test]
    fn a_repeated_field_is_refused() {
        for frame in [
            r#"{"type":"ping","type":"subscribe","topic":"x"}"#,
            r#"{"type":"subscribe","topic":"a","topic":"b"}"#,
            r#"{"type":"subscribe","topic":"a","since":"1","since":"2"}"#,
        ] {
            let refused = ClientFrame::parse(frame).unwrap_err();
            assert_eq!(refused.code(), ErrorCode::MalformedFrame, "{frame}");
            assert!(
                refused.to_string().contains("appears twice"),
                "{frame}: {refused}"
            );
        }
        // What the parser says in its own words is said in the protocol's.
        let deep = format!("{}{}", "[".repeat(128), "]".repeat(128));
        let deepest = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert!(
            !ClientFrame::parse(&deepest)
                .unwrap_err()
                .to_string()
                .contains("deep"),
            "127 levels are JSON the parser reads"
        );
        for (frame, says) in [
            (deep.as_str(), "nests arrays or objects more than 127 deep"),
            (r#"{"type":"ping","x":"\ud800"}"#, "half a surrogate pair"),
            (r#"{"type":"ping","x":"\udc00"}"#, "half a surrogate pair"),
        ] {
            let refused = ClientFrame::parse(frame).unwrap_err();
            assert_eq!(refused.code(), ErrorCode::MalformedFrame, "{frame}");
            let message = refused.to_string();
            assert!(
                message.starts_with("the frame is not valid JSON: ")
                    && message.contains(says)
                    && message.contains(" at line 1 column "),
                "{message}"
            );
        }
        let not_json = ClientFrame::parse("{").unwrap_err();
        assert!(
            not_json
                .to_string()
                .starts_with("the frame is not valid JSON"),
            "{not_json}"
        );
        let not_an_object = ClientFrame::parse("[1]").unwrap_err();
        assert!(
            not_an_object.to_string().contains("not a JSON object"),
            "{not_an_object}"
        );
    }
}

#[cfg(test)]
mod error_code_tests {
    use super::{ERROR_CODES, ErrorCode};

    /// Each code reads back as itself, and no two share a name.
    #[test]
    fn every_code_reads_back_as_itself() {
        for &code in ERROR_CODES {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
        let mut names: Vec<&str> = ERROR_CODES.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ERROR_CODES.len());
    }
}
