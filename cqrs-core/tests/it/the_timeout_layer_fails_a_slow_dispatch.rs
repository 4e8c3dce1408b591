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

/// Waits for ever holding a [`PanicsWhenDropped`]: its future panics when it is dropped.
struct HangArmed;

impl cqrs_core::Message for HangArmed {
    const NAME: &'static str = "test.hang_armed";
}

impl cqrs_core::Command for HangArmed {
    type Output = ();
}

struct HangArmedHandler;

#[cqrs_core::async_trait]
impl cqrs_core::CommandHandler<HangArmed> for HangArmedHandler {
    async fn handle(
        &self,
        _cmd: HangArmed,
        _ctx: &mut cqrs_core::CommandContext,
    ) -> Result<(), cqrs_core::HandlerError> {
        let _armed = PanicsWhenDropped;
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[test]
fn a_handler_future_that_panics_when_dropped_after_a_timeout_does_not_reach_the_caller() {
    let layered = CommandBus::builder()
        .layer(TimeoutLayer::new(Duration::from_millis(20)))
        .handler(HangArmedHandler)
        .handler(AddHandler)
        .build()
        .unwrap();
    let bare = CommandBus::builder()
        .handler(HangArmedHandler)
        .build()
        .unwrap();
    run(async {
        let err = layered.dispatch(HangArmed).await.unwrap_err();
        assert!(
            matches!(err, DispatchError::Timeout { .. }),
            "expected a timeout, got {err:?}"
        );
        // The caller gives up (its own timeout): dropping the dispatch drops the handler's
        // future, which panics; the panic stays in the bus.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), bare.dispatch(HangArmed)).await;
        assert!(gave_up.is_err(), "the dispatch hangs until given up");
        // The bus still works.
        let sum = layered
            .dispatch(Add {
                a: 1,
                b: 1,
                ..Add::default()
            })
            .await
            .unwrap();
        assert_eq!(sum, 2);
    });
}
