//! When a schedule fires: a standard 5-field cron expression (parsed by `croner`) read as wall-clock time in an
//! IANA time zone, turned into instants by one rule for daylight-saving changes:
//!
//! - a local time the clocks skip (spring forward) fires once, at the instant it would have been had the clocks
//!   not moved: `02:30` on a day Berlin jumps from `02:00` to `03:00` fires at `03:30` (`01:30Z`); when that
//!   instant is also a fire of its own (`03:30` in the pattern), it fires once;
//! - a local time the clocks repeat (fall back) fires once, at its first occurrence.
//!
//! The pattern is matched against local wall-clock minutes (as if the zone were UTC, where no minute is skipped or
//! repeated), and each match is then placed in the zone by that rule; the instants are sorted and made unique.

use std::str::FromStr as _;

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, Offset as _, TimeZone as _, Timelike as _, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// Beyond any daylight-saving shift: wall-clock times this far around a window are looked at, so that a skipped
/// time shifted into the window is not missed.
const SHIFT_SLACK: Duration = Duration::hours(3);

/// A schedule's cron expression in its time zone.
#[derive(Debug, Clone)]
pub(crate) struct CronSchedule {
    cron: Cron,
    zone: Tz,
}

/// Why an expression or a zone is refused, for the field that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CronProblem {
    /// The cron expression, and why.
    Expression(String),
    /// The time zone, and why.
    Zone(String),
}

impl CronSchedule {
    /// Parses `expression` (5 fields: minute, hour, day of month, month, day of week; `,` `-` `/`, names such as
    /// `MON` and `JAN`, and `@hourly` … `@yearly`) in the IANA zone `zone` (`UTC` when empty).
    ///
    /// # Errors
    /// What is wrong with the expression or the zone.
    pub(crate) fn parse(expression: &str, zone: &str) -> Result<Self, CronProblem> {
        let trimmed = expression.trim();
        let fields = trimmed.split_whitespace().count();
        if !trimmed.starts_with('@') && fields != 5 {
            return Err(CronProblem::Expression(format!(
                "{expression:?} has {fields} fields; give 5: minute hour day-of-month month day-of-week, e.g. \
                 \"30 2 * * MON-FRI\""
            )));
        }
        if trimmed.starts_with('@') && fields != 1 {
            return Err(CronProblem::Expression(format!(
                "{expression:?}: a nickname such as @daily stands alone"
            )));
        }
        let cron = Cron::from_str(trimmed)
            .map_err(|error| CronProblem::Expression(format!("{expression:?} is not a cron expression: {error}")))?;
        let zone = if zone.is_empty() {
            Tz::UTC
        } else {
            zone.parse::<Tz>().map_err(|_| {
                CronProblem::Zone(format!(
                    "{zone:?} is not an IANA time zone, e.g. \"Europe/Berlin\" or \"UTC\""
                ))
            })?
        };
        Ok(Self { cron, zone })
    }

    /// The instants it fires at in `(after, until]`, oldest first, at most `limit` of them.
    pub(crate) fn fires(&self, after: DateTime<Utc>, until: DateTime<Utc>, limit: usize) -> Vec<DateTime<Utc>> {
        let mut fires = Vec::new();
        // Times a protobuf timestamp can carry, with room for any zone's offset.
        let (first, end) = (
            DateTime::<Utc>::UNIX_EPOCH,
            DateTime::parse_from_rfc3339("9999-12-30T00:00:00Z")
                .map_or(DateTime::<Utc>::UNIX_EPOCH, |end| end.to_utc()),
        );
        let (after, until) = (after.clamp(first, end), until.clamp(first, end));
        if until <= after || limit == 0 {
            return fires;
        }
        let local = |at: DateTime<Utc>| self.zone.from_utc_datetime(&at.naive_utc()).naive_local();
        let last = local(until)
            .checked_add_signed(SHIFT_SLACK)
            .unwrap_or(NaiveDateTime::MAX);
        // Whole seconds: matches are at second 0, and the walk must not carry a fraction into them.
        let mut wall = local(after)
            .checked_sub_signed(SHIFT_SLACK)
            .unwrap_or(NaiveDateTime::MIN);
        wall = wall.with_nanosecond(0).unwrap_or(wall);
        // Wall-clock matches come in order; their instants nearly so (a shifted one may pass a later match).
        while let Ok(next) = self.cron.find_next_occurrence(&Utc.from_utc_datetime(&wall), false) {
            wall = next.naive_utc();
            if wall > last {
                break;
            }
            let at = self.instant(wall);
            if at <= after || at > until {
                continue;
            }
            fires.push(at);
            // Later matches land no earlier than `at - SHIFT_SLACK`: once `limit` fires lie before that, they are
            // the first `limit`.
            if fires.len() >= limit {
                fires.sort_unstable();
                fires.dedup();
                if fires.len() >= limit
                    && fires[limit - 1]
                        .checked_add_signed(SHIFT_SLACK)
                        .is_some_and(|done| done < at)
                {
                    break;
                }
            }
        }
        fires.sort_unstable();
        fires.dedup();
        fires.truncate(limit);
        fires
    }

    /// The instants it fires at in `(after_ms, until_ms]` (Unix milliseconds), oldest first, at most `limit`.
    pub(crate) fn fires_ms(&self, after_ms: i64, until_ms: i64, limit: usize) -> Vec<i64> {
        let time = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.fires(time(after_ms), time(until_ms), limit)
            .iter()
            .map(DateTime::timestamp_millis)
            .collect()
    }

    /// The newest `count` instants it fires at in `(after_ms, until_ms]`, oldest first, found by looking back
    /// from `until_ms` in doubling spans (a long window is never walked whole).
    pub(crate) fn newest_ms(&self, after_ms: i64, until_ms: i64, count: usize) -> Vec<i64> {
        let mut span: i64 = 3_600_000;
        loop {
            let from = until_ms.saturating_sub(span).max(after_ms);
            let fires = self.fires_ms(from, until_ms, usize::MAX);
            if fires.len() >= count || from == after_ms {
                return fires[fires.len().saturating_sub(count)..].to_vec();
            }
            span = span.saturating_mul(2);
        }
    }

    /// Instant `ms` as wall-clock time in the zone, `YYYY-MM-DD HH:MM:SS` (cube-studio's `execution_date`).
    pub(crate) fn local_time(&self, ms: i64) -> String {
        DateTime::from_timestamp_millis(ms)
            .map(|at| at.with_timezone(&self.zone).format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default()
    }

    /// The instant of wall-clock time `wall` in the zone, by the rule of the module's comment.
    fn instant(&self, wall: NaiveDateTime) -> DateTime<Utc> {
        match self.zone.from_local_datetime(&wall) {
            LocalResult::Single(at) => at.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            LocalResult::None => {
                // Skipped: read with the offset in force before the clocks moved.
                let earlier = wall.checked_sub_signed(SHIFT_SLACK + SHIFT_SLACK).unwrap_or(wall);
                let offset = self.zone.from_utc_datetime(&earlier).offset().fix();
                let shifted = wall
                    .checked_sub_signed(Duration::seconds(i64::from(offset.local_minus_utc())))
                    .unwrap_or(wall);
                Utc.from_utc_datetime(&shifted)
            }
        }
    }
}

/// The instant an RFC 3339 text names (tests).
#[cfg(test)]
pub(crate) fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .unwrap_or_else(|error| panic!("{text}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fires(expression: &str, zone: &str, after: &str, until: &str) -> Vec<String> {
        CronSchedule::parse(expression, zone)
            .unwrap_or_else(|problem| panic!("{problem:?}"))
            .fires(utc(after), utc(until), 1000)
            .iter()
            .map(|fire| fire.to_rfc3339())
            .collect()
    }

    #[test]
    fn five_fields_with_lists_ranges_steps_and_names() {
        assert_eq!(
            fires(
                "0,30 9-10/1 * * MON",
                "UTC",
                "2026-12-06T00:00:00Z",
                "2026-12-08T00:00:00Z"
            ),
            [
                "2026-12-07T09:00:00+00:00",
                "2026-12-07T09:30:00+00:00",
                "2026-12-07T10:00:00+00:00",
                "2026-12-07T10:30:00+00:00"
            ]
        );
        assert_eq!(
            fires("*/20 * * JAN *", "UTC", "2026-12-31T23:30:00Z", "2027-01-01T01:00:00Z"),
            [
                "2027-01-01T00:00:00+00:00",
                "2027-01-01T00:20:00+00:00",
                "2027-01-01T00:40:00+00:00",
                "2027-01-01T01:00:00+00:00"
            ]
        );
        assert_eq!(
            fires("@daily", "", "2026-12-01T00:00:00Z", "2026-12-03T00:00:00Z"),
            ["2026-12-02T00:00:00+00:00", "2026-12-03T00:00:00+00:00"]
        );
    }

    #[test]
    fn the_window_is_after_exclusive_and_until_inclusive() {
        assert_eq!(
            fires("0 * * * *", "UTC", "2026-12-01T10:00:00Z", "2026-12-01T12:00:00Z"),
            ["2026-12-01T11:00:00+00:00", "2026-12-01T12:00:00+00:00"]
        );
        let schedule = CronSchedule::parse("* * * * *", "UTC").unwrap_or_else(|problem| panic!("{problem:?}"));
        assert_eq!(
            schedule
                .fires(utc("2026-12-01T00:00:00Z"), utc("2026-12-02T00:00:00Z"), 3)
                .len(),
            3
        );
        assert!(
            schedule
                .fires(utc("2026-12-01T00:00:00Z"), utc("2026-12-01T00:00:00Z"), 3)
                .is_empty()
        );
    }

    #[test]
    fn fires_are_whole_minutes_whatever_the_window() {
        assert_eq!(
            fires("0 * * * *", "UTC", "2026-12-01T09:59:59.999Z", "2026-12-01T10:30:00Z"),
            ["2026-12-01T10:00:00+00:00"]
        );
    }

    #[test]
    fn the_ends_of_time_do_not_panic() {
        let schedule =
            CronSchedule::parse("* * * * *", "Pacific/Kiritimati").unwrap_or_else(|problem| panic!("{problem:?}"));
        let _ = schedule.fires(
            DateTime::<Utc>::MAX_UTC - Duration::hours(1),
            DateTime::<Utc>::MAX_UTC,
            1,
        );
        let _ = schedule.fires(
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MIN_UTC + Duration::hours(1),
            1,
        );
    }

    #[test]
    fn a_time_zone_moves_the_instants() {
        assert_eq!(
            fires(
                "30 8 * * *",
                "Asia/Shanghai",
                "2026-12-01T00:00:00Z",
                "2026-12-02T00:00:00Z"
            ),
            ["2026-12-01T00:30:00+00:00"]
        );
    }

    #[test]
    fn berlin_spring_forward_fires_a_skipped_time_once_at_the_shifted_instant() {
        // 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00Z).
        assert_eq!(
            fires(
                "30 2 * * *",
                "Europe/Berlin",
                "2026-03-28T12:00:00Z",
                "2026-03-30T12:00:00Z"
            ),
            ["2026-03-29T01:30:00+00:00", "2026-03-30T00:30:00+00:00"]
        );
        // Hourly: 02:00 does not exist and 03:00 is the same instant: one fire, not two, and none lost.
        assert_eq!(
            fires(
                "0 * * * *",
                "Europe/Berlin",
                "2026-03-28T23:30:00Z",
                "2026-03-29T03:00:00Z"
            ),
            [
                "2026-03-29T00:00:00+00:00",
                "2026-03-29T01:00:00+00:00",
                "2026-03-29T02:00:00+00:00",
                "2026-03-29T03:00:00+00:00"
            ]
        );
    }

    #[test]
    fn berlin_fall_back_fires_a_repeated_time_once() {
        // 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00Z); 02:30 happens at 00:30Z and 01:30Z.
        assert_eq!(
            fires(
                "30 2 * * *",
                "Europe/Berlin",
                "2026-10-24T12:00:00Z",
                "2026-10-26T12:00:00Z"
            ),
            ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"]
        );
    }

    #[test]
    fn new_york_changes_follow_the_same_rule() {
        // 2026-03-08: 02:00 EST becomes 03:00 EDT (07:00Z); 02:30 is skipped.
        assert_eq!(
            fires(
                "30 2 * * *",
                "America/New_York",
                "2026-03-07T12:00:00Z",
                "2026-03-08T12:00:00Z"
            ),
            ["2026-03-08T07:30:00+00:00"]
        );
        // 2026-11-01: 02:00 EDT becomes 01:00 EST (06:00Z); 01:30 happens at 05:30Z and 06:30Z.
        assert_eq!(
            fires(
                "30 1 * * *",
                "America/New_York",
                "2026-10-31T12:00:00Z",
                "2026-11-01T12:00:00Z"
            ),
            ["2026-11-01T05:30:00+00:00"]
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_by_field() {
        for bad in ["* * * *", "0 0 * * * *", "61 * * * *", "* * * * FOO", "", "@daily 5"] {
            assert!(
                matches!(CronSchedule::parse(bad, "UTC"), Err(CronProblem::Expression(_))),
                "{bad:?} was taken"
            );
        }
        assert!(matches!(
            CronSchedule::parse("* * * * *", "Mars/Olympus"),
            Err(CronProblem::Zone(_))
        ));
    }
}
