//! A subscribe that Redis refuses (`NOPERM`: the test's own ACL user may not use the channel)
//! fails, every time, while the watchdog pings the subscriber connection every 10 ms. The
//! refusal has no command of its own in fred: a watchdog `PING` between the `SUBSCRIBE` and
//! the `PING` that confirms it would take it as its reply, and fred drops one that arrives
//! before the confirming `PING` is queued; either way the subscribe passed with the channel
//! never subscribed (about one try in 10 to 60 here).

use crate::support::{
    acl_user, connect_admin, delete_stale_users, plain_redis_host, raw, reachable, within,
};
use cqrs_core::ports::PubSub;
use cqrs_core::testing::test_id;
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions};
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscribe_fails_while_the_watchdog_pings() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let id = test_id("refused-subscribe");
    let admin = connect_admin().await.unwrap();
    let user = acl_user(&admin, &id).await;
    delete_stale_users(&admin, "cqrs-test-refused_subscribe_").await;
    let allowed = format!("&cqrs-test:{id}:allowed");
    let args: Vec<Value> = [
        "SETUSER",
        &user,
        "on",
        "nopass",
        "+@all",
        "~*",
        "resetchannels",
        &allowed,
    ]
    .iter()
    .map(|a| Value::from(*a))
    .collect();
    raw(&admin, "ACL", args).await;

    within(
        60,
        Box::pin(async {
            let connection = ConnectionOptions::new(format!("redis://{user}:x@{host}"))
                .command_timeout(Duration::from_secs(2))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
                .ping_interval(Duration::from_millis(10));
            let pubsub = RedisPubSubOptions::with_connection(connection)
                .channel_prefix(format!("cqrs-test:{id}"))
                .connect()
                .await
                .expect("connect as the test's user");
            let _allowed = pubsub
                .subscribe("allowed")
                .await
                .expect("an allowed channel");
            for attempt in 0..300 {
                let refused = pubsub.subscribe("denied").await;
                assert!(
                    refused.is_err(),
                    "attempt {attempt}: a refused subscribe passed"
                );
                assert_eq!(pubsub.upstream_subscriptions("denied"), 0);
            }
        }),
    )
    .await;
    raw(&admin, "ACL", vec!["DELUSER".into(), user.as_str().into()]).await;
}
