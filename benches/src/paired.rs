//! Measuring two ways of doing the same work side by side, for the benches that talk to a
//! shared server (Postgres, Redis), where load drifts between criterion cases.

use std::time::Duration;

/// Whether criterion measures in this run: `cargo bench` (criterion gets `--bench`) without
/// `--test` (each case run once), `--list` (nothing run) or `--profile-time` (cases iterated,
/// nothing measured). `cargo test --benches` passes no `--bench`. These are the flags criterion
/// picks its mode from; whether a filter selects a group is for its cases to tell (criterion
/// runs a case's routine only when its filter, a regex or `--exact`, selects the case's id, and
/// none under `--ignored` or `--load-baseline`): see the benches' `compare`.
pub fn measuring() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    measuring_with(&args)
}

fn measuring_with(args: &[String]) -> bool {
    // After `--` every argument is a filter.
    let options = args.iter().take_while(|a| *a != "--");
    let (mut bench, mut other_mode) = (false, false);
    for arg in options {
        match arg.as_str() {
            "--bench" => bench = true,
            "--test" | "--list" | "--profile-time" => other_mode = true,
            a if a.starts_with("--profile-time=") => other_mode = true,
            _ => {}
        }
    }
    bench && !other_mode
}

/// Whether this is a test run (`cargo test --benches`: no `--bench`; or `--test`), where each
/// case runs once: the paired comparisons then run once too, unreported, so a fault in them
/// shows in CI rather than in a published figure. Not under `--list`, nor under `cargo bench
/// -- --profile-time` (criterion takes a test run's `--profile-time` as a test run).
pub fn testing() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    testing_with(&args)
}

fn testing_with(args: &[String]) -> bool {
    let options = args.iter().take_while(|a| *a != "--");
    let (mut bench, mut test, mut list) = (false, false, false);
    for arg in options {
        match arg.as_str() {
            "--bench" => bench = true,
            "--test" => test = true,
            "--list" => list = true,
            _ => {}
        }
    }
    (test || !bench) && !list
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
    use super::{measuring_with, quantile, testing_with};

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

    fn measuring_of(args: &str) -> bool {
        let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        measuring_with(&args)
    }

    #[test]
    fn only_a_bench_run_without_test_list_or_profile_time_measures() {
        assert!(measuring_of("--bench"));
        assert!(measuring_of("consume --bench --warm-up-time 1"));
        assert!(measuring_of(
            "--bench --save-baseline main publish_(one|100)"
        ));
        // `cargo test --benches`: no `--bench`.
        assert!(!measuring_of(""));
        assert!(!measuring_of("consume"));
        assert!(!measuring_of("--bench --test"));
        assert!(!measuring_of("--test --bench"));
        assert!(!measuring_of("--bench --list"));
        assert!(!measuring_of("--bench --list --format terse"));
        assert!(!measuring_of("--bench --profile-time 5"));
        assert!(!measuring_of("--bench --profile-time=5 bus_bare"));
        // After `--` an argument is a filter, even one spelled like a flag.
        assert!(measuring_of("--bench -- --test"));
    }

    fn testing_of(args: &str) -> bool {
        let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        testing_with(&args)
    }

    #[test]
    fn only_a_test_run_runs_the_paired_path_once() {
        assert!(testing_of(""), "cargo test --benches");
        assert!(testing_of("consume"));
        assert!(testing_of("--bench --test"));
        assert!(!testing_of("--bench"), "a measuring run");
        assert!(
            !testing_of("--bench --profile-time 5"),
            "cargo bench -- --profile-time"
        );
        assert!(
            testing_of("--profile-time=5"),
            "criterion's test mode comes first"
        );
        assert!(!testing_of("--bench --list"));
        assert!(!testing_of("--bench -- --test"), "a filter, not the flag");
    }
}
