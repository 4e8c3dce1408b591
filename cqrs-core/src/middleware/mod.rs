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
//!
//! # Writing your own: an authorization check
//!
//! A rule that needs only the dispatch is a [`CheckLayer`]. A layer of your own is a tower
//! `Service` over [`Dispatch`](crate::Dispatch), for what a closure cannot do (await a lookup,
//! change the reply):
//!
//! ```
//! # use cqrs_core::doc::{OpenTicket, OpenTicketHandler};
//! use cqrs_core::{BoxError, CommandBus, Dispatch, HandlerError, Metadata, Principal, Reply};
//! use std::future::Future;
//! use std::pin::Pin;
//! use std::task::{Context, Poll};
//! use tower::{Layer, Service};
//!
//! /// Refuses every command that carries no principal.
//! #[derive(Clone)]
//! struct RequireUser<S>(S);
//!
//! impl<S> Service<Dispatch> for RequireUser<S>
//! where
//!     S: Service<Dispatch, Response = Reply>,
//!     S::Error: Into<BoxError>,
//!     S::Future: Send + 'static,
//! {
//!     type Response = Reply;
//!     type Error = BoxError;
//!     type Future = Pin<Box<dyn Future<Output = Result<Reply, BoxError>> + Send>>;
//!
//!     fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
//!         self.0.poll_ready(cx).map_err(Into::into)
//!     }
//!
//!     fn call(&mut self, dispatch: Dispatch) -> Self::Future {
//!         if dispatch.metadata().principal.is_none() {
//!             let refused = HandlerError::unauthorized(format!("`{}` needs a signed-in user", dispatch.name()));
//!             return Box::pin(std::future::ready(Err(refused.into())));
//!         }
//!         let fut = self.0.call(dispatch);
//!         Box::pin(async move { fut.await.map_err(Into::into) })
//!     }
//! }
//!
//! #[derive(Clone)]
//! struct RequireUserLayer;
//!
//! impl<S> Layer<S> for RequireUserLayer {
//!     type Service = RequireUser<S>;
//!     fn layer(&self, inner: S) -> RequireUser<S> {
//!         RequireUser(inner)
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let bus = CommandBus::builder()
//!     .layer(RequireUserLayer)
//!     .handler(OpenTicketHandler)
//!     .build()?;
//!
//! let anonymous = bus.dispatch(OpenTicket { title: "hi".into() }).await.unwrap_err();
//! assert_eq!(anonymous.kind(), cqrs_core::ErrorKind::Unauthorized);
//!
//! let signed_in = Metadata::new().with_principal(Principal::new("user-1"));
//! assert!(bus.dispatch_with(OpenTicket { title: "hi".into() }, signed_in).await.is_ok());
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod check;
mod metrics;
mod timeout;
mod trace;

pub use check::{Check, CheckFuture, CheckLayer};
pub use metrics::{Metrics, MetricsFuture, MetricsLayer};
pub use timeout::{Timeout, TimeoutFuture, TimeoutLayer};
pub use trace::{Trace, TracingLayer};
