//! cqrs-core's behaviour tests, one module per behaviour, in one test binary.

#![allow(unreachable_pub)] // test helpers are shared between modules of this binary

mod fixtures;

mod a_command_has_exactly_one_handler;
mod a_panicking_handler_fails_only_its_own_message;
mod an_unhandled_message_is_a_typed_error_naming_it;
mod event_handlers_all_run_and_failures_are_reported;
mod events_from_a_transport_reach_the_event_bus;
mod layers_wrap_dispatch_outermost_first;
mod plugins_install_dependencies_first;
mod projections_take_effect_once_and_rebuild_from_zero;
mod recorded_events_inherit_ids_and_reach_the_sink_only_on_success;
mod the_in_memory_adapters_pass_every_conformance_suite;
mod the_runtime_restarts_reports_and_stops_workers;
mod the_timeout_layer_fails_a_slow_dispatch;
mod the_tracing_layer_opens_a_span_per_dispatch;
