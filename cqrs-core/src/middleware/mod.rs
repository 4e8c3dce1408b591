//! Tower layers for the buses.
//!
//! Any [`tower::Layer`] whose service takes a [`Dispatch`](crate::Dispatch) and returns a
//! [`Reply`](crate::Reply) can wrap a bus. These ship with the core:
//!
//! * [`TracingLayer`]: a span per dispatch with the message's kind, name and ids.
//! * [`TimeoutLayer`]: a time budget per dispatch.
//! * [`MetricsLayer`]: dispatch counts by outcome and latency histograms, through `metrics`.
//! * [`CheckLayer`]: a synchronous check of every dispatch (an authorization rule), written
//!   as one closure.
//! * [`RateLimitLayer`]: a token bucket per actor for commands and queries.
//!
//! # Writing your own: an authorization check that awaits a lookup
//!
//! A rule that needs only the dispatch is a [`CheckLayer`]. A layer of your own is a tower
//! `Service` over [`Dispatch`](crate::Dispatch), for what a closure cannot do: await a
//! lookup, change the metadata or the extensions on the way in, read or take the recorded
//! events and set extensions on the [`Reply`](crate::Reply) on the way out. (It cannot
//! answer in the handler's place, nor send one dispatch twice: the message travels inside
//! the `Dispatch`, which is neither built outside a bus nor cloned. So tower's retry layers
//! do not apply; a retry belongs around `bus.dispatch`. Test a layer through a bus built
//! with it and a handler.) Import tower from `cqrs_core::reexports::tower`, or depend on
//! `tower` 0.5 yourself. This one asks a permission store, asynchronously, before the
//! handler runs:
//!
//! ```
//! # use cqrs_core::doc::{OpenTicket, OpenTicketHandler};
//! use cqrs_core::{BoxError, CommandBus, Dispatch, HandlerError, Metadata, Principal, Reply};
//! use std::future::Future;
//! use std::pin::Pin;
//! use std::task::{Context, Poll};
//! use cqrs_core::reexports::tower::{Layer, Service};
//!
//! /// Who may send what: a database or a policy service in a real server.
//! #[derive(Clone)]
//! struct Permissions;
//!
//! impl Permissions {
//!     async fn may(&self, user: &str, message: &str) -> bool {
//!         user != "banned" && message.starts_with("tickets.")
//!     }
//! }
//!
//! /// Refuses a command without a user (401) or one its user may not send (403).
//! #[derive(Clone)]
//! struct Authorize<S> {
//!     inner: S,
//!     permissions: Permissions,
//! }
//!
//! impl<S> Service<Dispatch> for Authorize<S>
//! where
//!     S: Service<Dispatch, Response = Reply> + Clone + Send + 'static,
//!     S::Error: Into<BoxError>,
//!     S::Future: Send + 'static,
//! {
//!     type Response = Reply;
//!     type Error = BoxError;
//!     type Future = Pin<Box<dyn Future<Output = Result<Reply, BoxError>> + Send>>;
//!
//!     fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
//!         self.inner.poll_ready(cx).map_err(Into::into)
//!     }
//!
//!     fn call(&mut self, dispatch: Dispatch) -> Self::Future {
//!         // The future calls the inner service after an await: it takes the one
//!         // `poll_ready` readied, and leaves a clone (reference counts) for the next call.
//!         let clone = self.inner.clone();
//!         let mut inner = std::mem::replace(&mut self.inner, clone);
//!         let permissions = self.permissions.clone();
//!         Box::pin(async move {
//!             let user = dispatch.metadata().principal.as_ref().and_then(|p| p.downcast_ref::<&str>());
//!             let Some(&user) = user else {
//!                 let refused = format!("`{}` needs a signed-in user", dispatch.name());
//!                 return Err(HandlerError::unauthorized(refused).into());
//!             };
//!             if !permissions.may(user, dispatch.name()).await {
//!                 let refused = format!("{user} may not send `{}`", dispatch.name());
//!                 return Err(HandlerError::forbidden(refused).into());
//!             }
//!             inner.call(dispatch).await.map_err(Into::into)
//!         })
//!     }
//! }
//!
//! #[derive(Clone)]
//! struct AuthorizeLayer(Permissions);
//!
//! impl<S> Layer<S> for AuthorizeLayer {
//!     type Service = Authorize<S>;
//!     fn layer(&self, inner: S) -> Authorize<S> {
//!         Authorize { inner, permissions: self.0.clone() }
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let bus = CommandBus::builder()
//!     .layer(AuthorizeLayer(Permissions))
//!     .handler(OpenTicketHandler)
//!     .build()?;
//!
//! let open = || OpenTicket { title: "hi".into() };
//! let anonymous = bus.dispatch(open()).await.unwrap_err();
//! assert_eq!(anonymous.kind(), cqrs_core::ErrorKind::Unauthorized);
//!
//! let banned = Metadata::new().with_principal(Principal::new("banned"));
//! let refused = bus.dispatch_with(open(), banned).await.unwrap_err();
//! assert_eq!(refused.kind(), cqrs_core::ErrorKind::Forbidden);
//!
//! let signed_in = Metadata::new().with_principal(Principal::new("user-1"));
//! assert!(bus.dispatch_with(open(), signed_in).await.is_ok());
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # What a layer's service must be
//!
//! `L: Layer<Dispatcher>`, and its service `Service<Dispatch, Response = Reply>`, `Clone +
//! Send + Sync + 'static` (a bus clones the stack per dispatch: keep what it holds behind
//! an `Arc`), with a `Send + 'static` future and an error that is `Into<BoxError>`. The bus
//! builders' `build` states these bounds, so the compiler reports a layer that breaks them
//! there, not at `.layer(..)`, and, under other layers, names the outer one (`Timeout<Mine<..>>:
//! Clone` is not satisfied): look at the innermost type it names that is yours.
//!
//! # Errors
//!
//! A layer that refuses a dispatch for the caller to see returns a
//! [`HandlerError`](crate::HandlerError) of the kind it means (`HandlerError::forbidden`,
//! `unauthorized`, or `HandlerError::new` with any [`ErrorKind`](crate::ErrorKind)): the bus reports it as [`DispatchError::Handler`](crate::DispatchError::Handler),
//! with its kind, as it would the handler's refusal. To keep an error type of yours
//! matchable, make it the source: `HandlerError::forbidden(..).with_source(MyError)`, then
//! `err.handler_error()` and its `source()` (`std::error::Error`). Any other error becomes
//! [`DispatchError::Middleware`](crate::DispatchError::Middleware) of kind `internal` (a
//! 500 at a gateway), except tower's own `Elapsed` (`tower::timeout`), a `timeout`, and
//! `Overloaded` (`tower::load_shed`), `unavailable`: both retryable.

mod check;
mod metrics;
mod rate_limit;
mod timeout;
mod trace;

pub use check::{Check, CheckFuture, CheckLayer};
pub use metrics::{Metrics, MetricsFuture, MetricsLayer};
pub use rate_limit::{InvalidRateLimit, RateLimit, RateLimitLayer};
pub(crate) use timeout::Budgeted;
pub use timeout::{Timeout, TimeoutFuture, TimeoutLayer};
pub use trace::{Trace, Traced, TracingLayer};
