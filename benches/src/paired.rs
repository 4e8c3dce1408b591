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
    const FLAGS: [&str; 8] = [
        "--bench",
        "--test",
        "--list",
        "--noplot",
        "--quick",
        "--verbose",
        "--quiet",
        "--exact",
    ];
    let filters: Vec<&str> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            let after_option =
                *i > 0 && args[i - 1].starts_with("--") && !FLAGS.contains(&args[i - 1].as_str());
            !a.starts_with('-') && !after_option
        })
        .map(|(_, a)| a.as_str())
        .collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| group.contains(f) || f.contains(group))
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
