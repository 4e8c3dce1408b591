//! A resubscription that Redis refuses on a live connection is tried again, not left for a
//! reconnect that may never come. The test's own ACL user loses the right to one of its two
//! channels, which makes Redis drop its subscribed connection; fred reconnects, the
//! resubscription is refused (`NOPERM`, seen in `ACL LOG`) for that channel, while the other
//! is subscribed again and keeps delivering (Redis refuses a whole `SUBSCRIBE` for one
//! channel it refuses: one channel took every other down with it), and the health check says
//! so, and a subscription made meanwhile is told of the loss; the right comes back, and the
//! channel is subscribed again without another reconnect.
//! (The refusal is seen in Redis's count of the connection's subscriptions: fred may drop the
//! `NOPERM` reply.)

use crate::support::{
    acl, acl_user, connect_admin, delete_stale_users, plain_redis_host, raw, reachable, within,
};
use cqrs_core::ports::PubSub;
use cqrs_core::runtime::{Health, HealthCheck};
use cqrs_core::testing::{eventually, test_id};
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions};
use fred::clients::Client;
use fred::types::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubscribe_refused_while_connected_is_retried() {
    if !reachable().await {
        return;
    }
    let Some(host) = plain_redis_host() else {
        return;
    };
    let id = test_id("resubscribe-refused");
    let channels = format!("&cqrs-test:{id}:*");
    let admin = connect_admin().await.unwrap();
    let user = acl_user(&admin, &id).await;
    delete_stale_users(&admin, "cqrs-test-resubscribe_refused_").await;
    acl(
        &admin,
        &[
            "SETUSER",
            &user,
            "on",
            "nopass",
            "+@all",
            "~*",
            "resetchannels",
            &channels,
        ],
    )
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
            let mut sub = pubsub.subscribe(channel).await.unwrap();
            assert_eq!(numsub(&admin, &full).await, Some(1));
            let other = "sport";
            let other_full = format!("cqrs-test:{id}:{other}");
            let mut other_sub = pubsub.subscribe(other).await.unwrap();

            // Redis 7 closes a subscribed connection whose user loses the channel; kill it
            // as well, in case this server does not.
            acl(
                &admin,
                &["SETUSER", &user, "resetchannels", &format!("&{other_full}")],
            )
            .await;
            let _ = raw(
                &admin,
                "CLIENT",
                vec!["KILL".into(), "USER".into(), user.as_str().into()],
            )
            .await;
            eventually(
                Duration::from_secs(10),
                "a resubscription refused for the channel",
                || {
                    let (admin, user) = (admin.clone(), user.clone());
                    async move { refused_channel(&admin, &user).await.then_some(()) }
                },
            )
            .await;
            assert_eq!(numsub(&admin, &full).await, Some(0));
            // Whoever subscribes to the refused channel after the reconnect's notice (a client
            // that resumed) is told too, at a retry: its channel delivers nothing.
            let late = pubsub.subscribe(channel).await.unwrap();
            eventually(
                Duration::from_secs(10),
                "a subscription made while refused counts a loss",
                || {
                    let missed = late.missed();
                    async move { (missed > 0).then_some(()) }
                },
            )
            .await;
            drop(late);
            // The other channel is live again, and delivers, while this one is refused.
            eventually(
                Duration::from_secs(10),
                "the allowed channel subscribed again",
                || {
                    let (admin, other_full) = (admin.clone(), other_full.clone());
                    async move { (numsub(&admin, &other_full).await == Some(1)).then_some(()) }
                },
            )
            .await;
            eventually(
                Duration::from_secs(10),
                "a publish on the allowed channel",
                || {
                    let pubsub = pubsub.clone();
                    async move { pubsub.publish(other, "still here".into()).await.ok() }
                },
            )
            .await;
            let message = tokio::time::timeout(Duration::from_secs(5), other_sub.recv())
                .await
                .expect("a message on the allowed channel")
                .expect("open");
            assert_eq!(&*message.payload, "still here");
            eventually(
                Duration::from_secs(10),
                "the health check to report the refused channel",
                || {
                    let pubsub = pubsub.clone();
                    async move {
                        match pubsub.check().await {
                            Health::Unhealthy(why) if why.contains("refused 1") => Some(()),
                            _ => None,
                        }
                    }
                },
            )
            .await;

            acl(&admin, &["SETUSER", &user, &channels]).await;
            eventually(
                Duration::from_secs(10),
                "the channel subscribed again once allowed",
                || {
                    let (admin, full) = (admin.clone(), full.clone());
                    async move { (numsub(&admin, &full).await == Some(1)).then_some(()) }
                },
            )
            .await;
            eventually(
                Duration::from_secs(10),
                "a publish after the resubscription",
                || {
                    let pubsub = pubsub.clone();
                    async move { pubsub.publish(channel, "after".into()).await.ok() }
                },
            )
            .await;
            let message = tokio::time::timeout(Duration::from_secs(5), sub.recv())
                .await
                .expect("a message after the resubscription")
                .expect("open");
            assert_eq!(&*message.payload, "after");
            eventually(Duration::from_secs(10), "healthy again", || {
                let pubsub = pubsub.clone();
                async move { (pubsub.check().await == Health::Healthy).then_some(()) }
            })
            .await;
        }),
    )
    .await;
    acl(&admin, &["DELUSER", &user]).await;
}

async fn numsub(admin: &Client, full: &str) -> Option<u64> {
    let reply = raw(admin, "PUBSUB", vec!["NUMSUB".into(), full.into()]).await;
    reply.into_array().get(1).and_then(Value::as_u64)
}

/// Whether `ACL LOG` holds a refused channel access by `user`.
async fn refused_channel(admin: &Client, user: &str) -> bool {
    let log = raw(admin, "ACL", vec!["LOG".into()]).await;
    log.into_array().into_iter().any(|entry| {
        let fields = entry.into_array();
        let field = |name: &str| {
            fields
                .chunks(2)
                .find(|kv| kv[0].as_str().as_deref() == Some(name))
                .and_then(|kv| kv[1].as_string())
        };
        field("reason").as_deref() == Some("channel") && field("username").as_deref() == Some(user)
    })
}
