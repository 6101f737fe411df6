//! Who is calling: the typed identity the authentication layer hands every handler.

use std::sync::Arc;

use crate::error::ApiError;

/// The platform role every admin holds.
pub const ADMIN_ROLE: &str = "admin";

/// The caller of an RPC, verified from its bearer token; handlers read it with [`Principal::of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The username.
    pub username: String,
    /// The platform role ids in force, e.g. `["admin", "user"]`.
    pub roles: Vec<String>,
    /// The user's LDAP group DNs, as read at their last login.
    pub groups: Vec<String>,
    /// The credential the call carried.
    pub credential: Credential,
    /// When the credential was issued (access tokens) or last checked with auth (API tokens), in seconds since
    /// the Unix epoch; revocations of everything a user held before a time compare against it.
    pub issued_at: i64,
    /// When the credential expires, in seconds since the Unix epoch; `None` for API tokens without an expiry.
    pub expires_at: Option<i64>,
}

/// The credential behind a [`Principal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An access token from a login.
    AccessToken {
        /// The token's id.
        id: String,
        /// The login session it belongs to.
        session: String,
    },
    /// An API token.
    ApiToken {
        /// The token's resource name, `users/{username}/apiTokens/{token}`.
        name: String,
        /// The only permissions the token may use; empty for all of the user's.
        scopes: Vec<Permission>,
    },
    /// A service account's token. Alone, the principal is the account (`username` is its resource name, which no
    /// user can have, and it holds no roles); acting for a user (the call's [`ON_BEHALF_OF`] metadata), the
    /// principal is that user, with their roles and groups.
    ServiceAccount {
        /// The account's resource name, `serviceAccounts/{service_account}`.
        account: String,
        /// The token's name, `serviceAccounts/{service_account}/tokens/{token}`, which revocations name.
        token: String,
        /// The user it acts for (`users/{username}`), when it does.
        on_behalf_of: Option<String>,
    },
}

/// The metadata a service account's call names the user it acts for in (`users/{username}`); only service
/// accounts may send it.
pub const ON_BEHALF_OF: &str = "cube-on-behalf-of";

/// The right to do one verb to one type of resource; `*` in either part matches anything.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Permission {
    /// The resource type, e.g. `projects`.
    pub resource_type: String,
    /// The verb, e.g. `create`.
    pub verb: String,
}

impl Permission {
    /// Builds a permission.
    pub fn new(resource_type: impl Into<String>, verb: impl Into<String>) -> Self {
        Self {
            resource_type: resource_type.into(),
            verb: verb.into(),
        }
    }

    /// Whether this permission (possibly with wildcards) covers `wanted`.
    pub fn covers(&self, wanted: &Permission) -> bool {
        (self.resource_type == "*" || self.resource_type == wanted.resource_type)
            && (self.verb == "*" || self.verb == wanted.verb)
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.resource_type, self.verb)
    }
}

impl From<cube_proto::cube::auth::v1::Permission> for Permission {
    fn from(permission: cube_proto::cube::auth::v1::Permission) -> Self {
        Self::new(permission.resource_type, permission.verb)
    }
}

impl From<Permission> for cube_proto::cube::auth::v1::Permission {
    fn from(permission: Permission) -> Self {
        Self {
            resource_type: permission.resource_type,
            verb: permission.verb,
        }
    }
}

impl Principal {
    /// Returns the verified caller of `request`.
    ///
    /// # Errors
    /// Returns `UNAUTHENTICATED` when the call carried no verified credential (a method the server lets anonymous
    /// callers reach).
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Arc<Principal>, ApiError> {
        request
            .extensions()
            .get::<Arc<Principal>>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated {
                message: "this call needs a bearer token in the authorization metadata".into(),
            })
    }

    /// The service account behind the call (`serviceAccounts/{service_account}`), acting alone or for a user.
    pub fn service_account(&self) -> Option<&str> {
        match &self.credential {
            Credential::ServiceAccount { account, .. } => Some(account),
            Credential::AccessToken { .. } | Credential::ApiToken { .. } => None,
        }
    }

    /// Who made the call, for audit records: the user (`users/alice`), or the service account, alone
    /// (`serviceAccounts/workflow`) or acting for a user (`serviceAccounts/workflow for users/alice`).
    pub fn actor(&self) -> String {
        match &self.credential {
            Credential::ServiceAccount {
                account,
                on_behalf_of: Some(user),
                ..
            } => format!("{account} for {user}"),
            Credential::ServiceAccount { account, .. } => account.clone(),
            Credential::AccessToken { .. } | Credential::ApiToken { .. } => self.user_name(),
        }
    }

    /// Returns the caller's resource name, `users/{username}`.
    pub fn user_name(&self) -> String {
        format!("users/{}", self.username)
    }

    /// Whether the caller holds the platform `admin` role and may act as one: a scoped API token never does, nor
    /// does a service account acting for an admin (it acts for users, never with platform-wide powers).
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|role| role == ADMIN_ROLE) && self.scopes().is_empty() && self.service_account().is_none()
    }

    /// Returns the API token's scopes; empty for access tokens and unscoped API tokens.
    pub fn scopes(&self) -> &[Permission] {
        match &self.credential {
            Credential::ApiToken { scopes, .. } => scopes,
            Credential::AccessToken { .. } | Credential::ServiceAccount { .. } => &[],
        }
    }

    /// Whether the credential's scopes let it use `permission` (roles are checked separately).
    pub fn scope_allows(&self, permission: &Permission) -> bool {
        let scopes = self.scopes();
        scopes.is_empty() || scopes.iter().any(|scope| scope.covers(permission))
    }
}
