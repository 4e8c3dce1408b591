use crate::fixtures::*;
use cqrs_core::middleware::TimeoutLayer;
use cqrs_core::{CommandBus, DispatchError, ErrorKind, MessageKind};
use std::time::Duration;

#[test]
fn a_handler_that_never_finishes_times_out_with_a_typed_error() {
    let bus = CommandBus::builder()
        .layer(TimeoutLayer::new(Duration::from_millis(20)))
        .handler(HangHandler)
        .handler(AddHandler)
        .build()
        .unwrap();
    run(async {
        let err = bus.dispatch(Hang).await.unwrap_err();
        match err {
            DispatchError::Timeout { kind, name, after } => {
                assert_eq!(
                    (kind, name, after),
                    (MessageKind::Command, "test.hang", Duration::from_millis(20))
                );
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(
            bus.dispatch(Hang).await.unwrap_err().kind(),
            ErrorKind::Timeout
        );
        assert_eq!(
            bus.dispatch(Add {
                a: 1,
                b: 1,
                ..Add::default()
            })
            .await
            .unwrap(),
            2
        );
    });
}
