//! The firer: the one loop that makes schedules' fires. The replica holding the schedules lease looks at every
//! enabled schedule each tick and makes the fires [`firing::due`] gives, then the fires of pending backfills.
//! Each fire is a run made for the schedule's creator (the service account acting for them), recorded with its
//! row in the fire ledger in one transaction fenced by the lease's epoch: a fire has one run, whatever the
//! replicas, restarts or clock steps, and a replica that lost the lease makes none.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cube_kit::ApiError;
use cube_kit::identity::act_for;
use cube_kit::lease::{Epoch, Keeper};
use cube_kit::time::Clock;
use cube_proto::cube::workflow::v1::Schedule;
use tokio::sync::Notify;
use tonic::Request;

use crate::cron::CronSchedule;
use crate::firing::{self, ON_TIME_MS, Window};
use crate::model::schedule;
use crate::runs::{Fire, Maker, Runs, Scope};
use crate::schedules::{MAX_BACKFILL, catch_up_of, ms, spec};
use crate::store::NewFire;

/// How often the firer looks at the schedules, besides when a handler wakes it.
const TICK: Duration = Duration::from_secs(1);
/// The most fires of a backfill one tick makes (the rest at the next ticks), so that a long backfill does not
/// hold back the schedules' own fires.
const BACKFILL_PER_TICK: usize = 100;

/// The firer's parts.
pub(crate) struct Firer {
    /// Makes the runs.
    pub(crate) runs: Runs,
    /// The time fires are due by.
    pub(crate) clock: Clock,
    /// Wakes the loop before its next tick.
    pub(crate) wake: Arc<Notify>,
    /// The workflow service account's token, with which runs are made for schedules' creators.
    pub(crate) token: String,
}

/// Makes fires while `keeper` holds the schedules lease.
pub(crate) async fn run(firer: Arc<Firer>, keeper: Keeper) {
    loop {
        let epoch = keeper.tick(&firer.wake, TICK).await;
        let schedules = match firer.runs.engine.store.schedules_to_fire().await {
            Ok(schedules) => schedules,
            Err(error) => {
                tracing::warn!(%error, "listing schedules");
                continue;
            }
        };
        let now = firer.clock.now_ms();
        for row in schedules {
            if let Err(error) = fire_schedule(&firer, epoch, &row, now).await {
                tracing::warn!(%error, project = %row.project, pipeline = %row.pipeline, schedule = %row.id, "firing");
            }
        }
    }
}

/// Whether an error making a fire holds for good (the project or pipeline is gone, the creator may no longer run
/// it: the fire is passed over with the reason) rather than for now (a task that cannot be placed yet, a service
/// unavailable: it is tried again at the next tick, the reason shown meanwhile).
fn for_good(error: &ApiError) -> bool {
    matches!(
        error,
        ApiError::NotFound { .. } | ApiError::PermissionDenied { .. } | ApiError::InvalidArgument(_)
    )
}

/// Makes what schedule `row` has due at `now` and what its backfill still lacks.
async fn fire_schedule(firer: &Firer, epoch: Epoch, row: &schedule::Model, now: i64) -> Result<(), ApiError> {
    let store = &firer.runs.engine.store;
    let given = spec(row);
    let cron = match CronSchedule::parse(&given.cron, &given.time_zone) {
        Ok(cron) => cron,
        Err(problem) => {
            let reason = format!("its cron expression or zone does not parse: {problem:?}");
            return store.pass_schedule(row, now, Some(&reason)).await;
        }
    };
    if row.enabled {
        let window = Window {
            since_ms: row.since_ms,
            start_ms: ms(given.start_time.as_ref()),
            end_ms: ms(given.end_time.as_ref()),
        };
        let due = firing::due(&cron, window, now, catch_up_of(&given));
        let mut blocked = None;
        for fire_ms in &due.fires {
            if let Err(error) = make(firer, epoch, row, &given, &cron, *fire_ms, false).await {
                let reason = format!("the fire of {} was not made: {error}", rfc3339(*fire_ms));
                if !for_good(&error) {
                    // Tried again next tick (a fire that stays late becomes a missed one).
                    store.pass_schedule(row, row.since_ms, Some(&reason)).await?;
                    return Err(error);
                }
                blocked = Some(reason);
            }
        }
        // Without fires nothing depends on `since_ms` being exact: it is written only now and then.
        if !due.fires.is_empty() || due.since_ms - row.since_ms > ON_TIME_MS / 2 {
            store.pass_schedule(row, due.since_ms, blocked.as_deref()).await?;
        }
    }
    if row.backfill_pending
        && let (Some(start), Some(end)) = (row.backfill_start_ms, row.backfill_end_ms)
    {
        let made: HashSet<i64> = store.fired(row, start, end).await?.into_iter().collect();
        let fires = cron.fires_ms(start.saturating_sub(1), end, MAX_BACKFILL + 1);
        if fires.len() > MAX_BACKFILL {
            // The cron changed since the backfill was asked for: the window holds too many fires now.
            let reason =
                format!("the backfill stopped: its window holds more than {MAX_BACKFILL} fires of the cron now");
            store.pass_schedule(row, row.since_ms, Some(&reason)).await?;
            return store.end_backfill(row, start, end).await;
        }
        let missing: Vec<i64> = fires.into_iter().filter(|fire| !made.contains(fire)).collect();
        for fire_ms in missing.iter().take(BACKFILL_PER_TICK) {
            if let Err(error) = make(firer, epoch, row, &given, &cron, *fire_ms, true).await {
                if !for_good(&error) {
                    return Err(error);
                }
                // What holds for one fire holds for the rest: the backfill ends here, with the reason.
                let reason = format!("the backfill stopped at {}: {error}", rfc3339(*fire_ms));
                store.pass_schedule(row, row.since_ms, Some(&reason)).await?;
                return store.end_backfill(row, start, end).await;
            }
        }
        if missing.len() <= BACKFILL_PER_TICK {
            store.end_backfill(row, start, end).await?;
        } else {
            firer.wake.notify_one();
        }
    }
    Ok(())
}

/// Makes the fire of `row` at `fire_ms` (of a backfill or not) unless it has a run; returns whether it made it.
async fn make(
    firer: &Firer,
    epoch: Epoch,
    row: &schedule::Model,
    given: &Schedule,
    cron: &CronSchedule,
    fire_ms: i64,
    backfill: bool,
) -> Result<bool, ApiError> {
    let store = &firer.runs.engine.store;
    if !store.fired(row, fire_ms, fire_ms).await?.is_empty() {
        return Ok(false);
    }
    let pipeline = store
        .pipeline(&row.project, &row.pipeline)
        .await?
        .ok_or_else(|| ApiError::NotFound {
            kind: "pipeline",
            name: format!("projects/{}/pipelines/{}", row.project, row.pipeline),
        })?;
    let mut credentials = Request::new(());
    act_for(&mut credentials, &firer.token, &format!("users/{}", row.creator))?;
    let fire = Fire {
        schedule: row.id.clone(),
        fire_ms,
        execution_date: cron.local_time(fire_ms),
        env: given.global_env.clone(),
    };
    let maker = Maker {
        creator: &row.creator,
        credentials: &credentials,
    };
    let (run, tasks) = firer
        .runs
        .prepare(&maker, &pipeline, Scope::Pipeline, Some(&fire))
        .await?;
    let made = store
        .record_fire(
            epoch,
            NewFire {
                schedule: row.clone(),
                fire_ms,
                backfill,
                run,
                tasks,
            },
            usize::try_from(given.keep_newest).unwrap_or(0),
        )
        .await?;
    if made {
        firer.runs.engine.wake.notify_one();
    }
    Ok(made)
}

/// Instant `ms` in RFC 3339.
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|at| at.to_rfc3339())
        .unwrap_or_default()
}
