//! The helpdesk's HTTP and WebSocket contract, driven against a real server on a loopback port.

#![allow(unreachable_pub)] // helpers shared between the modules of this one test binary

mod support;

mod bad_input_always_gets_a_json_error_and_never_a_500;
mod changes_bump_the_version_and_a_closed_ticket_refuses_them;
mod idempotency_keys_replay_and_refuse_reuse;
mod login_is_throttled_after_repeated_failures;
mod operations_endpoints_report_health_metrics_and_the_api;
mod racing_writers_at_one_version_leave_exactly_one_winner;
mod registration_and_login_follow_the_contract;
mod stats_count_every_event_exactly_once;
mod the_plugins_are_found_through_inventory;
mod tickets_are_created_read_and_listed_per_the_contract;
mod tokens_are_verified_strictly;
mod websocket_clients_get_the_ticket_events_they_may_see;
