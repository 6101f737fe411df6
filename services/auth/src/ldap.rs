//! Logs users in against an LDAP directory: binds as the user, reads their entry and groups, and maps groups to
//! Cube roles.
//!
//! The flags mirror the `AUTH_LDAP_*` keys of Flask-AppBuilder that cube-studio users already know. Two ways to
//! find the user's DN are supported, as there:
//!
//! - direct bind: the DN comes from `--ldap-username-format` (`uid=%s,ou=people,dc=example,dc=com`) or the bind
//!   name from `--ldap-append-domain` (`user@example.com`, Active Directory);
//! - search, then bind: the service account of `--ldap-bind-user` (or an anonymous bind) searches `--ldap-search`
//!   for `(&(UID_FIELD=<user>)<--ldap-search-filter>)`, and the single entry found is bound with the password.
//!
//! Groups are the values of the user's `--ldap-group-field` attribute (`memberOf`) together with the groups that
//! `--ldap-group-search` finds, for directories without a `memberOf` overlay. Every connection lives for one
//! login: it is opened, used, unbound and closed, each step bounded by `--ldap-timeout`.
//!
//! [`Directory::lookup`] re-reads a user's entry and groups without their password, for `RefreshToken`: it binds as
//! the service account of `--ldap-bind-user` or, without one, stays anonymous, as search-then-bind logins do (also
//! in a direct-bind configuration). It finds the entry as the login does, by the uid field under `--ldap-search`,
//! or at the DN of `--ldap-username-format` when there is no search base. A directory that hides entries from
//! anonymous readers makes every user look gone, so direct-bind deployments whose directory refuses anonymous
//! reads should set `--ldap-bind-user`.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry, SearchOptions, dn_escape, ldap_escape};
use tracing::{debug, info, warn};

/// The `sizeLimitExceeded` result code of RFC 4511.
const RC_SIZE_LIMIT_EXCEEDED: u32 = 4;
/// The `noSuchObject` result code of RFC 4511.
const RC_NO_SUCH_OBJECT: u32 = 32;
/// The `invalidDNSyntax` result code of RFC 4511.
const RC_INVALID_DN_SYNTAX: u32 = 34;
/// The `inappropriateAuthentication` result code of RFC 4511.
const RC_INAPPROPRIATE_AUTHENTICATION: u32 = 48;
/// The `invalidCredentials` result code of RFC 4511.
const RC_INVALID_CREDENTIALS: u32 = 49;
/// The `busy` result code of RFC 4511.
const RC_BUSY: u32 = 51;
/// The `unavailable` result code of RFC 4511.
const RC_UNAVAILABLE: u32 = 52;

/// The placeholder of `--ldap-username-format` that the user name replaces.
const USERNAME_PLACEHOLDER: &str = "%s";
/// The placeholder of `--ldap-group-search-filter` that the user's DN replaces.
const DN_PLACEHOLDER: &str = "{dn}";

/// How the auth service logs users in against an LDAP directory (the `AUTH_LDAP_*` keys of Flask-AppBuilder).
#[derive(Debug, Clone, clap::Args)]
pub struct LdapArgs {
    /// LDAP server URL, ldap://HOST:389 or ldaps://HOST:636; LDAP login is off when unset.
    #[arg(long = "ldap-server", env = "AUTH_LDAP_SERVER")]
    pub server: Option<String>,

    /// Upgrades the ldap:// connection to TLS with StartTLS before anything is sent.
    #[arg(long = "ldap-use-tls", env = "AUTH_LDAP_USE_TLS")]
    pub use_tls: bool,

    /// Skips the verification of the server's certificate (ldaps:// or StartTLS): anyone on the path can then
    /// read the passwords, so use it for test servers only.
    #[arg(long = "ldap-allow-self-signed", env = "AUTH_LDAP_ALLOW_SELF_SIGNED")]
    pub allow_self_signed: bool,

    /// PEM file of the CA certificates to trust for the server's certificate, instead of the system's.
    #[arg(long = "ldap-tls-cacertfile", env = "AUTH_LDAP_TLS_CACERTFILE")]
    pub tls_cacertfile: Option<PathBuf>,

    /// DN of the service account that searches for users (search, then bind); anonymous when unset.
    #[arg(long = "ldap-bind-user", env = "AUTH_LDAP_BIND_USER")]
    pub bind_user: Option<String>,

    /// Password of the service account of --ldap-bind-user.
    #[arg(long = "ldap-bind-password", env = "AUTH_LDAP_BIND_PASSWORD", hide_env_values = true)]
    pub bind_password: Option<Secret>,

    /// Base DN under which users are searched (e.g. ou=people,dc=example,dc=com).
    #[arg(long = "ldap-search", env = "AUTH_LDAP_SEARCH")]
    pub search: Option<String>,

    /// Filter that a user's entry must also match, e.g. (objectClass=inetOrgPerson) or (memberOf=cn=ml,...).
    #[arg(long = "ldap-search-filter", env = "AUTH_LDAP_SEARCH_FILTER")]
    pub search_filter: Option<String>,

    /// Attribute that holds the login name.
    #[arg(long = "ldap-uid-field", env = "AUTH_LDAP_UID_FIELD", default_value = "uid")]
    pub uid_field: String,

    /// Attribute that holds the first name.
    #[arg(
        long = "ldap-firstname-field",
        env = "AUTH_LDAP_FIRSTNAME_FIELD",
        default_value = "givenName"
    )]
    pub firstname_field: String,

    /// Attribute that holds the last name.
    #[arg(long = "ldap-lastname-field", env = "AUTH_LDAP_LASTNAME_FIELD", default_value = "sn")]
    pub lastname_field: String,

    /// Attribute that holds the email address.
    #[arg(long = "ldap-email-field", env = "AUTH_LDAP_EMAIL_FIELD", default_value = "mail")]
    pub email_field: String,

    /// Attribute of the user's entry that lists the DNs of their groups, when the directory keeps one.
    #[arg(long = "ldap-group-field", env = "AUTH_LDAP_GROUP_FIELD", default_value = "memberOf")]
    pub group_field: String,

    /// Domain to append to the login name for a direct bind as user@domain (Active Directory).
    #[arg(long = "ldap-append-domain", env = "AUTH_LDAP_APPEND_DOMAIN")]
    pub append_domain: Option<String>,

    /// DN template for a direct bind, %s standing for the login name (e.g. uid=%s,ou=people,dc=example,dc=com).
    #[arg(long = "ldap-username-format", env = "AUTH_LDAP_USERNAME_FORMAT")]
    pub username_format: Option<String>,

    /// Base DN under which to search the groups that list the user as a member (for directories without memberOf).
    #[arg(long = "ldap-group-search", env = "AUTH_LDAP_GROUP_SEARCH")]
    pub group_search: Option<String>,

    /// Filter for the group search, {dn} standing for the user's DN.
    #[arg(
        long = "ldap-group-search-filter",
        env = "AUTH_LDAP_GROUP_SEARCH_FILTER",
        default_value = "(|(member={dn})(uniqueMember={dn}))"
    )]
    pub group_search_filter: String,

    /// Cube roles given to LDAP groups: ROLE=GROUP_DN entries separated by ; (e.g.
    /// admin=cn=admins,ou=groups,dc=example,dc=com;user=cn=ml,ou=groups,dc=example,dc=com).
    #[arg(long = "ldap-roles-mapping", env = "AUTH_ROLES_MAPPING")]
    pub roles_mapping: Option<String>,

    /// Longest wait for the server at each step of a login: connecting, TLS, each bind and search (e.g. 5s, 500ms).
    #[arg(long = "ldap-timeout", env = "AUTH_LDAP_TIMEOUT", default_value = "5s", value_parser = cube_kit::config::parse_duration)]
    pub timeout: Duration,
}

/// A password from the configuration, which `Debug` does not show.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Returns the secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"***\")")
    }
}

/// Why the LDAP configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LdapConfigError {
    /// A flag, or a combination of flags, is invalid.
    #[error("invalid {flag}: {reason}")]
    Invalid {
        /// The flag at fault, with its environment variable.
        flag: &'static str,
        /// What is wrong and what would have been accepted.
        reason: String,
    },
    /// The CA file of `--ldap-tls-cacertfile` cannot be read or holds no usable certificate.
    #[error("cannot use --ldap-tls-cacertfile (AUTH_LDAP_TLS_CACERTFILE) {}: {reason}", path.display())]
    CaFile {
        /// The file as given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Why a login against the directory failed.
#[derive(Debug, thiserror::Error)]
pub enum LdapError {
    /// The password is wrong, the user does not exist or the name is ambiguous: deliberately one error, so that a
    /// caller cannot tell which.
    #[error("invalid username or password")]
    InvalidCredentials,
    /// The server cannot be reached or does not answer in time: connection refused, TLS failure, timeout, busy.
    #[error("ldap server {server} is unavailable: {reason}")]
    Unavailable {
        /// The server URL.
        server: String,
        /// What failed.
        reason: String,
    },
    /// The directory refused something that is not the user's fault, such as the service account's bind or a
    /// search base that does not exist: a configuration problem.
    #[error("ldap directory error: {0}")]
    Directory(String),
}

/// A user whom the directory authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdapUser {
    /// The DN of the user's entry.
    pub dn: String,
    /// The login name, as the directory spells it (the uid field), or as given when the entry has none.
    pub uid: String,
    /// The email address, when the entry has one.
    pub email: Option<String>,
    /// The first name, when the entry has one.
    pub given_name: Option<String>,
    /// The last name, when the entry has one.
    pub surname: Option<String>,
    /// The DNs of the user's groups, sorted, without duplicates (compared case-insensitively).
    pub groups: Vec<String>,
}

/// How the DN to bind the user with is found.
#[derive(Debug, Clone)]
enum BindMode {
    /// Binds with the DN made from a template with `%s`.
    Format(String),
    /// Binds as `user@domain`, then finds the user's entry under the base DN.
    Domain { domain: String, base: String },
    /// Searches for the user's entry under the base DN, then binds with its DN.
    Search { base: String },
}

/// A configured LDAP directory that users log in against.
#[derive(Clone)]
pub struct Directory {
    server: String,
    settings: LdapConnSettings,
    mode: BindMode,
    service: Option<(String, Secret)>,
    search_base: Option<String>,
    search_filter: Option<String>,
    uid_field: String,
    firstname_field: String,
    lastname_field: String,
    email_field: String,
    group_field: String,
    group_search: Option<(String, String)>,
    /// Role and normalized group DN, one pair per mapping entry.
    roles: Vec<(String, String)>,
    timeout: Duration,
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("server", &self.server)
            .field("mode", &self.mode)
            .field("service_account", &self.service.as_ref().map(|(dn, _)| dn))
            .field("search_base", &self.search_base)
            .field("group_search", &self.group_search)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Directory {
    /// Builds the directory from its flags: `None` when `--ldap-server` is unset.
    ///
    /// # Errors
    /// Returns an error naming the flag when the configuration is invalid or contradictory: no way to find the
    /// user's DN, both direct-bind flags, a bad filter or roles-mapping entry, an unreadable CA file.
    pub fn from_args(args: &LdapArgs) -> Result<Option<Self>, LdapConfigError> {
        let Some(server) = non_empty(&args.server) else {
            return Ok(None);
        };
        let tls = check_server_url(server, args.use_tls)?;

        let mut settings = LdapConnSettings::new().set_starttls(args.use_tls);
        let ca_file = args.tls_cacertfile.as_deref().filter(|p| !p.as_os_str().is_empty());
        if let Some(path) = ca_file {
            if !tls {
                return Err(invalid(
                    "--ldap-tls-cacertfile (AUTH_LDAP_TLS_CACERTFILE)",
                    format!(
                        "{server} is plain LDAP: use an ldaps:// URL or --ldap-use-tls to verify the server with a CA"
                    ),
                ));
            }
            let config = client_config(path)?;
            // With --ldap-allow-self-signed nothing is verified, so ldap3's own non-verifying config must be used.
            if !args.allow_self_signed {
                settings = settings.set_config(config);
            }
        }
        if tls && args.allow_self_signed {
            settings = settings.set_no_tls_verify(true);
        }

        let search_base = non_empty(&args.search).map(str::to_owned);
        let mode = match (non_empty(&args.username_format), non_empty(&args.append_domain)) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "--ldap-username-format (AUTH_LDAP_USERNAME_FORMAT)",
                    "it cannot be combined with --ldap-append-domain: set one way to form the bind name".to_owned(),
                ));
            }
            (Some(format), None) => {
                if !format.contains(USERNAME_PLACEHOLDER) {
                    return Err(invalid(
                        "--ldap-username-format (AUTH_LDAP_USERNAME_FORMAT)",
                        format!("{format:?} has no %s for the login name, e.g. uid=%s,ou=people,dc=example,dc=com"),
                    ));
                }
                BindMode::Format(format.to_owned())
            }
            (None, Some(domain)) => {
                let Some(base) = search_base.clone() else {
                    return Err(invalid(
                        "--ldap-search (AUTH_LDAP_SEARCH)",
                        "--ldap-append-domain binds as user@domain, which is not a DN: set the base DN to find the \
                         user's entry under, e.g. ou=people,dc=example,dc=com"
                            .to_owned(),
                    ));
                };
                BindMode::Domain {
                    domain: domain.trim_start_matches('@').to_owned(),
                    base,
                }
            }
            (None, None) => {
                let Some(base) = search_base.clone() else {
                    return Err(invalid(
                        "--ldap-search (AUTH_LDAP_SEARCH)",
                        "set the base DN to search users under (e.g. ou=people,dc=example,dc=com), or bind users \
                         directly with --ldap-username-format or --ldap-append-domain"
                            .to_owned(),
                    ));
                };
                BindMode::Search { base }
            }
        };

        let service = match (non_empty(&args.bind_user), &args.bind_password) {
            (Some(user), Some(password)) if !password.expose().is_empty() => Some((user.to_owned(), password.clone())),
            (Some(_), _) => {
                // An empty password would make the bind an unauthenticated one, which "succeeds" as nobody.
                return Err(invalid(
                    "--ldap-bind-password (AUTH_LDAP_BIND_PASSWORD)",
                    "--ldap-bind-user needs its password".to_owned(),
                ));
            }
            (None, Some(password)) if !password.expose().is_empty() => {
                return Err(invalid(
                    "--ldap-bind-user (AUTH_LDAP_BIND_USER)",
                    "--ldap-bind-password is set without the service account's DN".to_owned(),
                ));
            }
            (None, _) => None,
        };

        let uid_field = attribute_name("--ldap-uid-field (AUTH_LDAP_UID_FIELD)", &args.uid_field)?;
        let search_filter = match non_empty(&args.search_filter) {
            Some(filter) => {
                let filter = if filter.starts_with('(') {
                    filter.to_owned()
                } else {
                    format!("({filter})")
                };
                check_filter(
                    "--ldap-search-filter (AUTH_LDAP_SEARCH_FILTER)",
                    &format!("(&({uid_field}=x){filter})"),
                    &filter,
                )?;
                Some(filter)
            }
            None => None,
        };
        let group_search = match non_empty(&args.group_search) {
            Some(base) => {
                let filter = args.group_search_filter.trim();
                if !filter.contains(DN_PLACEHOLDER) {
                    return Err(invalid(
                        "--ldap-group-search-filter (AUTH_LDAP_GROUP_SEARCH_FILTER)",
                        format!(
                            "{filter:?} has no {{dn}} for the user's DN, e.g. (|(member={{dn}})(uniqueMember={{dn}}))"
                        ),
                    ));
                }
                let sample = filter.replace(DN_PLACEHOLDER, &ldap_escape("uid=x,dc=example"));
                check_filter(
                    "--ldap-group-search-filter (AUTH_LDAP_GROUP_SEARCH_FILTER)",
                    &sample,
                    filter,
                )?;
                Some((base.to_owned(), filter.to_owned()))
            }
            None => None,
        };
        let roles = match non_empty(&args.roles_mapping) {
            Some(mapping) => parse_roles_mapping(mapping)?,
            None => Vec::new(),
        };
        if args.timeout.is_zero() {
            return Err(invalid(
                "--ldap-timeout (AUTH_LDAP_TIMEOUT)",
                "it must be longer than zero, e.g. 5s".to_owned(),
            ));
        }

        Ok(Some(Self {
            server: server.to_owned(),
            settings,
            mode,
            service,
            search_base,
            search_filter,
            uid_field,
            firstname_field: attribute_name(
                "--ldap-firstname-field (AUTH_LDAP_FIRSTNAME_FIELD)",
                &args.firstname_field,
            )?,
            lastname_field: attribute_name("--ldap-lastname-field (AUTH_LDAP_LASTNAME_FIELD)", &args.lastname_field)?,
            email_field: attribute_name("--ldap-email-field (AUTH_LDAP_EMAIL_FIELD)", &args.email_field)?,
            group_field: attribute_name("--ldap-group-field (AUTH_LDAP_GROUP_FIELD)", &args.group_field)?,
            group_search,
            roles,
            timeout: args.timeout,
        }))
    }

    /// Returns the server URL logins go to.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Returns whether a service account (`--ldap-bind-user`) searches and re-reads users, rather than an
    /// anonymous bind.
    pub fn has_service_account(&self) -> bool {
        self.service.is_some()
    }

    /// Binds as the user and returns their entry's attributes and groups.
    ///
    /// A direct bind uses `--ldap-username-format` or `--ldap-append-domain`; otherwise the service account (or an
    /// anonymous bind) searches `--ldap-search` for exactly one entry with the login name, which is then bound
    /// with the password. Groups are the `--ldap-group-field` values together with what `--ldap-group-search`
    /// finds. The connection is unbound and closed before this returns.
    ///
    /// # Errors
    /// [`LdapError::InvalidCredentials`] for an empty or wrong password, an unknown or ambiguous name;
    /// [`LdapError::Unavailable`] when the server cannot be reached or does not answer within the timeout;
    /// [`LdapError::Directory`] for anything else the directory refuses.
    pub async fn authenticate(&self, username: &str, password: &str) -> Result<LdapUser, LdapError> {
        // A simple bind with an empty password is an unauthenticated bind, which servers answer with success.
        if username.is_empty() || password.is_empty() {
            debug!(user = %username, "ldap login refused: empty username or password");
            return Err(LdapError::InvalidCredentials);
        }
        let mut ldap = self.connect().await.inspect_err(|e| self.log_failure(username, e))?;
        let result = self.login(&mut ldap, username, password).await;
        self.unbind(ldap).await;
        match &result {
            Ok(user) => info!(user = %user.uid, dn = %user.dn, groups = user.groups.len(), "ldap login"),
            Err(e) => self.log_failure(username, e),
        }
        result
    }

    /// Re-reads a user's entry and groups without their password: `None` when the directory no longer has them.
    ///
    /// The service account binds (an anonymous bind without one), then the entry is found as a login finds it: by
    /// the uid field (and `--ldap-search-filter`) under `--ldap-search`, or at the DN of `--ldap-username-format`
    /// when no search base is set. An entry that no longer matches, a name that became ambiguous, and an entry
    /// the reader may not see all read as gone. Groups are read as at login.
    ///
    /// # Errors
    /// [`LdapError::Unavailable`] when the server cannot be reached or does not answer within the timeout;
    /// [`LdapError::Directory`] for anything else the directory refuses, such as the service account's bind or a
    /// search an anonymous reader may not make. Never [`LdapError::InvalidCredentials`].
    pub async fn lookup(&self, username: &str) -> Result<Option<LdapUser>, LdapError> {
        if username.is_empty() {
            return Ok(None);
        }
        let mut ldap = self.connect().await.inspect_err(|e| self.log_failure(username, e))?;
        let result = self.reread(&mut ldap, username).await;
        self.unbind(ldap).await;
        match &result {
            Ok(Some(user)) => debug!(user = %user.uid, dn = %user.dn, groups = user.groups.len(), "ldap user re-read"),
            Ok(None) => info!(user = %username, server = %self.server, "ldap user no longer found"),
            Err(e) => self.log_failure(username, e),
        }
        result
    }

    /// Unbinds and closes a connection, as a best effort: dropping the last handle closes it anyway.
    async fn unbind(&self, mut ldap: Ldap) {
        match tokio::time::timeout(self.timeout, ldap.unbind()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(server = %self.server, error = %e, "ldap unbind failed"),
            Err(_) => debug!(server = %self.server, "ldap unbind timed out"),
        }
    }

    /// Returns the Cube roles that `--ldap-roles-mapping` gives these group DNs, sorted, without duplicates.
    pub fn mapped_roles(&self, groups: &[String]) -> Vec<String> {
        let groups: BTreeSet<String> = groups.iter().map(|g| cube_kit::dn::normalize_lenient(g)).collect();
        self.roles
            .iter()
            .filter(|(_, dn)| groups.contains(dn))
            .map(|(role, _)| role.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    fn log_failure(&self, username: &str, error: &LdapError) {
        match error {
            LdapError::InvalidCredentials => debug!(user = %username, "ldap login refused"),
            LdapError::Unavailable { server, reason } => {
                warn!(user = %username, %server, %reason, "ldap server unavailable");
            }
            LdapError::Directory(reason) => {
                warn!(user = %username, server = %self.server, %reason, "ldap directory error");
            }
        }
    }

    async fn connect(&self) -> Result<Ldap, LdapError> {
        let settings = self.settings.clone().set_conn_timeout(self.timeout);
        let (conn, ldap) = self
            .bounded("connect", LdapConnAsync::with_settings(settings, &self.server))
            .await?;
        let server = self.server.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                debug!(%server, error = %e, "ldap connection ended with an error");
            }
        });
        Ok(ldap)
    }

    async fn login(&self, ldap: &mut Ldap, username: &str, password: &str) -> Result<LdapUser, LdapError> {
        let entry = match &self.mode {
            BindMode::Format(format) => {
                let dn = format.replace(USERNAME_PLACEHOLDER, &dn_escape(username));
                self.bind_user(ldap, &dn, password).await?;
                match &self.search_base {
                    Some(base) => self.find_user(ldap, base, username).await?,
                    None => self.read_entry(ldap, &dn).await?,
                }
            }
            BindMode::Domain { domain, base } => {
                self.bind_user(ldap, &format!("{username}@{domain}"), password).await?;
                self.find_user(ldap, base, username).await?
            }
            BindMode::Search { base } => {
                self.bind_service(ldap).await?;
                let entry = self.find_user(ldap, base, username).await?;
                self.bind_user(ldap, &entry.dn, password).await?;
                // Groups are read with the service account's rights, as the user was: a user may not see them.
                if self.group_search.is_some() && self.service.is_some() {
                    self.bind_service(ldap).await?;
                }
                entry
            }
        };

        self.user_of(ldap, entry, username).await
    }

    async fn reread(&self, ldap: &mut Ldap, username: &str) -> Result<Option<LdapUser>, LdapError> {
        self.bind_service(ldap).await?;
        let entry = match (&self.mode, &self.search_base) {
            (BindMode::Format(format), None) => {
                let dn = format.replace(USERNAME_PLACEHOLDER, &dn_escape(username));
                self.read_entry_if_any(ldap, &dn).await?
            }
            (BindMode::Format(_), Some(base)) | (BindMode::Domain { base, .. } | BindMode::Search { base }, _) => {
                match self.find_user(ldap, base, username).await {
                    Ok(entry) => Some(entry),
                    Err(LdapError::InvalidCredentials) => None,
                    Err(e) => return Err(e),
                }
            }
        };
        match entry {
            Some(entry) => self.user_of(ldap, entry, username).await.map(Some),
            None => Ok(None),
        }
    }

    /// Reads an entry's attributes and the user's groups.
    async fn user_of(&self, ldap: &mut Ldap, entry: SearchEntry, username: &str) -> Result<LdapUser, LdapError> {
        let mut groups = Groups::default();
        for dn in attribute(&entry, &self.group_field).into_iter().flatten() {
            groups.insert(dn);
        }
        if let Some((base, filter)) = &self.group_search {
            for dn in self.search_groups(ldap, base, filter, &entry.dn).await? {
                groups.insert(&dn);
            }
        }
        let first = |field: &str| attribute(&entry, field).and_then(|values| values.first()).cloned();
        Ok(LdapUser {
            uid: first(&self.uid_field).unwrap_or_else(|| username.to_owned()),
            email: first(&self.email_field),
            given_name: first(&self.firstname_field),
            surname: first(&self.lastname_field),
            groups: groups.into_sorted(),
            dn: entry.dn,
        })
    }

    /// Binds as the service account; without one, the new connection stays anonymous.
    async fn bind_service(&self, ldap: &mut Ldap) -> Result<(), LdapError> {
        let Some((dn, password)) = &self.service else {
            return Ok(());
        };
        let result = self
            .bounded("service account bind", ldap.simple_bind(dn, password.expose()))
            .await?;
        match result.rc {
            0 => Ok(()),
            rc if is_unavailable(rc) => Err(self.unavailable(format!("service account bind: {result}"))),
            _ => Err(LdapError::Directory(format!(
                "service account {dn} bind refused: {result}"
            ))),
        }
    }

    /// Binds with the user's name and password; a refusal is `InvalidCredentials`, whatever the reason.
    async fn bind_user(&self, ldap: &mut Ldap, dn: &str, password: &str) -> Result<(), LdapError> {
        let result = self.bounded("user bind", ldap.simple_bind(dn, password)).await?;
        match result.rc {
            0 => Ok(()),
            RC_INVALID_CREDENTIALS | RC_INVALID_DN_SYNTAX | RC_NO_SUCH_OBJECT | RC_INAPPROPRIATE_AUTHENTICATION => {
                Err(LdapError::InvalidCredentials)
            }
            rc if is_unavailable(rc) => Err(self.unavailable(format!("user bind: {result}"))),
            _ => Err(LdapError::Directory(format!("user bind: {result}"))),
        }
    }

    fn user_attributes(&self) -> Vec<&str> {
        vec![
            self.uid_field.as_str(),
            self.firstname_field.as_str(),
            self.lastname_field.as_str(),
            self.email_field.as_str(),
            self.group_field.as_str(),
        ]
    }

    /// Finds the one entry under `base` whose uid field is `username`; none or several are `InvalidCredentials`.
    async fn find_user(&self, ldap: &mut Ldap, base: &str, username: &str) -> Result<SearchEntry, LdapError> {
        let filter = format!(
            "(&({}={}){})",
            self.uid_field,
            ldap_escape(username),
            self.search_filter.as_deref().unwrap_or_default()
        );
        // Two are enough to tell an ambiguous name.
        let search = ldap.with_search_options(SearchOptions::new().sizelimit(2)).search(
            base,
            Scope::Subtree,
            &filter,
            self.user_attributes(),
        );
        let result = self.bounded("user search", search).await?;
        let rc = result.1.rc;
        if rc != 0 && rc != RC_SIZE_LIMIT_EXCEEDED {
            return Err(self.search_error("user search", base, &result.1));
        }
        let mut entries = result.0;
        if rc == RC_SIZE_LIMIT_EXCEEDED || entries.len() > 1 {
            warn!(user = %username, %base, "ldap user search found several entries: refusing the login");
            return Err(LdapError::InvalidCredentials);
        }
        entries
            .pop()
            .map(SearchEntry::construct)
            .ok_or(LdapError::InvalidCredentials)
    }

    /// Reads the bound user's own entry.
    async fn read_entry(&self, ldap: &mut Ldap, dn: &str) -> Result<SearchEntry, LdapError> {
        let search = ldap.search(dn, Scope::Base, "(objectClass=*)", self.user_attributes());
        let result = self.bounded("user entry read", search).await?;
        if result.1.rc != 0 {
            return Err(self.search_error("user entry read", dn, &result.1));
        }
        let mut entries = result.0;
        entries
            .pop()
            .map(SearchEntry::construct)
            .ok_or_else(|| LdapError::Directory(format!("bound as {dn} but cannot read that entry")))
    }

    /// Reads the entry at `dn` as the bound reader: `None` when there is none, or the reader may not see it.
    async fn read_entry_if_any(&self, ldap: &mut Ldap, dn: &str) -> Result<Option<SearchEntry>, LdapError> {
        let search = ldap.search(dn, Scope::Base, "(objectClass=*)", self.user_attributes());
        let result = self.bounded("user entry read", search).await?;
        match result.1.rc {
            0 => Ok(result.0.into_iter().next().map(SearchEntry::construct)),
            RC_NO_SUCH_OBJECT => Ok(None),
            _ => Err(self.search_error("user entry read", dn, &result.1)),
        }
    }

    /// Returns the DNs of the groups under `base` that `filter` finds for the user `dn`.
    async fn search_groups(
        &self,
        ldap: &mut Ldap,
        base: &str,
        filter: &str,
        dn: &str,
    ) -> Result<Vec<String>, LdapError> {
        let filter = filter.replace(DN_PLACEHOLDER, &ldap_escape(dn));
        // "1.1" asks for no attributes: the DNs are all we need.
        let search = ldap.search(base, Scope::Subtree, &filter, vec!["1.1"]);
        let result = self.bounded("group search", search).await?;
        match result.1.rc {
            0 => {}
            // Fewer groups only ever mean fewer roles: keep what came, but say so.
            RC_SIZE_LIMIT_EXCEEDED => warn!(user = %dn, %base, "ldap group search hit the server's size limit"),
            _ => return Err(self.search_error("group search", base, &result.1)),
        }
        Ok(result.0.into_iter().map(|e| SearchEntry::construct(e).dn).collect())
    }

    fn search_error(&self, what: &str, base: &str, result: &ldap3::LdapResult) -> LdapError {
        if is_unavailable(result.rc) {
            self.unavailable(format!("{what}: {result}"))
        } else {
            LdapError::Directory(format!("{what} under {base}: {result}"))
        }
    }

    /// Runs one LDAP step, giving up after the timeout; failures of the connection are `Unavailable`.
    async fn bounded<T>(
        &self,
        what: &str,
        step: impl Future<Output = ldap3::result::Result<T>>,
    ) -> Result<T, LdapError> {
        match tokio::time::timeout(self.timeout, step).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(ldap3::LdapError::Timeout { .. })) | Err(_) => {
                Err(self.unavailable(format!("{what}: no answer within {:?}", self.timeout)))
            }
            Ok(Err(ldap3::LdapError::LdapResult { result })) if !is_unavailable(result.rc) => {
                Err(LdapError::Directory(format!("{what}: {result}")))
            }
            Ok(Err(ldap3::LdapError::FilterParsing)) => Err(LdapError::Directory(format!(
                "{what}: the server rejected an invalid filter"
            ))),
            // Everything else is the connection failing: refused, reset, TLS handshake, certificate, busy.
            Ok(Err(e)) => Err(self.unavailable(format!("{what}: {e}"))),
        }
    }

    fn unavailable(&self, reason: String) -> LdapError {
        LdapError::Unavailable {
            server: self.server.clone(),
            reason,
        }
    }
}

/// Group DNs, deduplicated case-insensitively, keeping the first spelling.
#[derive(Default)]
struct Groups(std::collections::BTreeMap<String, String>);

impl Groups {
    fn insert(&mut self, dn: &str) {
        self.0
            .entry(cube_kit::dn::normalize_lenient(dn))
            .or_insert_with(|| dn.to_owned());
    }

    fn into_sorted(self) -> Vec<String> {
        self.0.into_values().collect()
    }
}

fn is_unavailable(rc: u32) -> bool {
    rc == RC_BUSY || rc == RC_UNAVAILABLE
}

/// Returns the values of an attribute, whose name the server may spell in another case than the request.
fn attribute<'a>(entry: &'a SearchEntry, name: &str) -> Option<&'a Vec<String>> {
    entry
        .attrs
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, values)| values)
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn invalid(flag: &'static str, reason: String) -> LdapConfigError {
    LdapConfigError::Invalid { flag, reason }
}

/// Checks the server URL, and returns whether the connection uses TLS.
fn check_server_url(server: &str, use_tls: bool) -> Result<bool, LdapConfigError> {
    const FLAG: &str = "--ldap-server (AUTH_LDAP_SERVER)";
    let lower = server.to_ascii_lowercase();
    let (ldaps, rest) = if let Some(rest) = lower.strip_prefix("ldaps://") {
        (true, rest)
    } else if let Some(rest) = lower.strip_prefix("ldap://") {
        (false, rest)
    } else {
        return Err(invalid(
            FLAG,
            format!("{server:?} is not an LDAP URL: expected ldap://HOST:389 or ldaps://HOST:636"),
        ));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err(invalid(
            FLAG,
            format!("{server:?} names no host: expected ldap://HOST:389 or ldaps://HOST:636"),
        ));
    }
    if ldaps && use_tls {
        return Err(invalid(
            "--ldap-use-tls (AUTH_LDAP_USE_TLS)",
            format!("StartTLS upgrades an ldap:// connection, but {server} is already ldaps://: set one or the other"),
        ));
    }
    Ok(ldaps || use_tls)
}

fn attribute_name(flag: &'static str, name: &str) -> Result<String, LdapConfigError> {
    let name = name.trim();
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ';');
    if valid {
        Ok(name.to_owned())
    } else {
        Err(invalid(
            flag,
            format!("{name:?} is not an attribute name: expected letters, digits and '-', e.g. uid or sAMAccountName"),
        ))
    }
}

fn check_filter(flag: &'static str, sample: &str, as_given: &str) -> Result<(), LdapConfigError> {
    ldap3::parse_filter(sample).map(drop).map_err(|()| {
        invalid(
            flag,
            format!("{as_given:?} is not an LDAP filter (RFC 4515), e.g. (objectClass=inetOrgPerson)"),
        )
    })
}

/// Parses `ROLE=GROUP_DN;ROLE=GROUP_DN`, each role split from its DN at the first `=`.
fn parse_roles_mapping(mapping: &str) -> Result<Vec<(String, String)>, LdapConfigError> {
    const FLAG: &str = "--ldap-roles-mapping (AUTH_ROLES_MAPPING)";
    let mut roles = Vec::new();
    for entry in mapping.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |what: &str| {
            invalid(
                FLAG,
                format!(
                    "entry {entry:?} {what}: expected ROLE=GROUP_DN, e.g. admin=cn=admins,ou=groups,dc=example,dc=com"
                ),
            )
        };
        let (role, dn) = entry.split_once('=').ok_or_else(|| bad("has no '='"))?;
        let (role, dn) = (role.trim(), dn.trim());
        if role.is_empty() {
            return Err(bad("names no role"));
        }
        if !dn.contains('=') {
            return Err(bad("names no group DN"));
        }
        roles.push((role.to_owned(), cube_kit::dn::normalize_lenient(dn)));
    }
    Ok(roles)
}

/// Builds a rustls client config that trusts the CA certificates of a PEM file, and only those.
fn client_config(path: &Path) -> Result<Arc<rustls::ClientConfig>, LdapConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let fail = |reason: String| LdapConfigError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| fail(e.to_string()))? {
        let cert = cert.map_err(|e| fail(format!("not a PEM file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("invalid CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(fail("it holds no CERTIFICATE block".to_owned()));
    }
    // The provider is named rather than taken from the process default, which rustls cannot pick by itself when
    // another crate of the binary enables a second one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(format!("no TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_dns_compare_in_the_one_normal_form_projects_uses() {
        assert_eq!(
            cube_kit::dn::normalize_lenient(" CN=Admins , OU=Groups,dc=Cube "),
            "cn=admins,ou=groups,dc=cube"
        );
        assert_eq!(
            cube_kit::dn::normalize_lenient("cn=a\\2C b,dc=x"),
            cube_kit::dn::normalize_lenient("CN=A\\, B, DC=x")
        );
    }

    #[test]
    fn roles_mapping_splits_at_the_first_equals_sign() {
        let roles = parse_roles_mapping("admin=cn=admins,ou=groups;; user = CN=ML,ou=groups ;").expect("valid");
        assert_eq!(
            roles,
            [
                ("admin".to_owned(), "cn=admins,ou=groups".to_owned()),
                ("user".to_owned(), "cn=ml,ou=groups".to_owned())
            ]
        );
        for bad in ["admin", "=cn=admins", "admin=admins"] {
            let err = parse_roles_mapping(bad).expect_err(bad).to_string();
            assert!(err.contains("expected ROLE=GROUP_DN"), "{err}");
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let secret = Secret::from("hunter2".to_owned());
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2");
    }
}
