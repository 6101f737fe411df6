//! `cube.scheduler.v1.AdmissionService`: quotas enforced at admission. Each admission adds its requests to the
//! reserved amounts of its project and of its user inside the project with one conditional UPDATE per scope
//! (`… SET cpu = cpu + r WHERE scope = ? AND cpu + r <= limit`), in one transaction, so concurrent admissions
//! serialise on the row and can never over-commit, on SQLite, PostgreSQL and MariaDB alike.

use cube_kit::identity::{Principal, forward_token};
use cube_kit::{ApiError, Channel, FieldViolation};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{GetMembershipRequest, GetProjectRequest, Quota};
use cube_proto::cube::scheduler::v1::admission_service_server::AdmissionService;
use cube_proto::cube::scheduler::v1::{
    Admission, AdmissionState, AdmitRequest, Blocker, ExplainPendingRequest, Explanation, GetProjectUsageRequest,
    ProjectUsage, ReleaseRequest, ReleaseResponse,
};
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, DbErr, EntityTrait as _, IntoActiveModel as _, QueryFilter as _,
    TransactionTrait as _,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::DOMAIN;
use crate::model::{reservation, usage};

/// Admission's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AdmissionArgs {}

impl AdmissionArgs {
    /// The options these flags set.
    pub fn options(&self) -> AdmissionOptions {
        AdmissionOptions {}
    }
}

/// How admission works.
#[derive(Debug, Clone, Default)]
pub struct AdmissionOptions {}

/// Serves `AdmissionService`.
#[derive(Clone)]
pub(crate) struct Admissions {
    db: DatabaseConnection,
    projects: Channel,
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

impl Limits {
    fn of(quota: Option<&Quota>) -> Self {
        let Some(quota) = quota else {
            return Self::default();
        };
        let thousandths = |value: f64| (value * 1000.0).round() as i64;
        Self {
            cpu_millis: quota.cpu.map(thousandths),
            memory_bytes: quota.memory_bytes,
            gpu_millis: quota.gpu.map(thousandths),
            notebooks: quota.notebooks.map(i64::from),
            services: quota.services.map(i64::from),
            runs: quota.runs.map(i64::from),
        }
    }
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

/// The quota columns, with each resource's name, its unit scale for people, and its two sides.
fn columns(amount: &Amount, limits: &Limits, used: &usage::Model) -> [(&'static str, f64, i64, Option<i64>, i64); 6] {
    [
        ("cpu", 1000.0, amount.cpu_millis, limits.cpu_millis, used.cpu_millis),
        (
            "memory",
            1.0,
            amount.memory_bytes,
            limits.memory_bytes,
            used.memory_bytes,
        ),
        ("gpu", 1000.0, amount.gpu_millis, limits.gpu_millis, used.gpu_millis),
        ("notebooks", 1.0, amount.notebooks, limits.notebooks, used.notebooks),
        ("services", 1.0, amount.services, limits.services, used.services),
        ("runs", 1.0, amount.runs, limits.runs, used.runs),
    ]
}

/// Makes sure the usage row of `scope` exists.
async fn ensure_scope(db: &DatabaseConnection, scope: &str) -> Result<(), ApiError> {
    let row = usage::Model {
        scope: scope.to_owned(),
        cpu_millis: 0,
        memory_bytes: 0,
        gpu_millis: 0,
        notebooks: 0,
        services: 0,
        runs: 0,
    };
    if usage::Entity::find_by_id(scope.to_owned())
        .one(db)
        .await
        .map_err(db_error)?
        .is_some()
    {
        return Ok(());
    }
    // Outside any transaction, so a racing insert's duplicate key aborts nothing: the row exists either way.
    if let Err(error) = usage::Entity::insert(row.into_active_model()).exec(db).await {
        let exists = usage::Entity::find_by_id(scope.to_owned())
            .one(db)
            .await
            .map_err(db_error)?
            .is_some();
        if !exists {
            return Err(db_error(error));
        }
    }
    Ok(())
}

/// Adds `amount` to `scope` if every limited column stays within its limit; false when one would not.
async fn reserve(
    txn: &sea_orm::DatabaseTransaction,
    scope: &str,
    amount: &Amount,
    limits: &Limits,
) -> Result<bool, ApiError> {
    let pairs = [
        (usage::Column::CpuMillis, amount.cpu_millis, limits.cpu_millis),
        (usage::Column::MemoryBytes, amount.memory_bytes, limits.memory_bytes),
        (usage::Column::GpuMillis, amount.gpu_millis, limits.gpu_millis),
        (usage::Column::Notebooks, amount.notebooks, limits.notebooks),
        (usage::Column::Services, amount.services, limits.services),
        (usage::Column::Runs, amount.runs, limits.runs),
    ];
    let mut update = usage::Entity::update_many().filter(usage::Column::Scope.eq(scope.to_owned()));
    for (column, add, limit) in pairs {
        update = update.col_expr(column, Expr::col(column).add(add));
        if let Some(limit) = limit
            && add > 0
        {
            update = update.filter(Expr::col(column).add(add).lte(limit));
        }
    }
    Ok(update.exec(txn).await.map_err(db_error)?.rows_affected == 1)
}

/// Takes `amount` off `scope` (a release).
async fn unreserve(txn: &sea_orm::DatabaseTransaction, scope: &str, amount: &Amount) -> Result<(), ApiError> {
    let pairs = [
        (usage::Column::CpuMillis, amount.cpu_millis),
        (usage::Column::MemoryBytes, amount.memory_bytes),
        (usage::Column::GpuMillis, amount.gpu_millis),
        (usage::Column::Notebooks, amount.notebooks),
        (usage::Column::Services, amount.services),
        (usage::Column::Runs, amount.runs),
    ];
    let mut update = usage::Entity::update_many().filter(usage::Column::Scope.eq(scope.to_owned()));
    for (column, amount) in pairs {
        update = update.col_expr(column, Expr::col(column).sub(amount));
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
        state: if row.state == "admitted" {
            AdmissionState::Admitted
        } else {
            AdmissionState::Queued
        } as i32,
        reason: row.reason.clone(),
        create_time: Some(prost_types::Timestamp {
            seconds: row.created_ms.div_euclid(1000),
            nanos: i32::try_from(row.created_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
        }),
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

impl Admissions {
    /// Admission over reservations stored in `db`, with quotas from projects behind `projects`.
    pub(crate) fn new(
        db: DatabaseConnection,
        projects: Channel,
        _registry: crate::ClusterRegistry,
        _fleet: std::sync::Arc<crate::inventory::Fleet>,
        _options: AdmissionOptions,
    ) -> Self {
        Self { db, projects }
    }

    /// The background work admission needs while serving, if any.
    pub(crate) fn reconcile(&self) -> Option<cube_kit::task::Background> {
        None
    }

    /// Reserves `amount` in both scopes and stores the admission, in one transaction; false (and nothing
    /// written) when a quota would be exceeded.
    async fn try_reserve(
        &self,
        project_scope: &str,
        member_scope: &str,
        amount: &Amount,
        (project_limits, member_limits): (&Limits, &Limits),
        row: &reservation::Model,
        was_queued: bool,
    ) -> Result<bool, ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let admitted = reserve(&txn, project_scope, amount, project_limits).await?
            && reserve(&txn, member_scope, amount, member_limits).await?;
        if !admitted {
            txn.rollback().await.map_err(db_error)?;
            return Ok(false);
        }
        if was_queued {
            reservation::Entity::delete_by_id(row.workload.clone())
                .exec(&txn)
                .await
                .map_err(db_error)?;
        }
        reservation::Entity::insert(row.clone().into_active_model())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        Ok(true)
    }

    /// The project's quota and the caller's member quota, asked of projects with the caller's token.
    async fn quotas<T>(&self, request: &Request<T>, project: &str) -> Result<(Limits, Limits), ApiError> {
        let upstream = |status: Status| match status.code() {
            tonic::Code::NotFound => ApiError::NotFound {
                kind: "project",
                name: format!("projects/{project}"),
            },
            tonic::Code::Unauthenticated => ApiError::Unauthenticated {
                message: status.message().to_owned(),
            },
            _ => ApiError::Unavailable {
                service: "projects".into(),
                source: Box::new(status),
            },
        };
        let mut client = ProjectServiceClient::new(self.projects.clone());
        let mut get = Request::new(GetProjectRequest {
            name: format!("projects/{project}"),
        });
        forward_token(request, &mut get)?;
        let found = client.get_project(get).await.map_err(upstream)?.into_inner();
        let mut membership = Request::new(GetMembershipRequest {
            project: format!("projects/{project}"),
            user: String::new(),
        });
        forward_token(request, &mut membership)?;
        let membership = client.get_membership(membership).await.map_err(upstream)?.into_inner();
        Ok((Limits::of(found.quota.as_ref()), Limits::of(membership.quota.as_ref())))
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
        let crate::ask::Ask {
            project,
            kind,
            cpu,
            memory,
            gpu,
        } = ask;
        let kind = kind.label();
        let workload = body.workload.clone();
        let existing = reservation::Entity::find_by_id(workload.clone())
            .one(&self.db)
            .await
            .map_err(db_error)?;
        if let Some(existing) = &existing
            && (existing.state == "admitted" || existing.project != project)
        {
            return Ok(admission(existing));
        }
        let was_queued = existing.is_some();
        let (project_limits, member_limits) = self.quotas(&request, &project).await?;
        let amount = Amount {
            cpu_millis: i64::try_from(cpu.request_millis()).unwrap_or(i64::MAX),
            memory_bytes: i64::try_from(memory.request_bytes()).unwrap_or(i64::MAX),
            gpu_millis: i64::try_from(gpu.thousandths()).unwrap_or(i64::MAX),
            notebooks: i64::from(kind == "notebook"),
            services: i64::from(kind == "service"),
            runs: i64::from(kind == "train"),
        };
        let project_scope = format!("projects/{project}");
        let member_scope = format!("projects/{project}/members/u-{}", caller.username);
        ensure_scope(&self.db, &project_scope).await?;
        ensure_scope(&self.db, &member_scope).await?;

        let mut row = reservation::Model {
            workload: workload.clone(),
            project: project.clone(),
            username: caller.username.clone(),
            kind: kind.to_owned(),
            cpu_millis: amount.cpu_millis,
            memory_bytes: amount.memory_bytes,
            gpu_millis: amount.gpu_millis,
            state: "admitted".into(),
            reason: String::new(),
            blockers: "[]".into(),
            created_ms: now_ms(),
        };
        // MariaDB may pick a racing transaction as a deadlock victim; the transaction is simply tried again.
        let mut attempts = 0;
        let admitted = loop {
            attempts += 1;
            match self
                .try_reserve(
                    &project_scope,
                    &member_scope,
                    &amount,
                    (&project_limits, &member_limits),
                    &row,
                    was_queued,
                )
                .await
            {
                Err(error) if attempts < 8 && retryable(&error) => continue,
                other => break other?,
            }
        };
        if admitted {
            return Ok(admission(&row));
        }
        let mut blockers = Vec::new();
        for (scope, limits) in [(&project_scope, &project_limits), (&member_scope, &member_limits)] {
            let used = usage::Entity::find_by_id(scope.clone())
                .one(&self.db)
                .await
                .map_err(db_error)?
                .unwrap_or(usage::Model {
                    scope: scope.clone(),
                    cpu_millis: 0,
                    memory_bytes: 0,
                    gpu_millis: 0,
                    notebooks: 0,
                    services: 0,
                    runs: 0,
                });
            for (resource, scale, requested, limit, in_use) in columns(&amount, limits, &used) {
                if let Some(limit) = limit
                    && requested > 0
                    && in_use + requested > limit
                {
                    blockers.push(StoredBlocker {
                        quota: scope.clone(),
                        resource: resource.to_owned(),
                        requested: requested as f64 / scale,
                        in_use: in_use as f64 / scale,
                        limit: limit as f64 / scale,
                    });
                }
            }
        }
        row.state = "queued".into();
        row.reason = match blockers.first() {
            Some(blocker) => format!(
                "the {} quota of {} is {}, {} is in use, and this asks for {}",
                blocker.resource, blocker.quota, blocker.limit, blocker.in_use, blocker.requested
            ),
            None => "a quota was full a moment ago; ask again".into(),
        };
        row.blockers = serde_json::to_string(&blockers).unwrap_or_else(|_| "[]".into());
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.store_queued(&row, was_queued).await {
                Err(error) if attempts < 8 && retryable(&error) => {}
                Err(error) => return Err(error),
                Ok(stored) => return Ok(admission(&stored)),
            }
        }
    }

    /// Stores a queued admission, or returns the admission another call stored for the workload meanwhile.
    async fn store_queued(&self, row: &reservation::Model, was_queued: bool) -> Result<reservation::Model, ApiError> {
        let stored = if was_queued {
            let updated = reservation::Entity::update_many()
                .col_expr(reservation::Column::Reason, Expr::value(row.reason.clone()))
                .col_expr(reservation::Column::Blockers, Expr::value(row.blockers.clone()))
                .col_expr(reservation::Column::CreatedMs, Expr::value(row.created_ms))
                .filter(reservation::Column::Workload.eq(row.workload.clone()))
                .filter(reservation::Column::State.eq("queued"))
                .exec(&self.db)
                .await
                .map_err(db_error)?;
            updated.rows_affected == 1
        } else {
            reservation::Entity::insert(row.clone().into_active_model())
                .exec(&self.db)
                .await
                .is_ok()
        };
        if stored {
            return Ok(row.clone());
        }
        reservation::Entity::find_by_id(row.workload.clone())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::internal("a reservation could neither be written nor read"))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> Result<(), ApiError> {
        let caller = Principal::of(&request)?;
        let workload = request.get_ref().workload.clone();
        let txn = self.db.begin().await.map_err(db_error)?;
        let Some(row) = reservation::Entity::find_by_id(workload.clone())
            .one(&txn)
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
        let deleted = reservation::Entity::delete_by_id(workload.clone())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if deleted.rows_affected == 1 && row.state == "admitted" {
            let amount = amount_of(&row);
            unreserve(&txn, &format!("projects/{}", row.project), &amount).await?;
            unreserve(
                &txn,
                &format!("projects/{}/members/u-{}", row.project, row.username),
                &amount,
            )
            .await?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(())
    }

    async fn project_usage(&self, request: Request<GetProjectUsageRequest>) -> Result<ProjectUsage, ApiError> {
        Principal::of(&request)?;
        let project = request
            .get_ref()
            .project
            .strip_prefix("projects/")
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ApiError::invalid("project", "expected projects/{project}"))?;
        // Only those who may see the project learn its usage: projects answers NOT_FOUND to anyone else.
        self.quotas(&request, &project).await?;
        let used = usage::Entity::find_by_id(format!("projects/{project}"))
            .one(&self.db)
            .await
            .map_err(db_error)?;
        let count = |value: i64| i32::try_from(value).unwrap_or(i32::MAX);
        Ok(match used {
            Some(used) => ProjectUsage {
                project: format!("projects/{project}"),
                cpu: used.cpu_millis as f64 / 1000.0,
                memory_bytes: used.memory_bytes,
                gpu: used.gpu_millis as f64 / 1000.0,
                notebooks: count(used.notebooks),
                services: count(used.services),
                runs: count(used.runs),
            },
            None => ProjectUsage {
                project: format!("projects/{project}"),
                ..ProjectUsage::default()
            },
        })
    }

    async fn explain(&self, request: Request<ExplainPendingRequest>) -> Result<Explanation, ApiError> {
        let caller = Principal::of(&request)?;
        let workload = request.get_ref().workload.clone();
        let not_found = || ApiError::NotFound {
            kind: "admission",
            name: workload.clone(),
        };
        let row = reservation::Entity::find_by_id(workload.clone())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .filter(|row| row.username == caller.username || caller.is_admin())
            .ok_or_else(not_found)?;
        let blockers: Vec<StoredBlocker> = serde_json::from_str(&row.blockers).unwrap_or_default();
        Ok(Explanation {
            workload: row.workload.clone(),
            state: admission(&row).state,
            reason: if row.state == "admitted" {
                "admitted: nothing blocks it".into()
            } else {
                row.reason.clone()
            },
            blockers: blockers
                .into_iter()
                .map(|blocker| Blocker {
                    quota: blocker.quota,
                    resource: blocker.resource,
                    requested: blocker.requested,
                    in_use: blocker.in_use,
                    limit: blocker.limit,
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
}
