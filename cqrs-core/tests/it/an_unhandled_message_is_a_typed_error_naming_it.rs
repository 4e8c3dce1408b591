use crate::fixtures::*;
use cqrs_core::middleware::TracingLayer;
use cqrs_core::{CommandBus, DispatchError, ErrorKind, MessageKind, QueryBus};

#[test]
fn an_unhandled_command_names_itself() {
    for bus in [
        CommandBus::builder().build().unwrap(),
        CommandBus::builder()
            .layer(TracingLayer::new())
            .build()
            .unwrap(),
    ] {
        let err = run(bus.dispatch(Orphan)).unwrap_err();
        assert!(
            matches!(
                err,
                DispatchError::NoHandler {
                    kind: MessageKind::Command,
                    name: "test.orphan"
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(
            err.to_string()
                .contains("no command handler is registered for `test.orphan`")
        );
    }
}

#[test]
fn an_unhandled_query_names_itself() {
    for bus in [
        QueryBus::builder().build().unwrap(),
        QueryBus::builder()
            .layer(TracingLayer::new())
            .build()
            .unwrap(),
    ] {
        let err = run(bus.dispatch(Orphan)).unwrap_err();
        assert!(
            matches!(
                err,
                DispatchError::NoHandler {
                    kind: MessageKind::Query,
                    name: "test.orphan"
                }
            ),
            "{err:?}"
        );
    }
}

#[test]
fn a_handler_error_keeps_its_kind_and_code() {
    let bus = CommandBus::builder().handler(AddHandler).build().unwrap();
    let err = run(bus.dispatch(Add {
        fail: true,
        ..Add::default()
    }))
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(err.handler_error().unwrap().code(), "told_to_fail");
}
