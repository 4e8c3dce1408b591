//! Benchmarks and allocation checks of the cqrs-core buses. Not published.
//!
//! The library holds what the criterion bench (`benches/dispatch.rs`) and the allocation checks
//! (`tests/it`) share, so both measure exactly the same paths:
//!
//! * [`fixtures`]: a command, a query and an event with handlers that do trivial work;
//! * [`buses`]: the buses under measurement, bare or with three layers;
//! * [`metrics`]: a user-written counter layer, the third of those layers;
//! * [`baseline`]: the same handler logic reached without a bus, to compare with;
//! * [`paired`]: alternating-block ratios for the benches against a shared server.
//!
//! Run the benchmarks with `cargo bench -p cqrs-benches --bench dispatch`; the results and how
//! to read them are in `docs/benchmarks.md`.

pub mod baseline;
pub mod buses;
pub mod fixtures;
pub mod metrics;
pub mod paired;
