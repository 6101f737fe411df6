//! Benchmarks auth: password logins per second (Argon2id at OWASP's minimum parameters), bearer-token
//! verifications per second on one core (raw Ed25519 signature checks, and repeated tokens served from the
//! verifier's cache of verified claims, which still checks revocations), tokens with made-up key ids (how fast
//! each is refused, and how soon a key rotated meanwhile gets through), and `WhoAmI` through the gateway at
//! concurrency 64 beside the gateway's bare unary figure (Echo through the same gateway).
//!
//! Run: `cargo run --release -p cube-integration-tests --bin auth-bench -- [--seconds 10] [--rounds 3]`.
//! Servers run as child processes of their own (this binary in a server role), as in `gateway-bench`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use cube_auth::credentials::{self, ARGON2_LANES, ARGON2_MEMORY_KIB, ARGON2_PASSES};
use cube_auth::{Auth, AuthArgs};
use cube_bus::{BusOptions, MemoryBus};
use cube_integration_tests::bench::{Caller, Measurement, measure, spawn_role};
use cube_integration_tests::echo::EchoRequest;
use cube_integration_tests::echo::echo_service_client::EchoServiceClient;
use cube_integration_tests::{ECHO_PACKAGE, start_echo, start_gateway, start_server};
use cube_kit::identity::jws::{self, Claims, PublicKey, SigningKey};
use cube_kit::identity::{Authority, Principal, Revocation, RevokedCredential, Verifier, VerifierOptions, unix_now};
use cube_kit::{ApiError, Channel};
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::{LoginRequest, WhoAmIRequest};
use futures::future::BoxFuture;

const ADMIN_PASSWORD: &str = "benchmark admin password";

#[derive(Debug, Parser)]
#[command(about = "Benchmarks Cube's auth: logins, token verification, WhoAmI through the gateway")]
struct Args {
    /// A server role, used when the benchmark re-runs itself as a child process.
    #[command(subcommand)]
    role: Option<Role>,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// How many times each row is measured, rows taking turns; the median of each figure is printed.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of warm-up before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Worker threads of the gateway process (as in gateway-bench: a one-CPU proxy pod).
    #[arg(long, default_value_t = 1)]
    proxy_threads: usize,
}

#[derive(Debug, clap::Subcommand)]
enum Role {
    /// Serves the echo service, open to anyone.
    Echo,
    /// Serves auth on an SQLite file at PATH.
    Auth { path: String },
    /// Serves the gateway in front of echo at ECHO and auth at AUTH.
    Gateway { echo: String, auth: String },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = match &args.role {
        Some(Role::Gateway { .. }) => std::num::NonZeroUsize::new(args.proxy_threads),
        _ => None,
    };
    let runtime = cube_kit::cli::runtime(threads)?;
    match args.role {
        Some(role) => runtime.block_on(serve_role(role)),
        None => runtime.block_on(benchmark(&args)),
    }
}

async fn serve_role(role: Role) -> anyhow::Result<()> {
    // Kept alive while serving.
    let mut _background = None;
    let running = match role {
        Role::Echo => start_echo().await,
        Role::Auth { path } => {
            let args = AuthArgs::embedded(format!("sqlite://{path}"), Some(ADMIN_PASSWORD.into()))?;
            let auth = Auth::start(&args, Arc::new(MemoryBus::new(BusOptions::default()))).await?;
            _background = Some(auth.background);
            start_server(auth.server).await
        }
        Role::Gateway { echo, auth } => {
            let gateway = cube_gateway::Gateway::new(4 << 20)
                .route(ECHO_PACKAGE, Channel::remote(&echo)?)
                .route("cube.auth.v1", Channel::remote(&auth)?);
            start_gateway(gateway).await
        }
    };
    println!("listening {}", running.address);
    std::future::pending::<()>().await;
    Ok(())
}

/// Calls Login with the admin's password.
struct Login(AuthServiceClient<tonic::transport::Channel>);

impl Caller for Login {
    fn call(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let request = LoginRequest {
                username: "admin".into(),
                password: ADMIN_PASSWORD.into(),
            };
            self.0.login(request).await.is_ok()
        })
    }
}

/// Calls WhoAmI with an access token.
struct WhoAmI(
    AuthServiceClient<tonic::transport::Channel>,
    tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
);

impl Caller for WhoAmI {
    fn call(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let mut request = tonic::Request::new(WhoAmIRequest {});
            request.metadata_mut().insert("authorization", self.1.clone());
            self.0.who_am_i(request).await.is_ok()
        })
    }
}

/// Calls Echo.
struct Echo(EchoServiceClient<tonic::transport::Channel>);

impl Caller for Echo {
    fn call(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let request = EchoRequest {
                message: "hello".into(),
                ..EchoRequest::default()
            };
            self.0.echo(request).await.is_ok()
        })
    }
}

async fn channel(address: std::net::SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

async fn benchmark(args: &Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let warmup = Duration::from_secs(args.warmup);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "auth benchmark: {}s per row after {}s warm-up, median of {} rounds, {cores} cores",
        args.seconds, args.warmup, args.rounds
    );
    println!();
    token_verification(duration).await?;

    let data = std::env::temp_dir().join(format!("cube-auth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let database = data.join("auth.db");
    let auth = spawn_role(&["auth", &database.display().to_string()]).await?;
    let echo = spawn_role(&["echo"]).await?;
    let gateway = spawn_role(&[
        "--proxy-threads",
        &args.proxy_threads.to_string(),
        "gateway",
        &format!("http://{}", echo.address),
        &format!("http://{}", auth.address),
    ])
    .await?;

    // Password logins, straight to auth, two calls in flight per core.
    let concurrency = 2 * cores;
    let mut runs = Vec::new();
    for _ in 0..args.rounds {
        let shared = channel(auth.address).await?;
        let callers: Vec<Box<dyn Caller>> = (0..concurrency)
            .map(|_| Box::new(Login(AuthServiceClient::new(shared.clone()))) as Box<dyn Caller>)
            .collect();
        runs.push(measure(callers, warmup, duration, auth.pid()?).await?);
    }
    let logins = Measurement::median(&runs);
    println!(
        "password logins: Argon2id m={ARGON2_MEMORY_KIB} KiB, t={ARGON2_PASSES}, p={ARGON2_LANES} (OWASP's minimum); \
         concurrency {concurrency}, straight to auth"
    );
    println!(
        "  {:.0} logins/s, p50 {:.1} ms, p99 {:.1} ms, {:.1} CPU ms per login in auth, {} errors",
        logins.rps(),
        logins.p50_us / 1000.0,
        logins.p99_us / 1000.0,
        logins.cpu_per_1000(),
        logins.errors
    );
    let hash = credentials::hash_password(ADMIN_PASSWORD.into()).await?;
    let started = Instant::now();
    let mut checks = 0u32;
    while started.elapsed() < Duration::from_secs(2) {
        credentials::verify_password(ADMIN_PASSWORD.into(), Some(hash.clone())).await?;
        checks += 1;
    }
    println!(
        "  one Argon2id check alone: {:.1} ms ({:.0}/s on one core)",
        started.elapsed().as_secs_f64() * 1000.0 / f64::from(checks),
        f64::from(checks) / started.elapsed().as_secs_f64()
    );

    println!();
    println!("tokens with key ids auth never published");
    made_up_key_ids(auth.address).await?;

    // WhoAmI through the gateway beside Echo through the same gateway, at concurrency 64.
    let token = AuthServiceClient::new(channel(auth.address).await?)
        .login(LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await?
        .into_inner()
        .access_token;
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {token}").parse()?;
    println!();
    println!(
        "through the gateway ({} worker thread(s)), concurrency 64",
        args.proxy_threads
    );
    println!(
        "{:<44} {:>10} {:>9} {:>9} {:>7}",
        "call", "req/s", "p50 µs", "p99 µs", "errors"
    );
    let rows = [
        "Echo (the gateway's bare unary figure)",
        "WhoAmI with an access token",
        "WhoAmI straight to auth",
    ];
    let mut runs: Vec<Vec<Measurement>> = rows.iter().map(|_| Vec::new()).collect();
    for _ in 0..args.rounds {
        for (index, row) in runs.iter_mut().enumerate() {
            let target = if index == 2 { auth.address } else { gateway.address };
            let shared = channel(target).await?;
            let callers: Vec<Box<dyn Caller>> = (0..64)
                .map(|_| -> Box<dyn Caller> {
                    if index == 0 {
                        Box::new(Echo(EchoServiceClient::new(shared.clone())))
                    } else {
                        Box::new(WhoAmI(AuthServiceClient::new(shared.clone()), bearer.clone()))
                    }
                })
                .collect();
            let pid = if index == 2 { auth.pid()? } else { gateway.pid()? };
            row.push(measure(callers, warmup, duration, pid).await?);
        }
    }
    let medians: Vec<Measurement> = runs.iter().map(|runs| Measurement::median(runs)).collect();
    for (name, m) in rows.iter().zip(&medians) {
        println!(
            "{:<44} {:>10.0} {:>9.0} {:>9.0} {:>7}",
            name,
            m.rps(),
            m.p50_us,
            m.p99_us,
            m.errors
        );
    }
    println!(
        "WhoAmI through the gateway / Echo through the gateway: {:.2} (target ≥ 0.80)",
        medians[1].rps() / medians[0].rps()
    );
    drop((gateway, echo, auth));
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// 1,000 tokens with made-up key ids, four at a time, at a service that verifies with keys from auth (echo in this
/// process behind a verifier asking auth at `auth`, following no events): how long each refusal took, and how long
/// after a rotation made mid-way the new key's first token was accepted.
async fn made_up_key_ids(auth: std::net::SocketAddr) -> anyhow::Result<()> {
    use cube_proto::cube::auth::v1::RotateSigningKeyRequest;
    use futures::StreamExt as _;

    let verifier = Verifier::new(
        Arc::new(cube_kit::identity::RemoteAuthority::new(Channel::remote(&format!(
            "http://{auth}"
        ))?)),
        VerifierOptions::default(),
    );
    let echo = cube_integration_tests::start_echo_behind(cube_kit::identity::Gate::new(verifier, &[])).await;
    let echo_channel = channel(echo.address).await?;
    let mut auth_client = AuthServiceClient::new(channel(auth).await?);
    let login = LoginRequest {
        username: "admin".into(),
        password: ADMIN_PASSWORD.into(),
    };
    let first = auth_client.login(login.clone()).await?.into_inner().access_token;
    echo_with(echo_channel.clone(), first.clone()).await?;
    let now = unix_now();
    let tokens = (0..1000)
        .map(|n| {
            SigningKey::generate()?.sign(&Claims {
                iss: "cube".into(),
                aud: "cube".into(),
                sub: "admin".into(),
                roles: vec!["admin".into()],
                groups: Vec::new(),
                sid: format!("made-up-{n}"),
                jti: format!("made-up-{n}"),
                iat: now,
                exp: now + 600,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (first_half, second_half) = tokens.split_at(200);
    let flood = |tokens: Vec<String>| {
        let echo_channel = echo_channel.clone();
        futures::stream::iter(tokens)
            .map(move |token| echo_with(echo_channel.clone(), token))
            .buffer_unordered(4)
            .collect::<Vec<_>>()
    };
    let mut answers = flood(first_half.to_vec()).await;
    let rest = tokio::spawn(flood(second_half.to_vec()));
    let mut rotate = tonic::Request::new(RotateSigningKeyRequest {});
    rotate
        .metadata_mut()
        .insert("authorization", format!("Bearer {first}").parse()?);
    auth_client.rotate_signing_key(rotate).await?;
    let second = auth_client.login(login).await?.into_inner().access_token;
    let rotated = Instant::now();
    while !echo_with(echo_channel.clone(), second.clone()).await?.1 {
        anyhow::ensure!(
            rotated.elapsed() < Duration::from_secs(10),
            "the rotated key never got through"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let accepted_after = rotated.elapsed();
    answers.extend(rest.await?);
    let mut took = Vec::with_capacity(answers.len());
    for answer in answers {
        let (elapsed, accepted) = answer?;
        anyhow::ensure!(!accepted, "a made-up key id was accepted");
        took.push(elapsed);
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "  1,000 made-up key ids at a service verifying with auth's keys: refused in p50 {:.2} ms, p99 {:.2} ms, \
         slowest {:.2} ms (target ≤ 50 ms each)",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    println!(
        "  a token of a key rotated meanwhile (no event followed): accepted {:.0} ms after the rotation (target \
         ≤ 1 s)",
        accepted_after.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Calls echo with `token`: how long the answer took, and whether the call was accepted.
async fn echo_with(channel: tonic::transport::Channel, token: String) -> anyhow::Result<(Duration, bool)> {
    let mut request = tonic::Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let started = Instant::now();
    let answer = EchoServiceClient::new(channel).echo(request).await;
    Ok((started.elapsed(), answer.is_ok()))
}

/// Knows one public key and no API tokens: enough for a verifier checking access tokens.
struct OneKey(PublicKey);

impl Authority for OneKey {
    fn public_keys(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, ApiError>> {
        Box::pin(async move { Ok(vec![self.0.clone()]) })
    }

    fn introspect<'a>(&'a self, _token: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>> {
        Box::pin(async move {
            Err(ApiError::Unauthenticated {
                message: "no API tokens here".into(),
            })
        })
    }

    fn revocations(&self) -> BoxFuture<'_, Result<Vec<RevokedCredential>, ApiError>> {
        Box::pin(async move { Ok(Vec::new()) })
    }

    fn act_for<'a>(&'a self, _token: &'a str, _user: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>> {
        Box::pin(async move {
            Err(ApiError::Unauthenticated {
                message: "the bench has no service accounts".into(),
            })
        })
    }
}

/// Token checks on this thread alone (one core): raw signature checks, then repeated tokens from the verifier.
async fn token_verification(duration: Duration) -> anyhow::Result<()> {
    let key = SigningKey::generate()?;
    let now = unix_now();
    let tokens: Vec<String> = (0..1000)
        .map(|n| {
            key.sign(&Claims {
                iss: "cube".into(),
                aud: "cube".into(),
                sub: format!("user-{n}"),
                roles: vec!["user".into()],
                groups: Vec::new(),
                sid: format!("session-{n}"),
                jti: format!("token-{n}"),
                iat: now,
                exp: now + 900,
            })
        })
        .collect::<Result<_, _>>()?;
    let public = key.public_key();

    let started = Instant::now();
    let mut raw = 0u64;
    while started.elapsed() < duration {
        for token in &tokens {
            jws::verify(token, &public, "cube", now, 60)?;
        }
        raw += tokens.len() as u64;
    }
    let raw_rate = raw as f64 / started.elapsed().as_secs_f64();

    let verifier = Verifier::new(Arc::new(OneKey(public)), VerifierOptions::default());
    // 10,000 revoked sessions (none of them these tokens'), so every check consults a realistic revocation list.
    for n in 0..10_000 {
        verifier.revoke(&Revocation::Session {
            id: format!("revoked-{n}"),
            expires_at: now + 900,
        });
    }
    for token in &tokens {
        verifier.verify(token).await?;
    }
    let started = Instant::now();
    let mut cached = 0u64;
    while started.elapsed() < duration {
        for token in &tokens {
            verifier.verify(token).await?;
        }
        cached += tokens.len() as u64;
    }
    let cached_rate = cached as f64 / started.elapsed().as_secs_f64();
    // The cache still honours revocations.
    verifier.revoke(&Revocation::Session {
        id: "session-0".into(),
        expires_at: now + 900,
    });
    let refused = verifier.verify(&tokens[0]).await.is_err();
    println!("token verification on one core (EdDSA/Ed25519 access tokens, 1,000 distinct tokens in turn)");
    println!("  raw signature checks:                {raw_rate:>12.0} /s");
    println!(
        "  repeated tokens, verifier's cache:   {cached_rate:>12.0} /s (10,000 revocations on file; target ≥ 100,000)"
    );
    println!("  a cached token revoked afterwards is refused: {refused}");
    println!();
    Ok(())
}
