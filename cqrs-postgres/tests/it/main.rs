//! The cqrs-postgres integration tests: one binary, one module per behaviour, against the
//! Postgres at `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). Each test
//! works in a schema named after its test id. When the server is unreachable the tests are
//! skipped, or fail when `CQRS_REQUIRE_SERVICES=1`.

mod support;
#[cfg(feature = "tls")]
#[path = "../../../testdata/tls/proxy.rs"]
mod tls_proxy;

mod a_command_commits_its_writes_and_events_together;
mod a_failing_or_panicking_handler_leaves_no_rows_and_no_outbox_entries;
mod a_projection_unit_that_cannot_get_its_lock_leaves_the_pool_clean;
mod a_purge_never_deletes_a_key_claimed_again;
mod a_rebuild_resets_a_large_inbox_in_bounded_statements;
mod a_relay_behind_a_broker_too_slow_for_a_whole_batch_still_ships_it;
mod a_relay_dropped_mid_batch_loses_nothing_and_a_second_relay_finishes;
mod a_relay_publishes_only_while_it_holds_its_checkpoint;
mod a_relay_retries_a_failing_transport_with_backoff;
mod a_relay_skips_an_event_it_cannot_decode_or_ship;
mod a_relay_that_ships_part_of_a_batch_commits_it_and_reports_the_failure;
mod a_relay_whose_checkpoint_row_was_deleted_ships_from_its_start_again;
mod a_snapshot_the_stream_no_longer_backs_gives_way_to_a_save;
mod a_snapshot_updated_by_a_previous_build_carries_no_event_id;
mod a_transaction_given_up_while_it_begins_leaves_the_pool_clean;
mod an_empty_append_at_a_version_guards_its_transaction;
mod appends_need_read_committed_and_never_wait_for_a_second_connection;
mod appends_take_positions_in_commit_order;
mod commands_take_few_round_trips;
mod errors_map_to_the_core_kinds;
mod idempotency_claims_wait_only_for_a_holder_of_their_fingerprint;
mod idempotent_commands_replay_reject_mismatches_and_run_once;
mod inbox_entries_are_dated_when_processed;
mod migrations_are_idempotent_and_schemas_are_isolated;
mod one_relay_ships_at_a_time_exactly_once_in_per_stream_order;
mod projection_units_read_the_event_store_on_their_own_connection;
mod proxy;
mod the_adapters_hold_their_guarantees_whatever_the_server_settings;
mod the_postgres_adapters_pass_every_conformance_suite;
mod the_projection_runner_takes_effect_once_and_rebuilds_on_postgres;
mod the_relay_wakes_on_notify_and_reports_its_backlog;
#[cfg(feature = "tls")]
mod tls_connections_verify_the_server;
mod transport;
