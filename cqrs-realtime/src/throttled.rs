//! Warnings a crowd of clients could each repeat (every resume during an outage, every
//! subscribe to a feed that is down): said at most once an interval, with how many were left
//! unsaid since.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// One warning's allowance. A `static` per call site.
pub(crate) struct Throttled {
    interval_ms: u64,
    /// When it may be said again, in milliseconds since the first use of any.
    next_ms: AtomicU64,
    /// How many were not said since it last was.
    suppressed: AtomicU64,
}

impl Throttled {
    /// At most once every `interval_ms` milliseconds.
    pub(crate) const fn every(interval_ms: u64) -> Self {
        Self {
            interval_ms,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether this one may be said, with how many were not since the last that was.
    pub(crate) fn may_say(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis())
            .unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(self.interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A minute: the allowance of the warnings a crowd repeats.
pub(crate) const A_MINUTE_MS: u64 = 60_000;

#[cfg(test)]
mod tests {
    use super::Throttled;
    use std::time::Duration;

    /// The first is said; the next within the interval are counted, and told with the next
    /// one said once the interval passed.
    #[test]
    fn a_warning_is_said_once_an_interval_with_the_count_of_those_left_unsaid() {
        let warning = Throttled::every(100);
        assert_eq!(warning.may_say(), Some(0));
        assert_eq!(warning.may_say(), None);
        assert_eq!(warning.may_say(), None);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(warning.may_say(), Some(2));
        assert_eq!(warning.may_say(), None);
    }
}
