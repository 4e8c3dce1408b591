//! Every plugin's `RealtimeFeed` joins the one hub at `/ws`: a topic belongs to the feed whose
//! routing carries it, and that feed's authorizer decides who sees it. Before, a second feed
//! failed the start ("the hub takes one"), so only the tickets plugin's events could reach
//! WebSocket clients.

use crate::events_a_plugin_records_reach_the_store_on_either_backend::{
    Remember, RememberHandler, Remembered,
};
use crate::support::*;
use crate::websocket_clients_get_the_ticket_events_they_may_see::{connect, next, send, subscribe};
use cqrs_core::{EventRecord, Message, async_trait};
use cqrs_realtime::{Authorizer, EventRouting, PushedEvent, Refusal, Routed, Topic};
use helpdesk::Hooks;
use helpdesk_api::{BusHandle, RealtimeFeed, Role, User};
use serde_json::json;
use std::sync::{Arc, OnceLock};

/// Topic `notes`, on a channel of its own, carrying `test.remembered` events.
struct NotesRouting;

impl EventRouting for NotesRouting {
    fn channel(&self, topic: &Topic) -> Option<String> {
        (topic.family() == "notes" && topic.key().is_none()).then(|| "notes".to_owned())
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
        (record.event_type == Remembered::NAME).then(|| {
            Routed::new(json!({ "text": record.payload["what"] }))
                .topic(Topic::parse("notes").unwrap())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_plugins_feed_reaches_websocket_clients_under_its_own_rules() {
    within(async {
        let backend = Backend::from_env().await;
        let buses: Arc<OnceLock<BusHandle>> = Arc::default();
        let b = buses.clone();
        let hooks = Hooks {
            provide: vec![Arc::new(move |registrar| {
                registrar.commands().add(RememberHandler);
                registrar.contribute(RealtimeFeed {
                    routing: Arc::new(NotesRouting),
                    authorizer: Arc::new(AgentsOnly),
                });
                let _ = b.set(registrar.resource::<BusHandle>().unwrap());
            })],
            ..Hooks::default()
        };
        let s = TestServer::start_with_hooks(backend.clone(), hooks, |_| {}).await;
        let (agent, _) = s.agent().await;
        let (customer, _) = s.customer().await;
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

        let dispatch = buses.get().expect("the hook ran").get().unwrap();
        dispatch
            .commands
            .dispatch(Remember("hello".into()))
            .await
            .unwrap();
        let note = next(&mut agent_ws).await;
        assert_eq!(note["type"], "event", "{note}");
        assert_eq!(note["topic"], "notes", "{note}");
        assert_eq!(note["event"]["text"], "hello", "{note}");

        // The tickets feed still pushes its own events, to both.
        let ticket = s.ticket(&customer, "after the note").await;
        for ws in [&mut customer_ws, &mut agent_ws] {
            let event = next(ws).await;
            assert_eq!(event["topic"], "tickets", "{event}");
            assert_eq!(event["event"]["ticket_id"], ticket["id"], "{event}");
        }
        s.stop().await;
        backend.clean_up().await;
    })
    .await;
}
