//! With its server stopped, publishing fails fast with `Unavailable` (the outbox relay
//! retries); when a server is back on the address (empty: no persistence), the consumer
//! recreates its group and handles what is published then. Runs its own `redis-server`.

use crate::support::{consumer_options, event, publish_until_ok, within};
use cqrs_core::ports::{EventTransport, TransportError};
use cqrs_redis::{ConnectionOptions, RedisStreamOptions};
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// A `redis-server` of this test's own, killed when dropped.
struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn start(port: u16) -> std::io::Result<Server> {
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
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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

    async fn wait_until_up(&self) {
        let address = format!("127.0.0.1:{}", self.port);
        cqrs_core::testing::eventually(Duration::from_secs(10), "redis-server to listen", || {
            let address = address.clone();
            async move {
                tokio::net::TcpStream::connect(address)
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fails_fast_while_redis_is_down_and_consumers_resume() {
    let port = free_port();
    let mut server = match Server::start(port) {
        Ok(server) => server,
        Err(e) => {
            let required = std::env::var("CQRS_REQUIRE_SERVICES").as_deref() == Ok("1");
            assert!(!required, "redis-server could not start: {e}");
            eprintln!("skipping: redis-server could not start: {e}");
            return;
        }
    };
    within(
        60,
        Box::pin(async {
            server.wait_until_up().await;
            let transport = RedisStreamOptions::with_connection(
                ConnectionOptions::new(server.url())
                    .command_timeout(Duration::from_millis(500))
                    .reconnect_delays(Duration::from_millis(20), Duration::from_millis(200)),
            )
            .connect()
            .await
            .expect("connect");
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

            let mut server = Server::start(port).expect("restart redis-server");
            server.wait_until_up().await;
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
            stop.store(true, Ordering::SeqCst);
            task.await.unwrap();
            server.stop();
        }),
    )
    .await;
}
