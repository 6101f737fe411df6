//! Times as the services store them (Unix milliseconds) and show them (`google.protobuf.Timestamp`).

use std::time::{SystemTime, UNIX_EPOCH};

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

/// Returns a protobuf timestamp in Unix milliseconds.
pub fn timestamp_ms(time: &prost_types::Timestamp) -> i64 {
    time.seconds.saturating_mul(1000) + i64::from(time.nanos) / 1_000_000
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
        assert_eq!(unix_ms(UNIX_EPOCH - std::time::Duration::from_secs(1)), 0);
        assert!(now_ms() > 1_700_000_000_000);
    }
}
