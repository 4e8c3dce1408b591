//! Bus dispatch against a boxed `async_trait` call, in time, paired: the two run in
//! alternating blocks of dispatches (the bus then the baseline, then the baseline then the bus,
//! ...), and each round gives one ratio. Criterion's `command_dispatch` group measures its
//! cases one after another, seconds apart, on a machine whose speed drifts over those seconds;
//! here both sides of each ratio run within milliseconds of each other.
//!
//! ```text
//! cargo run --release -p cqrs-benches --bin dispatch_paired -- --rounds 40 --block 200000
//! ```
//!
//! Prints, for each bus (bare, the bench's three layers, cqrs-core's shipped layers; commands
//! and queries), the median time per dispatch of each side and the median ratio with its
//! quartiles. Options (defaults): `--rounds 40`, `--block 200000` (dispatches per side per
//! round). Everything runs on one current-thread runtime, as in the criterion bench.

use cqrs_benches::baseline::{LocalCommandHandler, LocalQueryHandler};
use cqrs_benches::buses::{Stack, command_bus, query_bus};
use cqrs_benches::fixtures::{Increment, IncrementHandler, Lookup, LookupHandler};
use cqrs_benches::paired::paired;
use cqrs_core::{CommandBus, CommandContext, Metadata, QueryBus, QueryContext};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// One comparison's result: the quartiles of the ratios bus / baseline, and each side's
/// median time per dispatch.
struct Compared {
    case: String,
    ratios: [f64; 3],
    bus: Duration,
    baseline: Duration,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut rounds, mut block) = (40usize, 200_000u64);
    while let Some(arg) = args.next() {
        let value = args.next();
        let number = || {
            value
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .unwrap_or_else(|| panic!("{arg} takes a whole number above 0"))
        };
        match arg.as_str() {
            "--rounds" => rounds = usize::try_from(number()).unwrap_or(usize::MAX),
            "--block" => block = number(),
            other => panic!("unknown option {other}; known: --rounds N, --block N"),
        }
    }
    for compared in measure(rounds, block) {
        let [q1, median, q3] = compared.ratios;
        println!(
            "{}: bus {:.2?}, boxed async_trait {:.2?} per dispatch; time ratio {median:.3} \
             (quartiles {q1:.3} - {q3:.3}) over {rounds} alternating rounds of {block}",
            compared.case, compared.bus, compared.baseline
        );
    }
}

/// Every comparison, each after a check that both sides reach the handler and a warm-up block
/// of each.
fn measure(rounds: usize, block: u64) -> Vec<Compared> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let metadata = Metadata::new();
    // Through `black_box`, as in the criterion bench: the call goes through the vtable.
    let commands = black_box(Box::new(IncrementHandler) as Box<dyn LocalCommandHandler>);
    let queries = black_box(Box::new(LookupHandler) as Box<dyn LocalQueryHandler>);
    let stacks = [
        ("bare", Stack::Bare),
        ("three_layers", Stack::three_layers()),
        ("shipped_layers", Stack::Shipped),
    ];
    let mut results = Vec::new();
    for (name, stack) in &stacks {
        let bus = command_bus(stack).expect("the command bus builds");
        rt.block_on(async {
            let command = Increment { value: 41 };
            assert_eq!(
                bus.dispatch_with(command, metadata.clone()).await.ok(),
                Some(42)
            );
            let mut ctx = CommandContext::new(metadata.clone());
            assert_eq!(commands.handle(command, &mut ctx).await.ok(), Some(42));
        });
        let dispatches = async |n: u64| time_commands(&bus, &metadata, n).await;
        let boxed = async |n: u64| time_boxed_commands(commands.as_ref(), &metadata, n).await;
        results.push(compare(
            &rt,
            format!("command/{name}"),
            &dispatches,
            &boxed,
            rounds,
            block,
        ));
        let bus = query_bus(stack).expect("the query bus builds");
        rt.block_on(async {
            let query = Lookup { key: 2 };
            assert_eq!(
                bus.dispatch_with(query, metadata.clone()).await.ok(),
                Some(62)
            );
            let ctx = QueryContext::new(metadata.clone());
            assert_eq!(queries.handle(query, &ctx).await.ok(), Some(62));
        });
        let dispatches = async |n: u64| time_queries(&bus, &metadata, n).await;
        let boxed = async |n: u64| time_boxed_queries(queries.as_ref(), &metadata, n).await;
        results.push(compare(
            &rt,
            format!("query/{name}"),
            &dispatches,
            &boxed,
            rounds,
            block,
        ));
    }
    results
}

fn compare<A, B>(
    rt: &tokio::runtime::Runtime,
    case: String,
    bus: &A,
    baseline: &B,
    rounds: usize,
    block: u64,
) -> Compared
where
    A: AsyncFn(u64) -> Duration,
    B: AsyncFn(u64) -> Duration,
{
    rt.block_on(async {
        bus(block).await;
        baseline(block).await;
        let (ratios, bus, baseline) = paired(bus, baseline, block, rounds).await;
        Compared {
            case,
            ratios,
            bus,
            baseline,
        }
    })
}

async fn time_commands(bus: &CommandBus, metadata: &Metadata, n: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let command = Increment {
            value: black_box(7),
        };
        let _ = black_box(bus.dispatch_with(command, metadata.clone()).await);
    }
    start.elapsed()
}

async fn time_boxed_commands(
    handler: &dyn LocalCommandHandler,
    metadata: &Metadata,
    n: u64,
) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let mut ctx = CommandContext::new(metadata.clone());
        let command = Increment {
            value: black_box(7),
        };
        let _ = black_box(handler.handle(command, &mut ctx).await);
    }
    start.elapsed()
}

async fn time_queries(bus: &QueryBus, metadata: &Metadata, n: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let query = Lookup { key: black_box(7) };
        let _ = black_box(bus.dispatch_with(query, metadata.clone()).await);
    }
    start.elapsed()
}

async fn time_boxed_queries(
    handler: &dyn LocalQueryHandler,
    metadata: &Metadata,
    n: u64,
) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let ctx = QueryContext::new(metadata.clone());
        let query = Lookup { key: black_box(7) };
        let _ = black_box(handler.handle(query, &ctx).await);
    }
    start.elapsed()
}

#[cfg(test)]
mod tests {
    use super::measure;

    /// A short run reaches every bus and baseline (one answer of each is checked before it is
    /// timed) and reports a finite, positive ratio for each of the six comparisons.
    #[test]
    fn a_short_run_reports_every_comparison() {
        let results = measure(2, 10);
        let cases: Vec<&str> = results.iter().map(|r| r.case.as_str()).collect();
        assert_eq!(
            cases,
            [
                "command/bare",
                "query/bare",
                "command/three_layers",
                "query/three_layers",
                "command/shipped_layers",
                "query/shipped_layers"
            ]
        );
        for r in &results {
            assert!(
                r.ratios.iter().all(|q| q.is_finite() && *q > 0.0),
                "{}: {:?}",
                r.case,
                r.ratios
            );
            assert!(r.ratios[0] <= r.ratios[1] && r.ratios[1] <= r.ratios[2]);
        }
    }
}
