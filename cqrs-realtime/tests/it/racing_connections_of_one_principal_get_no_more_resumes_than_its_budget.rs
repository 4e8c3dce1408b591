use crate::support::{TEST_LIMIT, TestHub, TicketRules, User};
use async_trait::async_trait;
use cqrs_core::memory::InMemoryPubSub;
use cqrs_core::testing::with_timeout;
use cqrs_realtime::{Authorizer, HubOptions, PushedEvent, Refusal, ServerFrame, Topic};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The test rules, answering each subscribe after 50 ms: the window between the budget check
/// and the subscription that every racing connection used to slip through.
struct SlowRules(TicketRules);

#[async_trait]
impl Authorizer<User> for SlowRules {
    async fn authorize_subscribe(&self, user: &User, topic: &Topic) -> Result<(), Refusal> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.0.authorize_subscribe(user, topic).await
    }

    fn may_see(&self, user: &User, topic: &Topic, event: &PushedEvent) -> bool {
        self.0.may_see(user, topic, event)
    }
}

/// Eight connections of one principal loop over `subscribe` with `since` and `unsubscribe`
/// at once: together they start no more resumes than the budget allows (the burst, plus what
/// refilled while the test ran), not one per connection over it at every refill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_resumes_stay_within_the_budget() {
    const BUDGET: u32 = 2;
    const CONNECTIONS: usize = 8;
    const ROUNDS: usize = 5;
    with_timeout(TEST_LIMIT, async {
        let t = TestHub::start_on(
            Arc::new(InMemoryPubSub::new()),
            HubOptions::new().resumes_per_minute(BUDGET),
            |b| b.authorizer(SlowRules(TicketRules::default())),
        )
        .await;
        let started = Instant::now();
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CONNECTIONS {
            let mut client = t.connect("agent-a1").await;
            clients.spawn(async move {
                let mut resumed = 0u64;
                for _ in 0..ROUNDS {
                    client
                        .send(json!({"type": "subscribe", "topic": "tickets", "since": "0"}))
                        .await;
                    match client.frame().await {
                        ServerFrame::Subscribed { .. } => {
                            resumed += 1;
                            client
                                .send(json!({"type": "unsubscribe", "topic": "tickets"}))
                                .await;
                            match client.frame().await {
                                ServerFrame::Unsubscribed { .. } => {}
                                other => panic!("expected unsubscribed, got {other:?}"),
                            }
                        }
                        ServerFrame::Error { code, .. } if code == "too_many_resumes" => {}
                        other => panic!("expected subscribed or too_many_resumes, got {other:?}"),
                    }
                }
                resumed
            });
        }
        let mut resumed = 0;
        while let Some(n) = clients.join_next().await {
            resumed += n.unwrap();
        }
        // One resume back every 60 s / BUDGET: none within a test this short, but counted
        // exactly so a slow machine does not fail it.
        let refilled = (started.elapsed().as_secs_f64() * f64::from(BUDGET) / 60.0).floor() as u64;
        assert!(
            resumed >= u64::from(BUDGET),
            "the budget's burst is usable: {resumed} resumes"
        );
        assert!(
            resumed <= u64::from(BUDGET) + refilled,
            "{resumed} resumes started, the budget allows {}",
            u64::from(BUDGET) + refilled
        );
    })
    .await;
}
