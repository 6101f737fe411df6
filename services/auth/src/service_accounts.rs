//! `cube.auth.v1.ServiceAccountService`: the identities Cube's services act as when no user is calling, and the
//! checks of their tokens, alone and acting for a user.

use std::sync::Arc;

use cube_kit::identity::{Credential, ON_BEHALF_OF, Principal, Revocation, TOKEN_REVOKED};
use cube_kit::page::{decode_token, finish_page, page_size};
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::auth::v1::service_account_service_server::ServiceAccountService;
use cube_proto::cube::auth::v1::{
    CreateServiceAccountRequest, CreateServiceAccountResponse, DeleteServiceAccountRequest, GetServiceAccountRequest,
    ListServiceAccountsRequest, ListServiceAccountsResponse, RevokedKind, ServiceAccount, TokenRevoked,
};
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _, TransactionTrait as _,
};
use tonic::{Request, Response, Status};

use crate::core::{Audit, Core, audit, db_error, enqueue, json_list, status, timestamp};
use crate::credentials;
use crate::model::service_account;

/// Serves `ServiceAccountService`.
#[derive(Clone)]
pub(crate) struct ServiceAccounts(pub(crate) Arc<Core>);

/// The resource name of service account `id`.
fn name_of(id: &str) -> String {
    format!("serviceAccounts/{id}")
}

/// The name revocations give the token of `row`.
fn token_name(row: &service_account::Model) -> String {
    format!("serviceAccounts/{}/tokens/{}", row.id, row.token_id)
}

fn message(row: &service_account::Model) -> ServiceAccount {
    ServiceAccount {
        name: name_of(&row.id),
        display_name: row.display_name.clone(),
        prefix: format!("{}{}", cube_kit::identity::API_TOKEN_PREFIX, row.token_id),
        create_time: Some(timestamp(row.created_ms)),
    }
}

/// Whether `id` may name a service account: 2 to 40 lowercase letters, digits and dashes, starting with a letter
/// and not ending with a dash.
fn valid_id(id: &str) -> bool {
    (2..=40).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && !id.ends_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The id in `name` (`serviceAccounts/{id}`), named as field `field` when malformed.
fn id_in<'a>(field: &str, name: &'a str) -> Result<&'a str, ApiError> {
    name.strip_prefix("serviceAccounts/")
        .filter(|id| valid_id(id))
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("expected serviceAccounts/{{service_account}}, got {name:?}"),
            )
        })
}

/// Refuses anyone but an admin.
fn admin_only(caller: &Principal, verb: &str) -> Result<(), ApiError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied {
            permission: format!("serviceAccounts.{verb} (admins only)"),
        })
    }
}

/// Makes service account `id` with a new token, in `db`'s transaction; returns the row and the token.
///
/// # Errors
/// `ALREADY_EXISTS` when the account exists.
pub(crate) async fn create_account(
    db: &impl ConnectionTrait,
    id: &str,
    display_name: &str,
) -> Result<(service_account::Model, String), ApiError> {
    if service_account::Entity::find_by_id(id.to_owned())
        .one(db)
        .await
        .map_err(db_error)?
        .is_some()
    {
        return Err(ApiError::AlreadyExists {
            kind: "service account",
            name: name_of(id),
        });
    }
    let token_id = credentials::random_hex::<8>()?;
    let token = format!(
        "{}{token_id}_{}",
        cube_kit::identity::API_TOKEN_PREFIX,
        credentials::random_secret()?
    );
    let row = service_account::Model {
        id: id.to_owned(),
        display_name: display_name.to_owned(),
        token_id,
        token_hash: credentials::digest(&token),
        created_ms: cube_kit::time::now_ms(),
    };
    service_account::Entity::insert(service_account::ActiveModel {
        id: Set(row.id.clone()),
        display_name: Set(row.display_name.clone()),
        token_id: Set(row.token_id.clone()),
        token_hash: Set(row.token_hash.clone()),
        created_ms: Set(row.created_ms),
    })
    .exec(db)
    .await
    .map_err(db_error)?;
    Ok((row, token))
}

/// Makes service account `id` anew, its earlier token (if any) no longer valid, in one transaction; returns the
/// new token.
///
/// # Errors
/// Returns why it could not be stored.
pub(crate) async fn renew_account(db: &DatabaseConnection, id: &str) -> Result<String, ApiError> {
    let txn = db.begin().await.map_err(db_error)?;
    service_account::Entity::delete_by_id(id.to_owned())
        .exec(&txn)
        .await
        .map_err(db_error)?;
    let (_, token) = create_account(&txn, id, id).await?;
    txn.commit().await.map_err(db_error)?;
    Ok(token)
}

impl ServiceAccounts {
    async fn create(
        &self,
        request: Request<CreateServiceAccountRequest>,
    ) -> Result<CreateServiceAccountResponse, ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        let client = core.client_address(&request);
        admin_only(&caller, "create")?;
        let CreateServiceAccountRequest {
            service_account_id,
            service_account,
        } = request.into_inner();
        let mut violations = Vec::new();
        if !valid_id(&service_account_id) {
            violations.push(FieldViolation::new(
                "service_account_id",
                "must be 2 to 40 lowercase letters, digits and dashes, starting with a letter and not ending with a dash",
            ));
        }
        let display_name = service_account
            .map(|account| account.display_name.trim().to_owned())
            .unwrap_or_default();
        if display_name.chars().count() > 100 || display_name.chars().any(char::is_control) {
            violations.push(FieldViolation::new(
                "service_account.display_name",
                "must be at most 100 characters, without control characters",
            ));
        }
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        let txn = core.db.begin().await.map_err(db_error)?;
        let (row, token) = create_account(&txn, &service_account_id, &display_name).await?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "service-account.create",
                target: &name_of(&row.id),
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        Ok(CreateServiceAccountResponse {
            service_account: Some(message(&row)),
            token,
        })
    }

    async fn get(&self, request: Request<GetServiceAccountRequest>) -> Result<ServiceAccount, ApiError> {
        let caller = Principal::of(&request)?;
        admin_only(&caller, "get")?;
        let id = id_in("name", &request.get_ref().name)?;
        service_account::Entity::find_by_id(id.to_owned())
            .one(&self.0.db)
            .await
            .map_err(db_error)?
            .map(|row| message(&row))
            .ok_or_else(|| ApiError::NotFound {
                kind: "service account",
                name: name_of(id),
            })
    }

    async fn list(
        &self,
        request: Request<ListServiceAccountsRequest>,
    ) -> Result<ListServiceAccountsResponse, ApiError> {
        let caller = Principal::of(&request)?;
        admin_only(&caller, "list")?;
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let after: Option<String> = decode_token(&request.page_token)?;
        let mut query = service_account::Entity::find().order_by_asc(service_account::Column::Id);
        if let Some(after) = after {
            query = query.filter(service_account::Column::Id.gt(after));
        }
        let mut rows = query.limit(size + 1).all(&self.0.db).await.map_err(db_error)?;
        let next_page_token = finish_page(&mut rows, size, |row| row.id.clone());
        Ok(ListServiceAccountsResponse {
            service_accounts: rows.iter().map(message).collect(),
            next_page_token,
        })
    }

    async fn delete(&self, request: Request<DeleteServiceAccountRequest>) -> Result<(), ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        let client = core.client_address(&request);
        admin_only(&caller, "delete")?;
        let id = id_in("name", &request.get_ref().name)?;
        let txn = core.db.begin().await.map_err(db_error)?;
        let row = service_account::Entity::find_by_id(id.to_owned())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::NotFound {
                kind: "service account",
                name: name_of(id),
            })?;
        service_account::Entity::delete_by_id(row.id.clone())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        let now = cube_kit::time::now_ms();
        let token = token_name(&row);
        let event = TokenRevoked {
            kind: RevokedKind::ApiToken as i32,
            id: token.clone(),
            user: name_of(&row.id),
            time: Some(timestamp(now)),
            expire_time: None,
        };
        enqueue(&txn, TOKEN_REVOKED, &event).await?;
        // Verifiers ask auth again about a token within seconds, and auth no longer knows this one: a day is ample.
        let revocation = Revocation::ApiToken {
            name: token,
            expires_at: (now + 24 * 3600 * 1000).div_euclid(1000),
        };
        crate::revocations::record(&txn, std::slice::from_ref(&revocation)).await?;
        audit(
            &txn,
            Audit {
                actor: &caller.actor(),
                action: "service-account.delete",
                target: &name_of(&row.id),
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

/// The service account holding `token`, acting alone, or `None` when the token is no service account's.
pub(crate) async fn introspect(core: &Core, token: &str) -> Result<Option<Principal>, ApiError> {
    let Some(id) = credentials::api_token_id(token) else {
        return Ok(None);
    };
    let Some(row) = service_account::Entity::find()
        .filter(service_account::Column::TokenId.eq(id))
        .one(&core.db)
        .await
        .map_err(db_error)?
    else {
        return Ok(None);
    };
    if !credentials::same_digest(&credentials::digest(token), &row.token_hash) {
        return Ok(None);
    }
    Ok(Some(Principal {
        // No user has a name with a slash: the account is a member of nothing and holds no role.
        username: name_of(&row.id),
        roles: Vec::new(),
        groups: Vec::new(),
        credential: Credential::ServiceAccount {
            account: name_of(&row.id),
            token: token_name(&row),
            on_behalf_of: None,
        },
        issued_at: cube_kit::time::now_ms().div_euclid(1000),
        expires_at: None,
    }))
}

/// The service account holding `token` acting for `user` (`users/{username}`): the user's roles and groups with
/// the account's credential. Recorded in the audit log as `serviceAccounts/x for users/y`.
pub(crate) async fn act_for(core: &Core, token: &str, user: &str) -> Result<Principal, ApiError> {
    let service = introspect(core, token)
        .await?
        .ok_or_else(|| ApiError::Unauthenticated {
            message: "the token is no live service account's".into(),
        })?;
    let unknown = || ApiError::PermissionDenied {
        permission: format!("{ON_BEHALF_OF}: {user} is not an active user"),
    };
    let username = user.strip_prefix("users/").ok_or_else(unknown)?;
    let row = core
        .user(username)
        .await?
        .filter(|row| row.active)
        .ok_or_else(unknown)?;
    let roles = core.roles_of(&core.db, &row).await?;
    let Credential::ServiceAccount { account, token, .. } = service.credential else {
        return Err(unknown());
    };
    let principal = Principal {
        username: row.username.clone(),
        roles,
        groups: json_list(&row.groups),
        credential: Credential::ServiceAccount {
            account,
            token,
            on_behalf_of: Some(user.to_owned()),
        },
        issued_at: service.issued_at,
        expires_at: None,
    };
    audit(
        &core.db,
        Audit {
            actor: &principal.actor(),
            action: "service-account.act-for",
            target: user,
            success: true,
            client: None,
            detail: "",
        },
    )
    .await?;
    Ok(principal)
}

#[tonic::async_trait]
impl ServiceAccountService for ServiceAccounts {
    async fn create_service_account(
        &self,
        request: Request<CreateServiceAccountRequest>,
    ) -> Result<Response<CreateServiceAccountResponse>, Status> {
        self.create(request).await.map(Response::new).map_err(status)
    }

    async fn get_service_account(
        &self,
        request: Request<GetServiceAccountRequest>,
    ) -> Result<Response<ServiceAccount>, Status> {
        self.get(request).await.map(Response::new).map_err(status)
    }

    async fn list_service_accounts(
        &self,
        request: Request<ListServiceAccountsRequest>,
    ) -> Result<Response<ListServiceAccountsResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }

    async fn delete_service_account(
        &self,
        request: Request<DeleteServiceAccountRequest>,
    ) -> Result<Response<()>, Status> {
        self.delete(request).await.map(Response::new).map_err(status)
    }
}
