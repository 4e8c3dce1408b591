//! The `helpdesk` binary's start and stop, in the library so a binary of your own (the
//! helpdesk with more plugins linked in) runs the same way.

use crate::{Config, Hooks, LogFormat, Server, error_chain, log_filter, log_subscriber};
use std::io::IsTerminal;
use tokio::sync::mpsc;

/// Runs the server as the `helpdesk` binary does, with `hooks`: the settings from the command
/// line and the environment (`--help` lists them; bad ones, and ones that do not go together,
/// print every problem and exit with 2), logs
/// on standard output, a graceful stop on SIGINT or SIGTERM, and a second signal exits at
/// once. Returns once the server stopped; exits the process with 1 when it failed to start or
/// to serve, and with 130 or 143 when a signal cut the start or the stop short.
///
/// A binary of your own links your plugins beside the helpdesk's and hands this
/// [`Hooks::expect_plugins`], so a plugin left unlinked fails the start instead of its routes
/// answering 404:
///
/// ```no_run
/// // use helpdesk_tags as _; // links your plugin crate in
///
/// #[tokio::main]
/// async fn main() {
///     helpdesk::main_with(helpdesk::Hooks {
///         expect_plugins: vec!["tags"], // besides auth and tickets, always expected
///         ..helpdesk::Hooks::default()
///     })
///     .await
/// }
/// ```
// Exits the process itself: a second signal must end it at once, not wait for the runtime to
// drop (which waits for blocking tasks, a password hash among them).
#[allow(clippy::exit)]
pub async fn main_with(hooks: Hooks) {
    let config = Config::try_parse_with_env(std::env::args_os(), std::env::vars_os())
        .unwrap_or_else(|e| {
            // JSON logs go to a collector that reads standard output only: a setting that does
            // not parse is said there too, or it sees a restart loop with exit code 2 and no
            // reason. (`--help` and `--version` are no errors.)
            if e.use_stderr() && json_logs_asked() {
                let subscriber =
                    log_subscriber(LogFormat::Json, log_filter(), false, std::io::stdout);
                let said = e.render().to_string();
                tracing::subscriber::with_default(subscriber, || {
                    tracing::error!(error = said.trim(), "bad settings; exiting with 2");
                });
            }
            e.exit()
        });
    // Colours only on a terminal: escape codes in a log file or a collector are noise.
    let ansi = std::io::stdout().is_terminal();
    let subscriber = log_subscriber(config.log_format, log_filter(), ansi, std::io::stdout);
    match tracing::subscriber::set_global_default(subscriber) {
        Ok(()) => crate::log_panics(),
        Err(e) => eprintln!("helpdesk: cannot install the logger: {e}"),
    }
    let json_logs = config.log_format == LogFormat::Json;
    // Settings that parse but do not go together (`REDIS_URL` without `DATABASE_URL`, a short
    // secret) exit with 2 as those that do not parse: a supervisor that reads 2 as "fix the
    // settings" must not restart the process for ever.
    if let Err(e) = crate::app::validated(&config) {
        if json_logs {
            tracing::error!(error = error_chain(&e), "bad settings; exiting with 2");
        }
        eprintln!("helpdesk: {}", error_chain(&e));
        std::process::exit(2);
    }
    match run(config, hooks).await {
        // Said, so that a log shows the stop finished rather than the process vanishing.
        Ok(None) => tracing::info!("stopped"),
        Ok(Some(signal)) => std::process::exit(signal.exit_code()),
        Err(e) => {
            // JSON logs go to a collector, which reads standard output only: the reason the
            // process exits belongs there too, not on standard error alone.
            if json_logs {
                tracing::error!(error = error_chain(&e), "the server failed; exiting with 1");
            }
            eprintln!("helpdesk: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}

/// Whether the command line or the environment asks for JSON logs, read without the rest of
/// the settings (for a setting that does not parse): `--log-format json` (or `=json`) or
/// `HELPDESK_LOG_FORMAT=json`, the flag first, as clap reads them.
fn json_logs_asked() -> bool {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let flag = args.iter().enumerate().rev().find_map(|(i, arg)| {
        if arg == "--log-format" {
            args.get(i + 1).cloned()
        } else {
            arg.strip_prefix("--log-format=").map(str::to_owned)
        }
    });
    let format = flag.or_else(|| std::env::var("HELPDESK_LOG_FORMAT").ok());
    format.is_some_and(|f| f.trim().eq_ignore_ascii_case("json"))
}

/// Serves until stopped; `Some` when a signal ended the process before the stop was done.
async fn run(config: Config, hooks: Hooks) -> anyhow::Result<Option<Signal>> {
    // Listening before the start, so that a signal during it (a slow Postgres, say) is not
    // lost: the start is abandoned and the process exits at once.
    let mut signals = signals();
    let server = tokio::select! {
        server = Server::start(config, hooks) => server?,
        Some(signal) = signals.recv() => {
            tracing::warn!(?signal, "stopped while starting");
            return Ok(Some(signal));
        }
    };
    let stop = server.stopper();
    let mut serving = std::pin::pin!(server.wait());
    tokio::select! {
        served = &mut serving => return served.map(|()| None),
        Some(signal) = signals.recv() => {
            tracing::info!(
                ?signal,
                "shutting down: /ready answers 503, then (after HELPDESK_SHUTDOWN_DELAY_MS) no new connections; finishing in-flight requests (a second signal exits at once)"
            );
            stop();
        }
    }
    // Still listening: an operator's second Ctrl-C must not wait out the grace period.
    tokio::select! {
        served = &mut serving => served.map(|()| None),
        Some(signal) = signals.recv() => {
            tracing::warn!(
                ?signal,
                "second signal: exiting now, cutting off in-flight requests and workers"
            );
            Ok(Some(signal))
        }
    }
}

/// A signal that stops the server.
#[derive(Clone, Copy, Debug)]
enum Signal {
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGTERM: `kill`, or an orchestrator stopping the process.
    Terminate,
}

impl Signal {
    /// 128 + the signal's number, the customary exit code of a process it ended.
    fn exit_code(self) -> i32 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

/// Every SIGINT and SIGTERM from now on, each as it arrives.
fn signals() -> mpsc::UnboundedReceiver<Signal> {
    let (sender, receiver) = mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        for (kind, which) in [
            (SignalKind::interrupt(), Signal::Interrupt),
            (SignalKind::terminate(), Signal::Terminate),
        ] {
            match signal(kind) {
                Ok(mut received) => {
                    let sender = sender.clone();
                    tokio::spawn(async move {
                        while received.recv().await.is_some() && sender.send(which).is_ok() {}
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, signal = ?which, "cannot listen for the signal; it will not stop the server gracefully");
                }
            }
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() && sender.send(Signal::Interrupt).is_ok() {}
    });
    receiver
}
