//! The server's log output: one line per answered request at `info`, with the method, the
//! path (its `token=` redacted) and the status; Postgres notices (`... already exists,
//! skipping` from the idempotent migrations) only from `warn` up.

use crate::LogFormat;
use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The filter used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// `RUST_LOG` when it is set and valid, else [`DEFAULT_FILTER`].
pub fn log_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
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
