//! The ticket aggregate, its events, and the view it folds into.

use chrono::{DateTime, Utc};
use cqrs_core::{Aggregate, Event, HandlerError, event_set};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

/// A ticket's priority: `"low"`, `"normal"`, `"high"` or `"urgent"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Low.
    Low,
    /// The default.
    #[default]
    Normal,
    /// High.
    High,
    /// Urgent.
    Urgent,
}

/// A ticket's status: `"open"`, `"assigned"` or `"closed"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not assigned yet.
    #[default]
    Open,
    /// An agent has it.
    Assigned,
    /// Done; no more changes.
    Closed,
}

// Read from a string, and only from one: serde's derived form also takes a one-key object
// (`{"low": null}`), which no client means, and says "expected unit" of anything else in it.
impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        one_of(
            deserializer,
            &["low", "normal", "high", "urgent"],
            [Self::Low, Self::Normal, Self::High, Self::Urgent],
        )
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        one_of(
            deserializer,
            &["open", "assigned", "closed"],
            [Self::Open, Self::Assigned, Self::Closed],
        )
    }
}

/// The value of the word the string in `deserializer` is: `values[i]` for `words[i]`.
fn one_of<'de, D: Deserializer<'de>, T: Copy, const N: usize>(
    deserializer: D,
    words: &'static [&'static str; N],
    values: [T; N],
) -> Result<T, D::Error> {
    let word = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
    match words.iter().position(|w| *w == word) {
        Some(i) => Ok(values[i]),
        None => Err(serde::de::Error::unknown_variant(&word, words)),
    }
}

/// A ticket was opened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[cqrs(name = "TicketOpened")]
pub struct TicketOpened {
    /// The ticket.
    pub ticket_id: Uuid,
    /// Who reported it (every ticket event carries it, so realtime can authorize from the
    /// event alone).
    pub reporter_id: Uuid,
    /// The title, trimmed.
    pub title: String,
    /// The description, as sent in its NFC form.
    pub description: String,
    /// The priority.
    pub priority: Priority,
}

/// A ticket was assigned to an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[cqrs(name = "TicketAssigned")]
pub struct TicketAssigned {
    /// The ticket.
    pub ticket_id: Uuid,
    /// Its reporter.
    pub reporter_id: Uuid,
    /// The agent.
    pub assignee_id: Uuid,
}

/// Someone commented on a ticket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[cqrs(name = "TicketCommented")]
pub struct TicketCommented {
    /// The ticket.
    pub ticket_id: Uuid,
    /// Its reporter.
    pub reporter_id: Uuid,
    /// The comment's id.
    pub comment_id: Uuid,
    /// Who wrote it.
    pub author_id: Uuid,
    /// The text, as sent in its NFC form.
    pub body: String,
}

/// A ticket was closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[cqrs(name = "TicketClosed")]
pub struct TicketClosed {
    /// The ticket.
    pub ticket_id: Uuid,
    /// Its reporter.
    pub reporter_id: Uuid,
    /// Why, if given, in its NFC form.
    pub resolution: Option<String>,
}

event_set! {
    /// Everything that happens to a ticket.
    pub enum TicketEvent {
        /// Opened.
        Opened(TicketOpened),
        /// Assigned.
        Assigned(TicketAssigned),
        /// Commented.
        Commented(TicketCommented),
        /// Closed.
        Closed(TicketClosed),
    }
}

/// A comment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comment {
    /// Its id.
    pub id: Uuid,
    /// Who wrote it.
    pub author_id: Uuid,
    /// The text.
    pub body: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A ticket as clients see it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    /// Its id.
    pub id: Uuid,
    /// The title.
    pub title: String,
    /// The description.
    pub description: String,
    /// The priority.
    pub priority: Priority,
    /// The status.
    pub status: Status,
    /// Who reported it.
    pub reporter_id: Uuid,
    /// The assigned agent.
    pub assignee_id: Option<Uuid>,
    /// Changes so far; 1 once opened.
    pub version: u64,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Its comments, oldest first.
    pub comments: Vec<Comment>,
}

/// What the aggregate decides on.
#[derive(Debug)]
pub enum TicketCommand {
    /// Open a new ticket.
    Open {
        /// The new id.
        id: Uuid,
        /// The reporter.
        reporter_id: Uuid,
        /// Trimmed title.
        title: String,
        /// Description.
        description: String,
        /// Priority.
        priority: Priority,
    },
    /// Assign to an agent (already checked to be one).
    Assign {
        /// The agent.
        assignee_id: Uuid,
    },
    /// Comment.
    Comment {
        /// The new comment's id.
        comment_id: Uuid,
        /// Its author.
        author_id: Uuid,
        /// Its text.
        body: String,
    },
    /// Close.
    Close {
        /// Why.
        resolution: Option<String>,
    },
}

/// The ticket's state: the view itself.
#[derive(Debug, Default)]
pub struct TicketState {
    /// The view.
    pub ticket: Ticket,
    /// Whether it exists.
    pub exists: bool,
    /// How many times it was assigned (at most 100; past that the ticket is full).
    pub assignments: usize,
}

impl TicketState {
    fn apply_at(&mut self, event: &TicketEvent, at: DateTime<Utc>) {
        let t = &mut self.ticket;
        match event {
            TicketEvent::Opened(e) => {
                self.exists = true;
                *t = Ticket {
                    id: e.ticket_id,
                    title: e.title.clone(),
                    description: e.description.clone(),
                    priority: e.priority,
                    status: Status::Open,
                    reporter_id: e.reporter_id,
                    assignee_id: None,
                    version: 0,
                    created_at: at,
                    updated_at: at,
                    comments: Vec::new(),
                };
            }
            TicketEvent::Assigned(e) => {
                t.assignee_id = Some(e.assignee_id);
                t.status = Status::Assigned;
                self.assignments += 1;
            }
            TicketEvent::Commented(e) => t.comments.push(Comment {
                id: e.comment_id,
                author_id: e.author_id,
                body: e.body.clone(),
                created_at: at,
            }),
            TicketEvent::Closed(_) => t.status = Status::Closed,
        }
        t.version += 1;
        t.updated_at = at;
    }
}

/// The most comments one ticket holds. A ticket is read, folded and sent whole, so what a
/// client can add to it must be bounded.
pub(crate) const MAX_COMMENTS: usize = 500;

/// The most comment text (UTF-8 bytes) one ticket holds, for the same reason.
pub(crate) const MAX_COMMENT_BYTES: usize = 1024 * 1024;

/// The most times one ticket is assigned, for the same reason: each assignment is an event
/// of the ticket's stream, read and folded whenever the ticket is.
pub(crate) const MAX_ASSIGNMENTS: usize = 100;

fn comment_bytes(ticket: &Ticket) -> usize {
    ticket.comments.iter().map(|c| c.body.len()).sum()
}

fn ticket_full(message: String) -> HandlerError {
    HandlerError::conflict("ticket_full", message)
}

pub(crate) fn closed() -> HandlerError {
    HandlerError::conflict("ticket_closed", "the ticket is closed")
}

impl Aggregate for TicketState {
    const TYPE: &'static str = "ticket";
    type Event = TicketEvent;
    type Command = TicketCommand;
    type Error = HandlerError;

    fn apply(&mut self, event: &TicketEvent) {
        self.apply_at(event, Utc::now());
    }

    fn apply_with(&mut self, event: &TicketEvent, envelope: &cqrs_core::EventEnvelope) {
        // Times come from the events' metadata, so every reload shows the same times.
        self.apply_at(event, envelope.metadata.timestamp);
    }

    fn decide(&self, command: TicketCommand) -> Result<Vec<TicketEvent>, HandlerError> {
        let t = &self.ticket;
        match command {
            TicketCommand::Open { .. } if self.exists => Err(HandlerError::conflict(
                "ticket_exists",
                "the ticket exists already",
            )),
            TicketCommand::Open {
                id,
                reporter_id,
                title,
                description,
                priority,
            } => Ok(vec![
                TicketOpened {
                    ticket_id: id,
                    reporter_id,
                    title,
                    description,
                    priority,
                }
                .into(),
            ]),
            _ if !self.exists => Err(HandlerError::not_found("no such ticket")),
            _ if t.status == Status::Closed => Err(closed()),
            // Already theirs: nothing happens, and the ticket is answered as it is (no event, no
            // new version, no realtime push).
            TicketCommand::Assign { assignee_id } if t.assignee_id == Some(assignee_id) => {
                Ok(Vec::new())
            }
            TicketCommand::Assign { .. } if self.assignments >= MAX_ASSIGNMENTS => {
                Err(ticket_full(format!(
                    "a ticket is assigned at most {MAX_ASSIGNMENTS} times: open a new ticket"
                )))
            }
            TicketCommand::Assign { assignee_id } => Ok(vec![
                TicketAssigned {
                    ticket_id: t.id,
                    reporter_id: t.reporter_id,
                    assignee_id,
                }
                .into(),
            ]),
            TicketCommand::Comment { .. } if t.comments.len() >= MAX_COMMENTS => Err(ticket_full(
                format!("a ticket holds at most {MAX_COMMENTS} comments: open a new ticket"),
            )),
            TicketCommand::Comment { ref body, .. }
                if comment_bytes(t).saturating_add(body.len()) > MAX_COMMENT_BYTES =>
            {
                Err(ticket_full(format!(
                    "a ticket holds at most {} KiB of comments: open a new ticket",
                    MAX_COMMENT_BYTES / 1024
                )))
            }
            TicketCommand::Comment {
                comment_id,
                author_id,
                body,
            } => Ok(vec![
                TicketCommented {
                    ticket_id: t.id,
                    reporter_id: t.reporter_id,
                    comment_id,
                    author_id,
                    body,
                }
                .into(),
            ]),
            TicketCommand::Close { resolution } => Ok(vec![
                TicketClosed {
                    ticket_id: t.id,
                    reporter_id: t.reporter_id,
                    resolution,
                }
                .into(),
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A priority or status is a string, one of its words: serde's derived form also took a
    /// one-key object, `{"low": null}`, and answered "expected unit" for anything else in it.
    #[test]
    fn priorities_and_statuses_are_words_only() {
        assert_eq!(
            serde_json::from_str::<Priority>(r#""urgent""#).unwrap(),
            Priority::Urgent
        );
        assert_eq!(
            serde_json::from_str::<Status>(r#""closed""#).unwrap(),
            Status::Closed
        );
        for (json, says) in [
            (r#"{"low": null}"#, "expected a string"),
            (r#"{"urgent": 1}"#, "expected a string"),
            ("3", "expected a string"),
            (
                r#""Low""#,
                "expected one of `low`, `normal`, `high`, `urgent`",
            ),
        ] {
            let error = serde_json::from_str::<Priority>(json)
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{json}: {error}");
        }
        assert!(serde_json::from_str::<Status>(r#"{"open": null}"#).is_err());
    }

    fn open_ticket() -> TicketState {
        let mut state = TicketState::default();
        let id = Uuid::now_v7();
        let opened = state
            .decide(TicketCommand::Open {
                id,
                reporter_id: Uuid::now_v7(),
                title: "t".into(),
                description: "d".into(),
                priority: Priority::default(),
            })
            .unwrap();
        for event in &opened {
            state.apply(event);
        }
        state
    }

    fn comment(state: &mut TicketState, body: &str) -> Result<(), HandlerError> {
        let events = state.decide(TicketCommand::Comment {
            comment_id: Uuid::now_v7(),
            author_id: Uuid::now_v7(),
            body: body.into(),
        })?;
        for event in &events {
            state.apply(event);
        }
        Ok(())
    }

    /// A client cannot grow a ticket without bound: past the comment count or size, a comment
    /// is refused with `ticket_full`.
    #[test]
    fn a_ticket_refuses_comments_past_its_limits() {
        let mut state = open_ticket();
        for _ in 0..MAX_COMMENTS {
            comment(&mut state, "short").unwrap();
        }
        let err = comment(&mut state, "one more").unwrap_err();
        assert_eq!(err.code(), "ticket_full");

        let mut state = open_ticket();
        let big = "x".repeat(40_000);
        let fit = MAX_COMMENT_BYTES / big.len();
        for _ in 0..fit {
            comment(&mut state, &big).unwrap();
        }
        let err = comment(&mut state, &big).unwrap_err();
        assert_eq!(err.code(), "ticket_full");
        comment(&mut state, "x").expect("a short one still fits");
    }

    fn assign(state: &mut TicketState, assignee_id: Uuid) -> Result<usize, HandlerError> {
        let events = state.decide(TicketCommand::Assign { assignee_id })?;
        for event in &events {
            state.apply(event);
        }
        Ok(events.len())
    }

    /// Assigning a ticket to the agent who has it decides nothing; alternating agents is
    /// bounded like comments are.
    #[test]
    fn a_ticket_is_assigned_again_only_to_another_agent_and_a_bounded_number_of_times() {
        let mut state = open_ticket();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(assign(&mut state, a).unwrap(), 1);
        assert_eq!(assign(&mut state, a).unwrap(), 0, "already theirs");
        assert_eq!(state.ticket.version, 2);
        for i in 1..MAX_ASSIGNMENTS {
            let to = if i.is_multiple_of(2) { a } else { b };
            assert_eq!(assign(&mut state, to).unwrap(), 1);
        }
        let to = if state.ticket.assignee_id == Some(a) {
            b
        } else {
            a
        };
        let err = assign(&mut state, to).unwrap_err();
        assert_eq!(err.code(), "ticket_full");
        let holder = state.ticket.assignee_id.unwrap();
        assert_eq!(
            assign(&mut state, holder).unwrap(),
            0,
            "still a no-op at the cap"
        );
    }
}
