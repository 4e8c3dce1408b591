//! The contract between the helpdesk gateway and its plugins.
//!
//! The gateway (`helpdesk`) never names a plugin: plugins register through `inventory`
//! (`cqrs_core::register_plugin!`) and hand the gateway [`HttpApi`] contributions (routes with
//! their OpenAPI operations). The gateway provides them [`Backends`] and a [`BusHandle`] as
//! resources before installing them. Everything here is shared by both sides: the JSON error
//! contract ([`ApiError`]), extractors that keep it ([`ApiJson`], [`ApiPath`], [`ApiQuery`]),
//! the authenticated [`User`], and the [`Authenticator`] the auth plugin provides.

mod api;
mod auth;
mod backends;
mod client;
mod error;
mod extract;
pub mod idempotency;
pub mod postgres;
mod validation;

pub use api::{HttpApi, Operation, RETRY_AFTER};
pub use auth::{
    AuthError, Authenticator, CloseSessions, ClosedSessions, LiveSessions, Role, User,
    UserDirectory, same_secret,
};
pub use backends::{
    Backends, BackgroundWorker, BusHandle, Buses, MIN_REDELIVERY_DELAY, Migration, Mode,
    RealtimeFeed, Settings,
};
pub use client::{client_key, site_key};
pub use error::{AfterTimeout, ApiError, ErrorBody};

/// The largest request body the gateway takes: room for the longest valid request (a
/// 10,000-character description or comment beside a 200-character title, counted in
/// composed characters, NFC) with every character sent at its longest: decomposed and
/// escaped as JSON encoders may. A character outside the BMP escapes to 12 bytes
/// (`\ud83d\ude00`), and some compose from three of them (Kirat Rai's U+16D6A: 36 bytes);
/// one in the BMP from up to four code points of 6 bytes each (`ᾂ`: 24 bytes). So 36 bytes a
/// character: about 367 KB.
pub const BODY_LIMIT: usize = 384 * 1024;

/// The message of a `payload_too_large` error.
pub const BODY_TOO_LARGE: &str = "the body is larger than the 384 KiB limit";

/// The message of a 408 `request_timeout`: the client's body stopped or came too slowly.
pub const BODY_TOO_SLOW: &str =
    "the body did not arrive in time (it stopped, or came too slowly): send it whole";
pub use extract::{
    AddressRange, ApiJson, ApiPath, ApiQuery, Authenticated, BodyDeadlineElapsed, ClientAddr,
    RequestMetadata, TrustedProxies, bearer_token,
};
pub use validation::{
    Lines, composed, has_visible, invalid_field, is_bidi_control, is_invisible, is_noncharacter,
    reject_controls, reject_hidden, reject_nul,
};
