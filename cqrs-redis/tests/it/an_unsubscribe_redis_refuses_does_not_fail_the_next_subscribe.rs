//! An `UNSUBSCRIBE` that Redis refuses (here an ACL that allows `SUBSCRIBE` but not
//! `UNSUBSCRIBE`) must not be taken for the reply to the next command on the subscriber
//! connection. fred completes `UNSUBSCRIBE` unanswered and hands an error reply to the oldest
//! command waiting for one: when the next subscribe's confirming `PING` was sent before the
//! refusal arrived (a slow network; here a proxy holds Redis's replies back), that subscribe
//! failed with `NOPERM`, though Redis had accepted it. The adapter confirms its `UNSUBSCRIBE`
//! with a `PING` of its own before any other subscribe may go out.

use crate::proxy::Proxy;
use crate::support::{
    acl_user, connect_admin, delete_stale_users, plain_redis_host, raw, reachable, within,
};
use cqrs_core::ports::PubSub;
use cqrs_core::testing::{eventually, test_id};
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions};
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_redis_refuses_does_not_fail_the_next_subscribe() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let id = test_id("unsubscribe-refused");
    let admin = connect_admin().await.unwrap();
    let user = acl_user(&admin, &id).await;
    delete_stale_users(&admin, "cqrs-test-unsubscribe_refused_").await;
    let channels = format!("&cqrs-test:{id}:*");
    let setuser: Vec<Value> = [
        "SETUSER",
        &user,
        "on",
        "nopass",
        "+@all",
        "-unsubscribe",
        "~*",
        "resetchannels",
        &channels,
    ]
    .iter()
    .map(|a| Value::from(*a))
    .collect();
    raw(&admin, "ACL", setuser).await;

    within(
        60,
        Box::pin(async {
            let host_only = host.split('/').next().unwrap_or(&host).to_owned();
            let proxy = Proxy::start(&host_only).await;
            let url = format!(
                "redis://{user}:x@{}",
                proxy
                    .url()
                    .trim_start_matches("redis://")
                    .rsplit('@')
                    .next()
                    .unwrap()
            );
            // No watchdog ping in the way: only the adapter's own commands go out.
            let connection = ConnectionOptions::new(url)
                .command_timeout(Duration::from_secs(5))
                .ping_interval(Duration::from_secs(3600));
            let pubsub = RedisPubSubOptions::with_connection(connection)
                .channel_prefix(format!("cqrs-test:{id}"))
                .connect()
                .await
                .expect("connect as the test's user");
            drop(pubsub.subscribe("first").await.expect("subscribe"));
            // Every reply from now on waits in the proxy, the refusal of the idle channel's
            // UNSUBSCRIBE among them, until a PING went out after that UNSUBSCRIBE: the next
            // subscribe's (which then took the refusal), or the adapter's own confirmation.
            proxy.hold_replies();
            let next = tokio::spawn({
                let pubsub = pubsub.clone();
                async move {
                    eventually(Duration::from_secs(10), "the idle channel let go", || {
                        let done = pubsub.upstream_subscriptions("first") == 0;
                        async move { done.then_some(()) }
                    })
                    .await;
                    pubsub.subscribe("next").await
                }
            });
            eventually(
                Duration::from_secs(10),
                "a PING after the UNSUBSCRIBE",
                || {
                    let sent = String::from_utf8_lossy(&proxy.sent()).into_owned();
                    let ping_after = sent
                        .find("UNSUBSCRIBE")
                        .is_some_and(|at| sent[at..].contains("PING"));
                    async move { ping_after.then_some(()) }
                },
            )
            .await;
            proxy.release_replies();
            let mut subscription = next
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("the next subscribe failed: {e}"));
            pubsub.publish("next", "hello".into()).await.unwrap();
            let message = tokio::time::timeout(Duration::from_secs(5), subscription.recv())
                .await
                .expect("the message arrives")
                .expect("open");
            assert_eq!(&*message.payload, "hello");
        }),
    )
    .await;
    raw(&admin, "ACL", vec!["DELUSER".into(), user.as_str().into()]).await;
}
