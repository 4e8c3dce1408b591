//! Measuring two ways of doing the same work side by side, for the benches that talk to a
//! shared server (Postgres, Redis), where load drifts between criterion cases.

use std::time::Duration;

/// Whether this is `cargo bench` (criterion passes `--bench`) rather than `cargo test
/// --benches`, and no criterion filter on the command line excludes `group`. A filter is
/// matched as a substring either way, which is coarser than criterion's regex.
pub fn measuring(group: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return false;
    }
    let filters = filters(&args);
    filters.is_empty()
        || filters
            .iter()
            .any(|f| group.contains(f) || f.contains(group))
}

/// Criterion's options that take a value (criterion 0.8's `configure_from_args`); every other
/// option is a flag (`--bench`, `--discard-baseline`, `--ignored`, ...), so the argument after
/// it is a filter, not its value.
const TAKE_A_VALUE: [&str; 20] = [
    "--color",
    "--colour",
    "-c",
    "--save-baseline",
    "-s",
    "--baseline",
    "-b",
    "--baseline-lenient",
    "--format",
    "--profile-time",
    "--load-baseline",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--plotting-backend",
    "--output-format",
];

/// The filters (positional arguments) among criterion's arguments.
fn filters(args: &[String]) -> Vec<&str> {
    let mut filters = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            filters.extend(args.map(String::as_str));
            break;
        }
        if !arg.starts_with('-') {
            filters.push(arg.as_str());
        } else if TAKE_A_VALUE.contains(&arg.as_str()) {
            // `--name value`; `--name=value` is one argument and takes nothing after it.
            args.next();
        }
    }
    filters
}

/// The quartiles of the rounds' ratios, and each side's median time per operation.
pub type Paired = ([f64; 3], Duration, Duration);

/// `a`'s time over `b`'s for the same work, measured in alternating blocks of `block`
/// operations (`a` then `b`, then `b` then `a`, ...): on a shared machine the load drifts over
/// the seconds between two criterion cases far more than within one round. Returns the
/// quartiles of the rounds' ratios and each side's median time per operation.
pub async fn paired<A, B>(a: &A, b: &B, block: u64, rounds: usize) -> Paired
where
    A: AsyncFn(u64) -> Duration,
    B: AsyncFn(u64) -> Duration,
{
    let (mut ratios, mut times_a, mut times_b) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (ta, tb) = if round % 2 == 0 {
            let ta = a(block).await;
            (ta, b(block).await)
        } else {
            let tb = b(block).await;
            (a(block).await, tb)
        };
        ratios.push(ta.as_secs_f64() / tb.as_secs_f64());
        times_a.push(ta / u32::try_from(block).unwrap_or(u32::MAX));
        times_b.push(tb / u32::try_from(block).unwrap_or(u32::MAX));
    }
    ratios.sort_by(f64::total_cmp);
    times_a.sort();
    times_b.sort();
    let at = |q: usize| ratios[(ratios.len() - 1) * q / 4];
    (
        [at(1), at(2), at(3)],
        times_a[times_a.len() / 2],
        times_b[times_b.len() / 2],
    )
}

#[cfg(test)]
mod tests {
    use super::filters;

    fn filters_of(args: &str) -> Vec<String> {
        let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        filters(&args).into_iter().map(str::to_owned).collect()
    }

    #[test]
    fn a_filter_after_a_flag_is_kept_and_an_option_value_is_not_a_filter() {
        assert_eq!(
            filters_of("--bench --discard-baseline consume"),
            ["consume"]
        );
        assert_eq!(filters_of("--bench --ignored consume"), ["consume"]);
        assert_eq!(
            filters_of("--bench --exact publish_one_event"),
            ["publish_one_event"]
        );
        assert_eq!(
            filters_of("--bench --save-baseline main consume"),
            ["consume"]
        );
        assert_eq!(filters_of("--bench --baseline=main consume"), ["consume"]);
        assert_eq!(
            filters_of("--bench -s main --sample-size 10 consume"),
            ["consume"]
        );
        assert_eq!(
            filters_of("--bench --output-format bencher"),
            Vec::<String>::new()
        );
        assert_eq!(filters_of("--bench -- --odd"), ["--odd"]);
        assert!(filters_of("--bench --noplot --quick").is_empty());
    }
}
