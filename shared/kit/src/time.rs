//! Times as the services store them (Unix milliseconds) and show them (`google.protobuf.Timestamp`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The time as work that follows the calendar (schedules, expiries) reads it: the system's, or one a test sets.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A clock that stands still until moved, shared by its clones (tests).
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A clock standing at `ms` (Unix milliseconds) until [`Clock::set_ms`] or [`Clock::advance_ms`] moves it.
    pub fn manual(ms: i64) -> Self {
        Self::Manual(Arc::new(AtomicI64::new(ms)))
    }

    /// The current time in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        match self {
            Self::System => now_ms(),
            Self::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }

    /// Sets a manual clock to `ms`; the system clock is not set.
    pub fn set_ms(&self, ms: i64) {
        if let Self::Manual(now) = self {
            now.store(ms, Ordering::SeqCst);
        }
    }

    /// Moves a manual clock on by `ms`; the system clock is not moved.
    pub fn advance_ms(&self, ms: i64) {
        if let Self::Manual(now) = self {
            now.fetch_add(ms, Ordering::SeqCst);
        }
    }
}

/// Returns `time` in Unix milliseconds (0 before the epoch, `i64::MAX` far after it).
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

/// Returns the current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// Returns Unix milliseconds as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Whether `time` is a timestamp the protobuf type allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z,
/// with nanoseconds in `0..1e9`.
pub fn valid_timestamp(time: &prost_types::Timestamp) -> bool {
    const FIRST: i64 = -62_135_596_800;
    const LAST: i64 = 253_402_300_799;
    (FIRST..=LAST).contains(&time.seconds) && (0..1_000_000_000).contains(&time.nanos)
}

/// Returns a protobuf timestamp in Unix milliseconds, saturating at the ends of `i64` (a caller may send any
/// seconds; the range check is the handler's).
pub fn timestamp_ms(time: &prost_types::Timestamp) -> i64 {
    time.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(time.nanos) / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_round_trip_through_timestamps() {
        for ms in [0, 1, 999, 1_000, 1_795_409_491_897, -1, -1_500] {
            assert_eq!(timestamp_ms(&timestamp(ms)), ms, "{ms}");
        }
        assert_eq!(timestamp(-1_500).nanos, 500_000_000);
        for (seconds, nanos, ms) in [
            (i64::MAX, 999_999_999, i64::MAX),
            (i64::MAX / 1000, i32::MAX, i64::MAX),
            (i64::MIN, -999_999_999, i64::MIN),
            (i64::MIN / 1000, i32::MIN, i64::MIN),
        ] {
            let time = prost_types::Timestamp { seconds, nanos };
            assert_eq!(timestamp_ms(&time), ms, "{seconds} s {nanos} ns");
            assert!(!valid_timestamp(&time), "{time:?}");
        }
        assert!(valid_timestamp(&timestamp(1_795_409_491_897)));
        assert!(valid_timestamp(&prost_types::Timestamp {
            seconds: 253_402_300_799,
            nanos: 999_999_999
        }));
        assert!(!valid_timestamp(&prost_types::Timestamp {
            seconds: 253_402_300_800,
            nanos: 0
        }));
        assert!(!valid_timestamp(&prost_types::Timestamp { seconds: 0, nanos: -1 }));
        assert_eq!(unix_ms(UNIX_EPOCH - std::time::Duration::from_secs(1)), 0);
        assert!(now_ms() > 1_700_000_000_000);
    }

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_move_with_it() {
        let clock = Clock::manual(1_000);
        let twin = clock.clone();
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance_ms(500);
        assert_eq!(twin.now_ms(), 1_500);
        twin.set_ms(42);
        assert_eq!(clock.now_ms(), 42);
        assert!(Clock::System.now_ms() > 1_700_000_000_000);
    }
}
