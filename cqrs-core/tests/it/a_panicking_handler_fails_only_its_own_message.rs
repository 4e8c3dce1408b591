use crate::fixtures::*;
use cqrs_core::middleware::TracingLayer;
use cqrs_core::{CommandBus, DispatchError, QueryBus};

#[test]
fn a_panicking_command_handler_becomes_an_error_and_the_bus_keeps_working() {
    for bus in [
        CommandBus::builder().handler(AddHandler).build().unwrap(),
        CommandBus::builder()
            .layer(TracingLayer::new())
            .handler(AddHandler)
            .build()
            .unwrap(),
    ] {
        run(async {
            let err = bus
                .dispatch(Add {
                    panic: true,
                    ..Add::default()
                })
                .await
                .unwrap_err();
            match &err {
                DispatchError::Panicked { name, message, .. } => {
                    assert_eq!(*name, "test.add");
                    assert_eq!(message, "the add handler was told to panic");
                }
                other => panic!("expected Panicked, got {other:?}"),
            }
            assert_eq!(
                bus.dispatch(Add {
                    a: 1,
                    b: 2,
                    ..Add::default()
                })
                .await
                .unwrap(),
                3
            );
        });
    }
}

#[test]
fn a_panicking_query_handler_becomes_an_error() {
    let bus = QueryBus::builder().handler(DoubleHandler).build().unwrap();
    run(async {
        let err = bus.dispatch(Double(13)).await.unwrap_err();
        assert!(
            matches!(
                err,
                DispatchError::Panicked {
                    name: "test.double",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(bus.dispatch(Double(2)).await.unwrap(), 4);
    });
}

#[test]
fn a_panicking_handler_on_a_multi_threaded_runtime_does_not_abort_the_task() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bus = CommandBus::builder().handler(AddHandler).build().unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    bus.dispatch(Add {
                        a: i,
                        b: 0,
                        panic: i % 2 == 0,
                        ..Add::default()
                    })
                    .await
                })
            })
            .collect();
        let mut panicked = 0;
        for t in tasks {
            match t.await.expect("the task itself did not panic") {
                Err(DispatchError::Panicked { .. }) => panicked += 1,
                Ok(_) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(panicked, 4);
    });
}
