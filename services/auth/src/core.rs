//! The state every auth RPC shares, and the steps several of them take: naming and validating users, computing
//! roles, issuing tokens, revoking sessions, and writing audit events and bus events with the change they
//! describe.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use cube_bus::EventBus;
use cube_kit::ApiError;
use cube_kit::identity::jws::Claims;
use cube_kit::identity::{Permission, Principal, Revocation, TOKEN_REVOKED, USER_DEACTIVATED, Verifier};
use cube_proto::cube::auth::v1::{RevokedKind, TokenRevoked, User, UserDeactivated, UserSource};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, EntityTrait as _, QueryFilter as _,
    QueryOrder as _,
};
use tokio::sync::Notify;

use crate::credentials::{self, Keyring};
use crate::ldap::Directory;
use crate::model::{audit_event, refresh_token, role, role_binding, session, user};
use crate::throttle::LoginThrottle;

/// The domain in auth's `ErrorInfo`s.
pub(crate) const DOMAIN: &str = "auth.cube.dev";

/// The built-in role every user holds.
pub(crate) const USER_ROLE: &str = "user";

/// Longest accepted password, in bytes.
pub(crate) const MAX_PASSWORD_BYTES: usize = 1024;
/// Shortest password a user may set.
pub(crate) const MIN_NEW_PASSWORD_BYTES: usize = 12;

/// Token lifetimes and where client addresses may be trusted from.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) issuer: String,
    pub(crate) access_token_ttl: Duration,
    pub(crate) session_ttl: Duration,
    pub(crate) trusted_proxies: Vec<IpAddr>,
}

/// What every auth RPC shares.
pub(crate) struct Core {
    pub(crate) db: DatabaseConnection,
    pub(crate) keyring: Keyring,
    pub(crate) directory: Option<Directory>,
    pub(crate) throttle: LoginThrottle,
    pub(crate) verifier: Verifier,
    pub(crate) outbox: Arc<Notify>,
    pub(crate) options: Options,
    pub(crate) profiles: Profiles,
}

/// User rows read recently, so that `WhoAmI` (which every UI page load calls) does not read the database each
/// time. Entries live one second, and this replica forgets a user as soon as it changes them; deactivation
/// needs neither, since the verifier refuses a deactivated user's tokens before any handler runs.
#[derive(Default)]
pub(crate) struct Profiles {
    rows: std::sync::RwLock<std::collections::HashMap<String, (std::time::Instant, user::Model)>>,
}

impl Profiles {
    const TTL: Duration = Duration::from_secs(1);
    const CAPACITY: usize = 10_000;

    fn get(&self, username: &str) -> Option<user::Model> {
        let rows = self.rows.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        rows.get(username)
            .filter(|(read, _)| read.elapsed() < Self::TTL)
            .map(|(_, row)| row.clone())
    }

    fn put(&self, row: user::Model) {
        let mut rows = self.rows.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if rows.len() >= Self::CAPACITY {
            rows.retain(|_, (read, _)| read.elapsed() < Self::TTL);
        }
        if rows.len() < Self::CAPACITY {
            rows.insert(row.username.clone(), (std::time::Instant::now(), row));
        }
    }

    /// Forgets a user this replica just changed.
    pub(crate) fn forget(&self, username: &str) {
        self.rows
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(username);
    }
}

/// Maps an [`ApiError`] to the status a client receives.
pub(crate) fn status(error: ApiError) -> tonic::Status {
    error.status(DOMAIN)
}

pub(crate) use cube_kit::time::{now_ms, timestamp, timestamp_ms};

pub(crate) fn db_error(error: sea_orm::DbErr) -> ApiError {
    ApiError::internal(error)
}

/// Checks a role id against `^[a-z][a-z0-9-]{0,61}[a-z0-9]$`.
pub(crate) fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    (2..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || *byte == b'-')
}

/// The error for a malformed role id in `field`.
pub(crate) fn invalid_id(field: &str, what: &str, id: &str) -> ApiError {
    let shown: String = id.chars().take(64).collect();
    ApiError::invalid(
        field,
        format!(
            "{what} {shown:?} must match ^[a-z][a-z0-9-]{{0,61}}[a-z0-9]$ (2 to 63 lowercase letters, digits and dashes)"
        ),
    )
}

pub(crate) use cube_kit::identity::canonical_username;

/// Resolves `users/{username}` or `users/me` in `field` to a canonical username (see [`canonical_username`]).
pub(crate) fn username_in(field: &str, name: &str, caller: &Principal) -> Result<String, ApiError> {
    let id = name
        .strip_prefix("users/")
        .ok_or_else(|| ApiError::invalid(field, format!("expected users/{{username}} or users/me, got {name:?}")))?;
    let id = canonical_username(field, id)?;
    if id == "me" {
        return Ok(caller.username.clone());
    }
    Ok(id)
}

/// Lets the caller reach `username`'s data: themselves or, for admins, anyone. Others are NOT_FOUND, so that
/// nobody learns which users exist.
pub(crate) fn may_access(caller: &Principal, username: &str) -> Result<(), ApiError> {
    if caller.username == username || caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::NotFound {
            kind: "user",
            name: format!("users/{username}"),
        })
    }
}

/// Requires that the caller's credential may use `resource_type.verb`: API tokens created with scopes reach only
/// what their scopes name, also among the self-service RPCs (a token scoped to `projects.list` cannot change its
/// owner's profile or revoke their other tokens).
pub(crate) fn require_scope(caller: &Principal, resource_type: &str, verb: &str) -> Result<(), ApiError> {
    let permission = cube_kit::identity::Permission::new(resource_type, verb);
    if caller.scope_allows(&permission) {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied {
            permission: format!("{permission} (not among this API token's scopes)"),
        })
    }
}

/// Requires the admin role.
pub(crate) fn require_admin(caller: &Principal, permission: &str) -> Result<(), ApiError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied {
            permission: permission.to_owned(),
        })
    }
}

/// Checks a password's length (`min` to 1024 bytes).
pub(crate) fn check_password(field: &str, password: &str, min: usize) -> Result<(), ApiError> {
    if password.len() < min.max(1) || password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::invalid(
            field,
            format!(
                "must be {} to {MAX_PASSWORD_BYTES} bytes, got {}",
                min.max(1),
                password.len()
            ),
        ));
    }
    Ok(())
}

/// Parses a JSON array of strings stored in a text column.
pub(crate) fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "[]".to_owned())
}

/// Parses stored permissions.
pub(crate) fn permissions_of(text: &str) -> Vec<Permission> {
    serde_json::from_str::<Vec<(String, String)>>(text)
        .unwrap_or_default()
        .into_iter()
        .map(|(resource_type, verb)| Permission::new(resource_type, verb))
        .collect()
}

pub(crate) fn store_permissions(permissions: &[Permission]) -> String {
    let pairs: Vec<(&str, &str)> = permissions
        .iter()
        .map(|permission| (permission.resource_type.as_str(), permission.verb.as_str()))
        .collect();
    to_json(&pairs)
}

/// Checks permissions given in a request, at `field`.
pub(crate) fn parse_permissions(
    field: &str,
    permissions: Vec<cube_proto::cube::auth::v1::Permission>,
) -> Result<Vec<Permission>, ApiError> {
    let part_ok = |part: &str| {
        part == "*"
            || (!part.is_empty()
                && part.len() <= 63
                && part.as_bytes()[0].is_ascii_lowercase()
                && part.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-'))
    };
    let mut parsed = BTreeSet::new();
    let mut violations = Vec::new();
    for (index, permission) in permissions.into_iter().enumerate() {
        if !part_ok(&permission.resource_type) || !part_ok(&permission.verb) {
            violations.push(cube_kit::FieldViolation::new(
                format!("{field}[{index}]"),
                format!(
                    "{:?}.{:?} is not a permission: resource_type and verb are `*` or a word like `projects` and `create`",
                    permission.resource_type, permission.verb
                ),
            ));
        } else {
            parsed.insert(Permission::from(permission));
        }
    }
    if !violations.is_empty() {
        return Err(ApiError::InvalidArgument(violations));
    }
    Ok(parsed.into_iter().collect())
}

/// Converts a user row for the API.
pub(crate) fn user_message(row: &user::Model) -> User {
    User {
        name: format!("users/{}", row.username),
        email: row.email.clone(),
        display_name: row.display_name.clone(),
        active: row.active,
        source: if row.source == "ldap" {
            UserSource::Ldap
        } else {
            UserSource::Local
        } as i32,
        groups: json_list(&row.groups),
        create_time: Some(timestamp(row.created_ms)),
        update_time: Some(timestamp(row.updated_ms)),
        last_login_time: row.last_login_ms.map(timestamp),
    }
}

/// What an audit event records.
pub(crate) struct Audit<'a> {
    /// Who acted: `users/{username}`, or a service account (see [`Principal::actor`]).
    pub(crate) actor: &'a str,
    pub(crate) action: &'a str,
    pub(crate) target: &'a str,
    pub(crate) success: bool,
    pub(crate) client: Option<IpAddr>,
    pub(crate) detail: &'a str,
}

/// Writes an audit event on `db` (a transaction, when it records a change).
pub(crate) async fn audit(db: &impl ConnectionTrait, event: Audit<'_>) -> Result<(), ApiError> {
    audit_event::Entity::insert(audit_event::ActiveModel {
        time_ms: Set(now_ms()),
        actor: Set(event.actor.to_owned()),
        action: Set(event.action.to_owned()),
        target: Set(event.target.to_owned()),
        success: Set(event.success),
        client_address: Set(event.client.map(|ip| ip.to_string()).unwrap_or_default()),
        detail: Set(event.detail.to_owned()),
        ..Default::default()
    })
    .exec(db)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Writes a bus event into the shared outbox on `db` (the change's transaction), to be published once the
/// transaction commits.
pub(crate) async fn enqueue(
    db: &impl ConnectionTrait,
    topic: &str,
    event: &impl prost::Message,
) -> Result<(), ApiError> {
    cube_kit::outbox::enqueue(db, topic, event)
        .await
        .map_err(ApiError::internal)?;
    Ok(())
}

/// Relays the outbox to the bus: woken by `notify` after each commit, and every second in case a wake-up was
/// missed (or another replica wrote the row).
pub(crate) async fn relay_outbox(db: DatabaseConnection, bus: Arc<dyn EventBus>, notify: Arc<Notify>) {
    cube_kit::outbox::relay(db, bus, notify, cube_kit::outbox::RelayOptions::default()).await;
}

impl Core {
    /// Returns the client's address: the peer's, or, when the peer is a trusted proxy (the gateway) or the call
    /// came in-process, the last address the proxy appended to `x-forwarded-for`.
    pub(crate) fn client_address<T>(&self, request: &tonic::Request<T>) -> Option<IpAddr> {
        let peer = request.remote_addr().map(|address| address.ip());
        let trusted = peer.is_none_or(|ip| self.options.trusted_proxies.contains(&ip));
        if trusted {
            let forwarded = request
                .metadata()
                .get("x-forwarded-for")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.rsplit(',').next())
                .and_then(|last| last.trim().parse().ok());
            if forwarded.is_some() {
                return forwarded;
            }
        }
        peer
    }

    /// Loads a user, from the last second's reads when it can.
    pub(crate) async fn profile(&self, username: &str) -> Result<Option<user::Model>, ApiError> {
        if let Some(row) = self.profiles.get(username) {
            return Ok(Some(row));
        }
        let row = self.user(username).await?;
        if let Some(row) = &row {
            self.profiles.put(row.clone());
        }
        Ok(row)
    }

    /// Loads a user.
    pub(crate) async fn user(&self, username: &str) -> Result<Option<user::Model>, ApiError> {
        user::Entity::find_by_id(username.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)
    }

    /// The platform roles a user holds: `user`, plus their bindings, their groups' bindings and the LDAP
    /// mapping of their groups.
    pub(crate) async fn roles_of(&self, db: &impl ConnectionTrait, row: &user::Model) -> Result<Vec<String>, ApiError> {
        let groups = json_list(&row.groups);
        let mut condition = sea_orm::Condition::any().add(
            sea_orm::Condition::all()
                .add(role_binding::Column::SubjectKind.eq("user"))
                .add(role_binding::Column::Subject.eq(row.username.clone())),
        );
        if !groups.is_empty() {
            condition = condition.add(
                sea_orm::Condition::all()
                    .add(role_binding::Column::SubjectKind.eq("group"))
                    .add(role_binding::Column::Subject.is_in(groups.clone())),
            );
        }
        let bindings = role_binding::Entity::find()
            .filter(condition)
            .all(db)
            .await
            .map_err(db_error)?;
        let mut roles: BTreeSet<String> = bindings.into_iter().map(|binding| binding.role).collect();
        if let Some(directory) = &self.directory {
            roles.extend(directory.mapped_roles(&groups));
        }
        roles.insert(USER_ROLE.to_owned());
        Ok(roles.into_iter().collect())
    }

    /// The permissions the roles grant, with the roles that grant them.
    pub(crate) async fn permissions_of_roles(
        &self,
        roles: &[String],
    ) -> Result<Vec<(String, Vec<Permission>)>, ApiError> {
        let rows = role::Entity::find()
            .filter(role::Column::Id.is_in(roles.to_vec()))
            .order_by_asc(role::Column::Id)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let permissions = permissions_of(&row.permissions);
                (row.id, permissions)
            })
            .collect())
    }

    /// Starts a session for `row` and returns its first tokens.
    pub(crate) async fn start_session(&self, db: &impl ConnectionTrait, row: &user::Model) -> Result<Tokens, ApiError> {
        let session_id = credentials::random_hex::<16>()?;
        let now = now_ms();
        let expire_ms = now + millis(self.options.session_ttl);
        session::Entity::insert(session::ActiveModel {
            id: Set(session_id.clone()),
            username: Set(row.username.clone()),
            created_ms: Set(now),
            expire_ms: Set(expire_ms),
            revoked_ms: Set(None),
        })
        .exec(db)
        .await
        .map_err(db_error)?;
        self.issue(db, row, &session_id, expire_ms).await
    }

    /// Issues a refresh token in `session_id` and an access token for `row`.
    pub(crate) async fn issue(
        &self,
        db: &impl ConnectionTrait,
        row: &user::Model,
        session_id: &str,
        session_expire_ms: i64,
    ) -> Result<Tokens, ApiError> {
        let refresh = credentials::random_secret()?;
        let now = now_ms();
        refresh_token::Entity::insert(refresh_token::ActiveModel {
            hash: Set(credentials::digest(&refresh)),
            session_id: Set(session_id.to_owned()),
            created_ms: Set(now),
            used_ms: Set(None),
        })
        .exec(db)
        .await
        .map_err(db_error)?;
        let roles = self.roles_of(db, row).await?;
        let iat = now.div_euclid(1000);
        let exp = iat + i64::try_from(self.options.access_token_ttl.as_secs()).unwrap_or(900);
        let claims = Claims {
            iss: self.options.issuer.clone(),
            aud: self.options.issuer.clone(),
            sub: row.username.clone(),
            roles,
            groups: json_list(&row.groups),
            sid: session_id.to_owned(),
            jti: credentials::random_hex::<12>()?,
            iat,
            exp,
        };
        let access = self.keyring.current()?.sign(&claims).map_err(ApiError::internal)?;
        Ok(Tokens {
            access,
            access_expire_ms: exp * 1000,
            refresh,
            refresh_expire_ms: session_expire_ms,
        })
    }

    /// Revokes sessions (in `db`'s transaction), records and announces it; the caller applies [`Self::committed`]
    /// after commit.
    pub(crate) async fn revoke_sessions(
        &self,
        db: &impl ConnectionTrait,
        sessions: &[session::Model],
    ) -> Result<Vec<Revocation>, ApiError> {
        let now = now_ms();
        let mut revocations = Vec::new();
        for row in sessions.iter().filter(|row| row.revoked_ms.is_none()) {
            session::Entity::update_many()
                .col_expr(session::Column::RevokedMs, Expr::value(now))
                .filter(session::Column::Id.eq(row.id.clone()))
                .exec(db)
                .await
                .map_err(db_error)?;
            // Access tokens of the session live at most one access-token lifetime past now.
            let expire_ms = now + millis(self.options.access_token_ttl) + 60_000;
            let event = TokenRevoked {
                kind: RevokedKind::Session as i32,
                id: format!("sessions/{}", row.id),
                user: format!("users/{}", row.username),
                time: Some(timestamp(now)),
                expire_time: Some(timestamp(expire_ms)),
            };
            enqueue(db, TOKEN_REVOKED, &event).await?;
            revocations.push(Revocation::Session {
                id: row.id.clone(),
                expires_at: expire_ms.div_euclid(1000),
            });
        }
        crate::revocations::record(db, &revocations).await?;
        Ok(revocations)
    }

    /// Announces, in `db`'s transaction, that a user's credentials issued until now stop working; `deleted`
    /// when the user is gone.
    pub(crate) async fn deactivate(
        &self,
        db: &impl ConnectionTrait,
        username: &str,
        deleted: bool,
    ) -> Result<Revocation, ApiError> {
        let now = now_ms();
        let event = UserDeactivated {
            user: format!("users/{username}"),
            time: Some(timestamp(now)),
            deleted,
        };
        enqueue(db, USER_DEACTIVATED, &event).await?;
        let revocation = Revocation::User {
            username: username.to_owned(),
            at: now.div_euclid(1000),
        };
        crate::revocations::record(db, std::slice::from_ref(&revocation)).await?;
        Ok(revocation)
    }

    /// Announces, in `db`'s transaction, that a user's access tokens issued until now carry stale roles.
    pub(crate) async fn expire_access_tokens(
        &self,
        db: &impl ConnectionTrait,
        username: &str,
    ) -> Result<Revocation, ApiError> {
        let now = now_ms();
        let event = TokenRevoked {
            kind: RevokedKind::UserAccessTokens as i32,
            id: format!("users/{username}"),
            user: format!("users/{username}"),
            time: Some(timestamp(now)),
            expire_time: Some(timestamp(now + millis(self.options.access_token_ttl) + 60_000)),
        };
        enqueue(db, TOKEN_REVOKED, &event).await?;
        let revocation = Revocation::UserAccessTokens {
            username: username.to_owned(),
            at: now.div_euclid(1000),
        };
        crate::revocations::record(db, std::slice::from_ref(&revocation)).await?;
        Ok(revocation)
    }

    /// After a commit: applies revocations to this replica's verifier at once (others follow the bus) and wakes
    /// the outbox relay.
    pub(crate) fn committed(&self, revocations: Vec<Revocation>) {
        for revocation in &revocations {
            self.verifier.revoke(revocation);
        }
        self.outbox.notify_one();
    }
}

/// Tokens handed out by a login or refresh.
pub(crate) struct Tokens {
    pub(crate) access: String,
    pub(crate) access_expire_ms: i64,
    pub(crate) refresh: String,
    pub(crate) refresh_expire_ms: i64,
}

pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
