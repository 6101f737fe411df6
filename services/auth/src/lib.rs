//! Cube's auth service (`cube.auth.v1`): users, password and LDAP login, access, refresh and API tokens,
//! platform roles and the audit log.
//!
//! [`Auth::start`] opens the database, loads the signing keys, creates the built-in roles and, on a fresh
//! database, the `admin` account, and returns the server with every RPC behind the shared authentication gate.

mod api_tokens;
mod audit;
mod core;
pub mod credentials;
pub mod ldap;
mod login;
pub mod model;
mod revocations;
mod roles;
mod service_accounts;
pub mod throttle;
mod users;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use cube_bus::EventBus;
use cube_kit::ApiError;
use cube_kit::config::{DatabaseArgs, RedisArgs, parse_duration};
use cube_kit::identity::jws::PublicKey;
use cube_kit::identity::{Authority, Gate, Principal, RevocationFeed, RevokedCredential, Verifier, VerifierOptions};
use cube_kit::{Server, db};
use cube_proto::cube::auth::v1::api_token_service_server::ApiTokenServiceServer;
use cube_proto::cube::auth::v1::audit_service_server::AuditServiceServer;
use cube_proto::cube::auth::v1::auth_service_server::AuthServiceServer;
use cube_proto::cube::auth::v1::role_service_server::RoleServiceServer;
use cube_proto::cube::auth::v1::service_account_service_server::ServiceAccountServiceServer;
use cube_proto::cube::auth::v1::user_service_server::UserServiceServer;
use futures::future::BoxFuture;
use sea_orm::{EntityTrait as _, PaginatorTrait as _, TransactionTrait as _};
use tokio::sync::Notify;

use crate::core::{Audit, Core, Options};
use crate::ldap::{Directory, LdapArgs};
pub use crate::login::USER_CREATED;
use crate::model::{Migrator, user};
use crate::throttle::{LoginThrottle, ThrottlePolicy};

/// The methods anyone may call without a token.
pub const ANONYMOUS_METHODS: &[&str] = &[
    "/cube.auth.v1.AuthService/Login",
    "/cube.auth.v1.AuthService/RefreshToken",
    "/cube.auth.v1.AuthService/GetJwks",
    "/cube.auth.v1.AuthService/GetRevocationList",
];

/// The largest request auth decodes: generous, so that oversized fields (a 10 MB password) reach validation and
/// are refused by name rather than by the transport.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// The auth service's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// Where users, tokens and roles are stored.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Redis for failed-login counters shared by replicas (in-process counters when unset).
    #[command(flatten)]
    pub redis: RedisArgs,
    /// LDAP login.
    #[command(flatten)]
    pub ldap: LdapArgs,
    /// The password of the `admin` account created on first start; generated and printed once when unset.
    #[arg(long = "admin-password", env = "CUBE_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// How long an access token lives (e.g. 15m).
    #[arg(long = "access-token-ttl", env = "CUBE_ACCESS_TOKEN_TTL", default_value = "15m", value_parser = parse_duration)]
    pub access_token_ttl: Duration,
    /// How long a login session (its chain of refresh tokens) lives (e.g. 168h).
    #[arg(long = "session-ttl", env = "CUBE_SESSION_TTL", default_value = "168h", value_parser = parse_duration)]
    pub session_ttl: Duration,
    /// Proxies (the gateway) whose `x-forwarded-for` names the client, by IP address; comma-separated.
    #[arg(long = "trusted-proxies", env = "CUBE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpAddr>,
}

impl AuthArgs {
    /// The flags `cube up` runs auth with: an SQLite file, no Redis, LDAP only when the `AUTH_LDAP_*`
    /// environment variables configure it.
    ///
    /// # Errors
    /// Returns clap's error when an `AUTH_LDAP_*` variable holds an invalid value.
    pub fn embedded(database_url: String, admin_password: Option<String>) -> Result<Self, clap::Error> {
        #[derive(clap::Parser)]
        struct LdapOnly {
            #[command(flatten)]
            ldap: LdapArgs,
        }
        let LdapOnly { ldap } = clap::Parser::try_parse_from(["cube"])?;
        Ok(Self {
            database: DatabaseArgs {
                database_url,
                migrate: true,
            },
            redis: RedisArgs {
                redis_url: None,
                redis_namespace: "cube".to_owned(),
            },
            ldap,
            admin_password,
            access_token_ttl: Duration::from_secs(15 * 60),
            session_ttl: Duration::from_secs(7 * 24 * 3600),
            trusted_proxies: Vec::new(),
        })
    }
}

/// Why auth could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Database(#[from] db::DbError),
    /// The LDAP flags are inconsistent.
    #[error("LDAP configuration: {0}")]
    Ldap(#[from] ldap::LdapConfigError),
    /// The Redis URL is invalid.
    #[error(transparent)]
    Redis(#[from] cube_kit::redis::RedisError),
    /// The revocation events could not be subscribed to.
    #[error("subscribing to revocation events: {0}")]
    Bus(#[from] cube_bus::BusError),
    /// Setting up the tables, keys or the admin account failed.
    #[error("setting up auth: {0}")]
    Setup(#[from] ApiError),
}

/// The `admin` account made on first start.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// The username, `admin`.
    pub username: String,
    /// The generated password, when none was given: shown once, never stored in clear.
    pub generated_password: Option<String>,
}

/// A started auth service: its server, plus the work that must run while it serves.
#[derive(Debug)]
pub struct Auth {
    /// The gRPC server, to serve or to route to in-process.
    pub server: Server,
    /// Set when this start created the `admin` account.
    pub bootstrap: Option<Bootstrap>,
    /// Keep alive while serving: the outbox relay and the revocation feed.
    pub background: Background,
    /// Issues the service-account tokens of services started in this process (`cube up`).
    pub service_accounts: ServiceAccountIssuer,
}

/// Issues service-account tokens in the process that runs auth, for the services `cube up` starts beside it
/// (deployed services read theirs from `--service-token-file`).
#[derive(Clone)]
pub struct ServiceAccountIssuer(Arc<Core>);

impl std::fmt::Debug for ServiceAccountIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceAccountIssuer")
    }
}

impl ServiceAccountIssuer {
    /// Makes service account `id` anew and returns its token; a token made for it before no longer works.
    ///
    /// # Errors
    /// Returns why the account could not be stored.
    pub async fn renew(&self, id: &str) -> Result<String, ApiError> {
        service_accounts::renew_account(&self.0.db, id).await
    }
}

/// Background work that stops when dropped.
#[derive(Debug)]
pub struct Background {
    _relay: cube_kit::task::Background,
    _feed: RevocationFeed,
}

/// Auth's own answers to its verifier: keys from the keyring, API tokens from the database.
struct LocalAuthority {
    core: OnceLock<Weak<Core>>,
}

impl LocalAuthority {
    fn core(&self) -> Result<Arc<Core>, ApiError> {
        self.core
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| ApiError::internal("auth is shutting down"))
    }
}

impl Authority for LocalAuthority {
    fn public_keys(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, ApiError>> {
        Box::pin(async move {
            let core = self.core()?;
            core.keyring.refresh(&core.db).await?;
            Ok(core
                .keyring
                .published(core::millis(core.options.access_token_ttl) + 120_000))
        })
    }

    fn introspect<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>> {
        Box::pin(async move {
            let core = self.core()?;
            api_tokens::introspect(&core, token).await
        })
    }

    fn revocations(&self) -> BoxFuture<'_, Result<Vec<RevokedCredential>, ApiError>> {
        Box::pin(async move {
            let core = self.core()?;
            revocations::in_force(&core.db).await
        })
    }

    fn act_for<'a>(&'a self, token: &'a str, user: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>> {
        Box::pin(async move {
            let core = self.core()?;
            service_accounts::act_for(&core, token, user).await
        })
    }
}

impl Auth {
    /// Opens the database, sets up keys, roles and the admin account, and builds the server; revocations are
    /// published on and followed from `bus`.
    ///
    /// # Errors
    /// Returns why auth cannot start.
    pub async fn start(args: &AuthArgs, bus: Arc<dyn EventBus>) -> Result<Self, StartError> {
        let db = db::connect::<Migrator>(&args.database.database_url, args.database.migrate).await?;
        let directory = Directory::from_args(&args.ldap)?;
        let throttle = match &args.redis.redis_url {
            Some(url) => LoginThrottle::redis(cube_kit::redis::pool(url)?, ThrottlePolicy::default()),
            None => LoginThrottle::in_process(ThrottlePolicy::default()),
        };
        let keyring = credentials::Keyring::load(&db).await?;
        let authority = Arc::new(LocalAuthority { core: OnceLock::new() });
        let verifier = Verifier::new(authority.clone(), VerifierOptions::default());
        let outbox = Arc::new(Notify::new());
        let core = Arc::new(Core {
            db: db.clone(),
            keyring,
            directory,
            throttle,
            verifier: verifier.clone(),
            outbox: outbox.clone(),
            options: Options {
                issuer: VerifierOptions::default().issuer,
                access_token_ttl: args.access_token_ttl,
                session_ttl: args.session_ttl,
                trusted_proxies: args.trusted_proxies.clone(),
            },
            profiles: core::Profiles::default(),
        });
        let _ = authority.core.set(Arc::downgrade(&core));
        roles::ensure_builtin_roles(&db).await?;
        let bootstrap = bootstrap_admin(&core, args.admin_password.clone()).await?;
        let feed = verifier
            .follow(&bus, &format!("auth-revocations-{}", credentials::random_hex::<8>()?))
            .await?;
        let relay = cube_kit::task::Background::spawn(core::relay_outbox(db, bus, outbox));
        let server = Server::new("auth", "cube.auth.v1")
            .authenticate(Gate::new(verifier, ANONYMOUS_METHODS))
            .add_service(
                AuthServiceServer::new(login::Login(core.clone())).max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                UserServiceServer::new(users::Users(core.clone())).max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(ApiTokenServiceServer::new(api_tokens::ApiTokens(core.clone())))
            .add_service(RoleServiceServer::new(roles::Roles(core.clone())))
            .add_service(ServiceAccountServiceServer::new(service_accounts::ServiceAccounts(
                core.clone(),
            )))
            .add_service(AuditServiceServer::new(audit::AuditLog(core.clone())));
        Ok(Self {
            server,
            bootstrap,
            service_accounts: ServiceAccountIssuer(core),
            background: Background {
                _relay: relay,
                _feed: feed,
            },
        })
    }
}

/// Creates the `admin` account (bound to the admin role) when the database has no users yet.
async fn bootstrap_admin(core: &Core, password: Option<String>) -> Result<Option<Bootstrap>, ApiError> {
    if user::Entity::find().count(&core.db).await.map_err(core::db_error)? > 0 {
        return Ok(None);
    }
    let generated = match password {
        Some(_) => None,
        None => Some(credentials::random_secret()?.chars().take(24).collect::<String>()),
    };
    let password = password.or_else(|| generated.clone()).unwrap_or_default();
    core::check_password("admin-password", &password, core::MIN_NEW_PASSWORD_BYTES)?;
    let hash = credentials::hash_password(password).await?;
    let now = cube_kit::time::now_ms();
    let txn = core.db.begin().await.map_err(core::db_error)?;
    user::Entity::insert(sea_orm::IntoActiveModel::into_active_model(user::Model {
        username: "admin".into(),
        email: "admin@cube.local".into(),
        display_name: "Administrator".into(),
        active: true,
        source: "local".into(),
        password_hash: Some(hash),
        groups: "[]".into(),
        created_ms: now,
        updated_ms: now,
        last_login_ms: None,
    }))
    .exec(&txn)
    .await
    .map_err(core::db_error)?;
    roles::bind_user(&txn, cube_kit::identity::ADMIN_ROLE, "admin").await?;
    core::audit(
        &txn,
        Audit {
            actor: "users/admin",
            action: "user.create",
            target: "users/admin",
            success: true,
            client: None,
            detail: "created on first start",
        },
    )
    .await?;
    txn.commit().await.map_err(core::db_error)?;
    tracing::info!("created the admin account");
    Ok(Some(Bootstrap {
        username: "admin".into(),
        generated_password: generated,
    }))
}

/// Why the auth binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Auth could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Serving failed.
    #[error(transparent)]
    Run(#[from] cube_kit::cli::RunError),
}

/// Runs auth on its own (`cube-auth`, `cube serve auth`) until SIGTERM or SIGINT.
///
/// # Errors
/// Returns why auth could not start or stopped serving.
pub async fn serve(serve: cube_kit::cli::ServeArgs, args: AuthArgs) -> Result<(), ServeError> {
    let bus = cube_kit::redis::bus(&args.redis).map_err(StartError::from)?;
    let auth = Auth::start(&args, bus).await?;
    if let Some(bootstrap) = &auth.bootstrap {
        print_bootstrap(bootstrap);
    }
    let _background = auth.background;
    cube_kit::cli::serve(auth.server, serve).await?;
    Ok(())
}

/// Prints how to log in as the `admin` account just created; the only time a generated password is shown.
pub fn print_bootstrap(bootstrap: &Bootstrap) {
    match &bootstrap.generated_password {
        Some(password) => println!(
            "created the admin account: username {}, password {password} (shown only now; change it with \
             UserService.ChangePassword)",
            bootstrap.username
        ),
        None => println!(
            "created the admin account: username {}, password from --admin-password",
            bootstrap.username
        ),
    }
}
