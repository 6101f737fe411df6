//! Admission's decisions over quotas, without a database: which usage rows (scopes) an admission reserves in and
//! the limits of each, what a workload reserves, and which quotas block a workload that does not fit.

use std::collections::HashMap;

use cube_proto::cube::projects::v1::Quota;
use serde::{Deserialize, Serialize};

use crate::ask::ProjectView;
use crate::model::{reservation, usage};

/// What a workload reserves.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Amount {
    pub(super) cpu_millis: i64,
    pub(super) memory_bytes: i64,
    pub(super) gpu_millis: i64,
    pub(super) notebooks: i64,
    pub(super) services: i64,
    pub(super) runs: i64,
}

/// A quota's limits in the units of [`Amount`]; `None` is no limit.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Limits {
    pub(super) cpu_millis: Option<i64>,
    pub(super) memory_bytes: Option<i64>,
    pub(super) gpu_millis: Option<i64>,
    pub(super) notebooks: Option<i64>,
    pub(super) services: Option<i64>,
    pub(super) runs: Option<i64>,
}

fn thousandths(value: f64) -> i64 {
    (value * 1000.0).round() as i64
}

impl Limits {
    fn of(quota: Option<&Quota>) -> Self {
        let Some(quota) = quota else {
            return Self::default();
        };
        Self {
            cpu_millis: quota.cpu.map(thousandths),
            memory_bytes: quota.memory_bytes,
            gpu_millis: quota.gpu.map(thousandths),
            notebooks: quota.notebooks.map(i64::from),
            services: quota.services.map(i64::from),
            runs: quota.runs.map(i64::from),
        }
    }

    /// The limit a quota sets on GPUs of one type (its `gpu_by_type`, keys compared case-insensitively).
    fn of_type(quota: Option<&Quota>, gpu_type: &str) -> Self {
        Self {
            gpu_millis: quota.and_then(|quota| {
                quota
                    .gpu_by_type
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(gpu_type))
                    .map(|(_, limit)| thousandths(*limit))
            }),
            ..Self::default()
        }
    }
}

/// A usage row an admission reserves in, and the limits it must stay within.
#[derive(Debug, Clone)]
pub(super) struct Scope {
    /// The row: `projects/{p}`, `projects/{p}/members/u-{user}`, either with `#gpu-type={TYPE}` appended.
    pub(super) row: String,
    /// The quota the row counts for, as blockers name it.
    pub(super) quota: String,
    /// The GPU type of a type row.
    pub(super) gpu_type: Option<String>,
    pub(super) limits: Limits,
}

/// The rows an admission of `username` in `project` reserves in: project, member, and for GPUs of a type the
/// two rows of that type. `view` gives the limits; without it (releases) there are none.
pub(super) fn scopes(project: &str, username: &str, gpu_type: Option<&str>, view: Option<&ProjectView>) -> Vec<Scope> {
    let project_quota = format!("projects/{project}");
    let member_quota = format!("projects/{project}/members/u-{username}");
    let quotas = [
        (project_quota, view.and_then(|view| view.quota.as_ref())),
        (member_quota, view.and_then(|view| view.member_quota.as_ref())),
    ];
    let mut scopes = Vec::with_capacity(4);
    for (quota, limits) in &quotas {
        scopes.push(Scope {
            row: quota.clone(),
            quota: quota.clone(),
            gpu_type: None,
            limits: Limits::of(*limits),
        });
    }
    if let Some(gpu_type) = gpu_type {
        for (quota, limits) in &quotas {
            scopes.push(Scope {
                row: format!("{quota}#gpu-type={gpu_type}"),
                quota: quota.clone(),
                gpu_type: Some(gpu_type.to_owned()),
                limits: Limits::of_type(*limits, gpu_type),
            });
        }
    }
    scopes
}

/// A scope as a reservation stores it (`reservations.scopes`): its row and the limits it was checked against,
/// those it does not have left out.
#[derive(Serialize)]
struct StoredScope<'a> {
    scope: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_millis: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu_millis: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notebooks: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    services: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    runs: Option<i64>,
}

/// The scopes and their limits as JSON, for `reservations.scopes` (which MariaDB's reserve trigger reads).
pub(super) fn scopes_json(scopes: &[Scope]) -> String {
    let stored: Vec<StoredScope<'_>> = scopes
        .iter()
        .map(|scope| StoredScope {
            scope: &scope.row,
            cpu_millis: scope.limits.cpu_millis,
            memory_bytes: scope.limits.memory_bytes,
            gpu_millis: scope.limits.gpu_millis,
            notebooks: scope.limits.notebooks,
            services: scope.limits.services,
            runs: scope.limits.runs,
        })
        .collect();
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".into())
}

/// Whether `amount` fits in every scope, given what each scope's row holds (`used`, by row; a missing row holds
/// nothing): the decision the database statements make, for a batch whose rows are locked.
pub(super) fn fits(scopes: &[Scope], amount: &Amount, used: &HashMap<String, usage::Model>) -> bool {
    blockers(scopes, amount, used).is_empty()
}

/// Adds `amount` to what each scope's row holds in `used`.
pub(super) fn add_to(scopes: &[Scope], amount: &Amount, used: &mut HashMap<String, usage::Model>) {
    for scope in scopes {
        let row = used.entry(scope.row.clone()).or_insert_with(|| empty_usage(&scope.row));
        row.cpu_millis += amount.cpu_millis;
        row.memory_bytes += amount.memory_bytes;
        row.gpu_millis += amount.gpu_millis;
        row.notebooks += amount.notebooks;
        row.services += amount.services;
        row.runs += amount.runs;
    }
}

pub(super) fn scopes_of(row: &reservation::Model) -> Vec<Scope> {
    let gpu_type = Some(row.gpu_type.as_str()).filter(|gpu_type| !gpu_type.is_empty());
    scopes(&row.project, &row.username, gpu_type, None)
}

/// A blocker as stored with a queued reservation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredBlocker {
    pub(super) quota: String,
    pub(super) resource: String,
    pub(super) requested: f64,
    pub(super) in_use: f64,
    pub(super) limit: f64,
}

pub(super) fn empty_usage(scope: &str) -> usage::Model {
    usage::Model {
        scope: scope.to_owned(),
        cpu_millis: 0,
        memory_bytes: 0,
        gpu_millis: 0,
        notebooks: 0,
        services: 0,
        runs: 0,
    }
}

/// The quota columns a scope limits, with each resource's name, its unit scale for people, and its two sides.
fn columns(scope: &Scope, amount: &Amount, used: &usage::Model) -> Vec<(String, f64, i64, Option<i64>, i64)> {
    let limits = &scope.limits;
    if let Some(gpu_type) = &scope.gpu_type {
        return vec![(
            format!("gpu({gpu_type})"),
            1000.0,
            amount.gpu_millis,
            limits.gpu_millis,
            used.gpu_millis,
        )];
    }
    vec![
        (
            "cpu".into(),
            1000.0,
            amount.cpu_millis,
            limits.cpu_millis,
            used.cpu_millis,
        ),
        (
            "memory".into(),
            1.0,
            amount.memory_bytes,
            limits.memory_bytes,
            used.memory_bytes,
        ),
        (
            "gpu".into(),
            1000.0,
            amount.gpu_millis,
            limits.gpu_millis,
            used.gpu_millis,
        ),
        (
            "notebooks".into(),
            1.0,
            amount.notebooks,
            limits.notebooks,
            used.notebooks,
        ),
        ("services".into(), 1.0, amount.services, limits.services, used.services),
        ("runs".into(), 1.0, amount.runs, limits.runs, used.runs),
    ]
}

pub(super) fn amount_of(row: &reservation::Model) -> Amount {
    Amount {
        cpu_millis: row.cpu_millis,
        memory_bytes: row.memory_bytes,
        gpu_millis: row.gpu_millis,
        notebooks: i64::from(row.kind == "notebook"),
        services: i64::from(row.kind == "service"),
        runs: i64::from(counts_a_run(&row.kind)),
    }
}

/// Whether an admission stored as `kind` counts against the `runs` quota: a run, or a training workload that
/// is not a run's task.
pub(super) fn counts_a_run(kind: &str) -> bool {
    matches!(kind, "train" | "run")
}

/// What blocks `amount` in `scopes`, given what each scope's row holds now (`used`, by row; a missing row holds
/// nothing): every limited resource the amount would take past its limit.
pub(super) fn blockers(scopes: &[Scope], amount: &Amount, used: &HashMap<String, usage::Model>) -> Vec<StoredBlocker> {
    let mut blockers = Vec::new();
    for scope in scopes {
        let used = used.get(&scope.row).cloned().unwrap_or_else(|| empty_usage(&scope.row));
        for (resource, scale, requested, limit, in_use) in columns(scope, amount, &used) {
            if let Some(limit) = limit
                && requested > 0
                && in_use + requested > limit
            {
                blockers.push(StoredBlocker {
                    quota: scope.quota.clone(),
                    resource,
                    requested: requested as f64 / scale,
                    in_use: in_use as f64 / scale,
                    limit: limit as f64 / scale,
                });
            }
        }
    }
    blockers
}

/// Why a workload is queued, for people: its first blocker.
pub(super) fn queued_reason(blockers: &[StoredBlocker]) -> String {
    match blockers.first() {
        Some(blocker) => format!(
            "the {} quota of {} is {}, {} is in use, and this asks for {}",
            blocker.resource, blocker.quota, blocker.limit, blocker.in_use, blocker.requested
        ),
        None => "a quota was full a moment ago; ask again".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_converted_to_thousandths() {
        let limits = Limits::of(Some(&Quota {
            cpu: Some(1.5),
            gpu: Some(0.25),
            notebooks: Some(2),
            ..Quota::default()
        }));
        assert_eq!(limits.cpu_millis, Some(1500));
        assert_eq!(limits.gpu_millis, Some(250));
        assert_eq!(limits.notebooks, Some(2));
        assert_eq!(limits.memory_bytes, None);
    }

    #[test]
    fn typed_gpus_count_in_type_rows_of_both_quotas() {
        let view = ProjectView {
            quota: Some(Quota {
                gpu: Some(10.0),
                gpu_by_type: [("t4".to_owned(), 2.0)].into(),
                ..Quota::default()
            }),
            member_quota: None,
            ..ProjectView::default()
        };
        let typed = scopes("vision", "lena", Some("T4"), Some(&view));
        let rows: Vec<&str> = typed.iter().map(|scope| scope.row.as_str()).collect();
        assert_eq!(
            rows,
            [
                "projects/vision",
                "projects/vision/members/u-lena",
                "projects/vision#gpu-type=T4",
                "projects/vision/members/u-lena#gpu-type=T4"
            ]
        );
        assert_eq!(typed[0].limits.gpu_millis, Some(10_000));
        assert_eq!(
            typed[2].limits.gpu_millis,
            Some(2_000),
            "quota keys compare case-insensitively"
        );
        assert_eq!(typed[2].limits.cpu_millis, None, "type rows limit GPUs only");
        assert_eq!(typed[3].limits.gpu_millis, None, "the member quota names no type");
        let names: Vec<String> = columns(&typed[2], &Amount::default(), &empty_usage("x"))
            .into_iter()
            .map(|(name, ..)| name)
            .collect();
        assert_eq!(names, ["gpu(T4)"]);
        assert_eq!(scopes("vision", "lena", None, Some(&view)).len(), 2);
    }

    #[test]
    fn a_workload_is_blocked_by_each_limit_it_would_pass() {
        let view = ProjectView {
            quota: Some(Quota {
                gpu: Some(2.0),
                cpu: Some(8.0),
                ..Quota::default()
            }),
            member_quota: Some(Quota {
                cpu: Some(1.0),
                ..Quota::default()
            }),
            ..ProjectView::default()
        };
        let scopes = scopes("vision", "lena", None, Some(&view));
        let amount = Amount {
            cpu_millis: 1_500,
            gpu_millis: 1_000,
            runs: 1,
            ..Amount::default()
        };
        let mut used = HashMap::new();
        used.insert(
            "projects/vision".to_owned(),
            usage::Model {
                gpu_millis: 2_000,
                ..empty_usage("projects/vision")
            },
        );
        let found = blockers(&scopes, &amount, &used);
        let named: Vec<(&str, &str)> = found
            .iter()
            .map(|blocker| (blocker.quota.as_str(), blocker.resource.as_str()))
            .collect();
        assert_eq!(
            named,
            [("projects/vision", "gpu"), ("projects/vision/members/u-lena", "cpu")]
        );
        assert_eq!((found[0].requested, found[0].in_use, found[0].limit), (1.0, 2.0, 2.0));
        assert_eq!(
            queued_reason(&found),
            "the gpu quota of projects/vision is 2, 2 is in use, and this asks for 1"
        );
        assert!(blockers(&scopes, &Amount::default(), &used).is_empty());
    }
}
