use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{EventRouting, HubOptions, ServerFrame};
use serde_json::json;
use std::sync::Arc;

/// A customer may not follow another customer's ticket: `forbidden`, and the connection
/// stays open. Its own ticket it may follow; an agent may follow any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_subscription_gets_an_error_and_the_connection_stays_open() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        t.store("t1", "u1", 1).await;
        t.store("t2", "u2", 1).await;
        let mut customer = t.connect("user-u1").await;
        customer
            .send(json!({"type": "subscribe", "topic": "ticket:t2"}))
            .await;
        match customer.frame().await {
            ServerFrame::Error {
                code,
                message,
                topic,
                ..
            } => {
                assert_eq!(code, "forbidden");
                assert!(!message.is_empty());
                assert_eq!(topic.as_deref(), Some("ticket:t2"));
            }
            other => panic!("expected forbidden, got {other:?}"),
        }
        customer.ping_pong().await;
        customer.subscribe("ticket:t1").await;

        let mut agent = t.connect("agent-a1").await;
        agent.subscribe("ticket:t2").await;
        assert_eq!(t.hub.stats().subscriptions, 2);
    })
    .await;
}

/// On `tickets`, a customer receives only the events of tickets it reported, decided from
/// the routing field each event carries; an agent receives all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_reaches_only_the_subscribers_that_may_see_it() {
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start(HubOptions::new()).await;
        let mut u1 = t.connect("user-u1").await;
        let mut u2 = t.connect("user-u2").await;
        let mut agent = t.connect("agent-a1").await;
        for client in [&mut u1, &mut u2, &mut agent] {
            client.subscribe("tickets").await;
        }
        t.publish("t2", "u2", 1).await;
        t.publish("t1", "u1", 2).await;
        t.publish("t2", "u2", 3).await;
        t.publish("t1", "u1", 4).await;

        // Order is kept, so the next event proves the ones in between were withheld.
        for seq in [2, 4] {
            let event = u1.event().await;
            assert_eq!((event.ticket.as_str(), event.seq), ("t1", seq));
        }
        for seq in [1, 3] {
            let event = u2.event().await;
            assert_eq!((event.ticket.as_str(), event.seq), ("t2", seq));
        }
        for seq in 1..=4 {
            assert_eq!(agent.event().await.seq, seq);
        }
        // Nothing else is pending for the customers.
        u1.ping_pong().await;
        u2.ping_pong().await;
    })
    .await;
}

/// Refuses every subscription with a long message, as one quoting a database error might.
struct Verbose;

#[async_trait::async_trait]
impl cqrs_realtime::Authorizer<crate::support::User> for Verbose {
    async fn authorize_subscribe(
        &self,
        _: &crate::support::User,
        _: &cqrs_realtime::Topic,
    ) -> Result<(), cqrs_realtime::Refusal> {
        Err(cqrs_realtime::Refusal::forbidden(
            "the rule says no. ".repeat(500),
        ))
    }

    fn may_see(
        &self,
        _: &crate::support::User,
        _: &cqrs_realtime::Topic,
        _: &cqrs_realtime::PushedEvent,
    ) -> bool {
        true
    }
}

/// A refusal's message is cut to fit the error frame: with the write buffer at its least, a
/// 9 KB message used to fail the write and drop the connection instead of an error frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_refusal_is_cut_to_fit_and_the_connection_stays_open() {
    with_timeout(TEST_LIMIT, async {
        let options = HubOptions::new().max_write_buffer_size(1024);
        let t = TestHub::start_on(
            std::sync::Arc::new(cqrs_core::memory::InMemoryPubSub::new()),
            options,
            |b| b.authorizer(Verbose),
        )
        .await;
        let mut client = t.connect("user-u1").await;
        client
            .send(json!({"type": "subscribe", "topic": "ticket:t1"}))
            .await;
        match client.frame().await {
            ServerFrame::Error { code, message, .. } => {
                assert_eq!(code, "forbidden");
                assert!(message.starts_with("the rule says no."), "{message}");
                assert!(message.len() <= 512, "{} bytes", message.len());
            }
            other => panic!("expected forbidden, got {other:?}"),
        }
        client.ping_pong().await;
    })
    .await;
}

/// `tickets` on its channel, each `ticket:<id>` on a channel of its own.
struct ChannelPerTicket;

impl EventRouting for ChannelPerTicket {
    fn channel(&self, topic: &cqrs_realtime::Topic) -> Option<String> {
        match (topic.family(), topic.key()) {
            ("tickets", None) => Some("tickets".into()),
            ("ticket", Some(id)) => Some(format!("ticket-{id}")),
            _ => None,
        }
    }

    fn route(&self, record: &cqrs_core::EventRecord) -> Option<cqrs_realtime::Routed> {
        crate::support::TicketRouting.route(record)
    }
}

/// Every topic of ticket `t1`'s events, `tickets` included, on channel `ticket-t1`: a
/// publisher whose routing differs from the hub's (a rolling deploy).
struct AllOnTicketT1;

impl EventRouting for AllOnTicketT1 {
    fn channel(&self, _: &cqrs_realtime::Topic) -> Option<String> {
        Some("ticket-t1".into())
    }

    fn route(&self, record: &cqrs_core::EventRecord) -> Option<cqrs_realtime::Routed> {
        crate::support::TicketRouting.route(record)
    }
}

/// A message on another channel than its topic's here (a publisher routing otherwise) tells
/// the topic's subscribers they missed an event: only those that may see it. A customer is
/// not told that a ticket it may not see changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_of_a_missed_event_goes_only_to_those_who_may_see_it() {
    with_timeout(TEST_LIMIT, async {
        let pubsub: Arc<dyn cqrs_core::ports::PubSub> =
            Arc::new(cqrs_core::memory::InMemoryPubSub::new());
        let t = TestHub::start_on(pubsub.clone(), HubOptions::new(), |b| {
            b.routing(ChannelPerTicket)
        })
        .await;
        let publisher =
            TestHub::start_on(pubsub, HubOptions::new(), |b| b.routing(AllOnTicketT1)).await;
        let mut u1 = t.connect("user-u1").await;
        u1.subscribe("tickets").await;
        let mut agent = t.connect("agent-a1").await;
        agent.subscribe("tickets").await;
        // The hub now holds channel `ticket-t1` too.
        let mut watcher = t.connect("agent-a2").await;
        watcher.subscribe("ticket:t1").await;

        // Ticket t1, reported by u2, published on `ticket-t1` naming `tickets` as well.
        publisher.publish("t1", "u2", 1).await;
        assert_eq!(watcher.event().await.seq, 1, "its own channel's subscriber");
        assert_eq!(
            agent.error_code().await,
            "events_missed",
            "an agent may see it"
        );
        // Nothing came before the pong: no notice of an event u1 may not see.
        u1.ping_pong().await;
    })
    .await;
}
