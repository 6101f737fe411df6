//! `cube.scheduler.v1.AdmissionService`: quotas enforced at admission. Each admission adds its requests to the
//! reserved amounts of its project and of its user inside the project (and, for GPUs of a named type, to the
//! same two scopes' rows for that type) with one conditional UPDATE over those rows
//! (`… SET cpu = cpu + r WHERE scope IN (…) AND (scope = 'projects/p' AND cpu + r <= limit OR …)`), in the
//! transaction that stores the admission, so concurrent admissions serialise on the rows and can never
//! over-commit, on SQLite, PostgreSQL and MariaDB alike.
//!
//! Quotas come from the projects service through the cache [`Place`](crate::place) shares
//! ([`crate::ask::ProjectCache`]). Admitted reservations are reconciled with the pods of every cluster
//! ([`Admissions::reconcile_once`]), and an admitted workload whose pods wait for a node is explained from the
//! node inventory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use cube_bus::EventBus;
use cube_kit::config::parse_duration;
use cube_kit::identity::Principal;
use cube_kit::task::Background;
use cube_kit::time::unix_ms;
use cube_kit::{ApiError, Channel, FieldViolation};
use cube_proto::cube::projects::v1::{MembersChanged, Quota};
use cube_proto::cube::scheduler::v1::admission_service_server::AdmissionService;
use cube_proto::cube::scheduler::v1::{
    Admission, AdmissionState, AdmitRequest, Blocker, BlockerKind, ExplainPendingRequest, Explanation,
    GetProjectUsageRequest, ProjectUsage, ReleaseRequest, ReleaseResponse,
};
use cube_proto::prost::Message as _;
use futures::StreamExt as _;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ColumnTrait as _, Condition, DatabaseConnection, DbErr, EntityTrait as _, IntoActiveModel as _, QueryFilter as _,
    QuerySelect as _, SqlErr, TransactionTrait as _,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::ask::{GpuVendors, ProjectView, Shared};
use crate::inventory::{Amounts, Fleet, NodeView, WaitingPod};
use crate::model::{reservation, usage};
use crate::placement::PlacementConfig;
use crate::{ClusterRegistry, DOMAIN};

/// The topic projects announces membership changes on (`cube.projects.v1.MembersChanged`).
const MEMBERS_CHANGED: &str = "project.members.changed";

/// How long a reconciliation waits for a cluster's first lists of nodes and pods.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Admission's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AdmissionArgs {
    /// How long a project's quota and settings, and the caller's membership, are kept per project and user
    /// (0 turns the cache off). A change of a project's quota reaches admission and placement within this time;
    /// a change of its members at once (the `project.members.changed` event), or else within this time.
    #[arg(long = "quota-cache-ttl", env = "CUBE_QUOTA_CACHE_TTL", default_value = "2s", value_parser = parse_duration)]
    pub quota_cache_ttl: Duration,
    /// How often admitted reservations are reconciled with the pods of every cluster (0 turns it off).
    #[arg(long = "reconcile-interval", env = "CUBE_RECONCILE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// How long an admitted workload may go without any unfinished pod before its reservation is released (it is
    /// released at the second reconciliation in a row that finds no pod, so a pod being replaced is not missed).
    #[arg(long = "reservation-grace", env = "CUBE_RESERVATION_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub reservation_grace: Duration,
}

impl AdmissionArgs {
    /// The options these flags set.
    pub fn options(&self) -> AdmissionOptions {
        AdmissionOptions {
            quota_cache_ttl: self.quota_cache_ttl,
            reconcile_interval: self.reconcile_interval,
            reservation_grace: self.reservation_grace,
        }
    }
}

/// How admission works; [`Default`] matches the flags' defaults.
#[derive(Debug, Clone)]
pub struct AdmissionOptions {
    /// How long answers of the projects service are kept per project and user; zero keeps none.
    pub quota_cache_ttl: Duration,
    /// How often reservations are reconciled with pods; zero never.
    pub reconcile_interval: Duration,
    /// How long an admitted workload may have no pod before its reservation is released.
    pub reservation_grace: Duration,
}

impl Default for AdmissionOptions {
    fn default() -> Self {
        Self {
            quota_cache_ttl: Duration::from_secs(2),
            reconcile_interval: Duration::from_secs(60),
            reservation_grace: Duration::from_secs(600),
        }
    }
}

/// Serves `AdmissionService`.
#[derive(Clone)]
pub(crate) struct Admissions {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    shared: Arc<Shared>,
    registry: ClusterRegistry,
    fleet: Arc<Fleet>,
    vendors: GpuVendors,
    options: AdmissionOptions,
    /// Usage rows known to exist: rows are never deleted, so each is looked for once.
    known_scopes: RwLock<HashSet<String>>,
    /// Admitted workloads the last reconciliation found without pods, with their admission times.
    suspects: Mutex<HashMap<String, i64>>,
    /// Forgets cached projects when their members change.
    _follow: Background,
}

/// What a workload reserves.
#[derive(Debug, Clone, Copy, Default)]
struct Amount {
    cpu_millis: i64,
    memory_bytes: i64,
    gpu_millis: i64,
    notebooks: i64,
    services: i64,
    runs: i64,
}

/// A quota's limits in the units of [`Amount`]; `None` is no limit.
#[derive(Debug, Clone, Copy, Default)]
struct Limits {
    cpu_millis: Option<i64>,
    memory_bytes: Option<i64>,
    gpu_millis: Option<i64>,
    notebooks: Option<i64>,
    services: Option<i64>,
    runs: Option<i64>,
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
struct Scope {
    /// The row: `projects/{p}`, `projects/{p}/members/u-{user}`, either with `#gpu-type={TYPE}` appended.
    row: String,
    /// The quota the row counts for, as blockers name it.
    quota: String,
    /// The GPU type of a type row.
    gpu_type: Option<String>,
    limits: Limits,
}

/// The rows an admission of `username` in `project` reserves in: project, member, and for GPUs of a type the
/// two rows of that type. `view` gives the limits; without it (releases) there are none.
fn scopes(project: &str, username: &str, gpu_type: Option<&str>, view: Option<&ProjectView>) -> Vec<Scope> {
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

fn scopes_of(row: &reservation::Model) -> Vec<Scope> {
    let gpu_type = Some(row.gpu_type.as_str()).filter(|gpu_type| !gpu_type.is_empty());
    scopes(&row.project, &row.username, gpu_type, None)
}

/// A blocker as stored with a queued reservation.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredBlocker {
    quota: String,
    resource: String,
    requested: f64,
    in_use: f64,
    limit: f64,
}

fn db_error(error: DbErr) -> ApiError {
    ApiError::internal(error)
}

fn empty_usage(scope: &str) -> usage::Model {
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

/// Each usage column with the amount of it and its limit.
fn pairs(amount: &Amount, limits: &Limits) -> [(usage::Column, i64, Option<i64>); 6] {
    [
        (usage::Column::CpuMillis, amount.cpu_millis, limits.cpu_millis),
        (usage::Column::MemoryBytes, amount.memory_bytes, limits.memory_bytes),
        (usage::Column::GpuMillis, amount.gpu_millis, limits.gpu_millis),
        (usage::Column::Notebooks, amount.notebooks, limits.notebooks),
        (usage::Column::Services, amount.services, limits.services),
        (usage::Column::Runs, amount.runs, limits.runs),
    ]
}

/// Adds `amount` to every scope's row if each stays within its own limits; false (and nothing changed) when one
/// would not. One statement: every row changes (each admission counts one notebook, service or run), so the
/// admission fits exactly when every row was updated.
async fn reserve(txn: &sea_orm::DatabaseTransaction, scopes: &[Scope], amount: &Amount) -> Result<bool, ApiError> {
    let mut update =
        usage::Entity::update_many().filter(usage::Column::Scope.is_in(scopes.iter().map(|scope| scope.row.clone())));
    for (column, add, _) in pairs(amount, &Limits::default()) {
        if add != 0 {
            update = update.col_expr(column, Expr::col(column).add(add));
        }
    }
    let mut within = Condition::any();
    for scope in scopes {
        let mut fits = Condition::all().add(usage::Column::Scope.eq(scope.row.clone()));
        for (column, add, limit) in pairs(amount, &scope.limits) {
            if let Some(limit) = limit
                && add > 0
            {
                fits = fits.add(Expr::col(column).add(add).lte(limit));
            }
        }
        within = within.add(fits);
    }
    let updated = update.filter(within).exec(txn).await.map_err(db_error)?;
    Ok(updated.rows_affected == scopes.len() as u64)
}

/// Takes `amount` off every scope's row (a release).
async fn unreserve(txn: &sea_orm::DatabaseTransaction, scopes: &[Scope], amount: &Amount) -> Result<(), ApiError> {
    let mut update =
        usage::Entity::update_many().filter(usage::Column::Scope.is_in(scopes.iter().map(|scope| scope.row.clone())));
    for (column, amount, _) in pairs(amount, &Limits::default()) {
        if amount != 0 {
            update = update.col_expr(column, Expr::col(column).sub(amount));
        }
    }
    update.exec(txn).await.map_err(db_error)?;
    Ok(())
}

fn amount_of(row: &reservation::Model) -> Amount {
    Amount {
        cpu_millis: row.cpu_millis,
        memory_bytes: row.memory_bytes,
        gpu_millis: row.gpu_millis,
        notebooks: i64::from(row.kind == "notebook"),
        services: i64::from(row.kind == "service"),
        runs: i64::from(row.kind == "train"),
    }
}

fn admission(row: &reservation::Model) -> Admission {
    Admission {
        workload: row.workload.clone(),
        state: state(row) as i32,
        reason: row.reason.clone(),
        create_time: Some(cube_kit::time::timestamp(row.created_ms)),
    }
}

fn state(row: &reservation::Model) -> AdmissionState {
    if row.state == "admitted" {
        AdmissionState::Admitted
    } else {
        AdmissionState::Queued
    }
}

/// Whether a failed transaction lost a race (deadlock, lock wait, busy database) and may be tried again.
fn retryable(error: &ApiError) -> bool {
    let ApiError::Internal(source) = error else {
        return false;
    };
    let text = source.to_string().to_lowercase();
    ["deadlock", "lock wait", "locked", "busy", "could not serialize"]
        .iter()
        .any(|word| text.contains(word))
}

/// Runs `attempt` again while it fails for a lost race (MariaDB picks deadlock victims), up to 8 times.
async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt().await {
            Err(error) if attempts < 8 && retryable(&error) => {}
            other => return other,
        }
    }
}

/// What storing an admission came to.
enum Outcome {
    /// Reserved and stored.
    Admitted,
    /// A quota would be exceeded; nothing was written.
    Full,
    /// The workload already has an admission (or its queued one changed meanwhile); nothing was written.
    Exists,
}

fn concurrent_change(workload: &str) -> ApiError {
    ApiError::Aborted {
        message: format!("the admission of {workload} kept changing while it was being written; ask again"),
    }
}

impl Admissions {
    /// Admission over reservations stored in `db`, with quotas from projects behind `projects` (the answers
    /// kept for [`AdmissionOptions::quota_cache_ttl`] and shared with placement, and forgotten when `bus`
    /// announces a membership change), and the pods of `registry`'s clusters from `fleet`.
    ///
    /// # Errors
    /// Returns an error when the membership changes cannot be subscribed to.
    pub(crate) async fn new(
        db: DatabaseConnection,
        projects: Channel,
        registry: ClusterRegistry,
        fleet: Arc<Fleet>,
        bus: Arc<dyn EventBus>,
        placement: &PlacementConfig,
        options: AdmissionOptions,
    ) -> Result<Self, cube_bus::BusError> {
        let shared = Arc::new(Shared::new(projects, options.quota_cache_ttl));
        // Every replica keeps its own cache, so each has a group of its own.
        let instance = cube_kit::identity::jws::random_id(9)
            .unwrap_or_else(|_| format!("{}-{}", std::process::id(), cube_kit::time::now_ms()));
        let mut changes = bus
            .subscribe(MEMBERS_CHANGED, &format!("scheduler-quotas-{instance}"), &instance)
            .await?;
        let follow = {
            let shared = shared.clone();
            Background::spawn(async move {
                while let Some(delivery) = changes.next().await {
                    let Ok(delivery) = delivery else { continue };
                    if let Ok(event) = MembersChanged::decode(delivery.payload.clone())
                        && let Some(project) = event.project.strip_prefix("projects/")
                    {
                        shared.projects.forget(project);
                    }
                    let _ = delivery.ack().await;
                }
            })
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                shared,
                registry,
                fleet,
                vendors: GpuVendors::of(placement),
                options,
                known_scopes: RwLock::new(HashSet::new()),
                suspects: Mutex::new(HashMap::new()),
                _follow: follow,
            }),
        })
    }

    /// The project cache and placement verdicts, for placement to share.
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.inner.shared.clone()
    }

    /// Reconciles reservations with pods every [`AdmissionOptions::reconcile_interval`] until dropped; `None`
    /// when reconciliation is turned off.
    pub(crate) fn reconcile(&self) -> Option<Background> {
        let interval = self.inner.options.reconcile_interval;
        if interval.is_zero() {
            return None;
        }
        let admissions = self.clone();
        Some(Background::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(error) = admissions.reconcile_once(SystemTime::now()).await {
                    tracing::warn!(%error, "reconciling reservations with pods");
                }
            }
        }))
    }

    /// One reconciliation: releases the admitted reservations older than the grace period whose workload has
    /// had no unfinished pod (bound or waiting) in any cluster at this pass and the one before, and returns
    /// their workloads. Does nothing unless every registered cluster is watched and listed: a partial view of
    /// the pods would release reservations whose pods merely were not seen.
    ///
    /// # Errors
    /// Returns an error when the database fails.
    pub(crate) async fn reconcile_once(&self, now: SystemTime) -> Result<Vec<String>, ApiError> {
        let inner = &self.inner;
        let mut live = BTreeSet::new();
        for cluster in inner.registry.names() {
            let seen = match inner.fleet.ready(&cluster, READY_TIMEOUT).await {
                Ok(()) => inner.fleet.workloads(&cluster),
                Err(error) => Err(error),
            };
            match seen {
                Ok(workloads) => live.extend(workloads),
                Err(error) => {
                    tracing::debug!(%cluster, %error, "reservations not reconciled: a cluster's pods are not watched");
                    inner.suspects.lock().unwrap_or_else(PoisonError::into_inner).clear();
                    return Ok(Vec::new());
                }
            }
        }
        let grace = i64::try_from(inner.options.reservation_grace.as_millis()).unwrap_or(i64::MAX);
        let cutoff = unix_ms(now).saturating_sub(grace);
        let old = reservation::Entity::find()
            .filter(reservation::Column::State.eq("admitted"))
            .filter(reservation::Column::CreatedMs.lte(cutoff))
            .all(&inner.db)
            .await
            .map_err(db_error)?;
        let missing: Vec<reservation::Model> = old.into_iter().filter(|row| !live.contains(&row.workload)).collect();
        let confirmed: Vec<&reservation::Model> = {
            let mut suspects = inner.suspects.lock().unwrap_or_else(PoisonError::into_inner);
            let confirmed = missing
                .iter()
                .filter(|row| suspects.get(&row.workload) == Some(&row.created_ms))
                .collect();
            *suspects = missing
                .iter()
                .map(|row| (row.workload.clone(), row.created_ms))
                .collect();
            confirmed
        };
        let mut released = Vec::new();
        for row in confirmed {
            if retrying(|| self.release_row(row)).await? {
                tracing::info!(
                    workload = %row.workload,
                    project = %row.project,
                    user = %row.username,
                    "released a reservation whose workload has no pod left"
                );
                released.push(row.workload.clone());
            }
        }
        Ok(released)
    }

    /// Makes sure the usage rows of `scopes` exist.
    async fn ensure_scopes(&self, scopes: &[Scope]) -> Result<(), ApiError> {
        let db = &self.inner.db;
        let missing: Vec<String> = {
            let known = self.inner.known_scopes.read().unwrap_or_else(PoisonError::into_inner);
            scopes
                .iter()
                .filter(|scope| !known.contains(&scope.row))
                .map(|scope| scope.row.clone())
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let present: HashSet<String> = usage::Entity::find()
            .select_only()
            .column(usage::Column::Scope)
            .filter(usage::Column::Scope.is_in(missing.clone()))
            .into_tuple::<String>()
            .all(db)
            .await
            .map_err(db_error)?
            .into_iter()
            .collect();
        for scope in missing.iter().filter(|scope| !present.contains(*scope)) {
            // Outside any transaction, so a racing insert's duplicate key aborts nothing: the row exists either way.
            if let Err(error) = usage::Entity::insert(empty_usage(scope).into_active_model())
                .exec(db)
                .await
            {
                let exists = usage::Entity::find_by_id(scope.clone())
                    .one(db)
                    .await
                    .map_err(db_error)?
                    .is_some();
                if !exists {
                    return Err(db_error(error));
                }
            }
        }
        self.inner
            .known_scopes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(missing);
        Ok(())
    }

    /// Stores `row` as admitted and reserves `amount` in every scope, in one transaction; `replacing` replaces
    /// the workload's queued admission.
    async fn try_admit(
        &self,
        row: &reservation::Model,
        scopes: &[Scope],
        amount: &Amount,
        replacing: bool,
    ) -> Result<Outcome, ApiError> {
        let txn = self.inner.db.begin().await.map_err(db_error)?;
        if replacing {
            let deleted = reservation::Entity::delete_many()
                .filter(reservation::Column::Workload.eq(row.workload.clone()))
                .filter(reservation::Column::State.eq("queued"))
                .exec(&txn)
                .await
                .map_err(db_error)?;
            if deleted.rows_affected != 1 {
                txn.rollback().await.map_err(db_error)?;
                return Ok(Outcome::Exists);
            }
        }
        if let Err(error) = reservation::Entity::insert(row.clone().into_active_model())
            .exec_without_returning(&txn)
            .await
        {
            txn.rollback().await.map_err(db_error)?;
            return match error.sql_err() {
                Some(SqlErr::UniqueConstraintViolation(_)) => Ok(Outcome::Exists),
                _ => Err(db_error(error)),
            };
        }
        if !reserve(&txn, scopes, amount).await? {
            txn.rollback().await.map_err(db_error)?;
            return Ok(Outcome::Full);
        }
        txn.commit().await.map_err(db_error)?;
        Ok(Outcome::Admitted)
    }

    async fn admit(&self, request: Request<AdmitRequest>) -> Result<Admission, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.get_ref();
        let mut violations = Vec::new();
        if body.workload.is_empty() || body.workload.len() > 250 {
            violations.push(FieldViolation::new(
                "workload",
                "must be the workload's resource name (at most 250 bytes)",
            ));
        }
        let ask = crate::ask::read(
            crate::ask::Fields {
                project: &body.project,
                kind: body.kind(),
                cpu: &body.cpu,
                memory: &body.memory,
                gpu: &body.gpu,
            },
            &mut violations,
        );
        let (Some(ask), true) = (ask, violations.is_empty()) else {
            return Err(ApiError::InvalidArgument(violations));
        };
        let gpu_type = ask.gpu_type(&self.inner.vendors);
        let project = ask.project.clone();
        let kind = ask.kind.label();
        let view = self.inner.shared.projects.view(&request, &caller, &project).await?;
        let amount = Amount {
            cpu_millis: i64::try_from(ask.cpu.request_millis()).unwrap_or(i64::MAX),
            memory_bytes: i64::try_from(ask.memory.request_bytes()).unwrap_or(i64::MAX),
            gpu_millis: i64::try_from(ask.gpu.thousandths()).unwrap_or(i64::MAX),
            notebooks: i64::from(kind == "notebook"),
            services: i64::from(kind == "service"),
            runs: i64::from(kind == "train"),
        };
        let scopes = scopes(&project, &caller.username, gpu_type.as_deref(), Some(&view));
        self.ensure_scopes(&scopes).await?;

        let mut row = reservation::Model {
            workload: body.workload.clone(),
            project: project.clone(),
            username: caller.username.clone(),
            kind: kind.to_owned(),
            cpu_millis: amount.cpu_millis,
            memory_bytes: amount.memory_bytes,
            gpu_millis: amount.gpu_millis,
            gpu_type: gpu_type.unwrap_or_default(),
            state: "admitted".into(),
            reason: String::new(),
            blockers: "[]".into(),
            created_ms: cube_kit::time::now_ms(),
        };
        // A new workload is inserted straight away; one that has an admission already is read only then.
        let mut replacing = false;
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > 8 {
                return Err(concurrent_change(&row.workload));
            }
            match retrying(|| self.try_admit(&row, &scopes, &amount, replacing)).await? {
                Outcome::Admitted => return Ok(admission(&row)),
                Outcome::Full => break,
                Outcome::Exists => {
                    let existing = reservation::Entity::find_by_id(row.workload.clone())
                        .one(&self.inner.db)
                        .await
                        .map_err(db_error)?;
                    match existing {
                        Some(existing) if existing.state == "admitted" || existing.project != project => {
                            return Ok(admission(&existing));
                        }
                        Some(_) => replacing = true,
                        None => replacing = false,
                    }
                }
            }
        }
        let blockers = self.blockers(&scopes, &amount).await?;
        row.state = "queued".into();
        row.reason = match blockers.first() {
            Some(blocker) => format!(
                "the {} quota of {} is {}, {} is in use, and this asks for {}",
                blocker.resource, blocker.quota, blocker.limit, blocker.in_use, blocker.requested
            ),
            None => "a quota was full a moment ago; ask again".into(),
        };
        row.blockers = serde_json::to_string(&blockers).unwrap_or_else(|_| "[]".into());
        let stored = retrying(|| self.store_queued(&row, replacing)).await?;
        Ok(admission(&stored))
    }

    /// What blocks `amount` in `scopes` now.
    async fn blockers(&self, scopes: &[Scope], amount: &Amount) -> Result<Vec<StoredBlocker>, ApiError> {
        let used: HashMap<String, usage::Model> = usage::Entity::find()
            .filter(usage::Column::Scope.is_in(scopes.iter().map(|scope| scope.row.clone())))
            .all(&self.inner.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|row| (row.scope.clone(), row))
            .collect();
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
        Ok(blockers)
    }

    /// Stores a queued admission, or returns the admission another call stored for the workload meanwhile.
    async fn store_queued(&self, row: &reservation::Model, was_queued: bool) -> Result<reservation::Model, ApiError> {
        let db = &self.inner.db;
        let stored = if was_queued {
            let updated = reservation::Entity::update_many()
                .col_expr(reservation::Column::Reason, Expr::value(row.reason.clone()))
                .col_expr(reservation::Column::Blockers, Expr::value(row.blockers.clone()))
                .col_expr(reservation::Column::CreatedMs, Expr::value(row.created_ms))
                .filter(reservation::Column::Workload.eq(row.workload.clone()))
                .filter(reservation::Column::State.eq("queued"))
                .exec(db)
                .await
                .map_err(db_error)?;
            updated.rows_affected == 1
        } else {
            reservation::Entity::insert(row.clone().into_active_model())
                .exec(db)
                .await
                .is_ok()
        };
        if stored {
            return Ok(row.clone());
        }
        reservation::Entity::find_by_id(row.workload.clone())
            .one(db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::internal("a reservation could neither be written nor read"))
    }

    /// Deletes the reservation as it was read and gives back what it held, in one transaction; false when it
    /// changed or went meanwhile.
    async fn release_row(&self, row: &reservation::Model) -> Result<bool, ApiError> {
        let txn = self.inner.db.begin().await.map_err(db_error)?;
        let deleted = reservation::Entity::delete_many()
            .filter(reservation::Column::Workload.eq(row.workload.clone()))
            .filter(reservation::Column::State.eq(row.state.clone()))
            .filter(reservation::Column::CreatedMs.eq(row.created_ms))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if deleted.rows_affected != 1 {
            txn.rollback().await.map_err(db_error)?;
            return Ok(false);
        }
        if row.state == "admitted" {
            unreserve(&txn, &scopes_of(row), &amount_of(row)).await?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(true)
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> Result<(), ApiError> {
        let caller = Principal::of(&request)?;
        let workload = request.get_ref().workload.clone();
        for _ in 0..8 {
            let Some(row) = reservation::Entity::find_by_id(workload.clone())
                .one(&self.inner.db)
                .await
                .map_err(db_error)?
            else {
                return Ok(());
            };
            if row.username != caller.username && !caller.is_admin() {
                return Err(ApiError::NotFound {
                    kind: "admission",
                    name: workload,
                });
            }
            if retrying(|| self.release_row(&row)).await? {
                return Ok(());
            }
        }
        Err(concurrent_change(&workload))
    }

    async fn project_usage(&self, request: Request<GetProjectUsageRequest>) -> Result<ProjectUsage, ApiError> {
        let caller = Principal::of(&request)?;
        let project = request
            .get_ref()
            .project
            .strip_prefix("projects/")
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ApiError::invalid("project", "expected projects/{project}"))?;
        // Only those who may see the project learn its usage: projects answers NOT_FOUND to anyone else.
        self.inner.shared.projects.view(&request, &caller, &project).await?;
        let scope = format!("projects/{project}");
        // The type rows `projects/{p}#gpu-type=…` sort between `…#gpu-type=` and `…#gpu-type>`.
        let rows = usage::Entity::find()
            .filter(
                Condition::any().add(usage::Column::Scope.eq(scope.clone())).add(
                    Condition::all()
                        .add(usage::Column::Scope.gt(format!("{scope}#gpu-type=")))
                        .add(usage::Column::Scope.lt(format!("{scope}#gpu-type>"))),
                ),
            )
            .all(&self.inner.db)
            .await
            .map_err(db_error)?;
        let count = |value: i64| i32::try_from(value).unwrap_or(i32::MAX);
        let mut usage = ProjectUsage {
            project: scope.clone(),
            ..ProjectUsage::default()
        };
        for row in rows {
            if row.scope == scope {
                usage.cpu = row.cpu_millis as f64 / 1000.0;
                usage.memory_bytes = row.memory_bytes;
                usage.gpu = row.gpu_millis as f64 / 1000.0;
                usage.notebooks = count(row.notebooks);
                usage.services = count(row.services);
                usage.runs = count(row.runs);
            } else if let Some(gpu_type) = row.scope.strip_prefix(&format!("{scope}#gpu-type="))
                && row.gpu_millis != 0
            {
                usage
                    .gpu_by_type
                    .insert(gpu_type.to_owned(), row.gpu_millis as f64 / 1000.0);
            }
        }
        Ok(usage)
    }

    async fn explain(&self, request: Request<ExplainPendingRequest>) -> Result<Explanation, ApiError> {
        let caller = Principal::of(&request)?;
        let workload = request.get_ref().workload.clone();
        let not_found = || ApiError::NotFound {
            kind: "admission",
            name: workload.clone(),
        };
        let row = reservation::Entity::find_by_id(workload.clone())
            .one(&self.inner.db)
            .await
            .map_err(db_error)?
            .filter(|row| row.username == caller.username || caller.is_admin())
            .ok_or_else(not_found)?;
        if row.state == "admitted" {
            let (reason, blockers) = self.waiting_pods(&row.workload, SystemTime::now());
            return Ok(Explanation {
                workload: row.workload.clone(),
                state: AdmissionState::Admitted as i32,
                reason,
                blockers,
            });
        }
        let blockers: Vec<StoredBlocker> = serde_json::from_str(&row.blockers).unwrap_or_default();
        Ok(Explanation {
            workload: row.workload.clone(),
            state: state(&row) as i32,
            reason: row.reason.clone(),
            blockers: blockers
                .into_iter()
                .map(|blocker| Blocker {
                    quota: blocker.quota,
                    resource: blocker.resource,
                    requested: blocker.requested,
                    in_use: blocker.in_use,
                    limit: blocker.limit,
                    kind: BlockerKind::Quota as i32,
                    ..Blocker::default()
                })
                .collect(),
        })
    }

    /// Why the pods of an admitted workload wait for a node, if any does, from the node inventory.
    fn waiting_pods(&self, workload: &str, now: SystemTime) -> (String, Vec<Blocker>) {
        let mut waiting: Vec<(String, WaitingPod)> = Vec::new();
        for cluster in self.inner.registry.names() {
            let Ok(pods) = self.inner.fleet.waiting(&cluster) else {
                continue;
            };
            waiting.extend(
                pods.into_iter()
                    .filter(|pod| pod.workload.as_deref() == Some(workload))
                    .map(|pod| (cluster.clone(), pod)),
            );
        }
        if waiting.is_empty() {
            return ("admitted: nothing blocks it".into(), Vec::new());
        }
        waiting.sort_by_key(|(_, pod)| std::cmp::Reverse(pod.waited(now)));
        let mut reason = String::new();
        let mut blockers = Vec::new();
        for (index, (cluster, pod)) in waiting.iter().enumerate() {
            let (text, blocker) = match self.inner.fleet.nodes(cluster) {
                Ok(nodes) => judge_pod(cluster, pod, &nodes),
                Err(error) => (error.to_string(), None),
            };
            if index == 0 {
                reason = format!(
                    "admitted; pod {}/{} has waited {}: {text}",
                    pod.namespace,
                    pod.name,
                    waited_text(pod.waited(now))
                );
            }
            blockers.extend(blocker);
        }
        if waiting.len() > 1 {
            reason.push_str(&format!("; {} more pods of the workload wait", waiting.len() - 1));
        }
        (reason, blockers)
    }
}

/// `6m`, `45s`, `2h5m`, `3d4h`.
fn waited_text(waited: Duration) -> String {
    let seconds = waited.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86400 => format!("{}h{}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How much of `resource` (`gpu`, `cpu`, `memory` or an extended resource) `amounts` hold.
fn amount_in(amounts: &Amounts, resource: &str) -> i64 {
    match resource {
        "gpu" => amounts.gpus,
        "cpu" => amounts.cpu_millis,
        "memory" => amounts.memory_bytes,
        other => amounts.other.get(other).copied().unwrap_or(0),
    }
}

/// An amount for people: `2 GPUs`, `1.5 CPU cores`, `4Gi of memory`, `25 tencent.com/vcuda-core`; `bare`
/// leaves out the unit.
fn amount_text(resource: &str, amount: i64, bare: bool) -> String {
    let unsigned = u64::try_from(amount).unwrap_or(0);
    let number = match resource {
        "cpu" => {
            let cores = format!("{:.3}", amount as f64 / 1000.0);
            cores.trim_end_matches('0').trim_end_matches('.').to_owned()
        }
        "memory" => cube_resources::quantity::memory(unsigned),
        _ => amount.to_string(),
    };
    if bare {
        return number;
    }
    match resource {
        "gpu" if amount == 1 => "1 GPU".into(),
        "gpu" => format!("{number} GPUs"),
        "cpu" => format!("{number} CPU cores"),
        "memory" => format!("{number} of memory"),
        other => format!("{number} {other}"),
    }
}

/// The unit scale of a resource in blockers: CPU in cores, everything else as counted.
fn blocker_value(resource: &str, amount: i64) -> f64 {
    if resource == "cpu" {
        amount as f64 / 1000.0
    } else {
        amount as f64
    }
}

/// What keeps a waiting pod off the cluster's nodes: a sentence, and a blocker when the nodes lack something.
/// Nodes are narrowed resource by resource (GPUs, CPU, memory, then extended resources): the first resource no
/// remaining node has enough of free is the blocker, measured on the node with the most of it free.
fn judge_pod(cluster: &str, pod: &WaitingPod, nodes: &[NodeView]) -> (String, Option<Blocker>) {
    let selector = &pod.node_selector;
    let labels = labels_text(selector);
    let blocker = |resource: &str| Blocker {
        quota: format!("clusters/{cluster}"),
        resource: resource.to_owned(),
        kind: BlockerKind::Nodes as i32,
        pod: format!("{}/{}", pod.namespace, pod.name),
        node_selector: selector.clone().into_iter().collect(),
        ..Blocker::default()
    };
    let matching: Vec<&NodeView> = nodes
        .iter()
        .filter(|node| selector.iter().all(|(key, value)| node.labels.get(key) == Some(value)))
        .collect();
    if matching.is_empty() {
        let absent: BTreeMap<String, String> = selector
            .iter()
            .filter(|(key, value)| !nodes.iter().any(|node| node.labels.get(*key) == Some(*value)))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let mut text = if selector.is_empty() {
            format!("cluster {cluster} has no nodes")
        } else {
            format!("no node has labels {labels}")
        };
        if !absent.is_empty() {
            text.push_str(&format!(
                " (none of the cluster's {} nodes has {})",
                nodes.len(),
                labels_text(&absent)
            ));
        }
        return (text, Some(blocker("labels")));
    }
    let usable: Vec<&NodeView> = matching
        .iter()
        .copied()
        .filter(|node| node.ready && !node.unschedulable)
        .collect();
    if usable.is_empty() {
        return (
            format!(
                "the {} nodes with labels {labels} are all not ready or cordoned",
                matching.len()
            ),
            Some(blocker("labels")),
        );
    }
    let mut resources: Vec<String> = vec!["gpu".into(), "cpu".into(), "memory".into()];
    resources.extend(pod.requests.other.keys().cloned());
    let free =
        |node: &NodeView, resource: &str| amount_in(&node.allocatable, resource) - amount_in(&node.requested, resource);
    let nodes_match = |count: usize| {
        if count == 1 {
            "1 node matches".to_owned()
        } else {
            format!("{count} nodes match")
        }
    };
    let mut candidates = usable.clone();
    let mut enough: Vec<&str> = Vec::new();
    for resource in &resources {
        let requested = amount_in(&pod.requests, resource);
        if requested <= 0 {
            continue;
        }
        let fitting: Vec<&NodeView> = candidates
            .iter()
            .copied()
            .filter(|node| free(node, resource) >= requested)
            .collect();
        if fitting.is_empty() {
            let Some(best) = candidates.iter().copied().max_by_key(|node| free(node, resource)) else {
                break;
            };
            let mut text = format!(
                "no node with labels {labels} has {} free (most free on one node: {}, on {}; {}",
                amount_text(resource, requested, false),
                amount_text(resource, std::cmp::max(free(best, resource), 0), true),
                best.name,
                nodes_match(usable.len())
            );
            if !enough.is_empty() {
                text.push_str(&format!(
                    ", {} of them with enough {} free",
                    candidates.len(),
                    enough.join(" and ")
                ));
            }
            text.push(')');
            let in_use = amount_in(&best.requested, resource);
            let limit = amount_in(&best.allocatable, resource);
            return (
                text,
                Some(Blocker {
                    requested: blocker_value(resource, requested),
                    in_use: blocker_value(resource, in_use),
                    limit: blocker_value(resource, limit),
                    matching_nodes: i32::try_from(usable.len()).unwrap_or(i32::MAX),
                    node: best.name.clone(),
                    ..blocker(resource)
                }),
            );
        }
        candidates = fitting;
        enough.push(resource);
    }
    let mut text = match candidates.first() {
        Some(node) => format!(
            "node {} has labels {labels} and room for it now; the Kubernetes scheduler has not bound it yet",
            node.name
        ),
        None => format!("a node with labels {labels} has room for it now"),
    };
    if let Some(message) = pod.unschedulable.as_deref().filter(|message| !message.is_empty()) {
        text.push_str(&format!(" (it last said: {message})"));
    }
    (text, None)
}

#[tonic::async_trait]
impl AdmissionService for Admissions {
    async fn admit(&self, request: Request<AdmitRequest>) -> Result<Response<Admission>, Status> {
        Admissions::admit(self, request)
            .await
            .map(Response::new)
            .map_err(|error| error.status(DOMAIN))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> Result<Response<ReleaseResponse>, Status> {
        Admissions::release(self, request)
            .await
            .map(|()| Response::new(ReleaseResponse {}))
            .map_err(|error| error.status(DOMAIN))
    }

    async fn get_project_usage(
        &self,
        request: Request<GetProjectUsageRequest>,
    ) -> Result<Response<ProjectUsage>, Status> {
        self.project_usage(request)
            .await
            .map(Response::new)
            .map_err(|error| error.status(DOMAIN))
    }

    async fn explain_pending(&self, request: Request<ExplainPendingRequest>) -> Result<Response<Explanation>, Status> {
        self.explain(request)
            .await
            .map(Response::new)
            .map_err(|error| error.status(DOMAIN))
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
    fn waits_read_like_people_write_them() {
        assert_eq!(waited_text(Duration::from_secs(45)), "45s");
        assert_eq!(waited_text(Duration::from_secs(6 * 60 + 5)), "6m");
        assert_eq!(waited_text(Duration::from_secs(2 * 3600 + 5 * 60)), "2h5m");
        assert_eq!(waited_text(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d4h");
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn node(name: &str, node_labels: &[(&str, &str)], gpus: i64, used_gpus: i64) -> NodeView {
        NodeView {
            name: name.into(),
            labels: labels(node_labels),
            resource_group: "vision".into(),
            ready: true,
            unschedulable: false,
            taints: Vec::new(),
            allocatable: Amounts {
                cpu_millis: 32_000,
                memory_bytes: 64 << 30,
                gpus,
                other: BTreeMap::new(),
            },
            requested: Amounts {
                cpu_millis: 1_000,
                memory_bytes: 1 << 30,
                gpus: used_gpus,
                other: BTreeMap::new(),
            },
        }
    }

    fn pod(selector: &[(&str, &str)], gpus: i64, cpu_millis: i64) -> WaitingPod {
        WaitingPod {
            namespace: "jupyter".into(),
            name: "alice-lab-0".into(),
            workload: Some("projects/vision/notebooks/alice-lab".into()),
            node_selector: labels(selector),
            requests: Amounts {
                cpu_millis,
                memory_bytes: 1 << 30,
                gpus,
                other: BTreeMap::new(),
            },
            since: None,
            unschedulable: Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()),
        }
    }

    #[test]
    fn a_waiting_pod_is_explained_by_the_resource_its_nodes_lack() {
        let t4 = [("gpu", "true"), ("gpu-type", "T4"), ("org", "vision")];
        let nodes = [
            node("node-a", &t4, 4, 3),
            node("node-b", &t4, 4, 4),
            node("node-c", &t4, 2, 2),
            node(
                "node-d",
                &[("gpu", "true"), ("gpu-type", "V100"), ("org", "vision")],
                8,
                0,
            ),
        ];
        let (text, blocker) = judge_pod("kube", &pod(&t4, 2, 1_000), &nodes);
        assert_eq!(
            text,
            "no node with labels gpu=true,gpu-type=T4,org=vision has 2 GPUs free (most free on one node: 1, on \
             node-a; 3 nodes match)"
        );
        let blocker = blocker.expect("a blocker");
        assert_eq!(blocker.kind(), BlockerKind::Nodes);
        assert_eq!(
            (blocker.quota.as_str(), blocker.resource.as_str(), blocker.node.as_str()),
            ("clusters/kube", "gpu", "node-a")
        );
        assert_eq!((blocker.requested, blocker.in_use, blocker.limit), (2.0, 3.0, 4.0));
        assert_eq!(blocker.matching_nodes, 3);
        assert_eq!(blocker.pod, "jupyter/alice-lab-0");

        // Enough GPUs on one node, but not with the CPU too.
        let (text, blocker) = judge_pod("kube", &pod(&t4, 1, 40_000), &nodes);
        assert!(
            text.starts_with("no node with labels gpu=true,gpu-type=T4,org=vision has 40 CPU cores free"),
            "{text}"
        );
        assert!(
            text.ends_with("3 nodes match, 1 of them with enough gpu free)"),
            "{text}"
        );
        assert_eq!(blocker.map(|blocker| blocker.resource), Some("cpu".to_owned()));

        let a100 = [("gpu", "true"), ("gpu-type", "A100"), ("org", "vision")];
        let (text, blocker) = judge_pod("kube", &pod(&a100, 1, 1_000), &nodes);
        assert_eq!(
            text,
            "no node has labels gpu=true,gpu-type=A100,org=vision (none of the cluster's 4 nodes has gpu-type=A100)"
        );
        assert_eq!(blocker.map(|blocker| blocker.resource), Some("labels".to_owned()));

        let (text, blocker) = judge_pod("kube", &pod(&t4, 1, 1_000), &nodes);
        assert!(text.starts_with("node node-a has labels"), "{text}");
        assert!(blocker.is_none());
    }
}
