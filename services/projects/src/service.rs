//! `cube.projects.v1.ProjectService`.

use std::sync::Arc;

use cube_kit::dn;
use cube_kit::identity::{Principal, canonical_username};
use cube_kit::names::{PROJECT_ID_RULE, is_project_id};
use cube_kit::page::{decode_token, finish_page, page_size, parse_filter};
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::projects::v1::member::Subject;
use cube_proto::cube::projects::v1::project_service_server::ProjectService;
use cube_proto::cube::projects::v1::{
    CreateMemberRequest, CreateProjectRequest, DeleteMemberRequest, DeleteProjectRequest, GetMembershipRequest,
    GetProjectRequest, GetQuotaUsageRequest, ListMembersRequest, ListMembersResponse, ListProjectsRequest,
    ListProjectsResponse, Member, Membership, Project, ProjectDeleted, ProjectType, ProjectUndeleted, Quota,
    QuotaUsage, Role, Settings, UndeleteProjectRequest, UpdateMemberRequest, UpdateProjectRequest,
};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, Condition, ConnectionTrait, DatabaseTransaction, EntityTrait as _,
    IntoActiveModel as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, TransactionTrait as _,
};
use tonic::{Request, Response, Status};

use crate::core::{
    Core, PROJECT_DELETED, PROJECT_UNDELETED, PUBLIC, RETENTION, db_error, normal_groups, not_found, now_ms,
    project_id, role_of, role_text, status, timestamp,
};
use crate::model::{member, project};
use crate::settings::{StoredQuota, StoredSettings, check_quota, check_settings};

/// How many times a change that lost a race with another change of the same project is tried again.
const ATTEMPTS: usize = 8;

/// How long a deleted project can be restored, in milliseconds.
fn retention_ms() -> i64 {
    i64::try_from(RETENTION.as_millis()).unwrap_or(i64::MAX)
}

/// Maps a failure to write an event into the outbox (the change then rolls back).
fn outbox_error(error: cube_kit::outbox::OutboxError) -> ApiError {
    ApiError::internal(error)
}

/// Serves `ProjectService`.
#[derive(Clone)]
pub(crate) struct Projects(pub(crate) Arc<Core>);

fn kind_text(kind: ProjectType) -> Option<&'static str> {
    match kind {
        ProjectType::Org => Some("org"),
        ProjectType::TemplateCategory => Some("template-category"),
        ProjectType::ModelGroup => Some("model-group"),
        ProjectType::Unspecified => None,
    }
}

fn kind_of(text: &str) -> ProjectType {
    match text {
        "org" => ProjectType::Org,
        "template-category" => ProjectType::TemplateCategory,
        "model-group" => ProjectType::ModelGroup,
        _ => ProjectType::Unspecified,
    }
}

fn etag(version: i64) -> String {
    format!("\"v{version}\"")
}

fn settings_of(row: &project::Model) -> StoredSettings {
    serde_json::from_str(&row.settings).unwrap_or_default()
}

fn quota_of(text: &str) -> StoredQuota {
    serde_json::from_str(text).unwrap_or_default()
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".into())
}

fn project_message(row: &project::Model) -> Project {
    Project {
        name: format!("projects/{}", row.id),
        display_name: row.display_name.clone(),
        description: row.description.clone(),
        r#type: kind_of(&row.kind) as i32,
        settings: Some(settings_of(row).message()),
        quota: Some(quota_of(&row.quota).message()),
        create_time: Some(timestamp(row.created_ms)),
        update_time: Some(timestamp(row.updated_ms)),
        delete_time: row.deleted_ms.map(timestamp),
        purge_time: row
            .deleted_ms
            .map(|deleted| timestamp(deleted.saturating_add(retention_ms()))),
        etag: etag(row.version),
    }
}

fn member_message(row: &member::Model) -> Member {
    Member {
        name: format!("projects/{}/members/{}", row.project, row.member_id),
        subject: Some(if row.kind == "user" {
            Subject::User(format!("users/{}", row.subject))
        } else {
            Subject::Group(row.subject.clone())
        }),
        role: role_of(&row.role) as i32,
        quota: Some(quota_of(&row.quota).message()),
        create_time: Some(timestamp(row.created_ms)),
    }
}

/// The member id of a group: `g-` and 16 hex digits of the SHA-256 of its DN in normal form.
///
/// Rows written before DNs were normalised keep the id of their lower-cased DN as given, so that their names stay
/// stable; a DN that was already in normal form has the same id either way.
fn group_member_id(normal_dn: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, normal_dn.as_bytes());
    let hex: String = digest.as_ref()[..8].iter().map(|byte| format!("{byte:02x}")).collect();
    format!("g-{hex}")
}

/// The longest group DN stored, in normal form.
const MAX_DN_BYTES: usize = 255;

/// Checks a group DN and returns it in the normal form it is stored and compared in (see [`cube_kit::dn`]).
fn group_dn(field: &str, given: &str) -> Result<String, ApiError> {
    let example = "an LDAP group DN like cn=ml-team,ou=groups,dc=example,dc=com";
    let dn = dn::normalize(given).map_err(|error| {
        let shown: String = given.chars().take(80).collect();
        ApiError::invalid(field, format!("{shown:?} is not {example}: {error}"))
    })?;
    if dn.len() > MAX_DN_BYTES {
        return Err(ApiError::invalid(
            field,
            format!(
                "must be {example} of at most {MAX_DN_BYTES} bytes once normalised, got {} bytes",
                dn.len()
            ),
        ));
    }
    Ok(dn)
}

/// Reads `users/{username}` or `users/me` into a canonical username (see [`canonical_username`]).
fn username_in(field: &str, name: &str, caller: &Principal) -> Result<String, ApiError> {
    let id = name
        .strip_prefix("users/")
        .ok_or_else(|| ApiError::invalid(field, format!("expected users/{{username}}, got {name:?}")))?;
    let id = canonical_username(field, id)?;
    if id == "me" {
        return Ok(caller.username.clone());
    }
    Ok(id)
}

/// Checks the display name and description of a project.
fn check_text(display_name: &str, description: &str, violations: &mut Vec<FieldViolation>) {
    if display_name.chars().count() > 100 || display_name.chars().any(char::is_control) {
        violations.push(FieldViolation::new(
            "project.display_name",
            "must be at most 100 characters, without control characters",
        ));
    }
    if description.chars().count() > 500 {
        violations.push(FieldViolation::new(
            "project.description",
            "must be at most 500 characters",
        ));
    }
}

/// Whether a failed write lost a race with another transaction (and is worth trying again).
fn lost_race(error: &ApiError) -> bool {
    let text = match error {
        ApiError::Internal(source) => source.to_string().to_lowercase(),
        _ => return false,
    };
    ["locked", "busy", "deadlock", "could not serialize", "lock wait"]
        .iter()
        .any(|word| text.contains(word))
}

/// Bumps the project's version from `version`, in `txn`: zero rows means another change got there first.
async fn bump(txn: &DatabaseTransaction, id: &str, version: i64) -> Result<bool, ApiError> {
    let result = project::Entity::update_many()
        .col_expr(project::Column::Version, Expr::value(version + 1))
        .col_expr(project::Column::UpdatedMs, Expr::value(now_ms()))
        .filter(project::Column::Id.eq(id.to_owned()))
        .filter(project::Column::Version.eq(version))
        .exec(txn)
        .await
        .map_err(db_error)?;
    Ok(result.rows_affected == 1)
}

/// Why a change of members was refused or must be tried again.
enum MemberChange<T> {
    Done(T),
    Retry,
}

impl Projects {
    /// Runs a change of a project's members in a transaction that also bumps the project's version, so that
    /// two changes racing each other (two owners removing each other) serialise: the one that loses sees the
    /// other's result and checks again.
    async fn change_members<T, F>(&self, id: &str, change: F) -> Result<T, ApiError>
    where
        F: for<'a> Fn(
            &'a DatabaseTransaction,
            Vec<member::Model>,
        ) -> futures::future::BoxFuture<'a, Result<T, ApiError>>,
    {
        for _ in 0..ATTEMPTS {
            let attempt = async {
                let txn = self.0.db.begin().await.map_err(db_error)?;
                let row = project::Entity::find_by_id(id.to_owned())
                    .one(&txn)
                    .await
                    .map_err(db_error)?
                    .ok_or_else(|| not_found(id))?;
                let members = member::Entity::find()
                    .filter(member::Column::Project.eq(id.to_owned()))
                    .all(&txn)
                    .await
                    .map_err(db_error)?;
                let done = change(&txn, members).await?;
                if !bump(&txn, id, row.version).await? {
                    return Ok(MemberChange::Retry);
                }
                txn.commit().await.map_err(db_error)?;
                Ok(MemberChange::Done(done))
            };
            match attempt.await {
                Ok(MemberChange::Done(done)) => {
                    self.0.members_changed(id).await;
                    return Ok(done);
                }
                Ok(MemberChange::Retry) => {}
                Err(error) if lost_race(&error) => {}
                Err(error) => return Err(error),
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Err(ApiError::FailedPrecondition {
            message: format!("projects/{id} kept changing under this request: try again"),
        })
    }

    async fn create(&self, request: Request<CreateProjectRequest>) -> Result<Project, ApiError> {
        let caller = Principal::of(&request)?;
        self.0.check_permission(&request, "projects", "create").await?;
        let body = request.get_ref();
        let given = body.project.clone().unwrap_or_default();
        let mut violations = Vec::new();
        if !is_project_id(&body.project_id) {
            violations.push(FieldViolation::new(
                "project_id",
                format!(
                    "{:?} is not a project id: {PROJECT_ID_RULE}",
                    body.project_id.chars().take(64).collect::<String>()
                ),
            ));
        }
        check_text(&given.display_name, &given.description, &mut violations);
        let kind = kind_text(given.r#type());
        if kind.is_none() {
            violations.push(FieldViolation::new(
                "project.type",
                "is required: PROJECT_TYPE_ORG, PROJECT_TYPE_TEMPLATE_CATEGORY or PROJECT_TYPE_MODEL_GROUP",
            ));
        }
        let settings = check_settings("project.settings", given.settings.clone().unwrap_or_default())
            .map_err(|found| violations.extend(found))
            .ok();
        let quota = check_quota("project.quota", given.quota.clone().unwrap_or_default())
            .map_err(|found| violations.extend(found))
            .ok();
        let (Some(kind), Some(settings), Some(quota), true) = (kind, settings, quota, violations.is_empty()) else {
            return Err(ApiError::InvalidArgument(violations));
        };
        if !settings.cluster.is_empty() {
            self.0
                .check_cluster(&request, "project.settings.cluster", &settings.cluster)
                .await?;
        }
        let now = now_ms();
        let id = body.project_id.clone();
        let row = project::Model {
            id: id.clone(),
            display_name: if given.display_name.is_empty() {
                id.clone()
            } else {
                given.display_name
            },
            description: given.description,
            kind: kind.to_owned(),
            settings: json(&settings),
            quota: json(&quota),
            version: 1,
            created_ms: now,
            updated_ms: now,
            deleted_ms: None,
        };
        let txn = self.0.db.begin().await.map_err(db_error)?;
        if project::Entity::find_by_id(id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .is_some()
        {
            return Err(ApiError::AlreadyExists {
                kind: "project",
                name: format!("projects/{id}"),
            });
        }
        project::Entity::insert(row.clone().into_active_model())
            .exec(&txn)
            .await
            .map_err(|error| {
                if error.to_string().to_lowercase().contains("unique") || error.to_string().contains("Duplicate") {
                    ApiError::AlreadyExists {
                        kind: "project",
                        name: format!("projects/{id}"),
                    }
                } else {
                    db_error(error)
                }
            })?;
        member::Entity::insert(
            member::Model {
                project: id.clone(),
                member_id: format!("u-{}", caller.username),
                kind: "user".into(),
                subject: caller.username.clone(),
                role: "owner".into(),
                quota: "{}".into(),
                created_ms: now,
            }
            .into_active_model(),
        )
        .exec(&txn)
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        self.0.members_changed(&id).await;
        Ok(project_message(&row))
    }

    async fn get(&self, request: Request<GetProjectRequest>) -> Result<Project, ApiError> {
        let caller = Principal::of(&request)?;
        let id = project_id("name", &request.get_ref().name)?;
        let (row, _) = self.0.visible(&caller, &id).await?;
        Ok(project_message(&row))
    }

    async fn list(&self, request: Request<ListProjectsRequest>) -> Result<ListProjectsResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let after: Option<String> = decode_token(&request.page_token)?;
        let mut query = project::Entity::find().order_by_asc(project::Column::Id);
        let mut mine = !caller.is_admin();
        let mut deleted = false;
        for condition in parse_filter(&request.filter, &["type", "mine", "deleted"])? {
            let boolean = |value: &str| match value {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(ApiError::invalid(
                    "filter",
                    format!("{} accepts true or false, got {other:?}", condition.field),
                )),
            };
            match condition.field.as_str() {
                "type" => {
                    let kind = ProjectType::from_str_name(&format!("PROJECT_TYPE_{}", condition.value))
                        .and_then(kind_text)
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "filter",
                                format!(
                                    "type accepts ORG, TEMPLATE_CATEGORY or MODEL_GROUP, got {:?}",
                                    condition.value
                                ),
                            )
                        })?;
                    query = query.filter(project::Column::Kind.eq(kind));
                }
                "mine" => mine = boolean(&condition.value)? || !caller.is_admin(),
                _ => deleted = boolean(&condition.value)?,
            }
        }
        query = if deleted {
            query.filter(project::Column::DeletedMs.is_not_null())
        } else {
            query.filter(project::Column::DeletedMs.is_null())
        };
        if mine {
            let mut subjects = Condition::any().add(
                Condition::all()
                    .add(member::Column::Kind.eq("user"))
                    .add(member::Column::Subject.eq(caller.username.clone())),
            );
            if !caller.groups.is_empty() {
                subjects = subjects.add(
                    Condition::all()
                        .add(member::Column::Kind.eq("group"))
                        .add(member::Column::Subject.is_in(normal_groups(&caller.groups))),
                );
            }
            let memberships = Query::select()
                .column(member::Column::Project)
                .from(member::Entity)
                .cond_where(subjects)
                .to_owned();
            query = query.filter(project::Column::Id.in_subquery(memberships));
        }
        if let Some(after) = after {
            query = query.filter(project::Column::Id.gt(after));
        }
        let mut rows = query.limit(size + 1).all(&self.0.db).await.map_err(db_error)?;
        let next_page_token = finish_page(&mut rows, size, |row| row.id.clone());
        Ok(ListProjectsResponse {
            projects: rows.iter().map(project_message).collect(),
            next_page_token,
        })
    }

    async fn update(&self, request: Request<UpdateProjectRequest>) -> Result<Project, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.get_ref();
        let given = body
            .project
            .clone()
            .ok_or_else(|| ApiError::invalid("project", "is required"))?;
        let id = project_id("project.name", &given.name)?;
        let paths = body.update_mask.clone().map(|mask| mask.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(ApiError::invalid(
                "update_mask",
                "name the fields to change: display_name, description, settings (or settings.<field>), quota",
            ));
        }
        let row = self.0.owned(&caller, &id, "projects.update").await?;
        if !given.etag.is_empty() && given.etag != etag(row.version) {
            return Err(ApiError::Aborted {
                message: format!(
                    "projects/{id} changed since etag {} (now {}): read it again and reapply your change",
                    given.etag,
                    etag(row.version)
                ),
            });
        }
        let mut violations = Vec::new();
        let mut settings = settings_of(&row).message();
        let given_settings = given.settings.clone().unwrap_or_default();
        let mut display_name = row.display_name.clone();
        let mut description = row.description.clone();
        let mut quota = quota_of(&row.quota).message();
        for path in &paths {
            match path.as_str() {
                "display_name" => display_name = given.display_name.clone(),
                "description" => description = given.description.clone(),
                "settings" => settings = given_settings.clone(),
                "quota" => quota = given.quota.clone().unwrap_or_default(),
                other => match other.strip_prefix("settings.") {
                    Some(field) if set_setting(&mut settings, &given_settings, field) => {}
                    _ => violations.push(FieldViolation::new(
                        "update_mask",
                        format!(
                            "{other:?} cannot be changed; the mask accepts display_name, description, settings, settings.<field>, quota"
                        ),
                    )),
                },
            }
        }
        check_text(&display_name, &description, &mut violations);
        let settings = check_settings("project.settings", settings)
            .map_err(|found| violations.extend(found))
            .ok();
        let quota = check_quota("project.quota", quota)
            .map_err(|found| violations.extend(found))
            .ok();
        let (Some(settings), Some(quota), true) = (settings, quota, violations.is_empty()) else {
            return Err(ApiError::InvalidArgument(violations));
        };
        if !settings.cluster.is_empty() && settings.cluster != settings_of(&row).cluster {
            self.0
                .check_cluster(&request, "project.settings.cluster", &settings.cluster)
                .await?;
        }
        let now = now_ms();
        let updated = project::Entity::update_many()
            .col_expr(project::Column::DisplayName, Expr::value(display_name))
            .col_expr(project::Column::Description, Expr::value(description))
            .col_expr(project::Column::Settings, Expr::value(json(&settings)))
            .col_expr(project::Column::Quota, Expr::value(json(&quota)))
            .col_expr(project::Column::Version, Expr::value(row.version + 1))
            .col_expr(project::Column::UpdatedMs, Expr::value(now))
            .filter(project::Column::Id.eq(id.clone()))
            .filter(project::Column::Version.eq(row.version))
            .exec(&self.0.db)
            .await
            .map_err(db_error)?;
        if updated.rows_affected != 1 {
            return Err(ApiError::Aborted {
                message: format!("projects/{id} changed while this update was applied: read it again and retry"),
            });
        }
        // Settings and quotas are cached beside the members by the scheduler: the same event clears them.
        self.0.members_changed(&id).await;
        let row = project::Entity::find_by_id(id.clone())
            .one(&self.0.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| not_found(&id))?;
        Ok(project_message(&row))
    }

    async fn delete(&self, request: Request<DeleteProjectRequest>) -> Result<Project, ApiError> {
        let caller = Principal::of(&request)?;
        let id = project_id("name", &request.get_ref().name)?;
        let row = self.0.owned(&caller, &id, "projects.delete").await?;
        if id == PUBLIC {
            return Err(ApiError::FailedPrecondition {
                message: "projects/public is where every user starts and cannot be deleted".into(),
            });
        }
        let given = &request.get_ref().etag;
        if !given.is_empty() && *given != etag(row.version) {
            return Err(ApiError::Aborted {
                message: format!("projects/{id} changed since etag {given}: read it again"),
            });
        }
        let live = self.0.live_workloads(&request, &id).await?;
        if !live.is_empty() {
            return Err(ApiError::FailedPrecondition {
                message: format!(
                    "projects/{id} still has {} live workload(s): {}; stop or delete them first",
                    live.len(),
                    live.join(", ")
                ),
            });
        }
        let now = now_ms();
        // The deletion and its announcement commit together: workload services stop the project's work.
        let txn = self.0.db.begin().await.map_err(db_error)?;
        let deleted = project::Entity::update_many()
            .col_expr(project::Column::DeletedMs, Expr::value(now))
            .col_expr(project::Column::Version, Expr::value(row.version + 1))
            .col_expr(project::Column::UpdatedMs, Expr::value(now))
            .filter(project::Column::Id.eq(id.clone()))
            .filter(project::Column::Version.eq(row.version))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if deleted.rows_affected != 1 {
            return Err(ApiError::Aborted {
                message: format!("projects/{id} changed while it was being deleted: read it again"),
            });
        }
        let event = ProjectDeleted {
            project: format!("projects/{id}"),
            time: Some(timestamp(now)),
            purge_time: Some(timestamp(now.saturating_add(retention_ms()))),
        };
        cube_kit::outbox::enqueue(&txn, PROJECT_DELETED, &event)
            .await
            .map_err(outbox_error)?;
        txn.commit().await.map_err(db_error)?;
        self.0.outbox.notify_one();
        self.0.members_changed(&id).await;
        let mut row = row;
        row.deleted_ms = Some(now);
        row.version += 1;
        Ok(project_message(&row))
    }

    async fn undelete(&self, request: Request<UndeleteProjectRequest>) -> Result<Project, ApiError> {
        let caller = Principal::of(&request)?;
        let id = project_id("name", &request.get_ref().name)?;
        let row = project::Entity::find_by_id(id.clone())
            .one(&self.0.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| not_found(&id))?;
        let (role, _) = self.0.role(&id, &caller.username, &caller.groups).await?;
        if role == Role::Unspecified && !caller.is_admin() {
            return Err(not_found(&id));
        }
        if role != Role::Owner && !caller.is_admin() {
            return Err(ApiError::PermissionDenied {
                permission: format!("projects.undelete (owners of projects/{id} and admins)"),
            });
        }
        if row.deleted_ms.is_none() {
            return Err(ApiError::FailedPrecondition {
                message: format!("projects/{id} is not deleted"),
            });
        }
        let now = now_ms();
        let txn = self.0.db.begin().await.map_err(db_error)?;
        let restored = project::Entity::update_many()
            .col_expr(project::Column::DeletedMs, Expr::value(Option::<i64>::None))
            .col_expr(project::Column::Version, Expr::value(row.version + 1))
            .col_expr(project::Column::UpdatedMs, Expr::value(now))
            .filter(project::Column::Id.eq(id.clone()))
            .filter(project::Column::Version.eq(row.version))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if restored.rows_affected != 1 {
            return Err(ApiError::Aborted {
                message: format!("projects/{id} changed while it was being restored: read it again"),
            });
        }
        let event = ProjectUndeleted {
            project: format!("projects/{id}"),
            time: Some(timestamp(now)),
        };
        cube_kit::outbox::enqueue(&txn, PROJECT_UNDELETED, &event)
            .await
            .map_err(outbox_error)?;
        txn.commit().await.map_err(db_error)?;
        self.0.outbox.notify_one();
        self.0.members_changed(&id).await;
        let row = project::Entity::find_by_id(id.clone())
            .one(&self.0.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| not_found(&id))?;
        Ok(project_message(&row))
    }

    async fn create_member(&self, request: Request<CreateMemberRequest>) -> Result<Member, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.into_inner();
        let id = project_id("parent", &body.parent)?;
        self.0.owned(&caller, &id, "members.create").await?;
        let given = body.member.ok_or_else(|| ApiError::invalid("member", "is required"))?;
        let role = given.role();
        if role == Role::Unspecified {
            return Err(ApiError::invalid(
                "member.role",
                "is required: ROLE_OWNER, ROLE_DEVELOPER or ROLE_VIEWER",
            ));
        }
        let quota =
            check_quota("member.quota", given.quota.clone().unwrap_or_default()).map_err(ApiError::InvalidArgument)?;
        let (kind, subject, member_id) = match given.subject {
            Some(Subject::User(name)) => {
                let username = username_in("member.user", &name, &caller)?;
                ("user", username.clone(), format!("u-{username}"))
            }
            Some(Subject::Group(given)) => {
                let dn = group_dn("member.group", &given)?;
                let member_id = group_member_id(&dn);
                ("group", dn, member_id)
            }
            None => return Err(ApiError::invalid("member.user", "set exactly one of user and group")),
        };
        let row = member::Model {
            project: id.clone(),
            member_id: member_id.clone(),
            kind: kind.to_owned(),
            subject,
            role: role_text(role).to_owned(),
            quota: json(&quota),
            created_ms: now_ms(),
        };
        let inserted = row.clone();
        self.change_members(&id, move |txn, members| {
            let row = inserted.clone();
            Box::pin(async move {
                // The same group under an id of its old spelling (see `group_member_id`) is the same member.
                let existing = members.iter().find(|member| {
                    member.member_id == row.member_id
                        || (row.kind == "group"
                            && member.kind == "group"
                            && dn::normalize_lenient(&member.subject) == row.subject)
                });
                if let Some(existing) = existing {
                    return Err(ApiError::AlreadyExists {
                        kind: "member",
                        name: format!("projects/{}/members/{}", row.project, existing.member_id),
                    });
                }
                member::Entity::insert(row.into_active_model())
                    .exec(txn)
                    .await
                    .map_err(db_error)?;
                Ok(())
            })
        })
        .await?;
        Ok(member_message(&row))
    }

    async fn list_members(&self, request: Request<ListMembersRequest>) -> Result<ListMembersResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.into_inner();
        let id = project_id("parent", &body.parent)?;
        self.0.visible(&caller, &id).await?;
        let size = page_size(body.page_size)?;
        let after: Option<String> = decode_token(&body.page_token)?;
        let mut query = member::Entity::find()
            .filter(member::Column::Project.eq(id.clone()))
            .order_by_asc(member::Column::MemberId);
        if let Some(after) = after {
            query = query.filter(member::Column::MemberId.gt(after));
        }
        let mut rows = query.limit(size + 1).all(&self.0.db).await.map_err(db_error)?;
        let next_page_token = finish_page(&mut rows, size, |row| row.member_id.clone());
        Ok(ListMembersResponse {
            members: rows.iter().map(member_message).collect(),
            next_page_token,
        })
    }

    /// Splits `projects/{project}/members/{member}`.
    fn member_name(field: &str, name: &str) -> Result<(String, String), ApiError> {
        let malformed = || {
            ApiError::invalid(
                field,
                format!("expected projects/{{project}}/members/{{member}}, got {name:?}"),
            )
        };
        let (parent, member_id) = name.split_once("/members/").ok_or_else(malformed)?;
        let id = project_id(field, parent)?;
        let valid = member_id.len() <= 70
            && (member_id.starts_with("u-") || member_id.starts_with("g-"))
            && member_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(malformed());
        }
        Ok((id, member_id.to_owned()))
    }

    async fn update_member(&self, request: Request<UpdateMemberRequest>) -> Result<Member, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.into_inner();
        let given = body.member.ok_or_else(|| ApiError::invalid("member", "is required"))?;
        let (id, member_id) = Self::member_name("member.name", &given.name)?;
        self.0.owned(&caller, &id, "members.update").await?;
        let paths = body.update_mask.map(|mask| mask.paths).unwrap_or_default();
        if paths.is_empty() || paths.iter().any(|path| path != "role" && path != "quota") {
            return Err(ApiError::invalid(
                "update_mask",
                "name the fields to change: role, quota",
            ));
        }
        let new_role = paths.iter().any(|path| path == "role").then(|| given.role());
        if new_role == Some(Role::Unspecified) {
            return Err(ApiError::invalid(
                "member.role",
                "must be ROLE_OWNER, ROLE_DEVELOPER or ROLE_VIEWER",
            ));
        }
        let new_quota = if paths.iter().any(|path| path == "quota") {
            Some(check_quota("member.quota", given.quota.unwrap_or_default()).map_err(ApiError::InvalidArgument)?)
        } else {
            None
        };
        let project = id.clone();
        self.change_members(&id, move |txn, members| {
            let (project, member_id, new_quota) = (project.clone(), member_id.clone(), new_quota.clone());
            Box::pin(async move {
                let current = members
                    .iter()
                    .find(|member| member.member_id == member_id)
                    .cloned()
                    .ok_or_else(|| ApiError::NotFound {
                        kind: "member",
                        name: format!("projects/{project}/members/{member_id}"),
                    })?;
                if let Some(role) = new_role {
                    keeps_an_owner(&project, &members, &member_id, Some(role))?;
                }
                let mut active = current.into_active_model();
                if let Some(role) = new_role {
                    active.role = Set(role_text(role).to_owned());
                }
                if let Some(quota) = new_quota {
                    active.quota = Set(json(&quota));
                }
                sea_orm::ActiveModelTrait::update(active, txn).await.map_err(db_error)
            })
        })
        .await
        .map(|row| member_message(&row))
    }

    async fn delete_member(&self, request: Request<DeleteMemberRequest>) -> Result<(), ApiError> {
        let caller = Principal::of(&request)?;
        let (id, member_id) = Self::member_name("name", &request.get_ref().name)?;
        self.0.owned(&caller, &id, "members.delete").await?;
        let project = id.clone();
        self.change_members(&id, move |txn, members| {
            let (project, member_id) = (project.clone(), member_id.clone());
            Box::pin(async move {
                if !members.iter().any(|member| member.member_id == member_id) {
                    return Err(ApiError::NotFound {
                        kind: "member",
                        name: format!("projects/{project}/members/{member_id}"),
                    });
                }
                keeps_an_owner(&project, &members, &member_id, None)?;
                member::Entity::delete_by_id((project, member_id))
                    .exec(txn)
                    .await
                    .map_err(db_error)?;
                Ok(())
            })
        })
        .await
    }

    async fn membership(&self, request: Request<GetMembershipRequest>) -> Result<Membership, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.get_ref();
        let id = project_id("project", &body.project)?;
        let username = if body.user.is_empty() {
            caller.username.clone()
        } else {
            username_in("user", &body.user, &caller)?
        };
        let (role, granted) = if username == caller.username {
            // A deleted or missing project is NOT_FOUND for everyone (its members lose their access with it),
            // and a non-member learns nothing about the project, not even that it exists.
            if !self.0.snapshot(&id).await?.live {
                return Err(not_found(&id));
            }
            let (role, granted) = self.0.role(&id, &username, &caller.groups).await?;
            if role == Role::Unspecified && !caller.is_admin() {
                return Err(not_found(&id));
            }
            (role, granted)
        } else {
            // Owners and admins ask about others; other users' groups are not known here, so their direct
            // membership is what counts.
            let (_, caller_role) = self.0.visible(&caller, &id).await?;
            if caller_role != Role::Owner && !caller.is_admin() {
                return Err(ApiError::NotFound {
                    kind: "membership",
                    name: format!("projects/{id} of users/{username}"),
                });
            }
            self.0.role(&id, &username, &[]).await?
        };
        let quota = granted
            .iter()
            .find(|member| member.kind == "user")
            .map(|member| quota_of(&member.quota).message());
        Ok(Membership {
            project: format!("projects/{id}"),
            user: format!("users/{username}"),
            role: role as i32,
            granted_by: granted
                .iter()
                .map(|member| format!("projects/{id}/members/{}", member.member_id))
                .collect(),
            quota,
        })
    }

    async fn quota_usage(&self, request: Request<GetQuotaUsageRequest>) -> Result<QuotaUsage, ApiError> {
        let caller = Principal::of(&request)?;
        let id = project_id("name", &request.get_ref().name)?;
        let (row, _) = self.0.visible(&caller, &id).await?;
        // Usage is what the scheduler has admitted, asked of it with the caller's token.
        let mut ask = Request::new(cube_proto::cube::scheduler::v1::GetProjectUsageRequest {
            project: format!("projects/{id}"),
        });
        cube_kit::identity::forward_token(&request, &mut ask)?;
        let used = cube_proto::cube::scheduler::v1::admission_service_client::AdmissionServiceClient::new(
            self.0.scheduler.clone(),
        )
        .get_project_usage(ask)
        .await
        .map_err(|status| crate::core::upstream("scheduler", status))?
        .into_inner();
        Ok(QuotaUsage {
            project: format!("projects/{id}"),
            limit: Some(quota_of(&row.quota).message()),
            usage: Some(Quota {
                cpu: Some(used.cpu),
                memory_bytes: Some(used.memory_bytes),
                gpu: Some(used.gpu),
                gpu_by_type: used.gpu_by_type,
                notebooks: Some(used.notebooks),
                services: Some(used.services),
                runs: Some(used.runs),
            }),
        })
    }
}

/// Refuses a change that would leave `project` without an owner: `member_id` gets `role`, or is removed (None).
fn keeps_an_owner(
    project: &str,
    members: &[member::Model],
    member_id: &str,
    role: Option<Role>,
) -> Result<(), ApiError> {
    let owners_after = members
        .iter()
        .filter(|member| {
            let role_after = if member.member_id == member_id {
                role.unwrap_or(Role::Unspecified)
            } else {
                role_of(&member.role)
            };
            role_after == Role::Owner
        })
        .count();
    let had_owner = members.iter().any(|member| role_of(&member.role) == Role::Owner);
    if had_owner && owners_after == 0 {
        return Err(ApiError::FailedPrecondition {
            message: format!("projects/{project} would have no owner left: make someone else an owner first"),
        });
    }
    Ok(())
}

/// Applies `settings.<field>` of an update mask; false for an unknown field.
fn set_setting(settings: &mut Settings, given: &Settings, field: &str) -> bool {
    match field {
        "cluster" => settings.cluster = given.cluster.clone(),
        "resource_group" => settings.resource_group = given.resource_group.clone(),
        "node_selector" => settings.node_selector = given.node_selector.clone(),
        "volume_mounts" => settings.volume_mounts = given.volume_mounts.clone(),
        "service_external_ip" => settings.service_external_ip = given.service_external_ip.clone(),
        "pipeline_namespace" => settings.pipeline_namespace = given.pipeline_namespace.clone(),
        "notebook_namespace" => settings.notebook_namespace = given.notebook_namespace.clone(),
        "service_namespace" => settings.service_namespace = given.service_namespace.clone(),
        "display_order" => settings.display_order = given.display_order,
        _ => return false,
    }
    true
}

/// Creates `public` when it is missing.
pub(crate) async fn ensure_public(db: &impl ConnectionTrait) -> Result<(), ApiError> {
    if project::Entity::find_by_id(PUBLIC.to_owned())
        .one(db)
        .await
        .map_err(db_error)?
        .is_some()
    {
        return Ok(());
    }
    let now = now_ms();
    let inserted = project::Entity::insert(
        project::Model {
            id: PUBLIC.into(),
            display_name: "Public".into(),
            description: "Where every user starts.".into(),
            kind: "org".into(),
            settings: "{}".into(),
            quota: "{}".into(),
            version: 1,
            created_ms: now,
            updated_ms: now,
            deleted_ms: None,
        }
        .into_active_model(),
    )
    .exec(db)
    .await;
    match inserted {
        Ok(_) => Ok(()),
        // Another replica created it first.
        Err(_)
            if project::Entity::find_by_id(PUBLIC.to_owned())
                .one(db)
                .await
                .map_err(db_error)?
                .is_some() =>
        {
            Ok(())
        }
        Err(error) => Err(db_error(error)),
    }
}

/// Makes `username` a developer of `public`, unless they are a member already.
pub(crate) async fn join_public(core: &Core, username: &str) -> Result<(), ApiError> {
    let member_id = format!("u-{username}");
    let exists = member::Entity::find_by_id((PUBLIC.to_owned(), member_id.clone()))
        .one(&core.db)
        .await
        .map_err(db_error)?
        .is_some();
    if exists {
        return Ok(());
    }
    let inserted = member::Entity::insert(
        member::Model {
            project: PUBLIC.into(),
            member_id: member_id.clone(),
            kind: "user".into(),
            subject: username.to_owned(),
            role: "developer".into(),
            quota: "{}".into(),
            created_ms: now_ms(),
        }
        .into_active_model(),
    )
    .exec(&core.db)
    .await;
    if let Err(error) = inserted {
        // A redelivered event, or another replica, got there first: the member exists, which is the point.
        let exists = member::Entity::find_by_id((PUBLIC.to_owned(), member_id))
            .one(&core.db)
            .await
            .map_err(db_error)?
            .is_some();
        if !exists {
            return Err(db_error(error));
        }
    }
    core.members_changed(PUBLIC).await;
    Ok(())
}

/// Purges projects deleted more than 30 days ago, with their members.
pub(crate) async fn purge(core: &Core) -> Result<u64, ApiError> {
    let cutoff = now_ms().saturating_sub(retention_ms());
    let expired = project::Entity::find()
        .filter(project::Column::DeletedMs.lt(cutoff))
        .all(&core.db)
        .await
        .map_err(db_error)?;
    for row in &expired {
        let txn = core.db.begin().await.map_err(db_error)?;
        member::Entity::delete_many()
            .filter(member::Column::Project.eq(row.id.clone()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        project::Entity::delete_by_id(row.id.clone())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        core.forget(&row.id);
        tracing::info!(project = %row.id, "purged a project deleted 30 days ago");
    }
    Ok(expired.len() as u64)
}

#[tonic::async_trait]
impl ProjectService for Projects {
    async fn create_project(&self, request: Request<CreateProjectRequest>) -> Result<Response<Project>, Status> {
        self.create(request).await.map(Response::new).map_err(status)
    }

    async fn get_project(&self, request: Request<GetProjectRequest>) -> Result<Response<Project>, Status> {
        self.get(request).await.map(Response::new).map_err(status)
    }

    async fn list_projects(
        &self,
        request: Request<ListProjectsRequest>,
    ) -> Result<Response<ListProjectsResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }

    async fn update_project(&self, request: Request<UpdateProjectRequest>) -> Result<Response<Project>, Status> {
        self.update(request).await.map(Response::new).map_err(status)
    }

    async fn delete_project(&self, request: Request<DeleteProjectRequest>) -> Result<Response<Project>, Status> {
        self.delete(request).await.map(Response::new).map_err(status)
    }

    async fn undelete_project(&self, request: Request<UndeleteProjectRequest>) -> Result<Response<Project>, Status> {
        self.undelete(request).await.map(Response::new).map_err(status)
    }

    async fn create_member(&self, request: Request<CreateMemberRequest>) -> Result<Response<Member>, Status> {
        self.create_member(request).await.map(Response::new).map_err(status)
    }

    async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        self.list_members(request).await.map(Response::new).map_err(status)
    }

    async fn update_member(&self, request: Request<UpdateMemberRequest>) -> Result<Response<Member>, Status> {
        self.update_member(request).await.map(Response::new).map_err(status)
    }

    async fn delete_member(&self, request: Request<DeleteMemberRequest>) -> Result<Response<()>, Status> {
        self.delete_member(request).await.map(Response::new).map_err(status)
    }

    async fn get_membership(&self, request: Request<GetMembershipRequest>) -> Result<Response<Membership>, Status> {
        self.membership(request).await.map(Response::new).map_err(status)
    }

    async fn get_quota_usage(&self, request: Request<GetQuotaUsageRequest>) -> Result<Response<QuotaUsage>, Status> {
        self.quota_usage(request).await.map(Response::new).map_err(status)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use cube_kit::Channel;
    use sea_orm::{EntityTrait as _, IntoActiveModel as _};

    use super::*;

    fn project_deleted_at(id: &str, deleted_ms: Option<i64>) -> project::ActiveModel {
        project::Model {
            id: id.into(),
            display_name: id.into(),
            description: String::new(),
            kind: "org".into(),
            settings: "{}".into(),
            quota: "{}".into(),
            version: 1,
            created_ms: 0,
            updated_ms: 0,
            deleted_ms,
        }
        .into_active_model()
    }

    fn caller(username: &str, groups: &[&str]) -> Arc<Principal> {
        Arc::new(Principal {
            username: username.into(),
            roles: vec!["user".into()],
            groups: groups.iter().map(|group| (*group).to_owned()).collect(),
            credential: cube_kit::identity::Credential::AccessToken {
                id: "t".into(),
                session: "s".into(),
            },
            issued_at: 0,
            expires_at: None,
        })
    }

    fn request<T>(message: T, caller: &Arc<Principal>) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(Arc::clone(caller));
        request
    }

    /// Projects on an in-memory database migrated `up to` migrations (all when `None`), with peers never called.
    async fn projects_on(db: sea_orm::DatabaseConnection) -> Result<Projects, ApiError> {
        let unused = || Channel::remote("http://127.0.0.1:9").map_err(ApiError::internal);
        let bus = Arc::new(cube_bus::MemoryBus::new(cube_bus::BusOptions::default()));
        Ok(Projects(Arc::new(Core::new(
            db,
            unused()?,
            unused()?,
            Vec::new(),
            bus,
            Duration::ZERO,
        ))))
    }

    /// Inserts a live project owned by `owner`.
    async fn owned_project(projects: &Projects, id: &str, owner: &str) -> Result<(), ApiError> {
        project::Entity::insert(project_deleted_at(id, None))
            .exec(&projects.0.db)
            .await
            .map_err(db_error)?;
        member::Entity::insert(
            member::Model {
                project: id.into(),
                member_id: format!("u-{owner}"),
                kind: "user".into(),
                subject: owner.into(),
                role: "owner".into(),
                quota: "{}".into(),
                created_ms: 0,
            }
            .into_active_model(),
        )
        .exec(&projects.0.db)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn add_group(projects: &Projects, owner: &Arc<Principal>, id: &str, dn: &str) -> Result<Member, ApiError> {
        projects
            .create_member(request(
                CreateMemberRequest {
                    parent: format!("projects/{id}"),
                    member: Some(Member {
                        subject: Some(Subject::Group(dn.into())),
                        role: Role::Viewer as i32,
                        ..Member::default()
                    }),
                },
                owner,
            ))
            .await
    }

    /// What `caller` is shown of `id`: whether `GetProject` answers it, and whether `ListProjects` lists it.
    async fn sees(projects: &Projects, caller: &Arc<Principal>, id: &str) -> Result<(bool, bool), ApiError> {
        let got = match projects
            .get(request(
                GetProjectRequest {
                    name: format!("projects/{id}"),
                },
                caller,
            ))
            .await
        {
            Ok(_) => true,
            Err(ApiError::NotFound { .. }) => false,
            Err(error) => return Err(error),
        };
        let listed = projects
            .list(request(ListProjectsRequest::default(), caller))
            .await?
            .projects
            .iter()
            .any(|project| project.name == format!("projects/{id}"));
        Ok((got, listed))
    }

    #[tokio::test]
    async fn a_group_added_in_any_spelling_is_seen_by_tokens_in_any_spelling() -> Result<(), ApiError> {
        let db = cube_kit::db::connect::<crate::model::Migrator>("sqlite::memory:", true)
            .await
            .map_err(ApiError::internal)?;
        let projects = projects_on(db).await?;
        let owner = caller("olga", &[]);
        // (how the owner typed the group, how directories spell it in members' tokens, its normal form)
        let ops = "cn=ops,ou=teams,dc=example,dc=com";
        let smith = "cn=smith\\, john,ou=teams,dc=example,dc=com";
        let table: [(&str, &[&str], &str); 9] = [
            (
                ops,
                &[
                    "CN=Ops,OU=Teams,DC=Example,DC=Com",
                    "cn=ops, ou=teams, dc=example, dc=com",
                ],
                ops,
            ),
            (
                "CN=Ops,OU=Teams,DC=Example,DC=Com",
                &[ops, "cn=Ops,ou=Teams,dc=example,dc=com"],
                ops,
            ),
            (
                "cn=ops, ou=teams, dc=example, dc=com",
                &[ops, "CN=OPS,OU=TEAMS,DC=EXAMPLE,DC=COM"],
                ops,
            ),
            (" CN = Ops , OU = Teams , DC = example , DC = com ", &[ops], ops),
            (
                "cn=\\6Fps,ou=te\\61ms,dc=example,dc=com",
                &[ops, "CN=Ops,OU=Teams,DC=example,DC=com"],
                ops,
            ),
            ("commonName=Ops,2.5.4.11=Teams,dc=example,dc=com", &[ops], ops),
            (
                "CN=Smith\\, John,OU=Teams,DC=example,DC=com",
                &[smith, "cn=Smith\\2C John, ou=teams, dc=example, dc=com"],
                smith,
            ),
            (
                "cn=Smith\\2c John,ou=teams,dc=example,dc=com",
                &["CN=SMITH\\, JOHN,OU=TEAMS,DC=EXAMPLE,DC=COM"],
                smith,
            ),
            (
                "cn=ML  Team+uid=ml,ou=teams,dc=example,dc=com",
                &["UID=ml + CN=ml team,ou=teams,dc=example,dc=com"],
                "cn=ml team+uid=ml,ou=teams,dc=example,dc=com",
            ),
        ];
        for (index, (stored, tokens, normal)) in table.into_iter().enumerate() {
            let id = format!("dn-{index}");
            owned_project(&projects, &id, "olga").await?;
            let member = add_group(&projects, &owner, &id, stored).await?;
            assert_eq!(
                member.subject,
                Some(Subject::Group(normal.to_owned())),
                "{stored:?} is stored normalised"
            );
            for token in tokens.iter().chain([&stored, &normal]) {
                let alice = caller("alice", &["cn=other,ou=teams,dc=example,dc=com", token]);
                assert_eq!(
                    sees(&projects, &alice, &id).await?,
                    (true, true),
                    "added as {stored:?}, token {token:?}"
                );
            }
            // Neighbours and strangers see nothing: a different group, and no group.
            for (who, groups) in [
                ("neighbour", vec!["cn=ops,ou=team,dc=example,dc=com"]),
                ("stranger", Vec::new()),
            ] {
                let other = caller(who, &groups);
                assert_eq!(
                    sees(&projects, &other, &id).await?,
                    (false, false),
                    "{who}, added as {stored:?}"
                );
            }
            // Adding the group again in another spelling names the member that exists.
            let again = add_group(&projects, &owner, &id, &normal.to_uppercase()).await;
            assert!(
                matches!(&again, Err(ApiError::AlreadyExists { name, .. }) if *name == member.name),
                "{again:?}"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_group_dn_that_is_not_a_dn_is_refused_naming_the_field() -> Result<(), ApiError> {
        let db = cube_kit::db::connect::<crate::model::Migrator>("sqlite::memory:", true)
            .await
            .map_err(ApiError::internal)?;
        let projects = projects_on(db).await?;
        let owner = caller("olga", &[]);
        owned_project(&projects, "refuses", "olga").await?;
        let long = format!("cn={},dc=example", "x".repeat(250));
        for (dn, says) in [
            ("", "is empty"),
            ("ops", "is not TYPE=VALUE"),
            ("cn=ops,teams", "is not TYPE=VALUE"),
            ("cn=o\\ps", "bad escape"),
            ("cn=\"ops\"", "unescaped"),
            (long.as_str(), "at most 255 bytes"),
        ] {
            match add_group(&projects, &owner, "refuses", dn).await {
                Err(ApiError::InvalidArgument(violations)) => {
                    assert_eq!(violations.len(), 1, "{dn:?}: {violations:?}");
                    let text = format!("{violations:?}");
                    assert!(text.contains("member.group") && text.contains(says), "{dn:?}: {text}");
                }
                other => panic!("{dn:?}: expected INVALID_ARGUMENT, got {other:?}"),
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn group_dns_stored_before_normalisation_are_rewritten_and_keep_their_ids() -> Result<(), ApiError> {
        use sea_orm_migration::MigratorTrait as _;

        let db = cube_kit::db::connect::<crate::model::Migrator>("sqlite::memory:", false)
            .await
            .map_err(ApiError::internal)?;
        crate::model::Migrator::up(&db, Some(1)).await.map_err(db_error)?;
        let projects = projects_on(db).await?;
        owned_project(&projects, "legacy", "olga").await?;
        // As the service wrote them before: the DN as given, the id from its lowercase.
        let legacy = |dn: &str| {
            let digest = ring::digest::digest(&ring::digest::SHA256, dn.to_lowercase().as_bytes());
            let hex: String = digest.as_ref()[..8].iter().map(|byte| format!("{byte:02x}")).collect();
            member::Model {
                project: "legacy".into(),
                member_id: format!("g-{hex}"),
                kind: "group".into(),
                subject: dn.into(),
                role: "viewer".into(),
                quota: "{}".into(),
                created_ms: 0,
            }
        };
        let rows = [
            legacy("CN=Ops, OU=Teams,DC=example,DC=com"),
            legacy("cn=Smith\\2C John,ou=teams,dc=example,dc=com"),
            legacy("not a dn"),
        ];
        for row in &rows {
            member::Entity::insert(row.clone().into_active_model())
                .exec(&projects.0.db)
                .await
                .map_err(db_error)?;
        }
        let alice = caller("alice", &["cn=ops,ou=teams,dc=example,dc=com"]);
        assert_eq!(
            sees(&projects, &alice, "legacy").await?,
            (true, false),
            "before the migration ListProjects misses the group"
        );

        crate::model::Migrator::up(&projects.0.db, None)
            .await
            .map_err(db_error)?;
        let mut stored: Vec<(String, String)> = member::Entity::find()
            .filter(member::Column::Kind.eq("group"))
            .all(&projects.0.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|row| (row.member_id, row.subject))
            .collect();
        stored.sort();
        let mut expected = vec![
            (
                rows[0].member_id.clone(),
                "cn=ops,ou=teams,dc=example,dc=com".to_owned(),
            ),
            (
                rows[1].member_id.clone(),
                "cn=smith\\, john,ou=teams,dc=example,dc=com".to_owned(),
            ),
            (rows[2].member_id.clone(), "not a dn".to_owned()),
        ];
        expected.sort();
        assert_eq!(stored, expected);
        assert_eq!(sees(&projects, &alice, "legacy").await?, (true, true));
        let smith = caller("sam", &["CN=Smith\\, John,OU=Teams,DC=example,DC=com"]);
        assert_eq!(sees(&projects, &smith, "legacy").await?, (true, true));
        // The group under its legacy id is the member a new CreateMember of it finds.
        let again = add_group(
            &projects,
            &caller("olga", &[]),
            "legacy",
            "cn=ops,ou=teams,dc=example,dc=com",
        )
        .await;
        assert!(
            matches!(&again, Err(ApiError::AlreadyExists { name, .. }) if name.ends_with(&rows[0].member_id)),
            "{again:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn purge_removes_projects_deleted_more_than_30_days_ago_with_their_members() -> Result<(), ApiError> {
        let db = cube_kit::db::connect::<crate::model::Migrator>("sqlite::memory:", true)
            .await
            .map_err(ApiError::internal)?;
        let unused = || Channel::remote("http://127.0.0.1:9").map_err(ApiError::internal);
        let bus = Arc::new(cube_bus::MemoryBus::new(cube_bus::BusOptions::default()));
        let core = Core::new(db, unused()?, unused()?, Vec::new(), bus, Duration::ZERO);
        let day = 24 * 3600 * 1000;
        for (id, deleted) in [
            ("old", Some(now_ms() - 31 * day)),
            ("recent", Some(now_ms() - day)),
            ("live", None),
        ] {
            project::Entity::insert(project_deleted_at(id, deleted))
                .exec(&core.db)
                .await
                .map_err(db_error)?;
            member::Entity::insert(
                member::Model {
                    project: id.into(),
                    member_id: "u-someone".into(),
                    kind: "user".into(),
                    subject: "someone".into(),
                    role: "owner".into(),
                    quota: "{}".into(),
                    created_ms: 0,
                }
                .into_active_model(),
            )
            .exec(&core.db)
            .await
            .map_err(db_error)?;
        }
        assert_eq!(purge(&core).await?, 1);
        let mut left: Vec<String> = project::Entity::find()
            .all(&core.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|row| row.id)
            .collect();
        left.sort();
        assert_eq!(left, ["live", "recent"]);
        let members = member::Entity::find().all(&core.db).await.map_err(db_error)?;
        assert!(members.iter().all(|member| member.project != "old"), "{members:?}");
        assert_eq!(members.len(), 2);
        Ok(())
    }
}
