//! What every projects RPC shares: the database, the clients of auth, the scheduler and the workload services,
//! the membership cache, and the rules of who may see and change what.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cube_bus::EventBus;
use cube_kit::dn;
use cube_kit::identity::{Principal, forward_token};
use cube_kit::names::{PROJECT_ID_RULE, is_project_id};
use cube_kit::{ApiError, Channel};
use cube_proto::cube::auth::v1::role_service_client::RoleServiceClient;
use cube_proto::cube::common::v1::project_workload_service_client::ProjectWorkloadServiceClient;
use cube_proto::cube::projects::v1::{MembersChanged, Role};
use cube_proto::cube::scheduler::v1::cluster_service_client::ClusterServiceClient;
use prost::Message as _;
use sea_orm::{DatabaseConnection, EntityTrait as _};
use tokio::sync::Notify;

use crate::model::{member, project};

/// The domain in the projects service's `ErrorInfo`s.
pub(crate) const DOMAIN: &str = "projects.cube.dev";
/// The project every user joins.
pub(crate) const PUBLIC: &str = "public";
/// The bus topic of membership changes.
pub const MEMBERS_CHANGED: &str = "project.members.changed";
/// The bus topic a project's deletion is announced on (`ProjectDeleted`), through the outbox.
pub const PROJECT_DELETED: &str = "project.deleted";
/// The bus topic a project's restoration is announced on (`ProjectUndeleted`), through the outbox.
pub const PROJECT_UNDELETED: &str = "project.undeleted";
/// How long a deleted project can be restored.
pub(crate) const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Maps an [`ApiError`] to the status a client receives.
pub(crate) fn status(error: ApiError) -> tonic::Status {
    error.status(DOMAIN)
}

pub(crate) fn db_error(error: sea_orm::DbErr) -> ApiError {
    ApiError::internal(error)
}

pub(crate) use cube_kit::time::{now_ms, timestamp};

/// The role stored in a member row.
pub(crate) fn role_of(text: &str) -> Role {
    match text {
        "owner" => Role::Owner,
        "developer" => Role::Developer,
        "viewer" => Role::Viewer,
        _ => Role::Unspecified,
    }
}

/// The text a role is stored as.
pub(crate) fn role_text(role: Role) -> &'static str {
    match role {
        Role::Owner => "owner",
        Role::Developer => "developer",
        Role::Viewer => "viewer",
        Role::Unspecified => "",
    }
}

/// The project id in `projects/{project}`, checked.
pub(crate) fn project_id(field: &str, name: &str) -> Result<String, ApiError> {
    let id = name
        .strip_prefix("projects/")
        .ok_or_else(|| ApiError::invalid(field, format!("expected projects/{{project}}, got {name:?}")))?;
    if !is_project_id(id) {
        return Err(ApiError::invalid(
            field,
            format!("{id:?} is not a project id: {PROJECT_ID_RULE}"),
        ));
    }
    Ok(id.to_owned())
}

/// The caller's LDAP group DNs in the normal form group members are stored in (see [`cube_kit::dn`]): tokens
/// carry them as the directory spelled them.
pub(crate) fn normal_groups(groups: &[String]) -> Vec<String> {
    let mut normal: Vec<String> = groups.iter().map(|group| dn::normalize_lenient(group)).collect();
    normal.sort();
    normal.dedup();
    normal
}

/// The error for a project the caller may not know about.
pub(crate) fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        kind: "project",
        name: format!("projects/{id}"),
    }
}

/// What membership checks need of a project: whether it is live, and its members.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// The project exists and is not deleted.
    pub(crate) live: bool,
    /// Its members, by member id.
    pub(crate) members: Vec<member::Model>,
}

/// A project's snapshot, read recently.
struct CachedMembers {
    read: Instant,
    snapshot: Arc<Snapshot>,
}

/// What every RPC shares.
pub(crate) struct Core {
    pub(crate) db: DatabaseConnection,
    pub(crate) auth: Channel,
    pub(crate) scheduler: Channel,
    pub(crate) workloads: Vec<(String, Channel)>,
    pub(crate) bus: Arc<dyn EventBus>,
    pub(crate) membership_ttl: Duration,
    /// Wakes the outbox relay after a commit that enqueued events.
    pub(crate) outbox: Arc<Notify>,
    members: RwLock<HashMap<String, CachedMembers>>,
}

impl Core {
    pub(crate) fn new(
        db: DatabaseConnection,
        auth: Channel,
        scheduler: Channel,
        workloads: Vec<(String, Channel)>,
        bus: Arc<dyn EventBus>,
        membership_ttl: Duration,
    ) -> Self {
        Self {
            db,
            auth,
            scheduler,
            workloads,
            bus,
            membership_ttl,
            outbox: Arc::new(Notify::new()),
            members: RwLock::new(HashMap::new()),
        }
    }

    /// Returns whether a project is live and its members, from the cache when it is fresh.
    pub(crate) async fn snapshot(&self, project: &str) -> Result<Arc<Snapshot>, ApiError> {
        {
            let cache = self.members.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(cached) = cache.get(project)
                && cached.read.elapsed() < self.membership_ttl
            {
                return Ok(Arc::clone(&cached.snapshot));
            }
        }
        let (live, rows) = self.read_snapshot(project).await?;
        let members = Arc::new(Snapshot { live, members: rows });
        if !self.membership_ttl.is_zero() {
            let mut cache = self.members.write().unwrap_or_else(PoisonError::into_inner);
            if cache.len() >= 100_000 {
                cache.clear();
            }
            cache.insert(
                project.to_owned(),
                CachedMembers {
                    read: Instant::now(),
                    snapshot: Arc::clone(&members),
                },
            );
        }
        Ok(members)
    }

    /// Reads whether a project is live and its members, in one query (the project left-joined to its members).
    async fn read_snapshot(&self, project: &str) -> Result<(bool, Vec<member::Model>), ApiError> {
        use sea_orm::sea_query::{Expr, ExprTrait as _, Order, Query};
        use sea_orm::{ConnectionTrait as _, Iden as _};

        let p = |column: project::Column| (project::Entity, column);
        let m = |column: member::Column| (member::Entity, column);
        let query = Query::select()
            .column(p(project::Column::DeletedMs))
            .columns([
                m(member::Column::MemberId),
                m(member::Column::Kind),
                m(member::Column::Subject),
                m(member::Column::Role),
                m(member::Column::Quota),
                m(member::Column::CreatedMs),
            ])
            .from(project::Entity)
            .left_join(
                member::Entity,
                Expr::col(m(member::Column::Project)).equals(p(project::Column::Id)),
            )
            .and_where(Expr::col(p(project::Column::Id)).eq(project))
            .order_by(m(member::Column::MemberId), Order::Asc)
            .to_owned();
        let rows = self.db.query_all(&query).await.map_err(db_error)?;
        let Some(first) = rows.first() else {
            return Ok((false, Vec::new()));
        };
        let live = first
            .try_get::<Option<i64>>("", &project::Column::DeletedMs.to_string())
            .map_err(db_error)?
            .is_none();
        let mut members = Vec::with_capacity(rows.len());
        for row in &rows {
            let text = |column: member::Column| row.try_get::<Option<String>>("", &column.to_string());
            let Some(member_id) = text(member::Column::MemberId).map_err(db_error)? else {
                continue;
            };
            members.push(member::Model {
                project: project.to_owned(),
                member_id,
                kind: text(member::Column::Kind).map_err(db_error)?.unwrap_or_default(),
                subject: text(member::Column::Subject).map_err(db_error)?.unwrap_or_default(),
                role: text(member::Column::Role).map_err(db_error)?.unwrap_or_default(),
                quota: text(member::Column::Quota).map_err(db_error)?.unwrap_or_default(),
                created_ms: row
                    .try_get::<Option<i64>>("", &member::Column::CreatedMs.to_string())
                    .map_err(db_error)?
                    .unwrap_or_default(),
            });
        }
        Ok((live, members))
    }

    /// Forgets what was cached about `project`.
    pub(crate) fn forget(&self, project: &str) {
        self.members
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(project);
    }

    /// After a change of `project`'s members: forgets them here and tells the other replicas.
    pub(crate) async fn members_changed(&self, project: &str) {
        self.forget(project);
        let event = MembersChanged {
            project: format!("projects/{project}"),
        };
        if let Err(error) = self.bus.publish(MEMBERS_CHANGED, event.encode_to_vec().into()).await {
            tracing::warn!(%error, project, "announcing a membership change");
        }
    }

    /// The highest role `username` (with `groups`) holds in `project`, and the members that give it.
    pub(crate) async fn role(
        &self,
        project: &str,
        username: &str,
        groups: &[String],
    ) -> Result<(Role, Vec<member::Model>), ApiError> {
        let snapshot = self.snapshot(project).await?;
        let groups = normal_groups(groups);
        let mut best = Role::Unspecified;
        let mut granted = Vec::new();
        for member in &snapshot.members {
            // Group subjects are stored normalised; normalising again keeps rows written before that matching.
            let holds = match member.kind.as_str() {
                "user" => member.subject == username,
                _ => groups.contains(&dn::normalize_lenient(&member.subject)),
            };
            if holds {
                let role = role_of(&member.role);
                if role > best {
                    best = role;
                }
                granted.push(member.clone());
            }
        }
        granted.retain(|member| role_of(&member.role) == best);
        Ok((best, granted))
    }

    /// Loads a live project the caller may see, with the caller's role in it; NOT_FOUND otherwise (admins see
    /// every project).
    pub(crate) async fn visible(&self, caller: &Principal, id: &str) -> Result<(project::Model, Role), ApiError> {
        let row = project::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .filter(|row| row.deleted_ms.is_none())
            .ok_or_else(|| not_found(id))?;
        let (role, _) = self.role(id, &caller.username, &caller.groups).await?;
        if role == Role::Unspecified && !caller.is_admin() {
            return Err(not_found(id));
        }
        Ok((row, role))
    }

    /// Like [`Core::visible`], and the caller must be an owner or an admin.
    pub(crate) async fn owned(
        &self,
        caller: &Principal,
        id: &str,
        permission: &str,
    ) -> Result<project::Model, ApiError> {
        let (row, role) = self.visible(caller, id).await?;
        if role != Role::Owner && !caller.is_admin() {
            return Err(ApiError::PermissionDenied {
                permission: format!("{permission} (owners of projects/{id} and admins)"),
            });
        }
        Ok(row)
    }

    /// Asks auth whether the caller holds a platform permission, with the caller's own token.
    pub(crate) async fn check_permission<T>(
        &self,
        request: &tonic::Request<T>,
        resource_type: &str,
        verb: &str,
    ) -> Result<(), ApiError> {
        let mut check = tonic::Request::new(cube_proto::cube::auth::v1::CheckPermissionRequest {
            user: String::new(),
            permission: Some(cube_proto::cube::auth::v1::Permission {
                resource_type: resource_type.into(),
                verb: verb.into(),
            }),
        });
        forward_token(request, &mut check)?;
        let answer = RoleServiceClient::new(self.auth.clone())
            .check_permission(check)
            .await
            .map_err(|status| upstream("auth", status))?
            .into_inner();
        if answer.allowed {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied {
                permission: format!("{resource_type}.{verb}"),
            })
        }
    }

    /// Checks that `cluster` is in the scheduler's registry, asking with the caller's token.
    pub(crate) async fn check_cluster<T>(
        &self,
        request: &tonic::Request<T>,
        field: &str,
        cluster: &str,
    ) -> Result<(), ApiError> {
        let mut get = tonic::Request::new(cube_proto::cube::scheduler::v1::GetClusterRequest {
            name: format!("clusters/{cluster}"),
        });
        forward_token(request, &mut get)?;
        match ClusterServiceClient::new(self.scheduler.clone()).get_cluster(get).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound => Err(ApiError::invalid(
                field,
                format!(
                    "{cluster:?} is not in the scheduler's cluster registry: {}",
                    status.message()
                ),
            )),
            Err(status) => Err(upstream("scheduler", status)),
        }
    }

    /// Asks every workload service for the project's live workloads.
    pub(crate) async fn live_workloads<T>(
        &self,
        request: &tonic::Request<T>,
        project: &str,
    ) -> Result<Vec<String>, ApiError> {
        let mut live = Vec::new();
        for (service, channel) in &self.workloads {
            let mut ask = tonic::Request::new(cube_proto::cube::common::v1::ListProjectWorkloadsRequest {
                project: format!("projects/{project}"),
            });
            forward_token(request, &mut ask)?;
            let answer = ProjectWorkloadServiceClient::new(channel.clone())
                .list_project_workloads(ask)
                .await
                .map_err(|status| upstream(service, status))?
                .into_inner();
            live.extend(answer.workloads);
        }
        Ok(live)
    }
}

/// The error for a failed call to another service.
pub(crate) fn upstream(service: &str, status: tonic::Status) -> ApiError {
    match status.code() {
        tonic::Code::Unauthenticated => ApiError::Unauthenticated {
            message: status.message().to_owned(),
        },
        _ => ApiError::Unavailable {
            service: service.to_owned(),
            source: Box::new(status),
        },
    }
}
