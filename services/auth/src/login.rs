//! `cube.auth.v1.AuthService`: login, refresh, logout, who-am-I and the published keys.

use std::sync::Arc;
use std::time::Duration;

use cube_kit::ApiError;
use cube_kit::identity::{Credential, Principal, Revocation};
use cube_proto::cube::auth::v1::auth_service_server::AuthService;
use cube_proto::cube::auth::v1::{Credential as CredentialMessage, UserCreated, UserSource};
use cube_proto::cube::auth::v1::{
    CredentialKind, GetJwksRequest, Jwk, Jwks, LoginRequest, LoginResponse, LogoutRequest, LogoutResponse,
    RefreshTokenRequest, RotateSigningKeyRequest, WhoAmIRequest, WhoAmIResponse,
};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, ConnectionTrait, EntityTrait as _, IntoActiveModel as _,
    QueryFilter as _, TransactionTrait as _,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::core::{
    Audit, Core, MAX_PASSWORD_BYTES, Tokens, audit, canonical_username, db_error, enqueue, json_list, millis, now_ms,
    require_admin, status, timestamp, to_json, user_message,
};
use crate::credentials;
use crate::ldap::{LdapError, LdapUser};
use crate::model::{refresh_token, session, user};
use crate::throttle::ThrottleError;

/// The one message for every failed password check: it must not tell unknown users from wrong passwords.
const BAD_CREDENTIALS: &str = "invalid username or password";

/// The least time a failed login takes, from the moment its request was found well-formed, whichever path refused
/// it (unknown user, wrong local password, wrong directory password): well above one Argon2 verification (about
/// 30 ms) and a directory's answer on a healthy network, so that the time does not tell the paths apart.
const FAILED_LOGIN_FLOOR: Duration = Duration::from_millis(150);

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
        let username = match canonical_username("username", &username) {
            Ok(username) => username,
            Err(ApiError::InvalidArgument(mut found)) => {
                violations.append(&mut found);
                String::new()
            }
            Err(error) => return Err(error),
        };
        if password.is_empty() || password.len() > MAX_PASSWORD_BYTES {
            violations.push(cube_kit::FieldViolation::new(
                "password",
                format!("must be 1 to {MAX_PASSWORD_BYTES} bytes, got {}", password.len()),
            ));
        }
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        let started = Instant::now();
        match core.throttle.check(&username, client).await {
            Ok(()) => {}
            Err(ThrottleError::Limited { retry_after }) => {
                audit(
                    &core.db,
                    Audit {
                        actor: &format!("users/{username}"),
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
        let Some(checked) = self.check_credentials(&username, password).await? else {
            let failed = core.throttle.record_failure(&username, client).await;
            audit(
                &core.db,
                Audit {
                    actor: &format!("users/{username}"),
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
            tokio::time::sleep_until(started + FAILED_LOGIN_FLOOR).await;
            return Err(ApiError::Unauthenticated {
                message: BAD_CREDENTIALS.into(),
            });
        };
        let row = match checked {
            Checked::Local(row) => row,
            Checked::Ldap(existing, found) => {
                let txn = core.db.begin().await.map_err(db_error)?;
                let (row, revocation) = sync_ldap_user(core, &txn, existing, &username, found).await?;
                txn.commit().await.map_err(db_error)?;
                core.profiles.forget(&username);
                apply(core, revocation).await;
                row
            }
        };
        if !row.active {
            audit(
                &core.db,
                Audit {
                    actor: &format!("users/{username}"),
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
        let txn = core.db.begin().await.map_err(db_error)?;
        user::Entity::update_many()
            .col_expr(user::Column::LastLoginMs, Expr::value(now_ms()))
            .filter(user::Column::Username.eq(username.clone()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        let tokens = core.start_session(&txn, &row).await?;
        audit(
            &txn,
            Audit {
                actor: &format!("users/{username}"),
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
        if let Err(error) = core.throttle.record_success(&username, client).await {
            tracing::warn!(%error, "clearing failed logins");
        }
        let row = core.user(&username).await?.unwrap_or(row);
        Ok(self.response(tokens, &row))
    }

    /// Checks the password where the user's credentials live: `None` when it is wrong or the user is unknown.
    ///
    /// A local account takes precedence over a directory user of the same name: the directory is never asked
    /// about it, which a failed login logs at info level when LDAP is on. Every refusal costs one Argon2
    /// verification (a dummy one for unknown users, and for directory users alongside the directory's check).
    async fn check_credentials(&self, username: &str, password: String) -> Result<Option<Checked>, ApiError> {
        let core = &self.0;
        let row = core.user(username).await?;
        match (row, &core.directory) {
            (Some(row), directory) if row.source == "local" => {
                let ok = credentials::verify_password(password, row.password_hash.clone()).await?;
                if !ok && directory.is_some() {
                    tracing::info!(
                        user = %username,
                        "wrong password for a local account: local accounts shadow directory users of the same \
                         name, so the directory was not asked"
                    );
                }
                Ok(ok.then_some(Checked::Local(row)))
            }
            (row, Some(directory)) if row.as_ref().is_none_or(|row| row.source == "ldap") => {
                let dummy = credentials::verify_password(password.clone(), None);
                let (found, dummy) = tokio::join!(directory.authenticate(username, &password), dummy);
                dummy?;
                match found {
                    Ok(found) => Ok(Some(Checked::Ldap(row, found))),
                    Err(LdapError::InvalidCredentials) => Ok(None),
                    Err(error) => Err(directory_error(error)),
                }
            }
            _ => {
                credentials::verify_password(password, None).await?;
                Ok(None)
            }
        }
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
        let hash = credentials::digest(&token);
        let stored = refresh_token::Entity::find_by_id(hash.clone())
            .one(&core.db)
            .await
            .map_err(db_error)?
            .ok_or_else(refused)?;
        let family = live_session(&core.db, &stored.session_id).await?;
        if stored.used_ms.is_some() {
            return Err(self.reused(&family, client).await);
        }
        let row = user::Entity::find_by_id(family.username.clone())
            .one(&core.db)
            .await
            .map_err(db_error)?
            .filter(|row| row.active)
            .ok_or_else(refused)?;
        // Before the token is traded: a directory that is down leaves it usable for when it is back.
        let row = if row.source == "ldap" {
            self.reread(row, client).await?
        } else {
            row
        };
        let txn = core.db.begin().await.map_err(db_error)?;
        // Trade the token in exactly once: of two concurrent uses, only one updates the row.
        let traded = refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::UsedMs, Expr::value(now_ms()))
            .filter(refresh_token::Column::Hash.eq(hash))
            .filter(refresh_token::Column::UsedMs.is_null())
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if traded.rows_affected != 1 {
            drop(txn);
            return Err(self.reused(&family, client).await);
        }
        // The session may have ended while the directory was asked.
        let family = live_session(&txn, &family.id).await?;
        let tokens = core.issue(&txn, &row, &family.id, family.expire_ms).await?;
        txn.commit().await.map_err(db_error)?;
        Ok(self.response(tokens, &row))
    }

    /// Ends the session of a rotated refresh token that came back (it was stolen, or its holder was), and returns
    /// the error for the caller.
    async fn reused(&self, family: &session::Model, client: Option<std::net::IpAddr>) -> ApiError {
        let core = &self.0;
        let revoke = async {
            let txn = core.db.begin().await.map_err(db_error)?;
            let revocations = core.revoke_sessions(&txn, std::slice::from_ref(family)).await?;
            audit(
                &txn,
                Audit {
                    actor: &format!("users/{}", family.username),
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
            Ok::<_, ApiError>(())
        };
        match revoke.await {
            Ok(()) => refused(),
            Err(error) => error,
        }
    }

    /// Re-reads an LDAP user from the directory before their session is refreshed: updates their profile, groups
    /// and roles (expiring their earlier access tokens when they lost any), deactivates a user the directory no
    /// longer has (every session and API token of theirs ends), and refuses to refresh while the directory cannot
    /// be asked.
    async fn reread(&self, row: user::Model, client: Option<std::net::IpAddr>) -> Result<user::Model, ApiError> {
        let core = &self.0;
        let username = row.username.clone();
        let Some(directory) = &core.directory else {
            return Err(ApiError::Unauthenticated {
                message: format!("users/{username} logs in through LDAP, which is not configured: log in again"),
            });
        };
        match directory.lookup(&username).await {
            Ok(Some(found)) => {
                let txn = core.db.begin().await.map_err(db_error)?;
                let (row, revocation) = sync_ldap_user(core, &txn, Some(row), &username, found).await?;
                txn.commit().await.map_err(db_error)?;
                core.profiles.forget(&username);
                apply(core, revocation).await;
                Ok(row)
            }
            Ok(None) | Err(LdapError::InvalidCredentials) => {
                let txn = core.db.begin().await.map_err(db_error)?;
                let sessions = session::Entity::find()
                    .filter(session::Column::Username.eq(username.clone()))
                    .all(&txn)
                    .await
                    .map_err(db_error)?;
                let mut revocations = core.revoke_sessions(&txn, &sessions).await?;
                // Deactivated, not deleted: their API tokens stop working too, and an admin who finds them back
                // in the directory reactivates them with their history intact.
                user::Entity::update_many()
                    .col_expr(user::Column::Active, Expr::value(false))
                    .col_expr(user::Column::UpdatedMs, Expr::value(now_ms()))
                    .filter(user::Column::Username.eq(username.clone()))
                    .exec(&txn)
                    .await
                    .map_err(db_error)?;
                revocations.push(core.deactivate(&txn, &username, false).await?);
                audit(
                    &txn,
                    Audit {
                        actor: &format!("users/{username}"),
                        action: "token.refresh",
                        target: &format!("users/{username}"),
                        success: false,
                        client,
                        detail: "the user is no longer in the LDAP directory: deactivated, their sessions ended",
                    },
                )
                .await?;
                txn.commit().await.map_err(db_error)?;
                core.profiles.forget(&username);
                core.committed(revocations);
                tracing::info!(user = %username, "ldap user gone from the directory: deactivated, sessions ended");
                Err(ApiError::Unauthenticated {
                    message: "the account is no longer in the directory: the session has ended".into(),
                })
            }
            Err(LdapError::Directory(reason)) if !directory.has_service_account() => {
                tracing::warn!(
                    user = %username,
                    %reason,
                    "the directory does not let an anonymous reader re-read users, so sessions cannot be \
                     refreshed: set --ldap-bind-user"
                );
                Err(ApiError::Unauthenticated {
                    message: "the directory cannot be re-read without a service account: log in again".into(),
                })
            }
            Err(error) => Err(directory_error(error)),
        }
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
                actor: &caller.actor(),
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
        let expire_time = caller.expires_at.map(|seconds| timestamp(seconds.saturating_mul(1000)));
        let credential = match &caller.credential {
            Credential::AccessToken { id, session } => CredentialMessage {
                kind: CredentialKind::AccessToken as i32,
                id: id.clone(),
                session: format!("sessions/{session}"),
                expire_time,
                scopes: Vec::new(),
            },
            Credential::ApiToken { name, scopes } => CredentialMessage {
                kind: CredentialKind::ApiToken as i32,
                id: name.clone(),
                session: String::new(),
                expire_time,
                scopes: scopes.iter().cloned().map(Into::into).collect(),
            },
            Credential::ServiceAccount {
                account,
                token,
                on_behalf_of,
            } => {
                let credential = CredentialMessage {
                    kind: CredentialKind::ServiceAccount as i32,
                    id: token.clone(),
                    session: String::new(),
                    expire_time,
                    scopes: Vec::new(),
                };
                if on_behalf_of.is_none() {
                    // Alone, the account is no user: it answers as itself, with no roles.
                    return Ok(WhoAmIResponse {
                        user: Some(cube_proto::cube::auth::v1::User {
                            name: account.clone(),
                            ..cube_proto::cube::auth::v1::User::default()
                        }),
                        roles: Vec::new(),
                        credential: Some(credential),
                    });
                }
                credential
            }
        };
        let row = self
            .0
            .profile(&caller.username)
            .await?
            .filter(|row| row.active)
            .ok_or_else(|| ApiError::Unauthenticated {
                message: "the account no longer exists or is deactivated".into(),
            })?;
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

/// The error for a refresh token that does not (or no longer) trade.
fn refused() -> ApiError {
    ApiError::Unauthenticated {
        message: "the refresh token is invalid, expired or revoked: log in again".into(),
    }
}

/// The error for a directory that could not check a password or re-read a user.
fn directory_error(error: LdapError) -> ApiError {
    match error {
        LdapError::Unavailable { server, reason } => ApiError::Unavailable {
            service: format!("LDAP server {server}"),
            source: reason.into(),
        },
        LdapError::Directory(reason) => ApiError::Unavailable {
            service: "LDAP directory".into(),
            source: reason.into(),
        },
        LdapError::InvalidCredentials => ApiError::Unauthenticated {
            message: BAD_CREDENTIALS.into(),
        },
    }
}

/// Loads a session that is neither revoked nor expired.
async fn live_session(db: &impl ConnectionTrait, id: &str) -> Result<session::Model, ApiError> {
    session::Entity::find_by_id(id.to_owned())
        .one(db)
        .await
        .map_err(db_error)?
        .filter(|family| family.revoked_ms.is_none() && family.expire_ms > now_ms())
        .ok_or_else(refused)
}

/// Applies a committed revocation of a user's earlier access tokens, then waits into the next second: tokens
/// carry their issue time in whole seconds, and one issued in the revocation's second would be refused with them.
async fn apply(core: &Core, revocation: Option<Revocation>) {
    let until = match &revocation {
        Some(Revocation::UserAccessTokens { at, .. }) => Some(*at),
        _ => None,
    };
    core.committed(revocation.into_iter().collect());
    if let Some(at) = until {
        let left = at.saturating_add(1).saturating_mul(1000) - now_ms();
        if let Ok(left) = u64::try_from(left) {
            tokio::time::sleep(Duration::from_millis(left)).await;
        }
    }
}

/// Creates (first login) or updates an LDAP user from what the directory says, in `txn`. When the update takes a
/// role or a group away, the user's earlier access tokens, which still carry it, are expired on every service:
/// the revocation is returned for [`apply`] after the commit.
async fn sync_ldap_user(
    core: &Core,
    txn: &sea_orm::DatabaseTransaction,
    existing: Option<user::Model>,
    username: &str,
    found: LdapUser,
) -> Result<(user::Model, Option<Revocation>), ApiError> {
    let now = now_ms();
    let display_name = match (&found.given_name, &found.surname) {
        (Some(given), Some(surname)) => format!("{given} {surname}"),
        (Some(name), None) | (None, Some(name)) => name.clone(),
        (None, None) => username.to_owned(),
    };
    let email = found.email.clone().unwrap_or_default();
    let groups = to_json(&found.groups);
    match existing {
        Some(row) => {
            let roles_before = core.roles_of(txn, &row).await?;
            let groups_before = json_list(&row.groups);
            let mut active = row.into_active_model();
            active.email = Set(email);
            active.display_name = Set(display_name);
            active.groups = Set(groups);
            active.updated_ms = Set(now);
            let row = active.update(txn).await.map_err(db_error)?;
            let roles = core.roles_of(txn, &row).await?;
            let lost_roles: Vec<&String> = roles_before.iter().filter(|role| !roles.contains(role)).collect();
            let lost_groups: Vec<&String> = groups_before
                .iter()
                .filter(|group| !found.groups.iter().any(|kept| kept.eq_ignore_ascii_case(group)))
                .collect();
            if lost_roles.is_empty() && lost_groups.is_empty() {
                return Ok((row, None));
            }
            tracing::info!(
                user = %username,
                ?lost_roles,
                ?lost_groups,
                "the directory took roles or groups away: expiring the user's earlier access tokens"
            );
            let revocation = core.expire_access_tokens(txn, username).await?;
            Ok((row, Some(revocation)))
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
            Ok((row, None))
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

    async fn get_revocation_list(
        &self,
        _request: Request<cube_proto::cube::auth::v1::GetRevocationListRequest>,
    ) -> Result<Response<cube_proto::cube::auth::v1::RevocationList>, Status> {
        crate::revocations::list(&self.0.db)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn rotate_signing_key(&self, request: Request<RotateSigningKeyRequest>) -> Result<Response<Jwk>, Status> {
        let core = &self.0;
        let rotate = async {
            let caller = Principal::of(&request)?;
            require_admin(&caller, "signingKeys.rotate")?;
            let key = core.keyring.rotate(&core.db).await?;
            core.committed(Vec::new());
            audit(
                &core.db,
                Audit {
                    actor: &caller.actor(),
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
