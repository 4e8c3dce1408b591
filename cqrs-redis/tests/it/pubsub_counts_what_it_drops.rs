//! A burst bigger than the subscriber's buffers loses messages (pub/sub is at-most-once), but
//! never silently: whatever a subscription does not receive, it counts as missed, also when
//! the adapter dropped it before it knew the channel.

use crate::support::{connect_admin, reachable, within};
use crate::the_pubsub_passes_the_conformance_suite::options;
use cqrs_core::ports::PubSub;
use fred::interfaces::LuaInterface;
use std::time::Duration;

const BURST: u64 = 20_000;

#[test]
fn every_message_of_a_burst_is_received_or_counted_as_missed() {
    // One thread: the adapter's forwarding task and fred's reader share it, as on a busy
    // machine, so the burst outruns the buffers.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(within(
            60,
            Box::pin(async {
                if !reachable().await {
                    return;
                }
                let id = cqrs_core::testing::test_id("pubsub-burst");
                // Each subscriber (and the client's own buffer) holds 8 messages.
                let pubsub = options(&id).capacity(8).connect().await.unwrap();
                let mut subscription = pubsub.subscribe("burst").await.unwrap();
                // A second subscriber of the channel, read first: once it has the end of the
                // burst, the fan-out has handed every message on, and `subscription`, not read
                // meanwhile, holds its last 8 at most: it certainly missed some.
                let mut probe = pubsub.subscribe("burst").await.unwrap();
                let admin = connect_admin().await.unwrap();
                let channel = format!("cqrs-test:{id}:burst");
                let script =
                    "for i = 1, tonumber(ARGV[1]) do redis.call('PUBLISH', KEYS[1], i) end";
                let _: () = admin
                    .eval(script, vec![channel.as_str()], vec![BURST.to_string()])
                    .await
                    .unwrap();
                // The end of the burst: a last message, after which nothing more comes.
                let _: () = admin
                    .eval(
                        "redis.call('PUBLISH', KEYS[1], 'end')",
                        vec![channel.as_str()],
                        Vec::<String>::new(),
                    )
                    .await
                    .unwrap();
                loop {
                    let message = tokio::time::timeout(Duration::from_secs(10), probe.recv())
                        .await
                        .expect("the end of the burst reaches the probe")
                        .expect("the probe is open");
                    if &*message.payload == "end" {
                        break;
                    }
                }
                let mut received = 0;
                loop {
                    let message =
                        tokio::time::timeout(Duration::from_secs(10), subscription.recv())
                            .await
                            .expect("the end of the burst arrives")
                            .expect("the subscription is open");
                    if &*message.payload == "end" {
                        break;
                    }
                    received += 1;
                }
                assert_eq!(
                    received + subscription.missed(),
                    BURST,
                    "received {received}, counted missed {}",
                    subscription.missed()
                );
                assert!(
                    subscription.missed() >= BURST - 8,
                    "a subscriber 8 messages deep, not read during a burst of {BURST}, \
                     received {received} and counted {} missed",
                    subscription.missed()
                );
            }),
        ));
}
