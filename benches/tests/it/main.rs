//! Allocation checks of the dispatch paths the benchmarks measure, and a run of the HTTP load
//! harness, one module per claim, in one test binary. Counting works per thread, so the tests
//! may run in parallel.

#![allow(unreachable_pub)] // helpers are shared between modules of this binary

mod counting_allocator;

mod a_bare_command_dispatch_allocates_once;
mod a_bare_query_dispatch_allocates_once;
mod a_dispatch_that_waits_adds_the_timeout_layers_timer;
mod a_three_layer_dispatch_stays_within_its_allocation_budget;
mod cqrs_cores_metrics_layer_adds_no_allocation;
mod publishing_an_event_stays_within_its_allocation_budget;
mod the_http_load_harness_runs_both_servers_without_failures;
mod the_metrics_layer_counts_each_outcome;
mod the_ws_fanout_harness_runs_clean_on_a_small_load;
