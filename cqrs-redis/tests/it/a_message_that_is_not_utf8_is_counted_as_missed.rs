//! The pub/sub port carries text: a message whose payload is not UTF-8 (published by another
//! client) cannot be delivered, and it is counted in `missed()` instead of vanishing, while
//! the text messages around it arrive as usual. Only that channel's subscriptions count it:
//! a subscriber of another channel missed nothing (one bad payload made every subscription of
//! the process report a loss, and the realtime hub send every client `events_missed`).

use crate::support::{connect_admin, raw, reachable, within};
use crate::the_pubsub_passes_the_conformance_suite::{options, prefix};
use cqrs_core::ports::PubSub;
use cqrs_core::testing::test_id;
use fred::interfaces::ClientLike;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_utf8_is_counted_as_missed() {
    if !reachable().await {
        return;
    }
    let id = test_id("not-utf8");
    within(
        30,
        Box::pin(async {
            let pubsub = options(&id).connect().await.expect("connect");
            let admin = connect_admin().await.unwrap();
            let channel = format!("{id}-news");
            let mut subscription = pubsub.subscribe(&channel).await.unwrap();
            let elsewhere = pubsub.subscribe(&format!("{id}-sport")).await.unwrap();
            let full = format!("{}:{channel}", prefix(&id));
            for payload in [
                Value::from("before"),
                Value::Bytes(vec![0xff].into()),
                Value::from("after"),
            ] {
                raw(&admin, "PUBLISH", vec![full.as_str().into(), payload]).await;
            }
            let mut received = Vec::new();
            while received.last().map(String::as_str) != Some("after") {
                let message = tokio::time::timeout(Duration::from_secs(5), subscription.recv())
                    .await
                    .expect("the messages arrive")
                    .expect("open");
                received.push(message.payload.to_string());
            }
            assert_eq!(received, ["before", "after"]);
            // Messages are handed on in order: by the time "after" arrived, the one before it
            // was dealt with.
            assert_eq!(
                subscription.missed(),
                1,
                "the undeliverable message is counted"
            );
            assert_eq!(elsewhere.missed(), 0, "by its own channel only");
            let _ = admin.quit().await;
        }),
    )
    .await;
}
