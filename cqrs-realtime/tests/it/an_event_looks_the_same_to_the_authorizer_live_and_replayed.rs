//! The authorizer decides on the same event whether it is pushed live or replayed on a resume.
//! A live event carries the topics of the pub/sub channel it came on; a replayed one listed
//! every topic it is routed to, on every channel, so an authorizer that looks at
//! `PushedEvent::topics` could decide one way live and another on a resume.

use crate::support::{TEST_LIMIT, TestHub, TicketRouting, User};
use async_trait::async_trait;
use cqrs_core::EventRecord;
use cqrs_core::memory::InMemoryPubSub;
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{Authorizer, EventRouting, HubOptions, PushedEvent, Refusal, Routed, Topic};
use serde_json::json;
use std::sync::{Arc, Mutex};

/// The helpdesk's topics on channel `tickets`, and `audit` on a channel of its own.
struct WithAudit;

impl EventRouting for WithAudit {
    fn channel(&self, topic: &Topic) -> Option<String> {
        match topic.family() {
            "audit" => Some("audit".into()),
            _ => TicketRouting.channel(topic),
        }
    }

    fn route(&self, record: &EventRecord) -> Option<Routed> {
        Some(
            TicketRouting
                .route(record)?
                .topic(Topic::parse("audit").ok()?),
        )
    }
}

/// Allows everything; records the topics of each event it is asked about.
#[derive(Clone, Default)]
struct Recording {
    seen: Arc<Mutex<Vec<Vec<String>>>>,
}

#[async_trait]
impl Authorizer<User> for Recording {
    async fn authorize_subscribe(&self, _: &User, _: &Topic) -> Result<(), Refusal> {
        Ok(())
    }

    fn may_see(&self, _: &User, _: &Topic, event: &PushedEvent) -> bool {
        let topics = event.topics().iter().map(ToString::to_string).collect();
        self.seen.lock().unwrap().push(topics);
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_looks_the_same_to_the_authorizer_live_and_replayed() {
    with_timeout(TEST_LIMIT, async {
        let rules = Recording::default();
        let t = TestHub::start_on(Arc::new(InMemoryPubSub::new()), HubOptions::new(), {
            let rules = rules.clone();
            |b| b.routing(WithAudit).authorizer(rules)
        })
        .await;
        let mut client = t.connect("user-u1").await;
        client.subscribe("tickets").await;
        t.publish("t1", "u1", 1).await;
        let first = client.event().await;
        assert_eq!(first.seq, 1);
        client.ws.close(None).await.unwrap();
        drop(client);
        t.publish("t1", "u1", 2).await;

        let mut client = t.connect("user-u1").await;
        client
            .send(json!({"type": "subscribe", "topic": "tickets", "since": first.position}))
            .await;
        client.expect_subscribed("tickets").await;
        assert_eq!(client.event().await.seq, 2, "replayed");
        let seen = rules.seen.lock().unwrap().clone();
        let tickets_channel = vec!["tickets".to_owned(), "ticket:t1".to_owned()];
        assert_eq!(seen.first(), Some(&tickets_channel), "live: {seen:?}");
        assert_eq!(seen.last(), Some(&tickets_channel), "replayed: {seen:?}");
    })
    .await;
}
