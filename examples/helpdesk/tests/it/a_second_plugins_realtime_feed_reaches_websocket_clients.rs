//! Every plugin's `RealtimeFeed` joins the one hub at `/ws`: a topic belongs to the one feed
//! whose routing carries it, and that feed's authorizer decides who sees it. Before, a second
//! feed failed the start ("the hub takes one"), so only the tickets plugin's events could reach
//! WebSocket clients. A feed cannot push onto another feed's topics, nor take them over, nor
//! push another plugin's events under its own rules.

use crate::events_a_plugin_records_reach_the_store_on_either_backend::{
    RememberHandler, Remembered, remember,
};
use crate::support::*;
use crate::websocket_clients_get_the_ticket_events_they_may_see::{
    Ws, connect, next, send, subscribe,
};
use cqrs_core::{EventRecord, Message, async_trait};
use cqrs_realtime::{Authorizer, EventRouting, PushedEvent, Refusal, Routed, Topic};
use helpdesk::Hooks;
use helpdesk_api::{BusHandle, RealtimeFeed, Role, User};
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};

/// Topic `notes`, on a channel of its own, carrying `test.remembered` events. With
/// `greedy`, it says it carries every topic. An event remembering `intrude:<user id>` it also
/// puts on `tickets`, with that user as the `reporter_id` the tickets feed's rules look at.
/// With `grabby`, it also routes onto `notes` any event whose payload has a `title` starting
/// with "grab" (as a feed that routes by payload fields without looking at the event's type
/// would take the tickets plugin's events).
struct NotesRouting {
    greedy: bool,
    grabby: bool,
}

impl EventRouting for NotesRouting {
    fn channel(&self, topic: &Topic) -> Option<String> {
        (self.greedy || (topic.family() == "notes" && topic.key().is_none()))
            .then(|| "notes".to_owned())
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
        if self.grabby
            && let Some(title) = record.payload["title"].as_str()
            && title.starts_with("grab")
        {
            return Some(
                Routed::new(json!({ "text": title })).topic(Topic::parse("notes").unwrap()),
            );
        }
        if record.event_type != Remembered::NAME {
            return None;
        }
        let what = record.payload["what"].as_str()?;
        let routed = Routed::new(json!({ "text": what })).topic(Topic::parse("notes").unwrap());
        Some(match what.strip_prefix("intrude:") {
            Some(reporter) => routed
                .topic(Topic::parse("tickets").unwrap())
                .routing("reporter_id", reporter),
            None => routed,
        })
    }
}

/// Agents only.
struct AgentsOnly;

#[async_trait]
impl Authorizer<User> for AgentsOnly {
    async fn authorize_subscribe(&self, user: &User, _: &Topic) -> Result<(), Refusal> {
        if user.role == Role::Agent {
            Ok(())
        } else {
            Err(Refusal::forbidden("notes are for agents"))
        }
    }

    fn may_see(&self, user: &User, _: &Topic, _: &PushedEvent) -> bool {
        user.role == Role::Agent
    }
}

/// A server with the notes feed (before the tickets plugin's: hooks provide first) and the
/// handler that records `Remembered`; and the buses, to dispatch it.
async fn notes_server(
    backend: &Backend,
    routing: NotesRouting,
) -> (TestServer, Arc<OnceLock<BusHandle>>) {
    let routing = Arc::new(routing);
    let buses: Arc<OnceLock<BusHandle>> = Arc::default();
    let b = buses.clone();
    let hooks = Hooks {
        provide: vec![Arc::new(move |registrar| {
            registrar.commands().add(RememberHandler);
            registrar.contribute(RealtimeFeed {
                routing: routing.clone(),
                authorizer: Arc::new(AgentsOnly),
            });
            let _ = b.set(registrar.resource::<BusHandle>().unwrap());
        })],
        ..Hooks::default()
    };
    let s = TestServer::start_with_hooks(backend.clone(), hooks, |_| {}).await;
    (s, buses)
}

/// The next frame, which must be an event on `topic`.
async fn next_event(ws: &mut Ws, topic: &str) -> Value {
    let frame = next(ws).await;
    assert_eq!(frame["type"], "event", "{frame}");
    assert_eq!(frame["topic"], topic, "{frame}");
    frame["event"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_plugins_feed_reaches_websocket_clients_under_its_own_rules() {
    within(async {
        let backend = Backend::from_env().await;
        let routing = NotesRouting {
            greedy: false,
            grabby: false,
        };
        let (s, buses) = notes_server(&backend, routing).await;
        let (agent, _) = s.agent().await;
        let (customer, customer_id) = s.customer().await;
        let (other, _) = s.customer().await;
        let mut agent_ws = connect(&s, &agent).await;
        let mut customer_ws = connect(&s, &customer).await;
        // The notes feed's rules, and the tickets feed's, each for its own topics.
        subscribe(&mut agent_ws, "notes").await;
        subscribe(&mut agent_ws, "tickets").await;
        send(
            &mut customer_ws,
            json!({ "type": "subscribe", "topic": "notes" }),
        )
        .await;
        let refused = next(&mut customer_ws).await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
        assert_eq!(refused["message"], "notes are for agents", "{refused}");
        subscribe(&mut customer_ws, "tickets").await;

        remember(&buses, "hello").await;
        assert_eq!(next_event(&mut agent_ws, "notes").await["text"], "hello");

        // An event the notes feed also puts on `tickets` (the tickets feed's topic), with the
        // customer as its reporter, is not pushed at all: not on `notes` either, where the
        // next note comes first, nor on `tickets`, where the customer's own ticket does.
        remember(&buses, &format!("intrude:{customer_id}")).await;
        remember(&buses, "after the intruder").await;
        assert_eq!(
            next_event(&mut agent_ws, "notes").await["text"],
            "after the intruder"
        );

        // The tickets feed's rules hold: another customer's ticket reaches the agent only.
        let others = s.ticket(&other, "not yours").await;
        assert_eq!(
            next_event(&mut agent_ws, "tickets").await["ticket_id"],
            others["id"]
        );
        let own = s.ticket(&customer, "yours").await;
        for ws in [&mut customer_ws, &mut agent_ws] {
            assert_eq!(next_event(ws, "tickets").await["ticket_id"], own["id"]);
        }
        // Closed first: a stop waits the close timeout for clients that are still open.
        drop((agent_ws, customer_ws));
        s.stop().await;
        backend.clean_up().await;
    })
    .await;
}

/// A feed that says it carries every topic (`tickets` included) cannot take the tickets
/// plugin's topics over, although it comes first: a topic two feeds carry is refused to
/// everyone, and a topic it carries alone is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_two_feeds_carry_is_served_to_no_one() {
    within(async {
        let backend = Backend::from_env().await;
        let routing = NotesRouting {
            greedy: true,
            grabby: false,
        };
        let (s, _) = notes_server(&backend, routing).await;
        let (agent, _) = s.agent().await;
        let mut ws = connect(&s, &agent).await;
        send(&mut ws, json!({ "type": "subscribe", "topic": "tickets" })).await;
        let refused = next(&mut ws).await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
        assert!(
            refused["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("two plugins' realtime feeds carry this topic")),
            "{refused}"
        );
        subscribe(&mut ws, "notes").await;
        drop(ws);
        s.stop().await;
        backend.clean_up().await;
    })
    .await;
}

/// A feed that routes the tickets plugin's events (by their payload, not their type) cannot
/// push them under its own rules, although it comes first in plugin order: an event two feeds
/// route is pushed by neither. Before, the first feed to route an event took it: the ticket's
/// events went to the notes feed's subscribers under its rules, and to no one on `tickets`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_two_feeds_route_is_pushed_by_neither() {
    within(async {
        let backend = Backend::from_env().await;
        let routing = NotesRouting {
            greedy: false,
            grabby: true,
        };
        let (s, buses) = notes_server(&backend, routing).await;
        let (agent, _) = s.agent().await;
        let (customer, _) = s.customer().await;
        let mut agent_ws = connect(&s, &agent).await;
        let mut customer_ws = connect(&s, &customer).await;
        subscribe(&mut agent_ws, "notes").await;
        subscribe(&mut customer_ws, "tickets").await;

        // Both feeds route this ticket's opening: neither pushes it.
        s.ticket(&customer, "grab this one").await;
        // Each topic's next event, published after it on the same channel, comes first.
        let plain = s.ticket(&customer, "plain").await;
        assert_eq!(
            next_event(&mut customer_ws, "tickets").await["ticket_id"],
            plain["id"]
        );
        remember(&buses, "after the grabbed ticket").await;
        assert_eq!(
            next_event(&mut agent_ws, "notes").await["text"],
            "after the grabbed ticket"
        );
        drop((agent_ws, customer_ws));
        s.stop().await;
        backend.clean_up().await;
    })
    .await;
}
