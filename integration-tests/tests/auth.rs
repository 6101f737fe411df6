//! Auth as other services see it, through the gateway: every service verifies tokens itself with the shared
//! gate (keys fetched from auth, API tokens checked with auth), and a revoked API token stops working on a
//! service other than auth within 5 seconds, whether the revocation arrives as an event (in process, or over
//! Redis Streams) or the short API-token cache runs out. Every test runs on both shapes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cube_auth::{Auth, AuthArgs};
use cube_bus::EventBus;
use cube_integration_tests::echo::EchoRequest;
use cube_integration_tests::echo::echo_service_client::EchoServiceClient;
use cube_integration_tests::shape::{Backing, Shape};
use cube_integration_tests::{ECHO_PACKAGE, Running, connect, start_echo_behind, start_gateway, start_server};
use cube_kit::ApiError;
use cube_kit::Channel;
use cube_kit::identity::jws::PublicKey;
use cube_kit::identity::{Authority, Gate, Principal, RemoteAuthority, RevokedCredential, Verifier, VerifierOptions};
use cube_proto::cube::auth::v1::api_token_service_client::ApiTokenServiceClient;
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::{ApiToken, CreateApiTokenRequest, DeleteApiTokenRequest, LoginRequest, LogoutRequest};
use futures::future::BoxFuture;
use tonic::Code;

const ADMIN_PASSWORD: &str = "integration admin password";

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
    request
}

/// Asks auth like [`RemoteAuthority`], counting the key fetches.
struct CountingAuthority {
    remote: RemoteAuthority,
    key_fetches: Arc<AtomicUsize>,
}

impl Authority for CountingAuthority {
    fn public_keys(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, ApiError>> {
        self.key_fetches.fetch_add(1, Ordering::Relaxed);
        self.remote.public_keys()
    }

    fn introspect<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>> {
        self.remote.introspect(token)
    }

    fn revocations(&self) -> BoxFuture<'_, Result<Vec<RevokedCredential>, ApiError>> {
        self.remote.revocations()
    }

    fn act_for<'a>(&'a self, token: &'a str, user: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>> {
        self.remote.act_for(token, user)
    }
}

/// Auth, the echo service as "another service", and the gateway in front of both, all over TCP.
struct Platform {
    /// How often echo's verifier fetched auth's keys.
    key_fetches: Arc<AtomicUsize>,
    gateway: Running,
    _auth: Running,
    _echo: Running,
    _background: cube_auth::Background,
    _feed: Option<cube_kit::identity::RevocationFeed>,
    /// The platform's bus.
    bus: Arc<dyn EventBus>,
    _backing: Backing,
}

/// Starts the platform of `shape`; the echo service trusts a checked API token for `api_token_ttl`, and follows
/// revocations on the bus when `follow`.
async fn platform(shape: Shape, follow: bool, api_token_ttl: Duration) -> Platform {
    let mut backing = Backing::new(shape);
    let bus = backing.bus();
    let database = backing.database("auth").await;
    let args = AuthArgs::embedded(database, Some(ADMIN_PASSWORD.into())).expect("auth flags");
    let auth = Auth::start(&args, bus.clone()).await.expect("starting auth");
    let background = auth.background;
    let auth = start_server(auth.server).await;

    let key_fetches = Arc::new(AtomicUsize::new(0));
    let authority = CountingAuthority {
        remote: RemoteAuthority::new(Channel::remote(&auth.url()).expect("auth url")),
        key_fetches: key_fetches.clone(),
    };
    let verifier = Verifier::new(
        Arc::new(authority),
        VerifierOptions {
            api_token_ttl,
            ..VerifierOptions::default()
        },
    );
    let feed = if follow {
        let group = format!("echo-revocations-{}", uuid::Uuid::new_v4().simple());
        Some(verifier.follow(&bus, &group).await.expect("following revocations"))
    } else {
        None
    };
    let echo = start_echo_behind(Gate::new(verifier, &[])).await;
    let gateway = cube_gateway::Gateway::new(4 << 20)
        .route("cube.auth.v1", Channel::remote(&auth.url()).expect("auth url"))
        .route(ECHO_PACKAGE, Channel::remote(&echo.url()).expect("echo url"));
    let gateway = start_gateway(gateway).await;
    Platform {
        key_fetches,
        gateway,
        _auth: auth,
        _echo: echo,
        _background: background,
        _feed: feed,
        bus,
        _backing: backing,
    }
}

async fn echo(channel: &tonic::transport::Channel, token: &str) -> Result<(), tonic::Status> {
    EchoServiceClient::new(channel.clone())
        .echo(authed(
            EchoRequest {
                message: "hello".into(),
                ..EchoRequest::default()
            },
            token,
        ))
        .await
        .map(|_| ())
}

/// Logs in through the gateway, makes an API token, checks it works on echo, revokes it, and returns how long
/// echo kept accepting it.
async fn revocation_delay(platform: &Platform) -> Duration {
    let channel = connect(&platform.gateway).await;
    let login = AuthServiceClient::new(channel.clone())
        .login(LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("logging in through the gateway")
        .into_inner();
    echo(&channel, &login.access_token)
        .await
        .expect("an access token works on echo");
    let anonymous = EchoServiceClient::new(channel.clone())
        .echo(EchoRequest::default())
        .await
        .expect_err("echo without a token");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let mut tokens = ApiTokenServiceClient::new(channel.clone());
    let created = tokens
        .create_api_token(authed(
            CreateApiTokenRequest {
                parent: "users/me".into(),
                api_token: Some(ApiToken {
                    display_name: "ci".into(),
                    ..ApiToken::default()
                }),
            },
            &login.access_token,
        ))
        .await
        .expect("creating an API token")
        .into_inner();
    echo(&channel, &created.secret)
        .await
        .expect("the API token works on echo");
    let name = created.api_token.expect("token").name;
    tokens
        .delete_api_token(authed(DeleteApiTokenRequest { name }, &login.access_token))
        .await
        .expect("revoking");
    let revoked = Instant::now();
    loop {
        match echo(&channel, &created.secret).await {
            Ok(()) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                return revoked.elapsed();
            }
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(10),
            "echo still accepts a revoked API token after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_revoked_api_token_is_refused_by_another_service_through_the_gateway_via_events(shape: Shape) {
    // A minute-long cache: only the event can cut it short.
    let platform = platform(shape, true, Duration::from_secs(60)).await;
    let delay = revocation_delay(&platform).await;
    eprintln!("refused {delay:?} after revocation (event)");
    assert!(delay < Duration::from_secs(5), "took {delay:?}");
}

async fn a_revoked_api_token_is_refused_within_5_seconds_without_events(shape: Shape) {
    // No bus subscription at all: the default 2-second API-token cache bounds the delay.
    let platform = platform(shape, false, VerifierOptions::default().api_token_ttl).await;
    let delay = revocation_delay(&platform).await;
    eprintln!("refused {delay:?} after revocation (cache expiry)");
    assert!(delay < Duration::from_secs(5), "took {delay:?}");
}

async fn logout_ends_access_tokens_on_another_service(shape: Shape) {
    let platform = platform(shape, true, Duration::from_secs(60)).await;
    let channel = connect(&platform.gateway).await;
    let login = AuthServiceClient::new(channel.clone())
        .login(LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("login")
        .into_inner();
    echo(&channel, &login.access_token).await.expect("works before logout");
    AuthServiceClient::new(channel.clone())
        .logout(authed(LogoutRequest {}, &login.access_token))
        .await
        .expect("logout");
    let started = Instant::now();
    loop {
        if let Err(status) = echo(&channel, &login.access_token).await {
            assert_eq!(status.code(), Code::Unauthenticated);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "echo accepts a logged-out token after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_service_started_after_a_logout_still_refuses_the_session(shape: Shape) {
    let platform = platform(shape, true, Duration::from_secs(60)).await;
    let bus = platform.bus.clone();
    let channel = connect(&platform.gateway).await;
    let login = AuthServiceClient::new(channel.clone())
        .login(LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("login")
        .into_inner();
    AuthServiceClient::new(channel.clone())
        .logout(authed(LogoutRequest {}, &login.access_token))
        .await
        .expect("logout");
    // Give the outbox time to publish, then start a second echo service that knows nothing yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let auth_url = format!("http://{}", platform._auth.address);
    let verifier = Verifier::new(
        Arc::new(RemoteAuthority::new(Channel::remote(&auth_url).expect("auth url"))),
        VerifierOptions::default(),
    );
    let group = format!("late-echo-{}", uuid::Uuid::new_v4().simple());
    let _feed = verifier.follow(&bus, &group).await.expect("following");
    let late = start_echo_behind(Gate::new(verifier, &[])).await;
    let late_channel = tonic::transport::Endpoint::from_shared(late.url())
        .expect("url")
        .connect()
        .await
        .expect("connecting");
    let started = Instant::now();
    loop {
        if let Err(status) = echo(&late_channel, &login.access_token).await {
            assert_eq!(status.code(), Code::Unauthenticated);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a service started after the logout accepts the ended session's token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another session's token is accepted by the late service: the refusal above was the revocation.
    let other = AuthServiceClient::new(channel.clone())
        .login(LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("login")
        .into_inner();
    echo(&late_channel, &other.access_token)
        .await
        .expect("a live session works on the late service");
}

async fn a_deactivated_user_is_refused_by_another_service_within_5_seconds(shape: Shape) {
    use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
    use cube_proto::cube::auth::v1::{CreateUserRequest, UpdateUserRequest, User};

    let platform = platform(shape, true, Duration::from_secs(60)).await;
    let channel = connect(&platform.gateway).await;
    let mut auth = AuthServiceClient::new(channel.clone());
    let admin = auth
        .login(LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("admin login")
        .into_inner()
        .access_token;
    let mut users = UserServiceClient::new(channel.clone());
    users
        .create_user(authed(
            CreateUserRequest {
                user: Some(User {
                    email: "dana@example.com".into(),
                    ..User::default()
                }),
                user_id: "dana".into(),
                password: "dana's long password".into(),
            },
            &admin,
        ))
        .await
        .expect("creating dana");
    let dana = auth
        .login(LoginRequest {
            username: "dana".into(),
            password: "dana's long password".into(),
        })
        .await
        .expect("dana logs in")
        .into_inner()
        .access_token;
    echo(&channel, &dana).await.expect("dana's token works on echo");
    users
        .update_user(authed(
            UpdateUserRequest {
                user: Some(User {
                    name: "users/dana".into(),
                    active: false,
                    ..User::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["active".into()],
                }),
            },
            &admin,
        ))
        .await
        .expect("deactivating dana");
    let deactivated = Instant::now();
    loop {
        if let Err(status) = echo(&channel, &dana).await {
            assert_eq!(status.code(), Code::Unauthenticated);
            break;
        }
        assert!(
            deactivated.elapsed() < Duration::from_secs(5),
            "echo accepts a deactivated user's access token after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("refused {:?} after deactivation", deactivated.elapsed());
    echo(&channel, &admin).await.expect("other users are unaffected");
}

/// Logs `username` in through `channel` and returns the access token.
async fn access_token(channel: &tonic::transport::Channel, username: &str, password: &str) -> String {
    AuthServiceClient::new(channel.clone())
        .login(LoginRequest {
            username: username.into(),
            password: password.into(),
        })
        .await
        .unwrap_or_else(|status| panic!("{username} logs in: {status:?}"))
        .into_inner()
        .access_token
}

/// A token for `admin` signed by a key of its own, with a random key id that auth never published.
fn made_up_key_token() -> String {
    use cube_kit::identity::jws::{Claims, SigningKey};
    let now = cube_kit::identity::unix_now();
    SigningKey::generate()
        .expect("a key")
        .sign(&Claims {
            iss: "cube".into(),
            aud: "cube".into(),
            sub: "admin".into(),
            roles: vec!["admin".into()],
            groups: Vec::new(),
            sid: "made-up".into(),
            jti: "made-up".into(),
            iat: now,
            exp: now + 600,
        })
        .expect("signing")
}

async fn made_up_key_ids_neither_stall_callers_nor_flood_auth_and_a_rotated_key_gets_through(shape: Shape) {
    use cube_proto::cube::auth::v1::{GetJwksRequest, RotateSigningKeyRequest, WhoAmIRequest};
    use futures::StreamExt as _;

    let platform = platform(shape, true, Duration::from_secs(60)).await;
    let channel = connect(&platform.gateway).await;
    let first_key = access_token(&channel, "admin", ADMIN_PASSWORD).await;
    echo(&channel, &first_key).await.expect("a real token works on echo");

    // 1,000 tokens with made-up key ids, 4 at a time, while an admin rotates the key once 200 have gone.
    let tokens: Vec<String> = (0..1000).map(|_| made_up_key_token()).collect();
    let sent = Arc::new(AtomicUsize::new(0));
    let flood_started = Instant::now();
    let flood = {
        let channel = channel.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            futures::stream::iter(tokens)
                .map(|token| {
                    let channel = channel.clone();
                    let sent = sent.clone();
                    async move {
                        let started = Instant::now();
                        let answer = echo(&channel, &token).await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        (started.elapsed(), answer)
                    }
                })
                .buffer_unordered(4)
                .collect::<Vec<_>>()
                .await
        })
    };
    cube_testkit::eventually("200 made-up tokens sent", Duration::from_secs(30), || {
        let sent = sent.load(Ordering::Relaxed);
        async move { (sent >= 200).then_some(()) }
    })
    .await;
    AuthServiceClient::new(channel.clone())
        .rotate_signing_key(authed(RotateSigningKeyRequest {}, &first_key))
        .await
        .expect("rotating the key");
    let second_key = access_token(&channel, "admin", ADMIN_PASSWORD).await;
    let rotated = Instant::now();
    // The rotation is announced, and the fetch after a refusal comes at most one interval later anyway.
    while let Err(status) = echo(&channel, &second_key).await {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            rotated.elapsed() < Duration::from_secs(5),
            "a token of the rotated key is still refused after {:?}",
            rotated.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let accepted_after = rotated.elapsed();
    let answers = flood.await.expect("the flood");
    let flood_took = flood_started.elapsed();
    assert_eq!(answers.len(), 1000);
    let slowest = answers.iter().map(|(took, _)| *took).max().unwrap_or_default();
    // How fast they are refused is measured by auth-bench; here, that each is refused.
    for (_, answer) in &answers {
        let status = answer.as_ref().expect_err("a made-up key id is refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    // At most one fetch per started 500 ms interval, plus the real token's first, the rotation's, and the one
    // scheduled at the end of the last interval.
    let fetches = platform.key_fetches.load(Ordering::Relaxed);
    let intervals = usize::try_from(flood_took.as_millis().div_ceil(500)).unwrap_or(usize::MAX);
    assert!(
        fetches <= intervals + 3,
        "{fetches} key fetches for 1,000 made-up key ids in {flood_took:?}"
    );
    eprintln!(
        "1,000 made-up key ids refused in {flood_took:?}, slowest after {slowest:?}, with {fetches} key fetches; \
         the rotated key's token accepted after {accepted_after:?}"
    );

    // Two more rotations keep three keys: the first one is retired and its tokens stop working everywhere.
    for _ in 0..2 {
        AuthServiceClient::new(channel.clone())
            .rotate_signing_key(authed(RotateSigningKeyRequest {}, &second_key))
            .await
            .expect("rotating again");
    }
    let jwks = AuthServiceClient::new(channel.clone())
        .get_jwks(GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner();
    assert_eq!(jwks.keys.len(), cube_auth::credentials::KEPT_KEYS, "{jwks:?}");
    cube_testkit::eventually("auth refuses the retired key's token", Duration::from_secs(5), || {
        let mut auth = AuthServiceClient::new(channel.clone());
        let first_key = first_key.clone();
        async move {
            match auth.who_am_i(authed(WhoAmIRequest {}, &first_key)).await {
                Err(status) if status.code() == Code::Unauthenticated => Some(()),
                _ => None,
            }
        }
    })
    .await;
    cube_testkit::eventually("echo refuses the retired key's token", Duration::from_secs(5), || {
        let channel = channel.clone();
        let first_key = first_key.clone();
        async move { echo(&channel, &first_key).await.is_err().then_some(()) }
    })
    .await;
    echo(&channel, &second_key)
        .await
        .expect("a token of a key still kept works");
}

cube_integration_tests::on_every_shape!(
    a_revoked_api_token_is_refused_by_another_service_through_the_gateway_via_events,
    a_revoked_api_token_is_refused_within_5_seconds_without_events,
    logout_ends_access_tokens_on_another_service,
    a_service_started_after_a_logout_still_refuses_the_session,
    a_deactivated_user_is_refused_by_another_service_within_5_seconds,
    made_up_key_ids_neither_stall_callers_nor_flood_auth_and_a_rotated_key_gets_through,
);
