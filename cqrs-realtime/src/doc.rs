//! Fixtures for the documentation's examples: a ticket routing, rules and tokens.

use crate::{
    AuthenticateFn, Authenticator, Authorizer, EventRouting, PushedEvent, Refusal, Routed, Topic,
    Unauthenticated,
};
use cqrs_core::{EventRecord, Metadata, RecordMetadata};

/// A user of the examples.
#[derive(Debug, Clone)]
pub struct User {
    /// The id.
    pub id: String,
    /// Whether the user is an agent (sees every ticket).
    pub agent: bool,
}

/// Tokens `agent-<id>` and `user-<id>`.
pub fn tokens() -> impl Authenticator<Principal = User> {
    AuthenticateFn::new(|token: String| async move {
        if let Some(id) = token.strip_prefix("agent-") {
            Ok(User {
                id: id.to_owned(),
                agent: true,
            })
        } else if let Some(id) = token.strip_prefix("user-") {
            Ok(User {
                id: id.to_owned(),
                agent: false,
            })
        } else {
            Err(Unauthenticated::new("invalid token"))
        }
    })
}

/// `tickets` and `ticket:<id>`, both on channel `tickets`; routing field `reporter_id`.
#[derive(Debug, Clone, Copy)]
pub struct TicketRouting;

impl EventRouting for TicketRouting {
    fn channel(&self, topic: &Topic) -> Option<String> {
        match (topic.family(), topic.key()) {
            ("tickets", None) | ("ticket", Some(_)) => Some("tickets".into()),
            _ => None,
        }
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
        if !record.event_type.starts_with("Ticket") {
            return None;
        }
        let ticket_id = record.payload.get("ticket_id")?.as_str()?;
        let reporter = record.payload.get("reporter_id").cloned();
        Some(
            Routed::new(serde_json::json!({
                "event_id": record.event_id,
                "type": record.event_type,
                "ticket_id": ticket_id,
                "data": record.payload,
            }))
            .topic(Topic::parse("tickets").ok()?)
            .topic(Topic::with_key("ticket", ticket_id).ok()?)
            .routing("reporter_id", reporter.unwrap_or_default()),
        )
    }
}

/// Agents see everything; users see the tickets they reported.
#[derive(Debug, Clone, Copy)]
pub struct TicketRules;

#[async_trait::async_trait]
impl Authorizer<User> for TicketRules {
    async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
        match topic.family() {
            "tickets" => Ok(()),
            _ if user.agent => Ok(()),
            _ => Err(Refusal::forbidden("only agents may follow one ticket")),
        }
    }

    fn may_see(&self, user: &User, _: &Topic, event: &PushedEvent) -> bool {
        user.agent || event.routing_str("reporter_id") == Some(user.id.as_str())
    }
}

/// A `TicketOpened` record of ticket `ticket_id` reported by `reporter_id`.
pub fn ticket_record(ticket_id: &str, reporter_id: &str) -> EventRecord {
    EventRecord::new(
        Metadata::new().message_id,
        "TicketOpened",
        1,
        serde_json::json!({ "ticket_id": ticket_id, "reporter_id": reporter_id }),
        RecordMetadata::from_metadata(&Metadata::new()),
    )
}
