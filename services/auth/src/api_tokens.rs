//! `cube.auth.v1.ApiTokenService`: long-lived bearer tokens for SDKs and CI.

use std::sync::Arc;

use cube_kit::ApiError;
use cube_kit::identity::{Credential, Permission, Principal, Revocation, TOKEN_REVOKED};
use cube_kit::page::{decode_token, finish_page, page_size};
use cube_proto::cube::auth::v1::api_token_service_server::ApiTokenService;
use cube_proto::cube::auth::v1::{
    ApiToken, CreateApiTokenRequest, CreateApiTokenResponse, DeleteApiTokenRequest, ListApiTokensRequest,
    ListApiTokensResponse, RevokedKind, TokenRevoked,
};
use futures::future::BoxFuture;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, Condition, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _, TransactionTrait as _,
};
use tonic::{Request, Response, Status};

use crate::core::{
    Audit, Core, audit, db_error, enqueue, json_list, may_access, parse_permissions, permissions_of, require_scope,
    status, store_permissions, timestamp, timestamp_ms, username_in,
};
use crate::credentials;
use crate::model::{api_token, user};

/// Serves `ApiTokenService`.
#[derive(Clone)]
pub(crate) struct ApiTokens(pub(crate) Arc<Core>);

fn message(row: &api_token::Model) -> ApiToken {
    ApiToken {
        name: format!("users/{}/apiTokens/{}", row.username, row.id),
        display_name: row.display_name.clone(),
        prefix: format!("{}{}", cube_kit::identity::API_TOKEN_PREFIX, row.id),
        scopes: permissions_of(&row.scopes).into_iter().map(Into::into).collect(),
        expire_time: row.expire_ms.map(timestamp),
        create_time: Some(timestamp(row.created_ms)),
        revoke_time: row.revoked_ms.map(timestamp),
    }
}

impl ApiTokens {
    async fn create(&self, request: Request<CreateApiTokenRequest>) -> Result<CreateApiTokenResponse, ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        let client = core.client_address(&request);
        let CreateApiTokenRequest { parent, api_token } = request.into_inner();
        let username = username_in("parent", &parent, &caller)?;
        may_access(&caller, &username)?;
        if matches!(caller.credential, Credential::ServiceAccount { .. }) {
            return Err(ApiError::PermissionDenied {
                permission: "apiTokens.create (service accounts cannot create API tokens)".into(),
            });
        }
        if matches!(caller.credential, Credential::ApiToken { .. }) && !caller.is_admin() {
            return Err(ApiError::PermissionDenied {
                permission: "apiTokens.create (API tokens cannot create API tokens)".into(),
            });
        }
        let token = api_token.ok_or_else(|| ApiError::invalid("api_token", "is required"))?;
        let mut violations = Vec::new();
        let display_name = token.display_name.trim().to_owned();
        if display_name.is_empty() || display_name.chars().count() > 100 || display_name.chars().any(char::is_control) {
            violations.push(cube_kit::FieldViolation::new(
                "api_token.display_name",
                "must be 1 to 100 characters, without control characters",
            ));
        }
        let now = cube_kit::time::now_ms();
        let expire_ms = token.expire_time.as_ref().map(timestamp_ms);
        if token
            .expire_time
            .as_ref()
            .is_some_and(|time| !cube_kit::time::valid_timestamp(time))
        {
            violations.push(cube_kit::FieldViolation::new(
                "api_token.expire_time",
                "must be a time between the years 1 and 9999, with nanos in 0..1e9",
            ));
        } else if expire_ms.is_some_and(|expire| expire <= now) {
            violations.push(cube_kit::FieldViolation::new(
                "api_token.expire_time",
                "must be in the future",
            ));
        }
        let scopes = match parse_permissions("api_token.scopes", token.scopes) {
            Ok(scopes) => scopes,
            Err(ApiError::InvalidArgument(mut found)) => {
                violations.append(&mut found);
                Vec::new()
            }
            Err(other) => return Err(other),
        };
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        let id = credentials::random_hex::<8>()?;
        let secret = format!(
            "{}{id}_{}",
            cube_kit::identity::API_TOKEN_PREFIX,
            credentials::random_secret()?
        );
        let row = api_token::Model {
            id: id.clone(),
            username: username.clone(),
            display_name,
            secret_hash: credentials::digest(&secret),
            scopes: store_permissions(&scopes),
            expire_ms,
            created_ms: now,
            revoked_ms: None,
        };
        let txn = core.db.begin().await.map_err(db_error)?;
        if user::Entity::find_by_id(username.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .is_none()
        {
            return Err(ApiError::NotFound {
                kind: "user",
                name: format!("users/{username}"),
            });
        }
        api_token::Entity::insert(api_token::ActiveModel {
            id: Set(row.id.clone()),
            username: Set(row.username.clone()),
            display_name: Set(row.display_name.clone()),
            secret_hash: Set(row.secret_hash.clone()),
            scopes: Set(row.scopes.clone()),
            expire_ms: Set(row.expire_ms),
            created_ms: Set(row.created_ms),
            revoked_ms: Set(None),
        })
        .exec(&txn)
        .await
        .map_err(db_error)?;
        let name = format!("users/{username}/apiTokens/{id}");
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "api-token.create",
                target: &name,
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        Ok(CreateApiTokenResponse {
            api_token: Some(message(&row)),
            secret,
        })
    }

    async fn list(&self, request: Request<ListApiTokensRequest>) -> Result<ListApiTokensResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let request = request.into_inner();
        let username = username_in("parent", &request.parent, &caller)?;
        may_access(&caller, &username)?;
        require_scope(&caller, "apiTokens", "list")?;
        let size = page_size(request.page_size)?;
        let after: Option<(i64, String)> = decode_token(&request.page_token)?;
        let mut query = api_token::Entity::find()
            .filter(api_token::Column::Username.eq(username))
            .order_by_desc(api_token::Column::CreatedMs)
            .order_by_desc(api_token::Column::Id);
        if let Some((created_ms, id)) = after {
            query = query.filter(
                Condition::any().add(api_token::Column::CreatedMs.lt(created_ms)).add(
                    Condition::all()
                        .add(api_token::Column::CreatedMs.eq(created_ms))
                        .add(api_token::Column::Id.lt(id)),
                ),
            );
        }
        let mut rows = query.limit(size + 1).all(&self.0.db).await.map_err(db_error)?;
        let next_page_token = finish_page(&mut rows, size, |row| (row.created_ms, row.id.clone()));
        Ok(ListApiTokensResponse {
            api_tokens: rows.iter().map(message).collect(),
            next_page_token,
        })
    }

    async fn delete(&self, request: Request<DeleteApiTokenRequest>) -> Result<(), ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        let client = core.client_address(&request);
        let name = &request.get_ref().name;
        let malformed = || {
            ApiError::invalid(
                "name",
                format!("expected users/{{username}}/apiTokens/{{token}}, got {name:?}"),
            )
        };
        let (parent, id) = name.split_once("/apiTokens/").ok_or_else(malformed)?;
        let username = username_in("name", parent, &caller)?;
        may_access(&caller, &username)?;
        require_scope(&caller, "apiTokens", "delete")?;
        let not_found = || ApiError::NotFound {
            kind: "API token",
            name: format!("users/{username}/apiTokens/{id}"),
        };
        let txn = core.db.begin().await.map_err(db_error)?;
        let row = api_token::Entity::find_by_id(id.to_owned())
            .one(&txn)
            .await
            .map_err(db_error)?
            .filter(|row| row.username == username)
            .ok_or_else(not_found)?;
        if row.revoked_ms.is_some() {
            return Ok(());
        }
        let now = cube_kit::time::now_ms();
        api_token::Entity::update_many()
            .col_expr(api_token::Column::RevokedMs, Expr::value(now))
            .filter(api_token::Column::Id.eq(row.id.clone()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        let full_name = format!("users/{username}/apiTokens/{}", row.id);
        let event = TokenRevoked {
            kind: RevokedKind::ApiToken as i32,
            id: full_name.clone(),
            user: format!("users/{username}"),
            time: Some(timestamp(now)),
            expire_time: row.expire_ms.map(timestamp),
        };
        enqueue(&txn, TOKEN_REVOKED, &event).await?;
        // Verifiers ask auth again about an API token within seconds, so the revocation need not outlive a day
        // even for a token that never expires.
        let remember_until = (now + 24 * 3600 * 1000).min(row.expire_ms.unwrap_or(i64::MAX));
        let revocation = Revocation::ApiToken {
            name: full_name.clone(),
            expires_at: remember_until.div_euclid(1000),
        };
        crate::revocations::record(&txn, std::slice::from_ref(&revocation)).await?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "api-token.revoke",
                target: &full_name,
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        core.committed(vec![revocation]);
        Ok(())
    }
}

/// Checks an API token against the database: the auth service's own answer to "who holds this token".
pub(crate) fn introspect<'a>(core: &'a Core, token: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>> {
    Box::pin(async move {
        let refused = || ApiError::Unauthenticated {
            message: "the API token is invalid, expired or revoked".into(),
        };
        let id = credentials::api_token_id(token).ok_or_else(refused)?;
        let Some(row) = api_token::Entity::find_by_id(id.to_owned())
            .one(&core.db)
            .await
            .map_err(db_error)?
        else {
            // Service accounts' tokens have the same form.
            return crate::service_accounts::introspect(core, token)
                .await?
                .ok_or_else(refused);
        };
        let now = cube_kit::time::now_ms();
        let live = row.revoked_ms.is_none() && row.expire_ms.is_none_or(|expire| expire > now);
        if !credentials::same_digest(&credentials::digest(token), &row.secret_hash) || !live {
            return Err(refused());
        }
        let owner = core
            .user(&row.username)
            .await?
            .filter(|owner| owner.active)
            .ok_or_else(refused)?;
        let roles = core.roles_of(&core.db, &owner).await?;
        let scopes: Vec<Permission> = permissions_of(&row.scopes);
        Ok(Principal {
            username: owner.username,
            roles,
            groups: json_list(&owner.groups),
            credential: Credential::ApiToken {
                name: format!("users/{}/apiTokens/{}", row.username, row.id),
                scopes,
            },
            issued_at: now.div_euclid(1000),
            expires_at: row.expire_ms.map(|ms| ms.div_euclid(1000)),
        })
    })
}

#[tonic::async_trait]
impl ApiTokenService for ApiTokens {
    async fn create_api_token(
        &self,
        request: Request<CreateApiTokenRequest>,
    ) -> Result<Response<CreateApiTokenResponse>, Status> {
        self.create(request).await.map(Response::new).map_err(status)
    }

    async fn list_api_tokens(
        &self,
        request: Request<ListApiTokensRequest>,
    ) -> Result<Response<ListApiTokensResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }

    async fn delete_api_token(&self, request: Request<DeleteApiTokenRequest>) -> Result<Response<()>, Status> {
        self.delete(request).await.map(Response::new).map_err(status)
    }
}
