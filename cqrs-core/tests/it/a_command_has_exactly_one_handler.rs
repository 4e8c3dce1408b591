use crate::fixtures::*;
use cqrs_core::{CommandBus, MessageType, QueryBus};

#[test]
fn a_second_handler_for_one_command_fails_the_build() {
    let err = CommandBus::builder()
        .handler(AddHandler)
        .handler(OtherAddHandler)
        .build()
        .unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.to_string()
            .contains("command `test.add` has more than one handler"),
        "{err}"
    );
}

#[test]
fn the_start_up_check_names_every_command_without_a_handler() {
    let bus = CommandBus::builder().handler(AddHandler).build().unwrap();
    bus.check([MessageType::command::<Add>()]).unwrap();
    let err = bus
        .check([
            MessageType::command::<Add>(),
            MessageType::command::<Orphan>(),
            MessageType::command::<Hang>(),
        ])
        .unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(err.to_string().contains("`test.orphan`"), "{err}");
    assert!(err.to_string().contains("`test.hang`"), "{err}");
    // What a `main` returning the error prints: the problems, not the struct.
    assert_eq!(format!("{err:?}"), err.to_string());
}

#[test]
fn a_query_dispatch_returns_the_handler_output() {
    let bus = QueryBus::builder().handler(DoubleHandler).build().unwrap();
    assert!(bus.handles::<Double>());
    assert_eq!(run(bus.dispatch(Double(21))).unwrap(), 42);
}

#[test]
fn two_command_types_with_one_wire_name_fail_the_build() {
    struct Impostor;
    impl cqrs_core::Message for Impostor {
        const NAME: &'static str = "test.add";
    }
    impl cqrs_core::Command for Impostor {
        type Output = ();
    }
    struct ImpostorHandler;
    #[async_trait::async_trait]
    impl cqrs_core::CommandHandler<Impostor> for ImpostorHandler {
        async fn handle(
            &self,
            _c: Impostor,
            _ctx: &mut cqrs_core::CommandContext,
        ) -> Result<(), cqrs_core::HandlerError> {
            Ok(())
        }
    }
    let err = CommandBus::builder()
        .handler(AddHandler)
        .handler(ImpostorHandler)
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("share the wire name `test.add`"),
        "{err}"
    );
    // Both types and both registrations are named, so they can be found.
    assert!(
        err.to_string().contains(
            "`it::fixtures::Add`, handled by `it::fixtures::AddHandler` (on the bus builder), and \
             `it::a_command_has_exactly_one_handler::"
        ) && err
            .to_string()
            .contains("ImpostorHandler` (on the bus builder); give each type a unique NAME"),
        "{err}"
    );
}
