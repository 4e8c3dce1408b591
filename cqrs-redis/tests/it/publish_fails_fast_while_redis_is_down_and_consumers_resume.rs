//! With its server stopped, publishing fails fast with `Unavailable` (the outbox relay
//! retries), and so does a pub/sub subscribe to a new channel (it waited a whole command
//! timeout, behind every other channel's, and then said `Timeout`); when a server is back on
//! the address (empty: no persistence), the consumer recreates its group and handles what is
//! published then, and subscribing works again. Runs its own `redis-server`.

use crate::support::{consumer_options, event, publish_until_ok, within};
use cqrs_core::ports::{EventTransport, PubSub, TransportError};
use cqrs_redis::{ConnectionOptions, RedisPubSubOptions, RedisStreamOptions};
use fred::interfaces::ClientLike;
use fred::prelude::{Builder, Config};
use fred::types::{ClusterHash, CustomCommand, Value};
use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// The log files of this test's `redis-server`s: printed if the test fails (a panic, or the
/// time limit), removed if it passes.
struct Logs(Vec<PathBuf>);

impl Logs {
    /// A new, empty log file for a server on `port`, named after the test id.
    fn create(&mut self, id: &str, port: u16) -> std::io::Result<File> {
        let path = std::env::temp_dir().join(format!("{id}-redis-{port}-{}.log", self.0.len()));
        let file = File::create(&path)?;
        self.0.push(path);
        Ok(file)
    }

    fn dump(&self) -> String {
        self.0
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
                format!("--- {} ---\n{text}", path.display())
            })
            .collect()
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the redis-server logs of this test:\n{}", self.dump());
        } else {
            for path in &self.0 {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A `redis-server` of this test's own, killed when dropped, logging to a file of `Logs`.
struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn start(port: u16, log: File) -> std::io::Result<Server> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Server {
            port,
            child: Some(child),
        })
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Waits until the server on the port is this one: `INFO server` answers with this
    /// child's `process_id` (not merely something listening: the port was free when picked,
    /// and another process may have taken it since). `Err` when the child exited (say, the
    /// port was taken) or did not answer within 10 s.
    async fn wait_until_up(&mut self) -> Result<(), String> {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        let url = self.url();
        loop {
            let child = self.child.as_mut().expect("a running server");
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!(
                    "redis-server on port {} exited: {status}",
                    self.port
                ));
            }
            let pid = child.id();
            if process_id(&url).await == Some(pid) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                return Err(format!(
                    "redis-server (pid {pid}) did not answer on port {} within 10 s",
                    self.port
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `process_id` that `INFO server` reports at `url`, if a Redis answers there.
async fn process_id(url: &str) -> Option<u32> {
    let mut builder = Builder::from_config(Config::from_url(url).ok()?);
    builder.with_connection_config(|c| c.connection_timeout = Duration::from_secs(1));
    builder.with_performance_config(|c| c.default_command_timeout = Duration::from_secs(1));
    let client = builder.build().ok()?;
    client.init().await.ok()?;
    let info: Option<String> = client
        .custom(
            CustomCommand::new("INFO", ClusterHash::FirstKey, false),
            vec![Value::from("server")],
        )
        .await
        .ok();
    let _ = client.quit().await;
    info?
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fails_fast_while_redis_is_down_and_consumers_resume() {
    let id = cqrs_core::testing::test_id("redis-down");
    let mut logs = Logs(Vec::new());
    // A port free when picked may be taken before redis-server binds it: then the server
    // exits, and another port is tried.
    let mut attempts = 0;
    let mut server = loop {
        attempts += 1;
        let port = free_port();
        let log = logs
            .create(&id, port)
            .expect("create the server's log file");
        let mut server = match Server::start(port, log) {
            Ok(server) => server,
            Err(e) => {
                let required = std::env::var("CQRS_REQUIRE_SERVICES").as_deref() == Ok("1");
                assert!(!required, "redis-server could not start: {e}");
                eprintln!("skipping: redis-server could not start: {e}");
                return;
            }
        };
        match server.wait_until_up().await {
            Ok(()) => break server,
            Err(e) if attempts < 3 => eprintln!("{e}; trying another port"),
            Err(e) => panic!("{e}"),
        }
    };
    let port = server.port;
    within(
        90,
        Box::pin(async {
            let transport = RedisStreamOptions::with_connection(
                ConnectionOptions::new(server.url())
                    .command_timeout(Duration::from_millis(500))
                    .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200)),
            )
            .connect()
            .await
            .expect("connect");
            // A command timeout well over the 2 s the subscribes below are given to fail
            // together: on a loaded machine they may take a while, but one that waited a
            // command timeout (behind the one before, or for the server) would not fit.
            let pubsub = RedisPubSubOptions::with_connection(
                ConnectionOptions::new(server.url())
                    .command_timeout(Duration::from_secs(5))
                    .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200)),
            )
            .channel_prefix(format!("cqrs-test:{id}"))
            .connect()
            .await
            .expect("connect the pub/sub");
            let _before = pubsub
                .subscribe("before")
                .await
                .expect("subscribe while up");
            let mut consumer = transport
                .consumer("events", "g", consumer_options("c"))
                .await
                .unwrap();
            let handled: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let task = {
                let (handled, stop) = (handled.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        match consumer.fetch(10).await {
                            Ok(batch) => {
                                let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();
                                handled
                                    .lock()
                                    .unwrap()
                                    .extend(batch.iter().map(|d| d.record.event_id));
                                let _ = consumer.ack(&ids).await;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            };
            let first = event(Some("k"), 1);
            transport
                .publish("events", std::slice::from_ref(&first))
                .await
                .unwrap();
            cqrs_core::testing::eventually(Duration::from_secs(10), "the first event", || {
                let done = handled.lock().unwrap().contains(&first.event_id);
                async move { done.then_some(()) }
            })
            .await;

            server.stop();
            let down = event(Some("k"), 2);
            // A publish in flight when the server died may time out; once fred knows the
            // connection is gone, publishing fails at once with `Unavailable`.
            cqrs_core::testing::eventually(
                Duration::from_secs(10),
                "publish to fail with Unavailable",
                || {
                    let (transport, down) = (transport.clone(), down.clone());
                    async move {
                        match transport.publish("events", &[down]).await {
                            Err(TransportError::Unavailable { .. }) => Some(()),
                            Err(TransportError::Timeout { .. }) => None,
                            other => {
                                panic!("a retryable error while the server is down, got {other:?}")
                            }
                        }
                    }
                },
            )
            .await;
            for _ in 0..3 {
                let result = tokio::time::timeout(
                    Duration::from_secs(2),
                    transport.publish("events", std::slice::from_ref(&down)),
                )
                .await
                .expect("publish fails fast instead of waiting for the server");
                assert!(
                    matches!(result, Err(TransportError::Unavailable { .. })),
                    "{result:?}"
                );
            }
            // Once fred knows the subscriber connection is gone, each new channel's subscribe
            // fails at once, not one command timeout after the one before.
            cqrs_core::testing::eventually(
                Duration::from_secs(20),
                "subscribe to fail with Unavailable",
                || {
                    let pubsub = pubsub.clone();
                    async move {
                        match pubsub.subscribe("probe").await {
                            Err(TransportError::Unavailable { .. }) => Some(()),
                            Err(TransportError::Timeout { .. }) => None,
                            other => {
                                panic!("a retryable error while the server is down, got {other:?}")
                            }
                        }
                    }
                },
            )
            .await;
            let subscribes = async {
                let (a, b, c, d) = tokio::join!(
                    pubsub.subscribe("a"),
                    pubsub.subscribe("b"),
                    pubsub.subscribe("c"),
                    pubsub.subscribe("d")
                );
                [a, b, c, d]
            };
            let results = tokio::time::timeout(Duration::from_secs(2), subscribes)
                .await
                .expect("four subscribes fail within one command timeout, together");
            for result in results {
                assert!(
                    matches!(result, Err(TransportError::Unavailable { .. })),
                    "{result:?}"
                );
            }

            let log = logs
                .create(&id, port)
                .expect("create the server's log file");
            let mut server = Server::start(port, log).expect("restart redis-server");
            server
                .wait_until_up()
                .await
                .unwrap_or_else(|e| panic!("restart on the same port: {e}"));
            let back = event(Some("k"), 3);
            publish_until_ok(|| transport.publish("events", std::slice::from_ref(&back))).await;
            cqrs_core::testing::eventually(
                Duration::from_secs(20),
                "the event published after the restart",
                || {
                    let done = handled.lock().unwrap().contains(&back.event_id);
                    async move { done.then_some(()) }
                },
            )
            .await;
            cqrs_core::testing::eventually(
                Duration::from_secs(20),
                "a subscribe once the server is back",
                || {
                    let pubsub = pubsub.clone();
                    async move { pubsub.subscribe("after").await.ok() }
                },
            )
            .await;
            stop.store(true, Ordering::SeqCst);
            task.await.unwrap();
            server.stop();
        }),
    )
    .await;
}
