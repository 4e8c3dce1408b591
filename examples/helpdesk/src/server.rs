//! Serving: bind, serve with graceful shutdown, stop the workers.

use crate::{Config, Hooks, build};
use axum::serve::ListenerExt;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Builds the app and serves it on `config.bind` (port 0 picks a free port).
    pub async fn start(config: Config, hooks: Hooks) -> anyhow::Result<Self> {
        let app = build(&config, hooks).await?;
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {}: {e} (set --bind / HELPDESK_BIND to another address)",
                    config.bind
                )
            })?;
        let addr = listener.local_addr()?;
        // Small frames (WebSocket events, JSON answers) go out at once instead of waiting for
        // Nagle's algorithm.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let (stop, stopped) = watch::channel(false);
        let runtime = app.runtime.clone();
        let hub = app.hub.clone();
        let closing = app.hub.clone();
        let grace = config.shutdown_grace();
        let task = tokio::spawn(async move {
            let mut stop_seen = stopped.clone();
            let mut stopped = stopped;
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
                // WebSockets are not in-flight requests: close them now, with 1001.
                hub.shutdown();
            };
            let mut serve = tokio::spawn(
                axum::serve(
                    listener,
                    app.router
                        .into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(shutdown)
                .into_future(),
            );
            tokio::select! {
                // Serving ended on its own: an error.
                served = &mut serve => served??,
                _ = async { let _ = stop_seen.wait_for(|s| *s).await; } => {
                    // In-flight requests get the grace period, then are cut off.
                    match tokio::time::timeout(grace, &mut serve).await {
                        Ok(served) => served??,
                        Err(_) => {
                            tracing::warn!(?grace, "in-flight requests did not finish in time; closing them");
                            serve.abort();
                        }
                    }
                }
            }
            // The WebSockets' close frames (1001) go out before the process may exit.
            if tokio::time::timeout(grace, closing.closed()).await.is_err() {
                tracing::warn!(?grace, "WebSocket connections did not close in time");
            }
            stop_runtime(runtime, grace).await;
            Ok(())
        });
        tracing::info!(%addr, "helpdesk listening");
        Ok(Self { addr, stop, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets in-flight requests finish, stops the workers.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await?
    }

    /// Waits until the server stops by itself (it does not, short of an error).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }

    /// A handle that triggers shutdown.
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let stop = self.stop.clone();
        move || {
            let _ = stop.send(true);
        }
    }
}

async fn stop_runtime(runtime: Arc<cqrs_core::runtime::Runtime>, grace: std::time::Duration) {
    if let Err(e) = runtime.shutdown(grace).await {
        tracing::warn!(error = %e, "workers did not stop in time");
    }
}
