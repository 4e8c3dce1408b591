//! A least-privilege Redis user, the common `+@all -@dangerous` (no `INFO`, `CONFIG`,
//! `CLIENT LIST`, ...), connects the stream transport and the pub/sub and uses both: the
//! version check reads `HELLO` when `INFO` is refused (it refused to connect before).

use crate::support::{
    acl, acl_user, connect_admin, consumer_options, delete_stale_users, event, fetch_some,
    key_prefix, plain_redis_host, reachable, within,
};
use cqrs_core::ports::{EventTransport, PubSub};
use cqrs_core::testing::test_id;
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions, RedisStreamOptions};
use fred::interfaces::ClientLike;
use fred::prelude::{Builder, Config};
use fred::types::{ClusterHash, CustomCommand};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_dangerous_commands_connects_and_works() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let id = test_id("least-privilege");
    let admin = connect_admin().await.unwrap();
    let user = acl_user(&admin, &id).await;
    delete_stale_users(&admin, "cqrs-test-least_privilege_").await;
    acl(
        &admin,
        &[
            "SETUSER",
            &user,
            "on",
            "nopass",
            "+@all",
            "-@dangerous",
            "~*",
            "&*",
        ],
    )
    .await;
    let url = format!("redis://{user}:x@{host}");

    within(
        60,
        Box::pin(async {
            // The premise: this user may not run INFO.
            let probe = Builder::from_config(Config::from_url(&url).unwrap())
                .build()
                .unwrap();
            probe.init().await.expect("log in as the test's user");
            let info: Result<String, _> = probe
                .custom(
                    CustomCommand::new("INFO", ClusterHash::FirstKey, false),
                    vec!["server"],
                )
                .await;
            let refused = info.expect_err("INFO is refused to a user without @dangerous");
            assert!(refused.details().starts_with("NOPERM"), "{refused:?}");
            let _ = probe.quit().await;

            let connection = || {
                ConnectionOptions::new(url.clone())
                    .command_timeout(Duration::from_secs(2))
                    .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200))
            };
            let transport = RedisStreamOptions::with_connection(connection())
                .key_prefix(key_prefix(&id))
                .connect()
                .await
                .expect("the stream transport connects as a least-privilege user");
            let published = event(Some("k"), 1);
            transport
                .publish("events", std::slice::from_ref(&published))
                .await
                .expect("publish");
            let mut consumer = transport
                .consumer("events", "g", consumer_options("c"))
                .await
                .expect("consumer");
            let got = fetch_some(consumer.as_mut(), 10, "the event published").await;
            assert_eq!(got[0].record.event_id, published.event_id);
            consumer.ack(&[got[0].id.clone()]).await.expect("ack");

            let pubsub = RedisPubSubOptions::with_connection(connection())
                .channel_prefix(format!("cqrs-test:{id}"))
                .connect()
                .await
                .expect("the pub/sub connects as a least-privilege user");
            let mut subscription = pubsub.subscribe("news").await.expect("subscribe");
            pubsub
                .publish("news", Arc::from("hello"))
                .await
                .expect("publish on pub/sub");
            let message = tokio::time::timeout(Duration::from_secs(10), subscription.recv())
                .await
                .expect("the message within 10 s")
                .expect("a message");
            assert_eq!(&*message.payload, "hello");
            crate::support::delete_prefix(&admin, &key_prefix(&id)).await;
        }),
    )
    .await;
    acl(&admin, &["DELUSER", &user]).await;
}
