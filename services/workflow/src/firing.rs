//! What a schedule does, decided without I/O: which fires are due at a tick (and what is made of fires missed
//! while no firer ran), whether a scheduled run may start under its schedule's policy, and which older scheduled
//! runs a new fire cancels.

use crate::cron::CronSchedule;
use crate::progress::State;

/// A fire the firer gets to at most this late is on time; an older one was missed (the service down, or no
/// replica holding the schedules lease) and is made only as the schedule's catch-up says.
pub(crate) const ON_TIME_MS: i64 = 60_000;
/// The most missed fires `CATCH_UP_ALL` makes when `max_catch_up` is 0.
pub(crate) const DEFAULT_MAX_CATCH_UP: usize = 100;

/// What is made of missed fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CatchUp {
    /// None.
    Skip,
    /// The newest only (counting an on-time fire: with one, no missed fire is made).
    Latest,
    /// The newest `max` missed fires, and every on-time one.
    All {
        /// How many missed fires at most.
        max: usize,
    },
}

/// The fire times a schedule may have: after `since_ms` (what earlier ticks decided), from `start_ms`, up to
/// `end_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// Fires at or before this were decided already.
    pub(crate) since_ms: i64,
    /// No fire before this.
    pub(crate) start_ms: Option<i64>,
    /// No fire after this.
    pub(crate) end_ms: Option<i64>,
}

/// What a tick makes of a schedule: the fires to make, oldest first, and the new `since_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Due {
    /// The fire times to make.
    pub(crate) fires: Vec<i64>,
    /// Everything at or before this is decided.
    pub(crate) since_ms: i64,
}

/// The fires of `cron` due at `now_ms` in `window`, with what `catch_up` makes of the missed ones.
pub(crate) fn due(cron: &CronSchedule, window: Window, now_ms: i64, catch_up: CatchUp) -> Due {
    let after = window
        .start_ms
        .map_or(window.since_ms, |start| window.since_ms.max(start.saturating_sub(1)));
    let until = window.end_ms.map_or(now_ms, |end| end.min(now_ms));
    let since_ms = window.since_ms.max(now_ms);
    if until <= after {
        return Due {
            fires: Vec::new(),
            since_ms,
        };
    }
    // Everything at or before this was missed.
    let missed_until = (now_ms - ON_TIME_MS).clamp(after, until);
    let on_time = cron.fires_ms(missed_until, until, usize::MAX);
    let fires = match catch_up {
        CatchUp::Skip => on_time,
        CatchUp::Latest if !on_time.is_empty() => on_time[on_time.len() - 1..].to_vec(),
        CatchUp::Latest => cron.newest_ms(after, missed_until, 1),
        CatchUp::All { max } => {
            let mut fires = cron.newest_ms(after, missed_until, max);
            fires.extend(on_time);
            fires
        }
    };
    Due { fires, since_ms }
}

/// A schedule's policy for its runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Policy {
    /// The most runs of the pipeline started and not ended at once, manual ones counted; 0: no limit.
    pub(crate) max_concurrent_runs: usize,
    /// Whether a run waits for the schedule's previous run to succeed.
    pub(crate) depends_on_past: bool,
}

/// The schedule's previous run: the one of the latest earlier fire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Previous {
    /// Its resource name.
    pub(crate) name: String,
    /// Its state.
    pub(crate) state: State,
}

/// What a scheduled run's start depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Surroundings {
    /// The pipeline's other runs started (admitted) and not ended, of any trigger.
    pub(crate) active_runs: usize,
    /// The schedule's previous run, if any.
    pub(crate) previous: Option<Previous>,
}

/// What the policy says of a scheduled run waiting to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It may start.
    Start,
    /// It waits, for this reason, until what it waits for ends.
    Wait(String),
    /// It waits until a person acts (a failed previous run under depends-on-past), for this reason.
    Blocked(String),
}

/// Whether a run waiting under `policy` may start among `around`.
pub(crate) fn verdict(policy: Policy, around: &Surroundings) -> Verdict {
    if policy.depends_on_past
        && let Some(previous) = &around.previous
    {
        match previous.state {
            State::Succeeded | State::Skipped => {}
            State::Failed | State::Canceled => {
                return Verdict::Blocked(format!(
                    "blocked: the previous run {} is {}; retry it to success (RetryRun) or skip it (SkipRun) \
                     for later fires to run",
                    previous.name,
                    previous.state.as_str()
                ));
            }
            State::Pending | State::Queued | State::Running | State::Canceling => {
                return Verdict::Wait(format!(
                    "waiting for the previous run {} to succeed (depends_on_past)",
                    previous.name
                ));
            }
        }
    }
    if policy.max_concurrent_runs > 0 && around.active_runs >= policy.max_concurrent_runs {
        return Verdict::Wait(format!(
            "waiting for a slot: {} runs of the pipeline are going and the schedule allows {} at once \
             (max_concurrent_runs, manual runs counted)",
            around.active_runs, policy.max_concurrent_runs
        ));
    }
    Verdict::Start
}

/// Which of a schedule's live runs, `(id, fire time)`, keep-newest-`keep` cancels: all but the `keep` of the
/// newest fire times. None when `keep` is 0.
pub(crate) fn superseded(keep: usize, live: &[(String, i64)]) -> Vec<String> {
    if keep == 0 {
        return Vec::new();
    }
    let mut newest_first: Vec<&(String, i64)> = live.iter().collect();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    newest_first.into_iter().skip(keep).map(|(id, _)| id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cron::utc;

    fn ms(text: &str) -> i64 {
        utc(text).timestamp_millis()
    }

    fn texts(fires: &[i64]) -> Vec<String> {
        fires
            .iter()
            .map(|fire| {
                chrono::DateTime::from_timestamp_millis(*fire)
                    .map(|at| at.format("%H:%M").to_string())
                    .unwrap_or_default()
            })
            .collect()
    }

    fn hourly() -> CronSchedule {
        CronSchedule::parse("0 * * * *", "UTC").unwrap_or_else(|problem| panic!("{problem:?}"))
    }

    fn window(since: &str) -> Window {
        Window {
            since_ms: ms(since),
            start_ms: None,
            end_ms: None,
        }
    }

    #[test]
    fn an_on_time_fire_is_made_whatever_the_catch_up() {
        for catch_up in [CatchUp::Skip, CatchUp::Latest, CatchUp::All { max: 100 }] {
            let due = due(
                &hourly(),
                window("2027-01-01T09:59:00Z"),
                ms("2027-01-01T10:00:01Z"),
                catch_up,
            );
            assert_eq!(texts(&due.fires), ["10:00"], "{catch_up:?}");
            assert_eq!(due.since_ms, ms("2027-01-01T10:00:01Z"));
        }
    }

    #[test]
    fn after_a_three_hour_outage_each_catch_up_makes_what_it_says() {
        let (since, now) = ("2027-01-01T10:30:00Z", ms("2027-01-01T13:30:00Z"));
        let made = |catch_up| texts(&due(&hourly(), window(since), now, catch_up).fires);
        assert_eq!(made(CatchUp::Skip), Vec::<String>::new());
        assert_eq!(made(CatchUp::Latest), ["13:00"]);
        assert_eq!(made(CatchUp::All { max: 100 }), ["11:00", "12:00", "13:00"]);
        assert_eq!(made(CatchUp::All { max: 2 }), ["12:00", "13:00"]);
        // An on-time fire after the outage: latest makes it alone; all makes the missed ones too.
        let now = ms("2027-01-01T13:00:30Z");
        let made = |catch_up| texts(&due(&hourly(), window(since), now, catch_up).fires);
        assert_eq!(made(CatchUp::Skip), ["13:00"]);
        assert_eq!(made(CatchUp::Latest), ["13:00"]);
        assert_eq!(made(CatchUp::All { max: 100 }), ["11:00", "12:00", "13:00"]);
    }

    #[test]
    fn the_window_bounds_the_fires_and_a_tick_never_makes_a_fire_twice() {
        let bounded = Window {
            since_ms: ms("2027-01-01T00:00:00Z"),
            start_ms: Some(ms("2027-01-01T11:00:00Z")),
            end_ms: Some(ms("2027-01-01T12:00:00Z")),
        };
        let all = CatchUp::All { max: 100 };
        let first = due(&hourly(), bounded, ms("2027-01-01T15:00:00Z"), all);
        assert_eq!(texts(&first.fires), ["11:00", "12:00"]);
        let again = due(
            &hourly(),
            Window {
                since_ms: first.since_ms,
                ..bounded
            },
            ms("2027-01-01T16:00:00Z"),
            all,
        );
        assert_eq!(again.fires, Vec::<i64>::new());
        // A clock stepped back decides nothing again.
        let back = due(
            &hourly(),
            window("2027-01-01T10:00:01Z"),
            ms("2027-01-01T09:00:00Z"),
            all,
        );
        assert_eq!((back.fires.len(), back.since_ms), (0, ms("2027-01-01T10:00:01Z")));
    }

    #[test]
    fn a_week_of_minutes_missed_is_not_walked_whole() {
        let every_minute = CronSchedule::parse("* * * * *", "UTC").unwrap_or_else(|problem| panic!("{problem:?}"));
        let due = due(
            &every_minute,
            window("2027-01-01T00:00:00Z"),
            ms("2027-01-08T00:00:30Z"),
            CatchUp::All { max: 3 },
        );
        // The newest three missed, and the on-time one.
        assert_eq!(texts(&due.fires), ["23:57", "23:58", "23:59", "00:00"]);
    }

    #[test]
    fn both_dst_changes_fire_once_in_berlin_and_new_york() {
        let all = CatchUp::All { max: 100 };
        let at = |expression: &str, zone: &str, since: &str, now: &str| {
            let cron = CronSchedule::parse(expression, zone).unwrap_or_else(|problem| panic!("{problem:?}"));
            due(&cron, window(since), ms(now), all).fires
        };
        // Berlin springs forward at 02:00 on 2027-03-28: 02:30 fires once, at 03:30 local (01:30Z).
        assert_eq!(
            at(
                "30 2 * * *",
                "Europe/Berlin",
                "2027-03-27T12:00:00Z",
                "2027-03-28T01:30:10Z"
            ),
            [ms("2027-03-28T01:30:00Z")]
        );
        // Berlin falls back at 03:00 on 2027-10-31: 02:30 happens twice and fires once (00:30Z).
        assert_eq!(
            at(
                "30 2 * * *",
                "Europe/Berlin",
                "2027-10-30T12:00:00Z",
                "2027-10-31T03:00:00Z"
            ),
            [ms("2027-10-31T00:30:00Z")]
        );
        // New York springs forward on 2027-03-14 and falls back on 2027-11-07.
        assert_eq!(
            at(
                "30 2 * * *",
                "America/New_York",
                "2027-03-13T12:00:00Z",
                "2027-03-14T08:00:00Z"
            ),
            [ms("2027-03-14T07:30:00Z")]
        );
        assert_eq!(
            at(
                "30 1 * * *",
                "America/New_York",
                "2027-11-06T12:00:00Z",
                "2027-11-07T08:00:00Z"
            ),
            [ms("2027-11-07T05:30:00Z")]
        );
    }

    #[test]
    fn the_policy_waits_blocks_or_starts() {
        let previous = |state| {
            Some(Previous {
                name: "projects/p/pipelines/x/runs/r1".into(),
                state,
            })
        };
        let past = Policy {
            max_concurrent_runs: 0,
            depends_on_past: true,
        };
        assert_eq!(verdict(past, &Surroundings::default()), Verdict::Start);
        for (state, expected) in [
            (State::Succeeded, "start"),
            (State::Skipped, "start"),
            (State::Running, "wait"),
            (State::Queued, "wait"),
            (State::Failed, "blocked"),
            (State::Canceled, "blocked"),
        ] {
            let around = Surroundings {
                active_runs: 1,
                previous: previous(state),
            };
            let got = match verdict(past, &around) {
                Verdict::Start => "start",
                Verdict::Wait(_) => "wait",
                Verdict::Blocked(reason) => {
                    assert!(reason.contains("runs/r1") && reason.contains("SkipRun"), "{reason}");
                    "blocked"
                }
            };
            assert_eq!(got, expected, "{state:?}");
        }
        let three = Policy {
            max_concurrent_runs: 3,
            depends_on_past: false,
        };
        let with = |active_runs| Surroundings {
            active_runs,
            previous: previous(State::Failed),
        };
        assert_eq!(verdict(three, &with(2)), Verdict::Start);
        assert!(matches!(verdict(three, &with(3)), Verdict::Wait(reason) if reason.contains("3 runs")));
    }

    #[test]
    fn keep_newest_cancels_all_but_the_newest_fires() {
        let live: Vec<(String, i64)> = [("a", 1), ("c", 3), ("b", 2), ("d", 4)]
            .iter()
            .map(|(id, fire)| ((*id).to_owned(), *fire))
            .collect();
        assert_eq!(superseded(2, &live), ["b", "a"]);
        assert_eq!(superseded(0, &live), Vec::<String>::new());
        assert_eq!(superseded(9, &live), Vec::<String>::new());
    }
}
