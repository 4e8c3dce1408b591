//! The cqrs-postgres integration tests: one binary, one module per behaviour, against the
//! Postgres at `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). Each test
//! works in a schema named after its test id. When the server is unreachable the tests are
//! skipped, or fail when `CQRS_REQUIRE_SERVICES=1`.

mod support;

mod a_command_commits_its_writes_and_events_together;
mod a_failing_or_panicking_handler_leaves_no_rows_and_no_outbox_entries;
mod a_projection_unit_that_cannot_get_its_lock_leaves_the_pool_clean;
mod a_purge_never_deletes_a_key_claimed_again;
mod a_relay_dropped_mid_batch_loses_nothing_and_a_second_relay_finishes;
mod a_relay_retries_a_failing_transport_with_backoff;
mod a_relay_skips_an_event_it_cannot_decode_or_ship;
mod a_relay_that_ships_part_of_a_batch_commits_it_and_reports_the_failure;
mod appends_take_positions_in_commit_order;
mod commands_take_few_round_trips;
mod errors_map_to_the_core_kinds;
mod idempotency_claims_wait_only_for_a_holder_of_their_fingerprint;
mod idempotent_commands_replay_reject_mismatches_and_run_once;
mod inbox_entries_are_dated_when_processed;
mod migrations_are_idempotent_and_schemas_are_isolated;
mod one_relay_ships_at_a_time_exactly_once_in_per_stream_order;
mod proxy;
mod the_adapters_hold_their_guarantees_whatever_the_server_settings;
mod the_postgres_adapters_pass_every_conformance_suite;
mod the_projection_runner_takes_effect_once_and_rebuilds_on_postgres;
mod the_relay_wakes_on_notify_and_reports_its_backlog;
mod transport;
