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
/// quartiles of the rounds' ratios and each side's median time per operation, all interpolated
/// linearly between neighbours (the private `quantile`).
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
        // Seconds per operation, kept as `f64` so the median is not truncated to whole
        // nanoseconds before it is interpolated.
        times_a.push(ta.as_secs_f64() / block.max(1) as f64);
        times_b.push(tb.as_secs_f64() / block.max(1) as f64);
    }
    // Zero for no rounds (the median is then NaN).
    let median_time =
        |times: Vec<f64>| Duration::try_from_secs_f64(quantile(times, 0.5)).unwrap_or_default();
    (
        [
            quantile(ratios.clone(), 0.25),
            quantile(ratios.clone(), 0.5),
            quantile(ratios, 0.75),
        ],
        median_time(times_a),
        median_time(times_b),
    )
}

/// The `q` quantile (0 to 1) of `values`, interpolating linearly between the two nearest ranks:
/// at position `(len - 1) * q` of the sorted values, so the median of an even count is the mean
/// of the middle two. The ratios and the per-side times all use it. NaN for no values.
fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let position = (values.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let (below, fraction) = (position.floor() as usize, position.fract());
    let above = (below + 1).min(values.len() - 1);
    values[below] + (values[above] - values[below]) * fraction
}

#[cfg(test)]
mod tests {
    use super::{filters, quantile};

    #[test]
    fn quantiles_interpolate_between_neighbours_for_odd_and_even_counts() {
        // Odd count: the median is the middle value; the quartiles fall on ranks 1 and 3.
        let odd = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(odd.clone(), 0.5), 3.0);
        assert_eq!(quantile(odd.clone(), 0.25), 2.0);
        assert_eq!(quantile(odd.clone(), 0.75), 4.0);
        assert_eq!(quantile(odd.clone(), 0.0), 1.0);
        assert_eq!(quantile(odd, 1.0), 5.0);
        // Even count: the median is the mean of the middle two, the quartiles interpolated
        // (positions 0.75 and 2.25 of 0..=3).
        let even = vec![40.0, 10.0, 30.0, 20.0];
        assert_eq!(quantile(even.clone(), 0.5), 25.0);
        assert_eq!(quantile(even.clone(), 0.25), 17.5);
        assert_eq!(quantile(even, 0.75), 32.5);
        // 20 rounds, as the benches run: the median lies halfway between the 10th and 11th.
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(twenty.clone(), 0.5), 10.5);
        assert_eq!(quantile(twenty.clone(), 0.25), 5.75);
        assert_eq!(quantile(twenty, 0.75), 15.25);
        // One value is every quantile; none has none.
        assert_eq!(quantile(vec![7.0], 0.25), 7.0);
        assert!(quantile(Vec::new(), 0.5).is_nan());
    }

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
