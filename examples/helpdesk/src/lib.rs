//! The helpdesk example server, as a library so its tests drive the same start-up as the
//! binary.
//!
//! The gateway knows no plugin by name in its code paths: the auth and tickets plugins are
//! linked by the two `use ... as _;` lines below and found through `inventory`; they contribute
//! their handlers, routes, OpenAPI operations and background workers.

// The linker drops crates nothing names: these lines link the plugins in.
use helpdesk_auth as _;
use helpdesk_tickets as _;

mod app;
mod binary;
mod body_deadline;
mod config;
mod deployment;
mod discard;
mod http;
mod logging;
mod metered;
mod migrations;
mod server;
mod stalled;

pub use app::{App, EVENTS_TOPIC, EXPECTED_PLUGINS, Hooks, MakePlugin, MakeWorker, Session, build};
pub use binary::main_with;
pub use config::{Config, LogFormat};
pub use http::BODY_LIMIT;
pub use logging::{DEFAULT_FILTER, error_chain, log_filter, log_panics, log_subscriber};
pub use server::Server;

/// The user guide's Rust examples (`docs/guide.md`), compiled and run as doc tests so they
/// cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/guide.md")]
pub struct GuideDoctests;

/// The Rust examples of `docs/architecture.md` and `docs/ports.md`, compiled as doc tests
/// for the same reason.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/architecture.md")]
#[doc = include_str!("../../../docs/ports.md")]
pub struct ArchitectureAndPortsDoctests;

/// The Rust examples of the adapters' pages (`docs/postgres.md`, `docs/redis.md`,
/// `docs/realtime.md`), compiled as doc tests for the same reason. Those that need a server
/// are `no_run`.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/postgres.md")]
#[doc = include_str!("../../../docs/redis.md")]
#[doc = include_str!("../../../docs/realtime.md")]
pub struct AdapterPagesDoctests;
