//! An `UNSUBSCRIBE` that fails leaves the channel subscribed in Redis: the pub/sub must say so
//! (`upstream_subscriptions` agrees with Redis's `PUBSUB NUMSUB`) and try again, not forget
//! the channel while Redis still sends it messages. The test's own ACL user may not run
//! `UNSUBSCRIBE`; once it may again, the channel is unsubscribed without another reconnect.

use crate::support::{
    acl_user, connect_admin, delete_stale_users, plain_redis_host, raw, reachable, within,
};
use crate::the_pubsub_passes_the_conformance_suite::numsub;
use cqrs_core::ports::PubSub;
use cqrs_core::testing::{eventually, test_id};
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions};
use fred::clients::Client;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_redis_refuses_is_retried() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let id = test_id("unsubscribe-refused");
    let admin = connect_admin().await.unwrap();
    let user = acl_user(&admin, &id).await;
    let acl = |args: &[&str]| {
        let admin = admin.clone();
        let args: Vec<Value> = args.iter().map(|a| Value::from(*a)).collect();
        async move { raw(&admin, "ACL", args).await }
    };
    delete_stale_users(&admin, "cqrs-test-unsubscribe_refused_").await;
    acl(&[
        "SETUSER",
        &user,
        "on",
        "nopass",
        "+@all",
        "-unsubscribe",
        "~*",
        "allchannels",
    ])
    .await;

    within(
        60,
        Box::pin(async {
            let connection = ConnectionOptions::new(format!("redis://{user}:x@{host}"))
                .command_timeout(Duration::from_secs(2))
                .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200));
            let pubsub = RedisPubSubOptions::with_connection(connection)
                .channel_prefix(format!("cqrs-test:{id}"))
                .connect()
                .await
                .expect("connect as the test's user");
            let channel = "news";
            let full = format!("cqrs-test:{id}:{channel}");
            let sub = pubsub.subscribe(channel).await.unwrap();
            assert_eq!(numsub(&admin, &full).await, 1);
            assert_eq!(pubsub.upstream_subscriptions(channel), 1);

            drop(sub);
            eventually(Duration::from_secs(10), "an unsubscribe refused", || {
                let (admin, user) = (admin.clone(), user.clone());
                async move { refused_unsubscribe(&admin, &user).await.then_some(()) }
            })
            .await;
            assert_eq!(numsub(&admin, &full).await, 1, "Redis still subscribed");
            assert_eq!(
                pubsub.upstream_subscriptions(channel),
                1,
                "the pub/sub says what Redis holds: the channel is still subscribed"
            );

            acl(&["SETUSER", &user, "+unsubscribe"]).await;
            eventually(
                Duration::from_secs(10),
                "the channel unsubscribed once allowed",
                || {
                    let (admin, full) = (admin.clone(), full.clone());
                    async move { (numsub(&admin, &full).await == 0).then_some(()) }
                },
            )
            .await;
            eventually(
                Duration::from_secs(10),
                "the pub/sub no longer counts the channel",
                || async { (pubsub.upstream_subscriptions(channel) == 0).then_some(()) },
            )
            .await;

            // Subscribing again works as before.
            let mut again = pubsub.subscribe(channel).await.unwrap();
            assert_eq!(numsub(&admin, &full).await, 1);
            pubsub.publish(channel, "again".into()).await.unwrap();
            let message = tokio::time::timeout(Duration::from_secs(5), again.recv())
                .await
                .expect("a message after subscribing again")
                .expect("open");
            assert_eq!(&*message.payload, "again");
        }),
    )
    .await;
    acl(&["DELUSER", &user]).await;
}

/// Whether `ACL LOG` holds an `UNSUBSCRIBE` refused to `user`.
async fn refused_unsubscribe(admin: &Client, user: &str) -> bool {
    let log = raw(admin, "ACL", vec!["LOG".into()]).await;
    log.into_array().into_iter().any(|entry| {
        let fields = entry.into_array();
        let field = |name: &str| {
            fields
                .chunks(2)
                .find(|kv| kv[0].as_str().as_deref() == Some(name))
                .and_then(|kv| kv[1].as_string())
        };
        field("reason").as_deref() == Some("command")
            && field("object").as_deref() == Some("unsubscribe")
            && field("username").as_deref() == Some(user)
    })
}
