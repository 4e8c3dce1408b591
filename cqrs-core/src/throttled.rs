//! Warnings that could repeat once per message or per client (every event of a type a newer
//! build added, every push while the pub/sub is down, every resume during an outage): said at
//! most once an interval, with how many were left unsaid since.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One warning's allowance: a `static` per call site, where a counter carries the volume and
/// the log needs only to say that it happens.
///
/// ```
/// use cqrs_core::throttled::{Throttled, A_MINUTE};
///
/// static SAID: Throttled = Throttled::every(A_MINUTE);
/// for event in 0..1000 {
///     if let Some(unsaid) = SAID.may_say() {
///         // cqrs_core::reexports::tracing::warn!(event, unsaid, "could not push (...)");
///         assert_eq!((event, unsaid), (0, 0));
///     }
/// }
/// ```
#[derive(Debug)]
pub struct Throttled {
    interval_ms: u64,
    /// When it may be said again, in milliseconds since the first use of any.
    next_ms: AtomicU64,
    /// How many were not said since it last was.
    suppressed: AtomicU64,
}

impl Throttled {
    /// At most once every `interval`.
    pub const fn every(interval: Duration) -> Self {
        Self {
            // `as_millis` is a u128; a span past u64's milliseconds is for ever all the same.
            interval_ms: interval
                .as_secs()
                .saturating_mul(1000)
                .saturating_add(interval.subsec_millis() as u64),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether this one may be said, with how many were not since the last that was.
    pub fn may_say(&self) -> Option<u64> {
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

/// A [`Throttled`] allowance per key (an event type, a topic): one key's flood does not hide
/// another's first line. The first `max_keys` keys get one each; the keys past them share one
/// more, so the memory stays bounded whatever the keys are.
///
/// ```
/// use cqrs_core::throttled::{ThrottledPerKey, A_MINUTE};
///
/// static SAID: ThrottledPerKey = ThrottledPerKey::every(A_MINUTE, 64);
/// assert_eq!(SAID.may_say("orders.placed"), Some(0));
/// assert_eq!(SAID.may_say("orders.placed"), None);
/// assert_eq!(SAID.may_say("orders.cancelled"), Some(0), "a key of its own");
/// ```
#[derive(Debug)]
pub struct ThrottledPerKey {
    interval: Duration,
    max_keys: usize,
    keys: std::sync::Mutex<std::collections::BTreeMap<String, Throttled>>,
    others: Throttled,
}

impl Default for ThrottledPerKey {
    /// Once a [minute](A_MINUTE) for each of 64 keys, as the framework's own warnings.
    fn default() -> Self {
        Self::every(A_MINUTE, 64)
    }
}

impl ThrottledPerKey {
    /// At most once every `interval` per key, for `max_keys` keys.
    pub const fn every(interval: Duration, max_keys: usize) -> Self {
        Self {
            interval,
            max_keys,
            keys: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            others: Throttled::every(interval),
        }
    }

    /// Whether a line about `key` may be said, with how many about it were not since.
    pub fn may_say(&self, key: &str) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(said) = keys.get(key) {
            return said.may_say();
        }
        if keys.len() < self.max_keys {
            let said = Throttled::every(self.interval);
            let may = said.may_say();
            keys.insert(key.to_owned(), said);
            return may;
        }
        drop(keys);
        self.others.may_say()
    }
}

/// A minute: the interval of the warnings the framework throttles.
pub const A_MINUTE: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::Throttled;
    use std::time::Duration;

    /// The first is said; the next within the interval are counted, and told with the next
    /// one said once the interval passed.
    #[test]
    fn a_warning_is_said_once_an_interval_with_the_count_of_those_left_unsaid() {
        let warning = Throttled::every(Duration::from_millis(100));
        assert_eq!(warning.may_say(), Some(0));
        assert_eq!(warning.may_say(), None);
        assert_eq!(warning.may_say(), None);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(warning.may_say(), Some(2));
        assert_eq!(warning.may_say(), None);
    }
}
