//! `cube.auth.v1.UserService`: accounts and passwords.

use std::sync::Arc;

use cube_kit::identity::{Credential, Principal};
use cube_kit::page::{decode_token, finish_page, page_size, parse_filter};
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::auth::v1::user_service_server::UserService;
use cube_proto::cube::auth::v1::{
    ChangePasswordRequest, ChangePasswordResponse, CreateUserRequest, DeleteUserRequest, GetUserRequest,
    ListUsersRequest, ListUsersResponse, UpdateUserRequest, User, UserCreated, UserSource,
};
use sea_orm::sea_query::LikeExpr;
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, EntityTrait as _, IntoActiveModel as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, TransactionTrait as _,
};
use tonic::{Request, Response, Status};

use crate::core::{
    Audit, Core, MIN_NEW_PASSWORD_BYTES, audit, canonical_username, check_password, db_error, enqueue, may_access,
    require_admin, require_scope, status, timestamp, user_message, username_in,
};
use crate::credentials;
use crate::login::USER_CREATED;
use crate::model::{api_token, refresh_token, role_binding, session, user};

/// Serves `UserService`.
#[derive(Clone)]
pub(crate) struct Users(pub(crate) Arc<Core>);

fn not_found(username: &str) -> ApiError {
    ApiError::NotFound {
        kind: "user",
        name: format!("users/{username}"),
    }
}

/// Checks an email address (optional: empty is none) and a display name.
fn check_profile(prefix: &str, email: &str, display_name: &str, violations: &mut Vec<FieldViolation>) {
    let at = email.find('@');
    let email_ok = email.is_empty()
        || email.len() <= 254
            && at.is_some_and(|at| at > 0 && at + 1 < email.len())
            && !email.chars().any(char::is_whitespace);
    if !email_ok {
        violations.push(FieldViolation::new(
            format!("{prefix}email"),
            "must be empty or an email address like name@example.com (at most 254 characters)",
        ));
    }
    if display_name.chars().count() > 200 || display_name.chars().any(char::is_control) {
        violations.push(FieldViolation::new(
            format!("{prefix}display_name"),
            "must be at most 200 characters, without control characters",
        ));
    }
}

impl Users {
    async fn create(&self, request: Request<CreateUserRequest>) -> Result<User, ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        require_admin(&caller, "users.create")?;
        let client = core.client_address(&request);
        let CreateUserRequest {
            user,
            user_id,
            password,
        } = request.into_inner();
        let user = user.unwrap_or_default();
        let mut violations = Vec::new();
        let user_id = match canonical_username("user_id", &user_id) {
            Ok(user_id) => user_id,
            Err(ApiError::InvalidArgument(mut found)) => {
                violations.append(&mut found);
                String::new()
            }
            Err(error) => return Err(error),
        };
        if user_id == "me" {
            violations.push(FieldViolation::new("user_id", "`me` is reserved"));
        }
        check_profile("user.", &user.email, &user.display_name, &mut violations);
        if let Err(ApiError::InvalidArgument(mut found)) = check_password("password", &password, MIN_NEW_PASSWORD_BYTES)
        {
            violations.append(&mut found);
        }
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        let hash = credentials::hash_password(password).await?;
        let now = cube_kit::time::now_ms();
        let txn = core.db.begin().await.map_err(db_error)?;
        if user::Entity::find_by_id(user_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .is_some()
        {
            return Err(ApiError::AlreadyExists {
                kind: "user",
                name: format!("users/{user_id}"),
            });
        }
        let row = user::Model {
            username: user_id.clone(),
            email: user.email,
            display_name: if user.display_name.is_empty() {
                user_id.clone()
            } else {
                user.display_name
            },
            active: true,
            source: "local".into(),
            password_hash: Some(hash),
            groups: "[]".into(),
            created_ms: now,
            updated_ms: now,
            last_login_ms: None,
        };
        user::Entity::insert(row.clone().into_active_model())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        let event = UserCreated {
            user: format!("users/{user_id}"),
            source: UserSource::Local as i32,
            time: Some(timestamp(now)),
        };
        enqueue(&txn, USER_CREATED, &event).await?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "user.create",
                target: &format!("users/{user_id}"),
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        core.committed(Vec::new());
        if core.directory.is_some() {
            tracing::info!(
                user = %user_id,
                "created a local account while LDAP login is on: it shadows any directory user of the same name"
            );
        }
        Ok(user_message(&row))
    }

    async fn get(&self, request: Request<GetUserRequest>) -> Result<User, ApiError> {
        let caller = Principal::of(&request)?;
        let username = username_in("name", &request.get_ref().name, &caller)?;
        may_access(&caller, &username)?;
        require_scope(&caller, "users", "get")?;
        let row = self.0.user(&username).await?.ok_or_else(|| not_found(&username))?;
        Ok(user_message(&row))
    }

    async fn list(&self, request: Request<ListUsersRequest>) -> Result<ListUsersResponse, ApiError> {
        let caller = Principal::of(&request)?;
        require_admin(&caller, "users.list")?;
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let after: Option<String> = decode_token(&request.page_token)?;
        let mut query = user::Entity::find().order_by_asc(user::Column::Username);
        for condition in parse_filter(&request.filter, &["active", "source", "email", "username_prefix"])? {
            let bad = |accepted: &str| {
                ApiError::invalid(
                    "filter",
                    format!("{} accepts {accepted}, got {:?}", condition.field, condition.value),
                )
            };
            query = match condition.field.as_str() {
                "active" => match condition.value.as_str() {
                    "true" => query.filter(user::Column::Active.eq(true)),
                    "false" => query.filter(user::Column::Active.eq(false)),
                    _ => return Err(bad("true or false")),
                },
                "source" => match condition.value.as_str() {
                    "local" | "ldap" => query.filter(user::Column::Source.eq(condition.value.clone())),
                    _ => return Err(bad("local or ldap")),
                },
                "email" => query.filter(user::Column::Email.eq(condition.value.clone())),
                _ => {
                    // Usernames hold only these characters, of which `_` is a LIKE wildcard: it is escaped with
                    // `!`, which usernames never hold.
                    let prefix_ok = condition
                        .value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                    if !prefix_ok {
                        return Err(bad("letters, digits, '.', '_' and '-'"));
                    }
                    let pattern = format!("{}%", condition.value.to_ascii_lowercase().replace('_', "!_"));
                    query.filter(user::Column::Username.like(LikeExpr::new(pattern).escape('!')))
                }
            };
        }
        if let Some(after) = after {
            query = query.filter(user::Column::Username.gt(after));
        }
        let mut rows = query.limit(size + 1).all(&self.0.db).await.map_err(db_error)?;
        let next_page_token = finish_page(&mut rows, size, |row| row.username.clone());
        Ok(ListUsersResponse {
            users: rows.iter().map(user_message).collect(),
            next_page_token,
        })
    }

    async fn update(&self, request: Request<UpdateUserRequest>) -> Result<User, ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        let client = core.client_address(&request);
        let UpdateUserRequest { user, update_mask } = request.into_inner();
        let user = user.ok_or_else(|| ApiError::invalid("user", "is required"))?;
        let username = username_in("user.name", &user.name, &caller)?;
        may_access(&caller, &username)?;
        require_scope(&caller, "users", "update")?;
        let paths = update_mask.map(|mask| mask.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(ApiError::invalid(
                "update_mask",
                "name the fields to change: email, display_name, active",
            ));
        }
        let mut violations = Vec::new();
        for path in &paths {
            match path.as_str() {
                "email" | "display_name" => {}
                "active" if caller.is_admin() => {}
                "active" => {
                    return Err(ApiError::PermissionDenied {
                        permission: "users.update.active".into(),
                    });
                }
                other => violations.push(FieldViolation::new(
                    "update_mask",
                    format!("{other:?} cannot be changed; the mask accepts email, display_name, active"),
                )),
            }
        }
        let txn = core.db.begin().await.map_err(db_error)?;
        let row = user::Entity::find_by_id(username.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| not_found(&username))?;
        let email = if paths.iter().any(|p| p == "email") {
            user.email.clone()
        } else {
            row.email.clone()
        };
        let display_name = if paths.iter().any(|p| p == "display_name") {
            user.display_name.clone()
        } else {
            row.display_name.clone()
        };
        if paths.iter().any(|p| p == "email" || p == "display_name") {
            check_profile("user.", &email, &display_name, &mut violations);
        }
        let deactivating = paths.iter().any(|p| p == "active") && !user.active && row.active;
        if deactivating && username == caller.username {
            violations.push(FieldViolation::new(
                "user.active",
                "admins cannot deactivate themselves",
            ));
        }
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        let mut active = row.clone().into_active_model();
        active.email = Set(email);
        active.display_name = Set(display_name);
        if paths.iter().any(|p| p == "active") {
            active.active = Set(user.active);
        }
        active.updated_ms = Set(cube_kit::time::now_ms());
        let updated = active.update(&txn).await.map_err(db_error)?;
        let mut revocations = Vec::new();
        if deactivating {
            let sessions = session::Entity::find()
                .filter(session::Column::Username.eq(username.clone()))
                .all(&txn)
                .await
                .map_err(db_error)?;
            revocations = core.revoke_sessions(&txn, &sessions).await?;
            revocations.push(core.deactivate(&txn, &username, false).await?);
        }
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "user.update",
                target: &format!("users/{username}"),
                success: true,
                client,
                detail: &format!("changed {}", paths.join(", ")),
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        core.profiles.forget(&username);
        core.committed(revocations);
        Ok(user_message(&updated))
    }

    async fn delete(&self, request: Request<DeleteUserRequest>) -> Result<(), ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        require_admin(&caller, "users.delete")?;
        let client = core.client_address(&request);
        let username = username_in("name", &request.get_ref().name, &caller)?;
        if username == caller.username {
            return Err(ApiError::FailedPrecondition {
                message: "admins cannot delete themselves".into(),
            });
        }
        let txn = core.db.begin().await.map_err(db_error)?;
        if user::Entity::find_by_id(username.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .is_none()
        {
            return Err(not_found(&username));
        }
        let sessions = session::Entity::find()
            .filter(session::Column::Username.eq(username.clone()))
            .all(&txn)
            .await
            .map_err(db_error)?;
        let ids: Vec<String> = sessions.iter().map(|row| row.id.clone()).collect();
        refresh_token::Entity::delete_many()
            .filter(refresh_token::Column::SessionId.is_in(ids))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        session::Entity::delete_many()
            .filter(session::Column::Username.eq(username.clone()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        api_token::Entity::delete_many()
            .filter(api_token::Column::Username.eq(username.clone()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        role_binding::Entity::delete_many()
            .filter(role_binding::Column::SubjectKind.eq("user"))
            .filter(role_binding::Column::Subject.eq(username.clone()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        user::Entity::delete_by_id(username.clone())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        let revocation = core.deactivate(&txn, &username, true).await?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "user.delete",
                target: &format!("users/{username}"),
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        core.profiles.forget(&username);
        core.committed(vec![revocation]);
        Ok(())
    }

    async fn change_password(&self, request: Request<ChangePasswordRequest>) -> Result<(), ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        let client = core.client_address(&request);
        let ChangePasswordRequest {
            name,
            current_password,
            new_password,
        } = request.into_inner();
        let username = username_in("name", &name, &caller)?;
        may_access(&caller, &username)?;
        require_scope(&caller, "users", "update")?;
        let own = username == caller.username;
        check_password("new_password", &new_password, MIN_NEW_PASSWORD_BYTES)?;
        if own {
            check_password("current_password", &current_password, 1)?;
        }
        let row = core.user(&username).await?.ok_or_else(|| not_found(&username))?;
        if row.source != "local" {
            return Err(ApiError::FailedPrecondition {
                message: format!("users/{username} logs in through LDAP: change the password in the directory"),
            });
        }
        if own {
            if let Err(crate::throttle::ThrottleError::Limited { retry_after }) =
                core.throttle.check(&username, client).await
            {
                return Err(ApiError::TooManyAttempts {
                    subject: format!("user {username}"),
                    retry_after,
                });
            }
            if !credentials::verify_password(current_password, row.password_hash.clone()).await? {
                if let Err(error) = core.throttle.record_failure(&username, client).await {
                    tracing::warn!(%error, "recording a failed password check");
                }
                audit(
                    &core.db,
                    Audit {
                        actor: &caller.actor(),
                        action: "password.change",
                        target: &format!("users/{username}"),
                        success: false,
                        client,
                        detail: "wrong current password",
                    },
                )
                .await?;
                return Err(ApiError::invalid("current_password", "is not the current password"));
            }
        }
        let hash = credentials::hash_password(new_password).await?;
        let txn = core.db.begin().await.map_err(db_error)?;
        let mut active = row.into_active_model();
        active.password_hash = Set(Some(hash));
        active.updated_ms = Set(cube_kit::time::now_ms());
        active.update(&txn).await.map_err(db_error)?;
        let keep = match &caller.credential {
            Credential::AccessToken { session, .. } if own => Some(session.clone()),
            _ => None,
        };
        let sessions: Vec<session::Model> = session::Entity::find()
            .filter(session::Column::Username.eq(username.clone()))
            .all(&txn)
            .await
            .map_err(db_error)?
            .into_iter()
            .filter(|row| Some(&row.id) != keep.as_ref())
            .collect();
        let revocations = core.revoke_sessions(&txn, &sessions).await?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "password.change",
                target: &format!("users/{username}"),
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        core.committed(revocations);
        Ok(())
    }
}

#[tonic::async_trait]
impl UserService for Users {
    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        self.create(request).await.map(Response::new).map_err(status)
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        self.get(request).await.map(Response::new).map_err(status)
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Result<Response<User>, Status> {
        self.update(request).await.map(Response::new).map_err(status)
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Result<Response<()>, Status> {
        self.delete(request).await.map(Response::new).map_err(status)
    }

    async fn change_password(
        &self,
        request: Request<ChangePasswordRequest>,
    ) -> Result<Response<ChangePasswordResponse>, Status> {
        self.change_password(request)
            .await
            .map(|()| Response::new(ChangePasswordResponse {}))
            .map_err(status)
    }
}
