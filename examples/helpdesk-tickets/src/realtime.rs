//! How ticket events reach WebSocket clients: topics `tickets` (every ticket the user may see)
//! and `ticket:<id>` (one ticket), both carried on one coarse pub/sub channel, `tickets`.

use crate::domain::TicketEvent;
use crate::handlers::MaySeeTicket;
use async_trait::async_trait;
use cqrs_core::{EventRecord, EventTypes, Metadata};
use cqrs_realtime::{Authorizer, EventRouting, PushedEvent, Refusal, Routed, Topic};
use helpdesk_api::{BusHandle, User, UserDirectory};
use serde_json::json;
use std::sync::{Arc, LazyLock};
use uuid::Uuid;

/// The one pub/sub channel every ticket event travels on.
const CHANNEL: &str = "tickets";

/// The events pushed to clients: this plugin's own, every member of [`TicketEvent`].
static TICKET_EVENTS: LazyLock<EventTypes> = LazyLock::new(EventTypes::of::<TicketEvent>);

/// Maps ticket events to topics and to the `event` object clients receive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TicketRouting;

impl EventRouting for TicketRouting {
    fn channel(&self, topic: &Topic) -> Option<String> {
        match (topic.family(), topic.key()) {
            // Any `ticket:<key>`: the authorizer refuses a key that is not a ticket id as the
            // API spells it, saying how to spell it (here the hub could only say that there
            // is no such topic).
            ("tickets", None) | ("ticket", Some(_)) => Some(CHANNEL.to_owned()),
            _ => None,
        }
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
        // The ticket events alone, by name: the event store is shared with every plugin, and
        // another plugin's event that happens to carry a `ticket_id` and a `reporter_id` must
        // not reach customers with whatever else it holds.
        if !TICKET_EVENTS.knows(&record.event_type) {
            return None;
        }
        let ticket_id = record.payload.get("ticket_id")?.as_str()?;
        let reporter_id = record.payload.get("reporter_id")?.as_str()?;
        let event = json!({
            "event_id": record.event_id,
            "type": record.event_type,
            "ticket_id": ticket_id,
            "version": record.stream_version,
            "occurred_at": record.metadata.occurred_at,
            "actor_id": record.metadata.actor,
            "data": record.payload,
        });
        Some(
            Routed::new(event)
                .topic(Topic::parse("tickets").ok()?)
                .topic(Topic::with_key("ticket", ticket_id).ok()?)
                .routing("reporter_id", reporter_id),
        )
    }
}

/// The ticket id of a `ticket:<id>` topic, only in the form events are published under (the
/// lower-case, hyphenated form the API returns): topics match exactly, so `ticket:<ID>` in
/// upper case would be accepted and never receive anything.
fn ticket_id(key: &str) -> Option<Uuid> {
    let id = Uuid::parse_str(key).ok()?;
    let mut canonical = Uuid::encode_buffer();
    (id.as_hyphenated().encode_lower(&mut canonical) == key).then_some(id)
}

/// Customers see their own tickets' events; agents see every event. Subscribing to one ticket
/// needs permission to see that ticket (looked up once, at subscribe); each event is then
/// checked from its own `reporter_id`, never with a lookup.
#[derive(Clone)]
pub(crate) struct TicketRules {
    pub(crate) buses: BusHandle,
    /// Each subscribe reads the user's role again: the connection's user is as the user store
    /// had it at the handshake, and a demoted agent must not follow customers' tickets anew.
    pub(crate) directory: Arc<dyn UserDirectory>,
}

impl std::fmt::Debug for TicketRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketRules").finish_non_exhaustive()
    }
}

#[async_trait]
impl Authorizer<User> for TicketRules {
    async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
        // The topic's shape first: a misspelled one costs no read of the user store.
        let ticket = match (topic.family(), topic.key()) {
            ("tickets", None) => None,
            ("ticket", Some(id)) => Some(ticket_id(id).ok_or_else(|| {
                Refusal::unknown_topic(
                    "a ticket topic is `ticket:<id>`, the id as the API returns it \
                     (a lower-case, hyphenated UUID)",
                )
            })?),
            _ => {
                return Err(Refusal::unknown_topic(
                    "topics are `tickets` and `ticket:<id>`",
                ));
            }
        };
        let role = self
            .directory
            .role_of(user.id)
            .await
            .map_err(|e| {
                // The store's text (a driver's, a host's) is for the log, not the client.
                tracing::error!(error = %e, user = %user.id, "could not read a subscriber's role");
                Refusal::unavailable("the user store is busy or unavailable; try again shortly")
            })?
            .ok_or_else(|| Refusal::forbidden("your account no longer exists"))?;
        // The connection's events are filtered with the role of its handshake (`may_see`
        // reads no store): with another role now, no new subscription, `tickets` included,
        // would be filtered right. Reconnecting gives the connection the new role.
        if role != user.role {
            return Err(Refusal::forbidden(
                "your role has changed since this connection opened; reconnect to subscribe",
            ));
        }
        let Some(id) = ticket else {
            return Ok(());
        };
        if user.is_agent() {
            return Ok(());
        }
        let buses = self
            .buses
            .get()
            .map_err(|e| Refusal::unavailable(e.message))?;
        let query = MaySeeTicket {
            user: user.clone(),
            id,
        };
        match buses
            .queries
            .dispatch_with(query, Metadata::new().with_actor(user.id.to_string()))
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(Refusal::forbidden("you may not follow this ticket")),
            // The user's request limit: theirs to wait out, no fault of the server's.
            Err(e) if e.kind() == cqrs_core::ErrorKind::RateLimited => Err(Refusal::unavailable(
                "too many requests from this user; try again in a few seconds",
            )),
            Err(e) => {
                tracing::error!(error = %e, ticket = %id, "could not read a ticket to authorize a subscription");
                Err(Refusal::unavailable(
                    "the ticket could not be read now; try again shortly",
                ))
            }
        }
    }

    fn may_see(&self, user: &User, _topic: &Topic, event: &PushedEvent) -> bool {
        if user.is_agent() {
            return true;
        }
        let mut id = Uuid::encode_buffer();
        event.routing_str("reporter_id") == Some(user.id.as_hyphenated().encode_lower(&mut id))
    }
}

#[cfg(test)]
mod tests {
    use super::TicketRouting;
    use cqrs_core::{EventRecord, Metadata, RecordMetadata};
    use cqrs_realtime::EventRouting;
    use serde_json::json;

    fn record(event_type: &str) -> EventRecord {
        let payload = json!({
            "ticket_id": "0192a5d8-0000-7000-8000-000000000001",
            "reporter_id": "0192a5d8-0000-7000-8000-000000000002",
            "internal_note": "not for customers",
        });
        let metadata = Metadata::new();
        EventRecord::new(
            metadata.message_id,
            event_type,
            1,
            payload,
            RecordMetadata::from_metadata(&metadata),
        )
    }

    /// Only this plugin's events are pushed: another plugin's event that carries a ticket id
    /// and a reporter id is not, whatever else it holds.
    #[test]
    fn only_ticket_events_are_pushed() {
        for pushed in [
            "TicketOpened",
            "TicketAssigned",
            "TicketCommented",
            "TicketClosed",
        ] {
            assert!(TicketRouting.route(&record(pushed)).is_some(), "{pushed}");
        }
        assert!(TicketRouting.route(&record("BillingNoted")).is_none());
    }
}
