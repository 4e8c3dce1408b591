//! The server's log output: one line per answered request at `info`, with the method, the
//! path (its `token=` redacted) and the status; Postgres notices (`... already exists,
//! skipping` from the idempotent migrations) only from `warn` up.

use crate::LogFormat;
use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The filter used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// `RUST_LOG` when it is set and valid, else [`DEFAULT_FILTER`]. An invalid `RUST_LOG` is
/// not ignored silently: a warning naming each bad directive goes to standard error (the
/// logger is not installed yet).
pub fn log_filter() -> EnvFilter {
    let (filter, warning) = match std::env::var("RUST_LOG") {
        Ok(value) => filter_from(Some(&value)),
        Err(std::env::VarError::NotPresent) => filter_from(None),
        Err(std::env::VarError::NotUnicode(_)) => (
            EnvFilter::new(DEFAULT_FILTER),
            Some(format!(
                "RUST_LOG is not valid UTF-8; using the default filter `{DEFAULT_FILTER}`"
            )),
        ),
    };
    if let Some(warning) = warning {
        eprintln!("helpdesk: warning: {warning}");
    }
    filter
}

/// The filter of a `RUST_LOG` value (`None`: unset), and a warning naming each invalid
/// directive when it has any (then the whole value is set aside for [`DEFAULT_FILTER`]). A
/// value of only spaces counts as unset, as the server's other variables do (`RUST_LOG=`
/// from a compose file's `${RUST_LOG:-}`): parsed, it would be a filter of no directive, which
/// logs nothing at all, errors included.
fn filter_from(value: Option<&str>) -> (EnvFilter, Option<String>) {
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return (EnvFilter::new(DEFAULT_FILTER), None);
    };
    match EnvFilter::builder().parse(value) {
        Ok(filter) => (filter, None),
        Err(_) => {
            // Split as the parser splits, to name each culprit.
            let bad: Vec<String> = value
                .split(',')
                .filter(|d| !d.is_empty())
                .filter_map(|d| {
                    d.parse::<tracing_subscriber::filter::Directive>()
                        .err()
                        .map(|e| format!("`{d}` ({e})"))
                })
                .collect();
            (
                EnvFilter::new(DEFAULT_FILTER),
                Some(format!(
                    "RUST_LOG has invalid directives: {}; ignoring it and using the default filter `{DEFAULT_FILTER}`",
                    bad.join(", ")
                )),
            )
        }
    }
}

/// A subscriber writing `format` lines that pass `filter` to `writer`; `ansi` colours text
/// lines (for a terminal, not for a file).
///
/// ```
/// use helpdesk::{LogFormat, log_filter, log_subscriber};
///
/// let subscriber = log_subscriber(LogFormat::Text, log_filter(), false, std::io::stderr);
/// let _guard = tracing::subscriber::set_default(subscriber);
/// tracing::info!("logged");
/// ```
pub fn log_subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    }
}

/// Sends panics to the logs, as one `error` event (`panic.message`, `panic.location`, the
/// thread, and the backtrace when `RUST_BACKTRACE` asks for one), instead of standard error:
/// a collector reading the JSON logs on standard output sees them, and a handler's panic the
/// framework caught is one log line among the others, not loose text beside them. Logged with
/// the target `panic`: a filter that leaves that target out (or no logger at all) gets the
/// default hook's text on standard error instead, so a panic is never lost. It replaces the
/// process's panic hook; [`main_with`](crate::main_with) installs it.
pub fn log_panics() {
    PANICS_LOGGED.store(true, std::sync::atomic::Ordering::Relaxed);
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !tracing::enabled!(target: "panic", tracing::Level::ERROR) {
            return default(info);
        }
        let message = cqrs_core::panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::event!(target: "panic", tracing::Level::ERROR, panic.message = %message, panic.location = %location, thread, %backtrace, "panicked");
        } else {
            tracing::event!(target: "panic", tracing::Level::ERROR, panic.message = %message, panic.location = %location, thread, "panicked");
        }
    }));
}

/// Whether [`log_panics`] installed its hook: every panic then has its line where it happens.
static PANICS_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether every panic is logged where it happens ([`log_panics`]), so that what catches one
/// need not log it again.
pub(crate) fn panics_logged() -> bool {
    PANICS_LOGGED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `error` and its causes, joined with `: `, each cause left out when the text before already
/// holds it ([`cqrs_core::ErrorChain`]). The framework's errors name their cause in their own
/// message (so that one read alone says it all), and a plain `{error:#}` then repeats each
/// cause once per level above it.
///
/// ```
/// let error = anyhow::anyhow!("connection refused")
///     .context("could not connect to postgres at db:5432: connection refused")
///     .context("cannot connect to Postgres (DATABASE_URL)");
/// assert_eq!(
///     helpdesk::error_chain(&error),
///     "cannot connect to Postgres (DATABASE_URL): could not connect to postgres at db:5432: \
///      connection refused"
/// );
/// ```
pub fn error_chain(error: &anyhow::Error) -> String {
    cqrs_core::ErrorChain(error.as_ref()).to_string()
}

#[cfg(test)]
mod tests {
    use super::{DEFAULT_FILTER, filter_from};

    #[test]
    fn an_invalid_rust_log_is_named_in_a_warning() {
        let (filter, warning) = filter_from(Some("info,hyper=loud,sqlx=warn"));
        let warning = warning.expect("a warning");
        assert!(warning.contains("`hyper=loud`"), "{warning}");
        assert!(!warning.contains("sqlx=warn"), "{warning}");
        assert!(warning.contains(DEFAULT_FILTER), "{warning}");
        assert_eq!(
            filter.to_string(),
            super::EnvFilter::new(DEFAULT_FILTER).to_string()
        );
    }

    /// An empty `RUST_LOG` is the default filter, not one that logs nothing.
    #[test]
    fn an_empty_rust_log_is_the_default_filter() {
        for empty in ["", "  "] {
            let (filter, warning) = filter_from(Some(empty));
            assert_eq!(
                filter.to_string(),
                super::EnvFilter::new(DEFAULT_FILTER).to_string(),
                "{empty:?}"
            );
            assert!(warning.is_none());
        }
    }

    #[test]
    fn a_valid_or_unset_rust_log_warns_of_nothing() {
        let (filter, warning) = filter_from(Some("debug,hyper=info"));
        assert_eq!(warning, None);
        assert!(filter.to_string().contains("hyper=info"), "{filter}");
        let (filter, warning) = filter_from(None);
        assert_eq!(warning, None);
        assert_eq!(
            filter.to_string(),
            super::EnvFilter::new(DEFAULT_FILTER).to_string()
        );
    }
}
