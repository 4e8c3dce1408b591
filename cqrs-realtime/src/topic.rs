//! Topic names: what clients subscribe to.

use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// The longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;

/// A topic a client subscribes to, such as `tickets` or `ticket:0190f3e2-...`.
///
/// A topic is `family` or `family:key`. The family names a kind of topic (`tickets`,
/// `ticket`); the key, when there is one, picks one thing of that kind (a ticket id). Which
/// topics exist, and which pub/sub channel carries each, is the server's choice
/// ([`EventRouting`](crate::EventRouting)); this type only checks that the name is
/// well-formed: 1 to [`MAX_TOPIC_LEN`] bytes of ASCII letters, digits and `_ - . : @ /`, with
/// a non-empty family and, after a `:`, a non-empty key (`ticket:` would hand an authorizer
/// that matches `Some(key)` an empty one).
///
/// Cloning is cheap (the name is shared).
///
/// ```
/// use cqrs_realtime::Topic;
///
/// let topic = Topic::parse("ticket:42")?;
/// assert_eq!(topic.family(), "ticket");
/// assert_eq!(topic.key(), Some("42"));
/// assert_eq!(Topic::with_key("ticket", "42")?, topic);
/// assert_eq!(Topic::parse("tickets")?.key(), None);
/// assert!(Topic::parse("").is_err());
/// assert!(Topic::parse("ticket 42").is_err());
/// assert!(Topic::parse("ticket:").is_err());
/// # Ok::<_, cqrs_realtime::InvalidTopic>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Topic(Arc<str>);

/// A string that is not a well-formed [`Topic`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{shown}` is not a topic: {why}")]
pub struct InvalidTopic {
    shown: String,
    why: &'static str,
}

impl InvalidTopic {
    fn new(name: &str, why: &'static str) -> Self {
        Self {
            shown: cut_for_json(name, SHOWN_LEN).to_owned(),
            why,
        }
    }
}

/// The most bytes of an invalid name an [`InvalidTopic`] shows, as JSON writes them.
const SHOWN_LEN: usize = 128;

/// The longest start of `text` that JSON writes in at most `max` bytes (a control character
/// takes six, `\u0001`; a quote or a backslash two), cut between characters. What the hub
/// echoes of a client's input must fit its write buffer once escaped, not only as sent.
pub(crate) fn cut_for_json(text: &str, max: usize) -> &str {
    let mut written = 0;
    for (at, c) in text.char_indices() {
        written += match c {
            '"' | '\\' => 2,
            c if c.is_control() => 6,
            c => c.len_utf8(),
        };
        if written > max {
            return &text[..at];
        }
    }
    text
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '/')
}

impl Topic {
    /// Checks and wraps a topic name.
    pub fn parse(name: &str) -> Result<Self, InvalidTopic> {
        if name.is_empty() {
            return Err(InvalidTopic::new(name, "it is empty"));
        }
        if name.len() > MAX_TOPIC_LEN {
            return Err(InvalidTopic::new(name, "it is longer than 200 bytes"));
        }
        if !name.chars().all(allowed) {
            return Err(InvalidTopic::new(
                name,
                "only ASCII letters, digits and `_ - . : @ /` are allowed",
            ));
        }
        if name.starts_with(':') {
            return Err(InvalidTopic::new(name, "its family (before `:`) is empty"));
        }
        if name.ends_with(':') && name.matches(':').count() == 1 {
            return Err(InvalidTopic::new(name, "its key (after `:`) is empty"));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The topic `family:key`.
    pub fn with_key(family: &str, key: impl fmt::Display) -> Result<Self, InvalidTopic> {
        Self::parse(&format!("{family}:{key}"))
    }

    /// The whole name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:` (the whole name when there is none).
    pub fn family(&self) -> &str {
        self.0
            .split_once(':')
            .map_or(&*self.0, |(family, _)| family)
    }

    /// The part after the first `:`, if any.
    pub fn key(&self) -> Option<&str> {
        self.0.split_once(':').map(|(_, key)| key)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Topic {
    type Err = InvalidTopic;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Topic {
    type Error = InvalidTopic;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl TryFrom<&str> for Topic {
    type Error = InvalidTopic;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<Topic> for String {
    fn from(topic: Topic) -> Self {
        topic.0.to_string()
    }
}
