//! Wall-clock time, injectable: what is stamped or compared with a date (message and event
//! timestamps, expiries, throttle windows, purge ages) is tested without sleeping.
//!
//! Waiting is another matter: timers (a worker's restart backoff, a relay's poll interval, a
//! timeout layer, a redelivery delay) run on tokio's time, which a [`ManualClock`] does not
//! move. Test those with short configured intervals, or with tokio's paused time
//! (`tokio::time::pause` and `advance`, feature `test-util`).

use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to. Clones share the time. It moves what reads a
/// [`Clock`], not tokio's timers (see the [module](self) docs).
///
/// ```
/// use cqrs_core::clock::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let before = clock.now();
/// clock.advance(Duration::from_secs(60));
/// assert_eq!((clock.now() - before).num_seconds(), 60);
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock set to the current system time.
    pub fn new() -> Self {
        Self::at(Utc::now())
    }

    /// A clock set to `now`.
    pub fn at(now: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(now)),
        }
    }

    /// Moves the clock forward. Any step is accepted: one past the calendar's end (chrono's
    /// `DateTime::<Utc>::MAX_UTC`, which `Duration::MAX` is far beyond) stops there.
    pub fn advance(&self, by: std::time::Duration) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now = chrono::Duration::from_std(by)
            .ok()
            .and_then(|by| now.checked_add_signed(by))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
    }

    /// Sets the time.
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A step past the calendar's end (`Duration::MAX`, or one that fits chrono's `Duration`
    /// but not the date) stops the clock at its end, as an expiry "never" saturates: it
    /// panicked on chrono's overflow.
    #[test]
    fn advancing_past_the_end_of_the_calendar_stops_there() {
        let clock = ManualClock::new();
        clock.advance(Duration::MAX);
        assert_eq!(clock.now(), DateTime::<Utc>::MAX_UTC);
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), DateTime::<Utc>::MAX_UTC);

        let clock = ManualClock::new();
        // Fits a chrono `Duration` (about 292 million years), not the calendar (262,143 years).
        clock.advance(Duration::from_secs(1 << 50));
        assert_eq!(clock.now(), DateTime::<Utc>::MAX_UTC);

        let clock = ManualClock::new();
        let before = clock.now();
        clock.advance(Duration::from_secs(60));
        assert_eq!((clock.now() - before).num_seconds(), 60);
    }
}
