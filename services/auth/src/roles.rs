//! `cube.auth.v1.RoleService`: platform roles, their bindings, and permission checks for other services.

use std::collections::BTreeSet;
use std::sync::Arc;

use cube_kit::ApiError;
use cube_kit::identity::{ADMIN_ROLE, Permission, Principal};
use cube_kit::page::{decode_token, finish_page, page_size};
use cube_proto::cube::auth::v1::role_binding::Subject;
use cube_proto::cube::auth::v1::role_service_server::RoleService;
use cube_proto::cube::auth::v1::{
    CheckPermissionRequest, CheckPermissionResponse, CreateRoleBindingRequest, CreateRoleRequest,
    DeleteRoleBindingRequest, DeleteRoleRequest, GetRoleRequest, ListPermissionsRequest, ListPermissionsResponse,
    ListRoleBindingsRequest, ListRoleBindingsResponse, ListRolesRequest, ListRolesResponse, Role, RoleBinding,
    UpdateRoleRequest,
};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, ConnectionTrait, EntityTrait as _, IntoActiveModel as _,
    PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, TransactionTrait as _,
};
use tonic::{Request, Response, Status};

use crate::core::{
    Audit, Core, USER_ROLE, audit, db_error, invalid_id, may_access, parse_permissions, permissions_of, require_admin,
    status, store_permissions, timestamp, username_in, valid_id,
};
use crate::credentials;
use crate::model::{role, role_binding, user};

/// Serves `RoleService`.
#[derive(Clone)]
pub(crate) struct Roles(pub(crate) Arc<Core>);

fn role_message(row: &role::Model) -> Role {
    Role {
        name: format!("roles/{}", row.id),
        title: row.title.clone(),
        description: row.description.clone(),
        permissions: permissions_of(&row.permissions).into_iter().map(Into::into).collect(),
        builtin: row.builtin,
        create_time: Some(timestamp(row.created_ms)),
        update_time: Some(timestamp(row.updated_ms)),
    }
}

fn binding_message(row: &role_binding::Model) -> RoleBinding {
    RoleBinding {
        name: format!("roleBindings/{}", row.id),
        role: format!("roles/{}", row.role),
        subject: Some(if row.subject_kind == "user" {
            Subject::User(format!("users/{}", row.subject))
        } else {
            Subject::Group(row.subject.clone())
        }),
        create_time: Some(timestamp(row.created_ms)),
    }
}

fn role_id(field: &str, name: &str) -> Result<String, ApiError> {
    let id = name
        .strip_prefix("roles/")
        .ok_or_else(|| ApiError::invalid(field, format!("expected roles/{{role}}, got {name:?}")))?;
    if !valid_id(id) {
        return Err(invalid_id(field, "role id", id));
    }
    Ok(id.to_owned())
}

fn role_not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        kind: "role",
        name: format!("roles/{id}"),
    }
}

fn check_text(field: &str, text: &str, max: usize, violations: &mut Vec<cube_kit::FieldViolation>) {
    if text.chars().count() > max {
        violations.push(cube_kit::FieldViolation::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
}

/// Creates the built-in roles when they are missing.
pub(crate) async fn ensure_builtin_roles(db: &impl ConnectionTrait) -> Result<(), ApiError> {
    let now = cube_kit::time::now_ms();
    let builtins = [
        (
            ADMIN_ROLE,
            "Administrator",
            "Every permission on the platform.",
            vec![Permission::new("*", "*")],
        ),
        (
            USER_ROLE,
            "User",
            "What every user may do: create projects and list the ones they can see.",
            vec![
                Permission::new("projects", "create"),
                Permission::new("projects", "list"),
            ],
        ),
    ];
    for (id, title, description, permissions) in builtins {
        if role::Entity::find_by_id(id.to_owned())
            .one(db)
            .await
            .map_err(db_error)?
            .is_none()
        {
            role::Entity::insert(role::ActiveModel {
                id: Set(id.to_owned()),
                title: Set(title.to_owned()),
                description: Set(description.to_owned()),
                permissions: Set(store_permissions(&permissions)),
                builtin: Set(true),
                created_ms: Set(now),
                updated_ms: Set(now),
            })
            .exec(db)
            .await
            .map_err(db_error)?;
        }
    }
    Ok(())
}

/// Binds `role` to the user `username` (no audit: the caller records why).
pub(crate) async fn bind_user(
    db: &impl ConnectionTrait,
    role: &str,
    username: &str,
) -> Result<role_binding::Model, ApiError> {
    let row = role_binding::Model {
        id: credentials::random_hex::<8>()?,
        role: role.to_owned(),
        subject_kind: "user".into(),
        subject: username.to_owned(),
        created_ms: cube_kit::time::now_ms(),
    };
    role_binding::Entity::insert(row.clone().into_active_model())
        .exec(db)
        .await
        .map_err(db_error)?;
    Ok(row)
}

impl Roles {
    async fn create(&self, request: Request<CreateRoleRequest>) -> Result<Role, ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        require_admin(&caller, "roles.create")?;
        let client = core.client_address(&request);
        let CreateRoleRequest { role, role_id } = request.into_inner();
        let role = role.unwrap_or_default();
        let mut violations = Vec::new();
        if !valid_id(&role_id)
            && let ApiError::InvalidArgument(mut found) = invalid_id("role_id", "role id", &role_id)
        {
            violations.append(&mut found);
        }
        check_text("role.title", &role.title, 100, &mut violations);
        check_text("role.description", &role.description, 2000, &mut violations);
        let permissions = match parse_permissions("role.permissions", role.permissions) {
            Ok(permissions) => permissions,
            Err(ApiError::InvalidArgument(mut found)) => {
                violations.append(&mut found);
                Vec::new()
            }
            Err(other) => return Err(other),
        };
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        let now = cube_kit::time::now_ms();
        let row = role::Model {
            id: role_id.clone(),
            title: role.title,
            description: role.description,
            permissions: store_permissions(&permissions),
            builtin: false,
            created_ms: now,
            updated_ms: now,
        };
        let txn = core.db.begin().await.map_err(db_error)?;
        if role::Entity::find_by_id(role_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .is_some()
        {
            return Err(ApiError::AlreadyExists {
                kind: "role",
                name: format!("roles/{role_id}"),
            });
        }
        role::Entity::insert(row.clone().into_active_model())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "role.create",
                target: &format!("roles/{role_id}"),
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        Ok(role_message(&row))
    }

    async fn get(&self, request: Request<GetRoleRequest>) -> Result<Role, ApiError> {
        Principal::of(&request)?;
        let id = role_id("name", &request.get_ref().name)?;
        let row = role::Entity::find_by_id(id.clone())
            .one(&self.0.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| role_not_found(&id))?;
        Ok(role_message(&row))
    }

    async fn list(&self, request: Request<ListRolesRequest>) -> Result<ListRolesResponse, ApiError> {
        Principal::of(&request)?;
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let after: Option<String> = decode_token(&request.page_token)?;
        let mut query = role::Entity::find().order_by_asc(role::Column::Id);
        if let Some(after) = after {
            query = query.filter(role::Column::Id.gt(after));
        }
        let mut rows = query.limit(size + 1).all(&self.0.db).await.map_err(db_error)?;
        let next_page_token = finish_page(&mut rows, size, |row| row.id.clone());
        Ok(ListRolesResponse {
            roles: rows.iter().map(role_message).collect(),
            next_page_token,
        })
    }

    async fn update(&self, request: Request<UpdateRoleRequest>) -> Result<Role, ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        require_admin(&caller, "roles.update")?;
        let client = core.client_address(&request);
        let UpdateRoleRequest { role, update_mask } = request.into_inner();
        let role = role.ok_or_else(|| ApiError::invalid("role", "is required"))?;
        let id = role_id("role.name", &role.name)?;
        let paths = update_mask.map(|mask| mask.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(ApiError::invalid(
                "update_mask",
                "name the fields to change: title, description, permissions",
            ));
        }
        let mut violations = Vec::new();
        for path in &paths {
            if !["title", "description", "permissions"].contains(&path.as_str()) {
                violations.push(cube_kit::FieldViolation::new(
                    "update_mask",
                    format!("{path:?} cannot be changed; the mask accepts title, description, permissions"),
                ));
            }
        }
        check_text("role.title", &role.title, 100, &mut violations);
        check_text("role.description", &role.description, 2000, &mut violations);
        let permissions = match parse_permissions("role.permissions", role.permissions) {
            Ok(permissions) => permissions,
            Err(ApiError::InvalidArgument(mut found)) => {
                violations.append(&mut found);
                Vec::new()
            }
            Err(other) => return Err(other),
        };
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        let txn = core.db.begin().await.map_err(db_error)?;
        let row = role::Entity::find_by_id(id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| role_not_found(&id))?;
        if row.builtin {
            return Err(ApiError::FailedPrecondition {
                message: format!("roles/{id} is built in and cannot change"),
            });
        }
        let mut active = row.into_active_model();
        if paths.iter().any(|p| p == "title") {
            active.title = Set(role.title);
        }
        if paths.iter().any(|p| p == "description") {
            active.description = Set(role.description);
        }
        if paths.iter().any(|p| p == "permissions") {
            active.permissions = Set(store_permissions(&permissions));
        }
        active.updated_ms = Set(cube_kit::time::now_ms());
        let updated = active.update(&txn).await.map_err(db_error)?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "role.update",
                target: &format!("roles/{id}"),
                success: true,
                client,
                detail: &format!("changed {}", paths.join(", ")),
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        Ok(role_message(&updated))
    }

    async fn delete(&self, request: Request<DeleteRoleRequest>) -> Result<(), ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        require_admin(&caller, "roles.delete")?;
        let client = core.client_address(&request);
        let id = role_id("name", &request.get_ref().name)?;
        let txn = core.db.begin().await.map_err(db_error)?;
        let row = role::Entity::find_by_id(id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| role_not_found(&id))?;
        if row.builtin {
            return Err(ApiError::FailedPrecondition {
                message: format!("roles/{id} is built in and cannot be deleted"),
            });
        }
        role_binding::Entity::delete_many()
            .filter(role_binding::Column::Role.eq(id.clone()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        role::Entity::delete_by_id(id.clone())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "role.delete",
                target: &format!("roles/{id}"),
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        Ok(())
    }

    async fn create_binding(&self, request: Request<CreateRoleBindingRequest>) -> Result<RoleBinding, ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        require_admin(&caller, "roleBindings.create")?;
        let client = core.client_address(&request);
        let binding = request
            .into_inner()
            .role_binding
            .ok_or_else(|| ApiError::invalid("role_binding", "is required"))?;
        let id = role_id("role_binding.role", &binding.role)?;
        let (kind, subject) = match binding.subject {
            Some(Subject::User(name)) => ("user", username_in("role_binding.user", &name, &caller)?),
            Some(Subject::Group(dn)) => {
                let dn = dn.trim().to_owned();
                if dn.is_empty() || dn.len() > 255 || !dn.contains('=') {
                    return Err(ApiError::invalid(
                        "role_binding.group",
                        "must be an LDAP group DN like cn=ml-team,ou=groups,dc=example,dc=com (at most 255 bytes)",
                    ));
                }
                ("group", dn)
            }
            None => {
                return Err(ApiError::invalid(
                    "role_binding.user",
                    "set exactly one of user and group",
                ));
            }
        };
        let txn = core.db.begin().await.map_err(db_error)?;
        if role::Entity::find_by_id(id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .is_none()
        {
            return Err(role_not_found(&id));
        }
        if kind == "user"
            && user::Entity::find_by_id(subject.clone())
                .one(&txn)
                .await
                .map_err(db_error)?
                .is_none()
        {
            return Err(ApiError::NotFound {
                kind: "user",
                name: format!("users/{subject}"),
            });
        }
        let existing = role_binding::Entity::find()
            .filter(role_binding::Column::Role.eq(id.clone()))
            .filter(role_binding::Column::SubjectKind.eq(kind))
            .filter(role_binding::Column::Subject.eq(subject.clone()))
            .one(&txn)
            .await
            .map_err(db_error)?;
        if let Some(existing) = existing {
            return Err(ApiError::AlreadyExists {
                kind: "role binding",
                name: format!("roleBindings/{}", existing.id),
            });
        }
        let row = role_binding::Model {
            id: credentials::random_hex::<8>()?,
            role: id.clone(),
            subject_kind: kind.to_owned(),
            subject: subject.clone(),
            created_ms: cube_kit::time::now_ms(),
        };
        role_binding::Entity::insert(row.clone().into_active_model())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "role-binding.create",
                target: &format!("roleBindings/{}", row.id),
                success: true,
                client,
                detail: &format!("roles/{id} to {kind} {subject}"),
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        Ok(binding_message(&row))
    }

    async fn list_bindings(
        &self,
        request: Request<ListRoleBindingsRequest>,
    ) -> Result<ListRoleBindingsResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let after: Option<String> = decode_token(&request.page_token)?;
        let user = if request.user.is_empty() {
            None
        } else {
            let username = username_in("user", &request.user, &caller)?;
            may_access(&caller, &username)?;
            Some(username)
        };
        if !caller.is_admin() && user.is_none() {
            return Err(ApiError::PermissionDenied {
                permission: "roleBindings.list (non-admins list their own: set user to users/me)".into(),
            });
        }
        let mut query = role_binding::Entity::find().order_by_asc(role_binding::Column::Id);
        if let Some(user) = user {
            query = query
                .filter(role_binding::Column::SubjectKind.eq("user"))
                .filter(role_binding::Column::Subject.eq(user));
        }
        if !request.role.is_empty() {
            query = query.filter(role_binding::Column::Role.eq(role_id("role", &request.role)?));
        }
        if let Some(after) = after {
            query = query.filter(role_binding::Column::Id.gt(after));
        }
        let mut rows = query.limit(size + 1).all(&self.0.db).await.map_err(db_error)?;
        let next_page_token = finish_page(&mut rows, size, |row| row.id.clone());
        Ok(ListRoleBindingsResponse {
            role_bindings: rows.iter().map(binding_message).collect(),
            next_page_token,
        })
    }

    async fn delete_binding(&self, request: Request<DeleteRoleBindingRequest>) -> Result<(), ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        require_admin(&caller, "roleBindings.delete")?;
        let client = core.client_address(&request);
        let name = &request.get_ref().name;
        let id = name
            .strip_prefix("roleBindings/")
            .filter(|id| !id.is_empty() && id.len() <= 64)
            .ok_or_else(|| ApiError::invalid("name", format!("expected roleBindings/{{binding}}, got {name:?}")))?
            .to_owned();
        let txn = core.db.begin().await.map_err(db_error)?;
        let row = role_binding::Entity::find_by_id(id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::NotFound {
                kind: "role binding",
                name: format!("roleBindings/{id}"),
            })?;
        if row.role == ADMIN_ROLE && row.subject_kind == "user" {
            let admins = role_binding::Entity::find()
                .filter(role_binding::Column::Role.eq(ADMIN_ROLE))
                .filter(role_binding::Column::SubjectKind.eq("user"))
                .filter(role_binding::Column::Id.ne(id.clone()))
                .count(&txn)
                .await
                .map_err(db_error)?;
            if admins == 0 {
                return Err(ApiError::FailedPrecondition {
                    message: "this is the last admin binding to a user: bind admin to someone else first".into(),
                });
            }
        }
        role_binding::Entity::delete_by_id(id.clone())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        let mut revocations = Vec::new();
        if row.subject_kind == "user" {
            // The user's live access tokens still name the role: make them refresh.
            revocations.push(core.expire_access_tokens(&txn, &row.subject).await?);
        }
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "role-binding.delete",
                target: &format!("roleBindings/{id}"),
                success: true,
                client,
                detail: &format!("roles/{} from {} {}", row.role, row.subject_kind, row.subject),
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        core.committed(revocations);
        Ok(())
    }

    /// The permissions `user` (empty or `users/me`: the caller) holds, with the roles they come from, and
    /// whether the caller's token scopes apply.
    async fn grants(&self, caller: &Principal, user: &str) -> Result<(Vec<(String, Vec<Permission>)>, bool), ApiError> {
        let username = if user.is_empty() {
            caller.username.clone()
        } else {
            username_in("user", user, caller)?
        };
        if username == caller.username {
            return Ok((self.0.permissions_of_roles(&caller.roles).await?, true));
        }
        if !caller.is_admin() {
            return Err(ApiError::NotFound {
                kind: "user",
                name: format!("users/{username}"),
            });
        }
        let row = self.0.user(&username).await?.ok_or_else(|| ApiError::NotFound {
            kind: "user",
            name: format!("users/{username}"),
        })?;
        let roles = if row.active {
            self.0.roles_of(&self.0.db, &row).await?
        } else {
            Vec::new()
        };
        Ok((self.0.permissions_of_roles(&roles).await?, false))
    }

    async fn check(&self, request: Request<CheckPermissionRequest>) -> Result<CheckPermissionResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let request = request.into_inner();
        let wanted: Permission = request
            .permission
            .ok_or_else(|| ApiError::invalid("permission", "is required"))?
            .into();
        if wanted.resource_type.is_empty() || wanted.verb.is_empty() {
            return Err(ApiError::invalid(
                "permission",
                "resource_type and verb must both be set",
            ));
        }
        let (grants, scoped) = self.grants(&caller, &request.user).await?;
        let granted_by: Vec<String> = grants
            .iter()
            .filter(|(_, permissions)| permissions.iter().any(|permission| permission.covers(&wanted)))
            .map(|(role, _)| format!("roles/{role}"))
            .collect();
        let allowed = !granted_by.is_empty() && (!scoped || caller.scope_allows(&wanted));
        Ok(CheckPermissionResponse { allowed, granted_by })
    }

    async fn list_permissions(
        &self,
        request: Request<ListPermissionsRequest>,
    ) -> Result<ListPermissionsResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let (grants, scoped) = self.grants(&caller, &request.get_ref().user).await?;
        let mut permissions = BTreeSet::new();
        let mut roles = Vec::new();
        for (role, granted) in grants {
            roles.push(format!("roles/{role}"));
            for permission in granted {
                if !scoped || caller.scope_allows(&permission) {
                    permissions.insert(permission);
                } else {
                    // A wildcard permission narrowed by scopes: what the scopes allow of it.
                    permissions.extend(caller.scopes().iter().filter(|scope| permission.covers(scope)).cloned());
                }
            }
        }
        Ok(ListPermissionsResponse {
            permissions: permissions.into_iter().map(Into::into).collect(),
            roles,
        })
    }
}

#[tonic::async_trait]
impl RoleService for Roles {
    async fn create_role(&self, request: Request<CreateRoleRequest>) -> Result<Response<Role>, Status> {
        self.create(request).await.map(Response::new).map_err(status)
    }

    async fn get_role(&self, request: Request<GetRoleRequest>) -> Result<Response<Role>, Status> {
        self.get(request).await.map(Response::new).map_err(status)
    }

    async fn list_roles(&self, request: Request<ListRolesRequest>) -> Result<Response<ListRolesResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }

    async fn update_role(&self, request: Request<UpdateRoleRequest>) -> Result<Response<Role>, Status> {
        self.update(request).await.map(Response::new).map_err(status)
    }

    async fn delete_role(&self, request: Request<DeleteRoleRequest>) -> Result<Response<()>, Status> {
        self.delete(request).await.map(Response::new).map_err(status)
    }

    async fn create_role_binding(
        &self,
        request: Request<CreateRoleBindingRequest>,
    ) -> Result<Response<RoleBinding>, Status> {
        self.create_binding(request).await.map(Response::new).map_err(status)
    }

    async fn list_role_bindings(
        &self,
        request: Request<ListRoleBindingsRequest>,
    ) -> Result<Response<ListRoleBindingsResponse>, Status> {
        self.list_bindings(request).await.map(Response::new).map_err(status)
    }

    async fn delete_role_binding(&self, request: Request<DeleteRoleBindingRequest>) -> Result<Response<()>, Status> {
        self.delete_binding(request).await.map(Response::new).map_err(status)
    }

    async fn check_permission(
        &self,
        request: Request<CheckPermissionRequest>,
    ) -> Result<Response<CheckPermissionResponse>, Status> {
        self.check(request).await.map(Response::new).map_err(status)
    }

    async fn list_permissions(
        &self,
        request: Request<ListPermissionsRequest>,
    ) -> Result<Response<ListPermissionsResponse>, Status> {
        self.list_permissions(request).await.map(Response::new).map_err(status)
    }
}
