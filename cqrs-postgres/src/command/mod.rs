//! Transactional command execution: a tower layer for the command bus, and an executor for
//! idempotent commands.

mod executor;
mod layer;

pub use executor::{IdempotencyKey, Idempotent, PgCommandExecutor};
pub use layer::{PgCommand, PgCommandLayer};

use cqrs_core::{BoxError, DispatchError, HandlerError};

/// What a layer's inner service failed with, as the bus reports it: the core's own errors
/// pass through, a handler error keeps its kind.
pub(crate) fn dispatch_error(error: BoxError) -> DispatchError {
    match error.downcast::<DispatchError>() {
        Ok(own) => *own,
        Err(other) => match other.downcast::<HandlerError>() {
            Ok(handler) => DispatchError::Handler(*handler),
            Err(other) => DispatchError::Middleware(other),
        },
    }
}

/// A store failure as the bus reports it: a handler error with the store error's kind.
pub(crate) fn store_failure(error: cqrs_core::ports::StoreError) -> DispatchError {
    DispatchError::Handler(HandlerError::from(error))
}
