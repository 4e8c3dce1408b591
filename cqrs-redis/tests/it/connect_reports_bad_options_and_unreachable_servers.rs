//! `connect` reports every problem of the options at once, an unreachable server as a
//! retryable error, and refuses a consumer name already in use in the process, saying how to
//! fix it. (A TLS URL in a build without TLS: the options' unit tests, for both builds.)

use crate::support::{Env, consumer_options, unreachable, within};
use cqrs_core::ErrorKind;
use cqrs_core::ports::EventTransport;
use cqrs_redis::{ConnectError, ConnectionOptions, RedisStreamOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_bad_options_and_unreachable_servers() {
    within(
        30,
        Box::pin(async {
            let invalid = RedisStreamOptions::new("nope://")
                .key_prefix("")
                .max_held(0)
                .connect()
                .await
                .expect_err("invalid options");
            let ConnectError::Invalid { problems } = &invalid else {
                panic!("{invalid:?}");
            };
            assert_eq!(problems.len(), 3, "{problems:?}");
            assert_eq!(invalid.kind(), ErrorKind::Invalid);

            // Port 1 on loopback: nothing listens there.
            let down = RedisStreamOptions::with_connection(
                ConnectionOptions::new("redis://127.0.0.1:1")
                    .connect_timeout(Duration::from_secs(2)),
            )
            .connect()
            .await
            .expect_err("nothing listens on port 1");
            assert!(unreachable(&down), "{down:?}");
            assert!(matches!(
                down.kind(),
                ErrorKind::Unavailable | ErrorKind::Timeout
            ));
            // A refused connection names the server and says what to check.
            if down.kind() == ErrorKind::Unavailable {
                let message = down.to_string();
                assert!(
                    message.contains("could not connect to 127.0.0.1:1 (")
                        && message.contains("check that Redis runs there"),
                    "{message}"
                );
            }
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_name_in_use_in_the_process_is_refused() {
    let Some(env) = Env::new("names").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("t");
            let name = format!("{}-same", env.id);
            let first = env
                .transport
                .consumer(&topic, "g", consumer_options(&name))
                .await
                .unwrap();
            let second = env
                .transport
                .consumer(&topic, "g", consumer_options(&name))
                .await;
            let Err(error) = second else {
                panic!("two live consumers with one name");
            };
            // It says the usual cause and the fix, not only that the name is taken.
            let message = error.to_string();
            for part in [
                name.as_str(),
                "one `ConsumerOptions` reused for two consumers",
                "build a fresh `ConsumerOptions::default()` for each consumer",
                "distinct `.consumer_name(..)`",
            ] {
                assert!(message.contains(part), "{part:?} in {message}");
            }
            // Through another transport of the process, to the same server, too: each
            // would release the other's entries when it closes.
            let other = env.transport.options().clone().connect().await.unwrap();
            let Err(error) = other.consumer(&topic, "g", consumer_options(&name)).await else {
                panic!("two live consumers with one name, on two transports");
            };
            assert!(error.to_string().contains(&name), "{error}");
            drop(first);
            env.transport
                .consumer(&topic, "g", consumer_options(&name))
                .await
                .expect("the name is free again");
        }),
    )
    .await;
    env.cleanup().await;
}

/// Consumer options that would break the transport's guarantees, and topic names that would
/// split a topic's keys across cluster slots, are refused as invalid, saying what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_options_and_topics_that_break_guarantees_are_refused() {
    let Some(env) = Env::new("refused").await else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let topic = env.topic("t");
            let refused = |options: cqrs_core::ports::ConsumerOptions, topic: String| {
                let transport = &env.transport;
                async move {
                    match transport.consumer(&topic, "g", options).await {
                        Ok(_) => panic!("accepted"),
                        Err(error) => {
                            assert_eq!(error.kind(), ErrorKind::Invalid, "{error}");
                            error.to_string()
                        }
                    }
                }
            };
            let message = refused(
                consumer_options("c").redelivery_delay(Duration::ZERO),
                topic.clone(),
            )
            .await;
            assert!(message.contains("redelivery_delay"), "{message}");
            let message = refused(consumer_options("c").max_deliveries(0), topic.clone()).await;
            assert!(message.contains("max_deliveries"), "{message}");
            let message = refused(consumer_options("c"), format!("}}{topic}")).await;
            assert!(message.contains("must not contain"), "{message}");
            env.transport
                .consumer(
                    &topic,
                    "g",
                    consumer_options("c").redelivery_delay(cqrs_redis::MIN_REDELIVERY_DELAY),
                )
                .await
                .expect("the shortest delay allowed");
        }),
    )
    .await;
    env.cleanup().await;
}

/// A server that accepts connections and never answers (another service on the port, a
/// stalled Redis) fails the connect within the connect timeout, naming the server: the
/// handshake waited out the command timeout, and the error said only "redis did not answer in
/// time". The command timeout here is far past the test's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_fails_the_connect_within_its_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts, reads nothing, answers nothing, keeps every connection open.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    within(
        20,
        Box::pin(async {
            let error = RedisStreamOptions::with_connection(
                ConnectionOptions::new(format!("redis://127.0.0.1:{port}"))
                    .connect_timeout(Duration::from_millis(300))
                    .command_timeout(Duration::from_secs(600)),
            )
            .connect()
            .await
            .expect_err("nothing answers");
            assert_eq!(error.kind(), ErrorKind::Unavailable, "{error:?}");
            let message = error.to_string();
            for part in [
                format!("could not connect to 127.0.0.1:{port}: no answer (the connect waits at most 300ms, its handshake 300ms)"),
                "Redis, not another service, listens there".to_owned(),
            ] {
                assert!(message.contains(&part), "{part:?} in {message}");
            }
        }),
    )
    .await;
    silent.abort();
}

/// A Redis Cluster node behind a URL that is not a cluster one is a configuration error for
/// the stream transport that says which scheme to use: fred follows no redirect then, and
/// every command for a key on another node would get `MOVED`, retried for ever as if Redis
/// were away. Also for a user who may not run `INFO` (told by `HELLO`). Pub/sub is not keyed
/// (a cluster carries a channel to every node): it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_behind_a_plain_url_says_to_use_a_cluster_one() {
    use crate::own_server::{Logs, Server};
    let id = cqrs_core::testing::test_id("cluster-node");
    let mut logs = Logs::new();
    let Some(node) = Server::start_free_with(&id, &mut logs, &["--cluster-enabled", "yes"]).await
    else {
        return;
    };
    within(
        30,
        Box::pin(async {
            let admin = node.admin().await;
            crate::support::acl(
                &admin,
                &["SETUSER", "limited", "on", ">s3cret", "+@all", "-@dangerous", "~*", "&*"],
            )
            .await;
            let limited = format!("redis://limited:s3cret@127.0.0.1:{}", node.port);
            for url in [node.url(), limited] {
                let error = RedisStreamOptions::new(&url)
                    .connect()
                    .await
                    .expect_err("a cluster node");
                assert!(
                    matches!(&error, ConnectError::Invalid { problems } if problems.iter().any(|p| p.contains("`redis-cluster://`"))),
                    "{url}: {error}"
                );
            }
            let pubsub = cqrs_redis::RedisPubSubOptions::new(node.url())
                .connect()
                .await
                .expect("pub/sub on a cluster node");
            drop(pubsub);
        }),
    )
    .await;
}
