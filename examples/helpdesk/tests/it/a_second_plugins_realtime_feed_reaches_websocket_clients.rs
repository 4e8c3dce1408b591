//! Every plugin's `RealtimeFeed` joins the one hub at `/ws`: a topic belongs to the one feed
//! whose routing carries it, and that feed's authorizer decides who sees it. Before, a second
//! feed failed the start ("the hub takes one"), so only the tickets plugin's events could reach
//! WebSocket clients. A feed cannot push onto another feed's topics, nor take them over.

use crate::events_a_plugin_records_reach_the_store_on_either_backend::{
    Remember, RememberHandler, Remembered,
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
struct NotesRouting {
    greedy: bool,
}

impl EventRouting for NotesRouting {
    fn channel(&self, topic: &Topic) -> Option<String> {
        (self.greedy || (topic.family() == "notes" && topic.key().is_none()))
            .then(|| "notes".to_owned())
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
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
async fn notes_server(backend: &Backend, greedy: bool) -> (TestServer, Arc<OnceLock<BusHandle>>) {
    let buses: Arc<OnceLock<BusHandle>> = Arc::default();
    let b = buses.clone();
    let hooks = Hooks {
        provide: vec![Arc::new(move |registrar| {
            registrar.commands().add(RememberHandler);
            registrar.contribute(RealtimeFeed {
                routing: Arc::new(NotesRouting { greedy }),
                authorizer: Arc::new(AgentsOnly),
            });
            let _ = b.set(registrar.resource::<BusHandle>().unwrap());
        })],
        ..Hooks::default()
    };
    let s = TestServer::start_with_hooks(backend.clone(), hooks, |_| {}).await;
    (s, buses)
}

async fn remember(buses: &OnceLock<BusHandle>, what: &str) {
    let buses = buses.get().expect("the hook ran").get().unwrap();
    buses
        .commands
        .dispatch(Remember(what.to_owned()))
        .await
        .unwrap();
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
        let (s, buses) = notes_server(&backend, false).await;
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
        let (s, _) = notes_server(&backend, true).await;
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
