//! Behaviour tests of cqrs-redis against a real Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Each test works under its own key or channel prefix, named by its
//! test id, and deletes its keys when it passes. Without Redis they skip, unless
//! `CQRS_REQUIRE_SERVICES=1`.

mod support;

mod a_consume_loop_recovers_when_its_connections_are_killed;
mod a_crashed_consumers_entries_are_reclaimed_by_another;
mod a_resubscribe_refused_while_connected_is_retried;
mod a_single_event_in_a_lane_is_chained_like_a_batch;
mod a_single_event_outside_any_lane_is_stored_like_a_batch;
mod closing_a_consumer_releases_what_it_holds;
mod connect_reports_bad_options_and_unreachable_servers;
mod consume_loops_keep_each_keys_order_while_handling_keys_in_parallel;
mod entries_held_back_do_not_use_up_their_deliveries;
mod group_stats_report_lag_and_pending;
mod per_key_order_holds_with_two_consumers;
mod poison_and_undecodable_entries_are_dead_lettered_and_replay_works;
mod publish_fails_fast_while_redis_is_down_and_consumers_resume;
mod pubsub_counts_what_it_drops;
mod pubsub_resubscribes_after_its_connection_is_killed;
mod settings_at_their_extremes_neither_stall_nor_panic;
mod the_pubsub_passes_the_conformance_suite;
mod the_stream_transport_passes_the_conformance_suite;
mod trimming_keeps_unacknowledged_entries;
mod two_consumers_split_a_stream_with_nothing_handled_twice;
