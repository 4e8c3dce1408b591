use crate::support::{TEST_LIMIT, TestHub};
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{HubOptions, ServerFrame};
use serde_json::json;

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
