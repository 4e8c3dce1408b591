//! `cargo run --release -p helpdesk`: the helpdesk server on 127.0.0.1:8080, in memory, or on
//! Postgres (and Redis) when `DATABASE_URL` (and `REDIS_URL`) are set.

use clap::Parser;
use helpdesk::{Config, Hooks, Server, log_filter, log_subscriber};
use std::io::IsTerminal;

#[tokio::main]
async fn main() {
    let config = Config::parse();
    // Colours only on a terminal: escape codes in a log file or a collector are noise.
    let ansi = std::io::stdout().is_terminal();
    let subscriber = log_subscriber(config.log_format, log_filter(), ansi, std::io::stdout);
    if let Err(e) = tracing::subscriber::set_global_default(subscriber) {
        eprintln!("helpdesk: cannot install the logger: {e}");
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
