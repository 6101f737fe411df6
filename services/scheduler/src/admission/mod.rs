//! `cube.scheduler.v1.AdmissionService`: quotas enforced at admission. Each admission reserves its requests in
//! the usage rows of its project and of its user inside the project (and, for GPUs of a named type, in the same
//! two scopes' rows for that type), in the transaction that stores it, so concurrent admissions never over-commit.
//!
//! Admissions are bound to their project. A workload's name lies under the project it is admitted in
//! (`projects/{project}/{collection}/{id}`), only members of that project (and admins) may admit, explain or
//! release it, and within the project an admission belongs to the user who made it: another member's `Admit` of
//! the same name is ALREADY_EXISTS, and their `ExplainPending` or `Release` NOT_FOUND. Every answer about an
//! admission the caller may not see is the NOT_FOUND of a workload that has none (same code, message and
//! details), so the answers reveal nothing about other projects' workloads. An admission stored before this
//! rule under a project its name does not lie in was never that workload's: the real owner's `Admit` releases it.
//!
//! The parts, one hop per layer: this file holds the flags, the wiring and the handler (decode, check the
//! caller, call the decisions and the store, map the result); [`quota`] the decisions over quotas; [`explain`]
//! why admitted pods wait for nodes; [`store`] every SQL statement; [`reconcile`] the background loop releasing
//! reservations whose pods are gone. Quotas come from the projects service through the cache
//! [`Place`](crate::place) shares ([`crate::ask::ProjectCache`]).

mod explain;
mod quota;
mod reconcile;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cube_bus::{EventBus, Start};
use cube_kit::config::parse_duration;
use cube_kit::identity::Principal;
use cube_kit::task::Background;
use cube_kit::{ApiError, Channel, FieldViolation};
use cube_proto::cube::projects::v1::MembersChanged;
use cube_proto::cube::scheduler::v1::admission_service_server::AdmissionService;
use cube_proto::cube::scheduler::v1::{
    Admission, AdmissionState, AdmitError, AdmitRequest, BatchAdmitRequest, BatchAdmitResponse, BatchAdmitResult,
    Blocker, BlockerKind, ExplainPendingRequest, Explanation, GetProjectUsageRequest, ProjectUsage, ReleaseRequest,
    ReleaseResponse, batch_admit_result,
};
use cube_proto::prost::Message as _;
use futures::StreamExt as _;
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};

use self::quota::{Amount, StoredBlocker, blockers, counts_a_run, queued_reason, scopes, scopes_json};
use self::reconcile::Reconciler;
use self::store::{BatchItem, Batched, Outcome, Store, retrying};
use cube_clusters::ClusterRegistry;

use crate::DOMAIN;
use crate::ask::{GpuVendors, ProjectView, Shared};
use crate::inventory::Fleet;
use crate::model::reservation;
use crate::names;
use crate::placement::PlacementConfig;

/// The topic projects announces membership changes on (`cube.projects.v1.MembersChanged`).
const MEMBERS_CHANGED: &str = "project.members.changed";

/// The most workloads one `BatchAdmit` admits.
const MAX_BATCH: usize = 1_000;

/// A workload ready to be admitted: its reservation, scopes and amount.
type Prepared = BatchItem;

/// Admission's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AdmissionArgs {
    /// How long a project's quota and settings, and the caller's membership, are kept per project and user
    /// (0 turns the cache off). Changes reach admission and placement at once through the projects service's
    /// `project.members.changed` event (members, member quotas, the project's quota and settings); this is how
    /// long a change whose event was lost can go unseen.
    #[arg(long = "quota-cache-ttl", env = "CUBE_QUOTA_CACHE_TTL", default_value = "60s", value_parser = parse_duration)]
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
            quota_cache_ttl: Duration::from_secs(60),
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
    store: Arc<Store>,
    shared: Arc<Shared>,
    registry: ClusterRegistry,
    fleet: Arc<Fleet>,
    vendors: GpuVendors,
    options: AdmissionOptions,
    reconciler: Arc<Reconciler>,
    /// Forgets cached projects when their members change.
    _follow: Background,
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

fn concurrent_change(workload: &str) -> ApiError {
    ApiError::Aborted {
        message: format!("the admission of {workload} kept changing while it was being written; ask again"),
    }
}

/// The answer about an admission the caller may not see, the same as about one that does not exist.
fn not_found(workload: &str) -> ApiError {
    ApiError::NotFound {
        kind: "admission",
        name: workload.to_owned(),
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
            .subscribe_instance(
                MEMBERS_CHANGED,
                &format!("scheduler-quotas-{instance}"),
                &instance,
                Start::Latest,
            )
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
        let store = Arc::new(Store::new(db));
        let reconciler = Arc::new(Reconciler {
            store: store.clone(),
            registry: registry.clone(),
            fleet: fleet.clone(),
            grace: options.reservation_grace,
            suspects: Mutex::new(HashMap::new()),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                shared,
                registry,
                fleet,
                vendors: GpuVendors::of(placement),
                options,
                reconciler,
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
        Some(self.inner.reconciler.clone().every(interval))
    }

    /// Reads an `Admit` request (its `project` given as `project`), adding a violation, with its field's path
    /// after `prefix` (`requests[3].`), for each malformed field.
    fn read_request(
        body: &AdmitRequest,
        project: &str,
        prefix: &str,
        violations: &mut Vec<FieldViolation>,
    ) -> Option<crate::ask::Ask> {
        let mut found = Vec::new();
        let ask = crate::ask::read(
            crate::ask::Fields {
                project,
                kind: body.kind(),
                cpu: &body.cpu,
                memory: &body.memory,
                gpu: &body.gpu,
            },
            &mut found,
        );
        let named = match names::project_id("project", project) {
            Ok(project) => names::workload_in("workload", &body.workload, &project),
            Err(_) => names::workload_project("workload", &body.workload).map(|_| ()),
        };
        if let Err(violation) = named {
            found.insert(0, violation);
        }
        let clean = found.is_empty();
        violations.extend(found.into_iter().map(|violation| FieldViolation {
            field: format!("{prefix}{}", violation.field),
            ..violation
        }));
        ask.filter(|_| clean)
    }

    /// What admitting `workload` of `ask` for `caller` stores and reserves, against the limits of `view`.
    fn prepare(&self, caller: &Principal, workload: &str, ask: &crate::ask::Ask, view: &ProjectView) -> Prepared {
        let gpu_type = ask.gpu_type(&self.inner.vendors);
        let kind = ask.admitted_as;
        let amount = Amount {
            cpu_millis: i64::try_from(ask.cpu.request_millis()).unwrap_or(i64::MAX),
            memory_bytes: i64::try_from(ask.memory.request_bytes()).unwrap_or(i64::MAX),
            gpu_millis: i64::try_from(ask.gpu.thousandths()).unwrap_or(i64::MAX),
            notebooks: i64::from(kind == "notebook"),
            services: i64::from(kind == "service"),
            runs: i64::from(counts_a_run(kind)),
        };
        let scopes = scopes(&ask.project, &caller.username, gpu_type.as_deref(), Some(view));
        let row = reservation::Model {
            workload: workload.to_owned(),
            project: ask.project.clone(),
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
            scopes: scopes_json(&scopes),
        };
        BatchItem { row, scopes, amount }
    }

    async fn admit(&self, request: Request<AdmitRequest>) -> Result<Admission, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.get_ref();
        let mut violations: Vec<FieldViolation> = Vec::new();
        let ask = Self::read_request(body, &body.project, "", &mut violations);
        let (Some(ask), true) = (ask, violations.is_empty()) else {
            return Err(ApiError::InvalidArgument(violations));
        };
        // A non-member is refused here, before anything about the workload is read.
        let view = self.inner.shared.projects.view(&request, &caller, &ask.project).await?;
        let prepared = self.prepare(&caller, &body.workload, &ask, &view);
        self.inner.store.ensure_scopes(&prepared.scopes).await?;
        self.admit_prepared(&caller, prepared).await
    }

    /// Admits or queues a prepared workload: one statement for a new one (see [`store`]), and a few more when it
    /// has an admission already or does not fit.
    async fn admit_prepared(&self, caller: &Principal, prepared: Prepared) -> Result<Admission, ApiError> {
        let BatchItem { row, scopes, amount } = prepared;
        let store = &self.inner.store;
        let project = row.project.clone();
        let already_exists = || ApiError::AlreadyExists {
            kind: "admission",
            name: row.workload.clone(),
        };
        // A new workload is inserted straight away; one that has an admission already is read only then.
        let mut replacing = false;
        for _ in 0..8 {
            match retrying(|| store.try_admit(&row, &scopes, &amount, replacing)).await? {
                Outcome::Admitted => return Ok(admission(&row)),
                Outcome::Exists => match store.find(&row.workload).await? {
                    None => replacing = false,
                    Some(existing) if existing.project != project => {
                        self.give_way(&existing).await?;
                        replacing = false;
                    }
                    Some(existing) if existing.username != caller.username => return Err(already_exists()),
                    Some(existing) if existing.state == "admitted" => return Ok(admission(&existing)),
                    Some(_) => replacing = true,
                },
                Outcome::Full => {
                    let used = store.usage_of(&scopes).await?;
                    let blockers = blockers(&scopes, &amount, &used);
                    let queued = reservation::Model {
                        state: "queued".into(),
                        reason: queued_reason(&blockers),
                        blockers: serde_json::to_string(&blockers).unwrap_or_else(|_| "[]".into()),
                        ..row.clone()
                    };
                    let stored = retrying(|| store.store_queued(&queued, replacing)).await?;
                    if stored.project != project {
                        self.give_way(&stored).await?;
                        replacing = false;
                    } else if stored.username != caller.username {
                        // Another caller stored an admission of the name meanwhile.
                        return Err(already_exists());
                    } else if stored.state == "queued" && stored != queued && !replacing {
                        // The user's own queued admission: it is brought up to date (or admitted) next round.
                        replacing = true;
                    } else {
                        return Ok(admission(&stored));
                    }
                }
            }
        }
        Err(concurrent_change(&row.workload))
    }

    /// Releases an admission stored before admissions were bound to their project, under a project its name does
    /// not lie in: it never was this workload's admission, and gives way to it.
    async fn give_way(&self, existing: &reservation::Model) -> Result<(), ApiError> {
        tracing::warn!(
            workload = %existing.workload,
            held_in = %existing.project,
            user = %existing.username,
            "released an admission stored under another project than its workload's"
        );
        retrying(|| self.inner.store.release_row(existing)).await?;
        Ok(())
    }

    async fn batch_admit(&self, request: Request<BatchAdmitRequest>) -> Result<BatchAdmitResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.get_ref();
        let mut violations: Vec<FieldViolation> = Vec::new();
        let project = names::project_id("project", &body.project)
            .map_err(|violation| violations.push(violation))
            .ok();
        if body.requests.is_empty() || body.requests.len() > MAX_BATCH {
            violations.push(FieldViolation::new(
                "requests",
                format!(
                    "holds {} workloads; a batch holds 1 to {MAX_BATCH}",
                    body.requests.len()
                ),
            ));
        }
        let mut asks = Vec::new();
        let mut named: HashMap<&str, usize> = HashMap::new();
        for (index, item) in body.requests.iter().enumerate().take(MAX_BATCH) {
            let prefix = format!("requests[{index}].");
            if !item.project.is_empty() && item.project != body.project {
                violations.push(FieldViolation::new(
                    format!("{prefix}project"),
                    format!("must be empty or the batch's project {}", names::shown(&body.project)),
                ));
            }
            if let Some(first) = named.insert(item.workload.as_str(), index) {
                violations.push(FieldViolation::new(
                    format!("{prefix}workload"),
                    format!("names the workload requests[{first}] names too; name each workload once"),
                ));
            }
            asks.push(Self::read_request(item, &body.project, &prefix, &mut violations));
        }
        let (Some(project), true) = (project, violations.is_empty()) else {
            return Err(ApiError::InvalidArgument(violations));
        };
        let view = self.inner.shared.projects.view(&request, &caller, &project).await?;
        let items: Vec<Prepared> = body
            .requests
            .iter()
            .zip(asks)
            .filter_map(|(item, ask)| ask.map(|ask| self.prepare(&caller, &item.workload, &ask, &view)))
            .collect();
        let mut all_scopes: Vec<quota::Scope> = Vec::new();
        for item in &items {
            for scope in &item.scopes {
                if !all_scopes.iter().any(|known| known.row == scope.row) {
                    all_scopes.push(scope.clone());
                }
            }
        }
        let store = &self.inner.store;
        store.ensure_scopes(&all_scopes).await?;
        let outcomes = retrying(|| store.admit_batch(&items)).await?;
        let mut results = Vec::with_capacity(items.len());
        for (item, outcome) in items.into_iter().zip(outcomes) {
            let workload = item.row.workload.clone();
            let answer = match outcome {
                Batched::Admitted(row) | Batched::Queued(row) => Ok(admission(&row)),
                // Stored under another project before admissions were bound to theirs: `Admit` releases it.
                Batched::Exists(existing) if existing.project != project => self.admit_prepared(&caller, item).await,
                Batched::Exists(existing) if existing.username != caller.username => Err(ApiError::AlreadyExists {
                    kind: "admission",
                    name: existing.workload.clone(),
                }),
                Batched::Exists(existing) => Ok(admission(&existing)),
            };
            let result = match answer {
                Ok(admission) => batch_admit_result::Result::Admission(admission),
                Err(error) if matches!(error, ApiError::Internal(_) | ApiError::Unavailable { .. }) => {
                    return Err(error);
                }
                Err(error) => batch_admit_result::Result::Error(AdmitError {
                    code: error.code() as i32,
                    reason: error.reason() as i32,
                    message: error.to_string(),
                }),
            };
            results.push(BatchAdmitResult {
                workload,
                result: Some(result),
            });
        }
        Ok(BatchAdmitResponse { results })
    }

    /// The admission of `workload` if the caller may see it: the name lies under a project the caller is a
    /// member of (or the caller is an admin), and the caller made the admission (or is an admin). Anything else
    /// is the NOT_FOUND of a workload without an admission; a malformed name is INVALID_ARGUMENT.
    async fn visible<T>(
        &self,
        request: &Request<T>,
        caller: &Principal,
        workload: &str,
    ) -> Result<reservation::Model, ApiError> {
        let project = names::workload_project("workload", workload)
            .map_err(|violation| ApiError::InvalidArgument(vec![violation]))?;
        match self.inner.shared.projects.view(request, caller, &project).await {
            Ok(_) => {}
            Err(ApiError::NotFound { .. }) => return Err(not_found(workload)),
            Err(other) => return Err(other),
        }
        self.inner
            .store
            .find(workload)
            .await?
            .filter(|row| row.project == project && (row.username == caller.username || caller.is_admin()))
            .ok_or_else(|| not_found(workload))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> Result<(), ApiError> {
        let caller = Principal::of(&request)?;
        let workload = request.get_ref().workload.as_str();
        let store = &self.inner.store;
        let mut row = self.visible(&request, &caller, workload).await?;
        for _ in 0..8 {
            if retrying(|| store.release_row(&row)).await? {
                return Ok(());
            }
            // It changed meanwhile (a queued workload admitted, or released by another call): read it again.
            row = store
                .find(workload)
                .await?
                .filter(|again| again.project == row.project && again.username == row.username)
                .ok_or_else(|| not_found(workload))?;
        }
        Err(concurrent_change(workload))
    }

    async fn project_usage(&self, request: Request<GetProjectUsageRequest>) -> Result<ProjectUsage, ApiError> {
        let caller = Principal::of(&request)?;
        let project = names::project_id("project", &request.get_ref().project)
            .map_err(|violation| ApiError::InvalidArgument(vec![violation]))?;
        // Only those who may see the project learn its usage: projects answers NOT_FOUND to anyone else.
        self.inner.shared.projects.view(&request, &caller, &project).await?;
        let scope = format!("projects/{project}");
        let rows = self.inner.store.project_rows(&scope).await?;
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
        let row = self.visible(&request, &caller, &request.get_ref().workload).await?;
        if row.state == "admitted" {
            let (reason, blockers) = explain::waiting_pods(
                &self.inner.registry,
                &self.inner.fleet,
                &row.workload,
                SystemTime::now(),
            );
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
}

#[tonic::async_trait]
impl AdmissionService for Admissions {
    async fn admit(&self, request: Request<AdmitRequest>) -> Result<Response<Admission>, Status> {
        Admissions::admit(self, request)
            .await
            .map(Response::new)
            .map_err(|error| error.status(DOMAIN))
    }

    async fn batch_admit(&self, request: Request<BatchAdmitRequest>) -> Result<Response<BatchAdmitResponse>, Status> {
        Admissions::batch_admit(self, request)
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
