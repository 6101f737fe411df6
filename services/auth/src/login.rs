//! `cube.auth.v1.AuthService`: login, refresh, logout, who-am-I and the published keys.

use std::sync::Arc;

use cube_kit::ApiError;
use cube_kit::identity::{Credential, Principal};
use cube_proto::cube::auth::v1::auth_service_server::AuthService;
use cube_proto::cube::auth::v1::{Credential as CredentialMessage, UserCreated, UserSource};
use cube_proto::cube::auth::v1::{
    CredentialKind, GetJwksRequest, Jwk, Jwks, LoginRequest, LoginResponse, LogoutRequest, LogoutResponse,
    RefreshTokenRequest, RotateSigningKeyRequest, WhoAmIRequest, WhoAmIResponse,
};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, EntityTrait as _, IntoActiveModel as _,
    QueryFilter as _, TransactionTrait as _,
};
use tonic::{Request, Response, Status};

use crate::core::{
    Audit, Core, MAX_PASSWORD_BYTES, Tokens, audit, db_error, enqueue, invalid_id, millis, now_ms, require_admin,
    status, timestamp, to_json, user_message, valid_id,
};
use crate::credentials;
use crate::ldap::{LdapError, LdapUser};
use crate::model::{refresh_token, session, user};
use crate::throttle::ThrottleError;

/// The one message for every failed password check: it must not tell unknown users from wrong passwords.
const BAD_CREDENTIALS: &str = "invalid username or password";

/// The bus topic of new users.
pub const USER_CREATED: &str = "user.created";

/// Serves `AuthService`.
#[derive(Clone)]
pub(crate) struct Login(pub(crate) Arc<Core>);

impl Login {
    fn response(&self, tokens: Tokens, row: &user::Model) -> LoginResponse {
        LoginResponse {
            access_token: tokens.access,
            access_token_expire_time: Some(timestamp(tokens.access_expire_ms)),
            refresh_token: tokens.refresh,
            refresh_token_expire_time: Some(timestamp(tokens.refresh_expire_ms)),
            user: Some(user_message(row)),
        }
    }

    async fn login(&self, request: Request<LoginRequest>) -> Result<LoginResponse, ApiError> {
        let core = &self.0;
        let client = core.client_address(&request);
        let LoginRequest { username, password } = request.into_inner();
        let mut violations = Vec::new();
        if !valid_id(&username)
            && let ApiError::InvalidArgument(mut found) = invalid_id("username", "username", &username)
        {
            violations.append(&mut found);
        }
        if password.is_empty() || password.len() > MAX_PASSWORD_BYTES {
            violations.push(cube_kit::FieldViolation::new(
                "password",
                format!("must be 1 to {MAX_PASSWORD_BYTES} bytes, got {}", password.len()),
            ));
        }
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        match core.throttle.check(&username, client).await {
            Ok(()) => {}
            Err(ThrottleError::Limited { retry_after }) => {
                audit(
                    &core.db,
                    Audit {
                        actor: &username,
                        action: "login",
                        target: &format!("users/{username}"),
                        success: false,
                        client,
                        detail: "throttled: too many failed logins",
                    },
                )
                .await?;
                return Err(ApiError::TooManyAttempts {
                    subject: format!("user {username} or client address"),
                    retry_after,
                });
            }
            Err(ThrottleError::Unavailable(source)) => {
                return Err(ApiError::Unavailable {
                    service: "login throttle (redis)".into(),
                    source,
                });
            }
        }
        let row = core.user(&username).await?;
        let outcome = match (&row, &core.directory) {
            (Some(row), _) if row.source == "local" => {
                let ok = credentials::verify_password(password, row.password_hash.clone()).await?;
                ok.then(|| Checked::Local(row.clone()))
            }
            (_, Some(directory)) if row.as_ref().is_none_or(|row| row.source == "ldap") => {
                match directory.authenticate(&username, &password).await {
                    Ok(found) => Some(Checked::Ldap(row.clone(), found)),
                    Err(LdapError::InvalidCredentials) => None,
                    Err(LdapError::Unavailable { server, reason }) => {
                        return Err(ApiError::Unavailable {
                            service: format!("LDAP server {server}"),
                            source: reason.into(),
                        });
                    }
                    Err(LdapError::Directory(reason)) => {
                        return Err(ApiError::Unavailable {
                            service: "LDAP directory".into(),
                            source: reason.into(),
                        });
                    }
                }
            }
            _ => {
                // Spend the time a real check takes, so that timing does not reveal whether the user exists.
                credentials::verify_password(password, None).await?;
                None
            }
        };
        let Some(checked) = outcome else {
            let failed = core.throttle.record_failure(&username, client).await;
            audit(
                &core.db,
                Audit {
                    actor: &username,
                    action: "login",
                    target: &format!("users/{username}"),
                    success: false,
                    client,
                    detail: BAD_CREDENTIALS,
                },
            )
            .await?;
            if let Err(error) = failed {
                tracing::warn!(%error, "recording a failed login");
            }
            return Err(ApiError::Unauthenticated {
                message: BAD_CREDENTIALS.into(),
            });
        };
        let txn = core.db.begin().await.map_err(db_error)?;
        let now = now_ms();
        let row = match checked {
            Checked::Local(row) => row,
            Checked::Ldap(existing, found) => sync_ldap_user(&txn, existing, &username, found, now).await?,
        };
        if !row.active {
            drop(txn);
            audit(
                &core.db,
                Audit {
                    actor: &username,
                    action: "login",
                    target: &format!("users/{username}"),
                    success: false,
                    client,
                    detail: "the account is deactivated",
                },
            )
            .await?;
            return Err(ApiError::Unauthenticated {
                message: "the account is deactivated".into(),
            });
        }
        user::Entity::update_many()
            .col_expr(user::Column::LastLoginMs, Expr::value(now))
            .filter(user::Column::Username.eq(username.clone()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        let tokens = core.start_session(&txn, &row).await?;
        audit(
            &txn,
            Audit {
                actor: &username,
                action: "login",
                target: &format!("users/{username}"),
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        core.profiles.forget(&username);
        core.committed(Vec::new());
        if let Err(error) = core.throttle.record_success(&username).await {
            tracing::warn!(%error, "clearing failed logins");
        }
        let row = core.user(&username).await?.unwrap_or(row);
        Ok(self.response(tokens, &row))
    }

    async fn refresh(&self, request: Request<RefreshTokenRequest>) -> Result<LoginResponse, ApiError> {
        let core = &self.0;
        let client = core.client_address(&request);
        let token = request.into_inner().refresh_token;
        if token.is_empty() || token.len() > 256 {
            return Err(ApiError::invalid(
                "refresh_token",
                "must be a refresh token from Login or RefreshToken",
            ));
        }
        let refused = || ApiError::Unauthenticated {
            message: "the refresh token is invalid, expired or revoked: log in again".into(),
        };
        let hash = credentials::digest(&token);
        let txn = core.db.begin().await.map_err(db_error)?;
        let stored = refresh_token::Entity::find_by_id(hash.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(refused)?;
        let family = session::Entity::find_by_id(stored.session_id.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .ok_or_else(refused)?;
        let now = now_ms();
        if family.revoked_ms.is_some() || family.expire_ms <= now {
            return Err(refused());
        }
        // Trade the token in exactly once: of two concurrent uses, only one updates the row.
        let traded = refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::UsedMs, Expr::value(now))
            .filter(refresh_token::Column::Hash.eq(hash))
            .filter(refresh_token::Column::UsedMs.is_null())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if traded.rows_affected != 1 {
            // A rotated token came back: it was stolen, or its holder was. End the whole family.
            let revocations = core.revoke_sessions(&txn, std::slice::from_ref(&family)).await?;
            audit(
                &txn,
                Audit {
                    actor: &family.username,
                    action: "token.refresh",
                    target: &format!("sessions/{}", family.id),
                    success: false,
                    client,
                    detail: "a rotated refresh token was reused: the session is revoked",
                },
            )
            .await?;
            txn.commit().await.map_err(db_error)?;
            core.committed(revocations);
            return Err(refused());
        }
        let row = user::Entity::find_by_id(family.username.clone())
            .one(&txn)
            .await
            .map_err(db_error)?
            .filter(|row| row.active)
            .ok_or_else(refused)?;
        let tokens = core.issue(&txn, &row, &family.id, family.expire_ms).await?;
        txn.commit().await.map_err(db_error)?;
        Ok(self.response(tokens, &row))
    }

    async fn logout(&self, request: Request<LogoutRequest>) -> Result<LogoutResponse, ApiError> {
        let core = &self.0;
        let caller = Principal::of(&request)?;
        let client = core.client_address(&request);
        let Credential::AccessToken { session: id, .. } = &caller.credential else {
            return Err(ApiError::FailedPrecondition {
                message: "an API token has no session to end: revoke it with ApiTokenService.DeleteApiToken".into(),
            });
        };
        let txn = core.db.begin().await.map_err(db_error)?;
        let sessions = session::Entity::find_by_id(id.clone())
            .all(&txn)
            .await
            .map_err(db_error)?;
        let revocations = core.revoke_sessions(&txn, &sessions).await?;
        audit(
            &txn,
            Audit {
                actor: &caller.username,
                action: "logout",
                target: &format!("sessions/{id}"),
                success: true,
                client,
                detail: "",
            },
        )
        .await?;
        txn.commit().await.map_err(db_error)?;
        core.committed(revocations);
        Ok(LogoutResponse {})
    }

    async fn who_am_i(&self, request: Request<WhoAmIRequest>) -> Result<WhoAmIResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let row = self
            .0
            .profile(&caller.username)
            .await?
            .filter(|row| row.active)
            .ok_or_else(|| ApiError::Unauthenticated {
                message: "the account no longer exists or is deactivated".into(),
            })?;
        let credential = match &caller.credential {
            Credential::AccessToken { id, session } => CredentialMessage {
                kind: CredentialKind::AccessToken as i32,
                id: id.clone(),
                session: format!("sessions/{session}"),
                expire_time: caller.expires_at.map(|seconds| timestamp(seconds * 1000)),
                scopes: Vec::new(),
            },
            Credential::ApiToken { name, scopes } => CredentialMessage {
                kind: CredentialKind::ApiToken as i32,
                id: name.clone(),
                session: String::new(),
                expire_time: caller.expires_at.map(|seconds| timestamp(seconds * 1000)),
                scopes: scopes.iter().cloned().map(Into::into).collect(),
            },
        };
        Ok(WhoAmIResponse {
            user: Some(user_message(&row)),
            roles: caller.roles.iter().map(|role| format!("roles/{role}")).collect(),
            credential: Some(credential),
        })
    }
}

/// A password check that passed.
enum Checked {
    Local(user::Model),
    Ldap(Option<user::Model>, LdapUser),
}

/// Creates (first login) or updates an LDAP user from the directory, in `txn`.
async fn sync_ldap_user(
    txn: &sea_orm::DatabaseTransaction,
    existing: Option<user::Model>,
    username: &str,
    found: LdapUser,
    now: i64,
) -> Result<user::Model, ApiError> {
    let display_name = match (&found.given_name, &found.surname) {
        (Some(given), Some(surname)) => format!("{given} {surname}"),
        (Some(name), None) | (None, Some(name)) => name.clone(),
        (None, None) => username.to_owned(),
    };
    let email = found.email.clone().unwrap_or_default();
    let groups = to_json(&found.groups);
    match existing {
        Some(row) => {
            let mut active = row.into_active_model();
            active.email = Set(email);
            active.display_name = Set(display_name);
            active.groups = Set(groups);
            active.updated_ms = Set(now);
            active.update(txn).await.map_err(db_error)
        }
        None => {
            let row = user::Model {
                username: username.to_owned(),
                email,
                display_name,
                active: true,
                source: "ldap".into(),
                password_hash: None,
                groups,
                created_ms: now,
                updated_ms: now,
                last_login_ms: None,
            };
            user::Entity::insert(row.clone().into_active_model())
                .exec(txn)
                .await
                .map_err(db_error)?;
            let event = UserCreated {
                user: format!("users/{username}"),
                source: UserSource::Ldap as i32,
                time: Some(timestamp(now)),
            };
            enqueue(txn, USER_CREATED, &event).await?;
            Ok(row)
        }
    }
}

#[tonic::async_trait]
impl AuthService for Login {
    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        self.login(request).await.map(Response::new).map_err(status)
    }

    async fn refresh_token(&self, request: Request<RefreshTokenRequest>) -> Result<Response<LoginResponse>, Status> {
        self.refresh(request).await.map(Response::new).map_err(status)
    }

    async fn logout(&self, request: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        self.logout(request).await.map(Response::new).map_err(status)
    }

    async fn who_am_i(&self, request: Request<WhoAmIRequest>) -> Result<Response<WhoAmIResponse>, Status> {
        self.who_am_i(request).await.map(Response::new).map_err(status)
    }

    async fn get_jwks(&self, _request: Request<GetJwksRequest>) -> Result<Response<Jwks>, Status> {
        let lifetime = millis(self.0.options.access_token_ttl) + 120_000;
        let keys = self
            .0
            .keyring
            .published(lifetime)
            .iter()
            .map(|key| key.to_jwk())
            .collect();
        Ok(Response::new(Jwks { keys }))
    }

    async fn rotate_signing_key(&self, request: Request<RotateSigningKeyRequest>) -> Result<Response<Jwk>, Status> {
        let core = &self.0;
        let rotate = async {
            let caller = Principal::of(&request)?;
            require_admin(&caller, "signingKeys.rotate")?;
            let key = core.keyring.rotate(&core.db).await?;
            audit(
                &core.db,
                Audit {
                    actor: &caller.username,
                    action: "signing-key.rotate",
                    target: &format!("signingKeys/{}", key.kid),
                    success: true,
                    client: core.client_address(&request),
                    detail: "",
                },
            )
            .await?;
            Ok::<_, ApiError>(key.to_jwk())
        };
        rotate.await.map(Response::new).map_err(status)
    }
}
