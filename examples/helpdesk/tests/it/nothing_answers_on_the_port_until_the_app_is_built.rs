//! The port is taken before the app is built, but listened on only after: while the server
//! connects and migrates, a client (a health probe, a load balancer) is refused at once and
//! goes elsewhere, instead of waiting in the backlog of a server that does not answer yet.

use crate::support::*;
use cqrs_core::BoxError;
use cqrs_core::runtime::{Worker, WorkerContext};
use helpdesk::{Hooks, Server};
use reqwest::StatusCode;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

struct Idle;

#[async_trait::async_trait]
impl Worker for Idle {
    fn name(&self) -> &str {
        "idle"
    }

    async fn run(&mut self, ctx: WorkerContext) -> Result<(), BoxError> {
        ctx.shutdown.requested().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_refused_while_the_app_is_built_then_served() {
    within(async {
        let backend = Backend::from_env().await;
        let mut config = test_config(&backend);
        // A port known in advance: the server's address is known only once it has started.
        // Held bound (not listening, with SO_REUSEADDR, as the server binds) until the server
        // has it: a port merely picked and released could be handed to a parallel test's
        // outgoing connection meanwhile, and the server's bind would fail.
        let reserved = tokio::net::TcpSocket::new_v4().unwrap();
        reserved.set_reuseaddr(true).unwrap();
        reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        config.bind = reserved.local_addr().unwrap();
        let addr = config.bind;
        // The build stops at the test's worker (blocking the thread that builds, which runs
        // nothing else meanwhile) while a prober connects; then it goes on.
        let (building, is_building) = mpsc::channel::<()>();
        let (release, released) = mpsc::channel::<()>();
        let prober = std::thread::spawn(move || {
            is_building
                .recv_timeout(Duration::from_secs(30))
                .expect("the app is being built");
            let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10));
            let _ = release.send(());
            probe
        });
        let building = Mutex::new(building);
        let released = Mutex::new(released);
        let server = Server::start(
            config,
            Hooks {
                workers: vec![Arc::new(move || {
                    let _ = building.lock().unwrap().send(());
                    let _ = released
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(30));
                    Box::new(Idle)
                })],
                ..Hooks::default()
            },
        )
        .await
        .expect("the server starts");
        drop(reserved);
        match prober.join().unwrap() {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
            Ok(_) => panic!("{addr} accepted a connection while the app was being built"),
        }
        assert_eq!(server.addr(), addr);
        let health = reqwest::get(format!("http://{addr}/health")).await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        server.shutdown().await.unwrap();
        backend.clean_up().await;
    })
    .await;
}
