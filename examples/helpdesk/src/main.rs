//! `cargo run --release -p helpdesk`: the helpdesk server on 127.0.0.1:8080, in memory, or on
//! Postgres (and Redis) when `DATABASE_URL` (and `REDIS_URL`) are set.

use clap::Parser;
use helpdesk::{Config, Hooks, LogFormat, Server};

#[tokio::main]
async fn main() {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tower_http=info".into());
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    if let Err(e) = run(config).await {
        eprintln!("helpdesk: {e:#}");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let server = Server::start(config, Hooks::default()).await?;
    let stop = server.stopper();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        stop();
    });
    server.wait().await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
