//! tower's own middleware fails a dispatch with its own error types: a bus reports tower's
//! `Elapsed` as a timeout and `Overloaded` as unavailable, both retryable, as the core's own
//! layers would. Both were `internal` (a 500 at a gateway, and never retried).

use crate::fixtures::*;
use cqrs_core::{CommandBus, DispatchError, ErrorKind};
use std::time::Duration;
use tower::limit::ConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::timeout::TimeoutLayer;

fn add() -> Add {
    Add {
        a: 1,
        b: 1,
        ..Add::default()
    }
}

#[test]
fn towers_timeout_is_a_timeout() {
    let bus = CommandBus::builder()
        .layer(TimeoutLayer::new(Duration::from_millis(20)))
        .handler(HangHandler)
        .handler(AddHandler)
        .build()
        .unwrap();
    run(async {
        let err = bus.dispatch(Hang).await.unwrap_err();
        assert!(matches!(err, DispatchError::Middleware(_)), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        assert!(err.kind().is_retryable());
        assert_eq!(bus.dispatch(add()).await.unwrap(), 2);
    });
}

#[test]
fn towers_load_shedding_is_unavailable() {
    let bus = CommandBus::builder()
        .layer(LoadShedLayer::new())
        .layer(ConcurrencyLimitLayer::new(1))
        .handler(HangHandler)
        .handler(AddHandler)
        .build()
        .unwrap();
    run(async {
        // The hanging dispatch is polled first and holds the one place; the second is shed.
        let hang = bus.dispatch(Hang);
        let shed = tokio::select! {
            biased;
            _ = hang => unreachable!("the hang handler never finishes"),
            shed = bus.dispatch(add()) => shed,
        };
        let err = shed.unwrap_err();
        assert!(matches!(err, DispatchError::Middleware(_)), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.kind().is_retryable());
        // The hanging dispatch is gone, and its place with it.
        assert_eq!(bus.dispatch(add()).await.unwrap(), 2);
    });
}

/// Any other error of a layer of its own stays internal: only tower's two are told apart.
#[test]
fn another_layers_error_is_internal() {
    let bus = CommandBus::builder()
        .layer(tower::filter::FilterLayer::new(
            |_: cqrs_core::Dispatch| -> Result<cqrs_core::Dispatch, cqrs_core::BoxError> {
                Err("refused by a filter".into())
            },
        ))
        .handler(AddHandler)
        .build()
        .unwrap();
    run(async {
        let err = bus.dispatch(add()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
        assert_eq!(
            err.to_string(),
            "middleware failed the dispatch: refused by a filter"
        );
    });
}
