//! Time as a dependency: the only module that reads the wall clock or sleeps.
//!
//! Everything else receives a [`Clock`], so tests run on [`FakeClock`] and never wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// `duration` as chrono's, saturating at the longest span it holds (a grace or timeout of
/// centuries is "never", not an overflow).
#[must_use]
pub fn span(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// `at` plus `duration`, saturating at the latest time chrono holds.
#[must_use]
pub fn later(at: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    at.checked_add_signed(span(duration))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A source of "now" and a way to wait.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    /// Sleeps for at most `duration`; callers re-read [`Clock::now`] after every wake-up.
    fn sleep(&self, duration: Duration);

    /// A reading that moves only forward, at the pace of real time, for measuring a wait
    /// that a stepped wall clock must neither shorten nor lengthen (a lease's settle delay).
    /// Differences between two readings are durations; the value itself is not the time of
    /// day. By default real time ([`SystemClock`]'s): a clock that does not say otherwise
    /// cannot make a safety delay pass sooner than it does. [`FakeClock`] answers its own
    /// time, which its test moves.
    fn monotonic(&self) -> DateTime<Utc> {
        SystemClock.monotonic()
    }

    /// Waits until [`Clock::now`] reaches `at` or `wake` is set, without moving time itself:
    /// for background threads (lease renewal) that must follow a fake clock, not drive it.
    /// Polls every few milliseconds of real time; whoever sets `wake` should also unpark the
    /// waiting thread, which then returns at once (a poll's wait is parked, not slept).
    fn wait_until(&self, at: DateTime<Utc>, wake: &AtomicBool) {
        const POLL: Duration = Duration::from_millis(10);
        while !wake.load(Ordering::SeqCst) && self.now() < at {
            std::thread::park_timeout(POLL);
        }
    }
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one sanctioned place
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    #[allow(clippy::disallowed_methods)] // the one sanctioned place
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }

    /// The wall clock at the first reading, advanced by `Instant` since then.
    #[allow(clippy::disallowed_methods)] // the one sanctioned place
    fn monotonic(&self) -> DateTime<Utc> {
        static ORIGIN: std::sync::OnceLock<(std::time::Instant, DateTime<Utc>)> =
            std::sync::OnceLock::new();
        let (instant, wall) = *ORIGIN.get_or_init(|| (std::time::Instant::now(), Utc::now()));
        later(wall, instant.elapsed())
    }
}

/// A clock that only moves when told to (or when someone sleeps on it).
#[derive(Debug, Clone)]
pub struct FakeClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl FakeClock {
    #[must_use]
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves time by `delta` (negative deltas model a clock stepped backwards).
    pub fn advance(&self, delta: chrono::Duration) {
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *now += delta;
    }

    pub fn set(&self, to: DateTime<Utc>) {
        *self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = to;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        *self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sleep(&self, duration: Duration) {
        self.advance(span(duration));
    }

    fn monotonic(&self) -> DateTime<Utc> {
        self.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_plus_a_duration_saturates_rather_than_overflowing() {
        let at = DateTime::parse_from_rfc3339("2030-01-01T04:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            later(at, Duration::from_secs(90)).to_rfc3339(),
            "2030-01-01T04:01:30+00:00"
        );
        // A grace of a billion years is never: not a panic, not a time in the past.
        let eon = Duration::from_secs(31_557_600 * 1_000_000_000);
        assert_eq!(later(at, eon), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            later(DateTime::<Utc>::MAX_UTC, Duration::from_secs(1)),
            DateTime::<Utc>::MAX_UTC
        );
        assert_eq!(span(Duration::MAX), chrono::Duration::MAX);
        assert_eq!(
            span(Duration::from_millis(1500)),
            chrono::Duration::milliseconds(1500)
        );
    }
}
