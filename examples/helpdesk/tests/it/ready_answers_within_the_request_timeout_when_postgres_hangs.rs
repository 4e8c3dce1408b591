//! `/ready` runs its backend checks at once, each bounded by a share of the request timeout:
//! with Postgres reachable but not answering (a stalled network, a hung server), the client
//! still gets the per-component report (503, `postgres` unhealthy), well within the request's
//! time budget, and not the budget's generic 503 `timeout`.

use crate::support::*;
use reqwest::{Method, StatusCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to `upstream` that, while `stalled`, passes nothing on in either direction (and
/// leaves new connections waiting): the server on the other side looks reachable but silent.
struct StallingProxy {
    addr: std::net::SocketAddr,
    stalled: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    wait_while(&flag).await;
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        () = pass(client_read, server_write, flag.clone()) => {}
                        () = pass(server_read, client_write, flag) => {}
                    }
                });
            }
        });
        Self {
            addr,
            stalled,
            task,
        }
    }

    fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_while(flag: &AtomicBool) {
    while flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Copies `from` to `to`, holding each chunk while the flag is up.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    flag: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_while(&flag).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        wait_while(&flag).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_postgres_gets_the_component_report_within_the_request_timeout() {
    // Without `--ready-details` the report says what is down, not why (the reason quotes the
    // driver); with it, why too.
    for details in [false, true] {
        within(report_while_postgres_hangs(details)).await;
    }
}

async fn report_while_postgres_hangs(details: bool) {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let Backend::Postgres { database_url, .. } = &backend else {
        unreachable!()
    };
    let upstream = host_port(database_url, 5432).expect("DATABASE_URL names a host");
    let proxy = StallingProxy::start(upstream).await;
    let proxied = via(database_url, proxy.addr);
    let s = TestServer::start_on(backend, |c| {
        c.database_url = Some(proxied);
        // Each check gets a third: 2 s, ample for a healthy backend on a loaded machine.
        c.request_timeout_ms = 6_000;
        c.ready_details = details;
    })
    .await;
    let ready = s.send(Method::GET, "/ready", None, None).await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");

    proxy.stall(true);
    // The report itself, not the request timeout's generic 503 `timeout` (no time is
    // asserted: the body says which of the two answered).
    let r = s.send(Method::GET, "/ready", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(r.body["status"], "unavailable", "{r:?}");
    let postgres = &r.body["components"]["postgres"];
    assert_eq!(postgres["status"], "unhealthy", "{r:?}");
    if details {
        assert!(postgres["reason"].is_string(), "{r:?}");
    } else {
        assert!(postgres.get("reason").is_none(), "{r:?}");
    }
    // Redis answers, and is reported so, checked alongside the hung Postgres.
    assert_eq!(r.body["components"]["redis"]["status"], "healthy", "{r:?}");

    proxy.stall(false);
    cqrs_core::testing::eventually(
        Duration::from_secs(15),
        "/ready is 200 once Postgres answers again",
        || async {
            let r = s.send(Method::GET, "/ready", None, None).await;
            (r.status == StatusCode::OK).then_some(())
        },
    )
    .await;
    s.stop().await;
}
