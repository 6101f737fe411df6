//! Starts the real auth service on loopback, on a real database, and gives tests clients and tokens.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses its own part of the harness"
)]

pub mod directory;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cube_auth::{Auth, AuthArgs, Background};
use cube_bus::{BusOptions, EventBus, MemoryBus};
use cube_kit::config::ServerArgs;
use cube_kit::metrics::RpcMetrics;
use cube_proto::cube::auth::v1::api_token_service_client::ApiTokenServiceClient;
use cube_proto::cube::auth::v1::audit_service_client::AuditServiceClient;
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::role_service_client::RoleServiceClient;
use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
use cube_proto::cube::auth::v1::{CreateUserRequest, LoginRequest, LoginResponse, User};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The admin password every harness starts with.
pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";

/// A running auth service.
pub struct Harness {
    /// Where it listens.
    pub address: SocketAddr,
    /// A connected channel.
    pub channel: Channel,
    /// The bus it publishes on.
    pub bus: Arc<dyn EventBus>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _background: Background,
}

/// The flags auth starts with in tests: the given database, no Redis, no LDAP.
pub fn args(database_url: &str) -> AuthArgs {
    let mut args = AuthArgs::embedded(database_url.to_owned(), Some(ADMIN_PASSWORD.to_owned()))
        .unwrap_or_else(|error| panic!("auth flags: {error}"));
    args.ldap.server = None;
    args
}

/// Trusts loopback as a proxy, so that a test's `x-forwarded-for` names the client address of its logins.
pub fn trusting_loopback(mut args: AuthArgs) -> AuthArgs {
    args.trusted_proxies = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    args
}

/// The server flags of test servers.
pub fn server_args(listen: SocketAddr) -> ServerArgs {
    ServerArgs {
        worker_threads: None,
        listen,
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        request_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(1),
    }
}

/// Starts auth with `args` on a fresh in-process bus.
pub async fn start(args: AuthArgs) -> Harness {
    start_on(args, Arc::new(MemoryBus::new(BusOptions::default()))).await
}

/// Starts auth with `args`, publishing on `bus`.
pub async fn start_on(args: AuthArgs, bus: Arc<dyn EventBus>) -> Harness {
    let auth = Auth::start(&args, bus.clone())
        .await
        .unwrap_or_else(|error| panic!("starting auth: {error}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|error| panic!("binding: {error}"));
    let address = listener.local_addr().unwrap_or_else(|error| panic!("address: {error}"));
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone().cancelled_owned();
    let metrics = RpcMetrics::register(&mut prometheus_client::registry::Registry::default());
    let server = auth.server;
    let task = tokio::spawn(async move {
        if let Err(error) = server.serve(listener, &server_args(address), &metrics, signal).await {
            panic!("auth failed: {error}");
        }
    });
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap_or_else(|error| panic!("uri: {error}"))
        .connect()
        .await
        .unwrap_or_else(|error| panic!("connecting to auth: {error}"));
    Harness {
        address,
        channel,
        bus,
        shutdown,
        task: Some(task),
        _background: auth.background,
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Wraps `message` in a request carrying `token` as its bearer token.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}")
        .parse()
        .unwrap_or_else(|error| panic!("token as metadata: {error}"));
    request.metadata_mut().insert("authorization", value);
    request
}

impl Harness {
    /// A client of `AuthService`.
    pub fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// A client of `UserService`.
    pub fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.channel.clone()).max_encoding_message_size(64 << 20)
    }

    /// A client of `ApiTokenService`.
    pub fn tokens(&self) -> ApiTokenServiceClient<Channel> {
        ApiTokenServiceClient::new(self.channel.clone())
    }

    /// A client of `RoleService`.
    pub fn roles(&self) -> RoleServiceClient<Channel> {
        RoleServiceClient::new(self.channel.clone())
    }

    /// A client of `AuditService`.
    pub fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone())
    }

    /// Logs in, panicking on failure.
    pub async fn login(&self, username: &str, password: &str) -> LoginResponse {
        self.try_login(username, password)
            .await
            .unwrap_or_else(|status| panic!("logging in as {username}: {status:?}"))
    }

    /// Logs in.
    pub async fn try_login(&self, username: &str, password: &str) -> Result<LoginResponse, tonic::Status> {
        self.auth()
            .login(LoginRequest {
                username: username.to_owned(),
                password: password.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Logs in as if from `client`, which the service believes when it trusts 127.0.0.1 as a proxy (see
    /// [`trusting_loopback`]).
    pub async fn try_login_from(
        &self,
        username: &str,
        password: &str,
        client: std::net::IpAddr,
    ) -> Result<LoginResponse, tonic::Status> {
        let mut request = tonic::Request::new(LoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
        });
        let forwarded = client
            .to_string()
            .parse()
            .unwrap_or_else(|error| panic!("address as metadata: {error}"));
        request.metadata_mut().insert("x-forwarded-for", forwarded);
        self.auth().login(request).await.map(tonic::Response::into_inner)
    }

    /// Logs in as admin and returns the access token.
    pub async fn admin_token(&self) -> String {
        self.login("admin", ADMIN_PASSWORD).await.access_token
    }

    /// Creates a local user (as `admin_token`) whose password is `<username>-password`.
    pub async fn create_user(&self, admin_token: &str, username: &str) -> User {
        self.users()
            .create_user(authed(
                CreateUserRequest {
                    user: Some(User {
                        email: format!("{username}@example.com"),
                        display_name: username.to_uppercase(),
                        ..User::default()
                    }),
                    user_id: username.to_owned(),
                    password: password_of(username),
                },
                admin_token,
            ))
            .await
            .unwrap_or_else(|status| panic!("creating {username}: {status:?}"))
            .into_inner()
    }
}

/// The password [`Harness::create_user`] gives `username`.
pub fn password_of(username: &str) -> String {
    format!("{username}-password")
}

/// Asserts that `result` failed with `code`, and returns the status.
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    what: &str,
) -> tonic::Status {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, got {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            status
        }
    }
}
