//! Fuzzing every RPC of auth, projects, the scheduler and the workflow service through the gateway, as `cube up` runs them (one
//! process, the services in-process behind the gateway; the scheduler over the test environment's API server):
//! random bytes and random messages shaped by the descriptors, with an admin's token and with a plain user's, over
//! grpc-web on HTTP/1.1 and HTTP/2. No answer may be INTERNAL, UNKNOWN or UNAVAILABLE (a client's bad input is
//! never the platform's failure), no error's trailers may exceed 8 KiB, and no call may take over 5 s.
//!
//! The generator is seeded; the seed is printed, and `CUBE_FUZZ_SEED=<seed>` replays a run.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use cube_auth::{Auth, AuthArgs};
use cube_bus::{BusOptions, EventBus, MemoryBus};
use cube_clusters::{ClusterConfig, ClusterRegistry};
use cube_gateway::Gateway;
use cube_integration_tests::grpc_web::{GrpcWebClient, GrpcWebReply, Http, Mode, frame};
use cube_integration_tests::platform::{ADMIN_PASSWORD, authed, test_options};
use cube_integration_tests::{Running, connect, start_gateway};
use cube_kit::Channel;
use cube_kit::config::DatabaseArgs;
use cube_projects::Projects;
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::service_account_service_client::ServiceAccountServiceClient;
use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
use cube_proto::cube::auth::v1::{CreateServiceAccountRequest, CreateUserRequest, LoginRequest, User};
use cube_runtime::{LocalRuntime, Runtimes};
use cube_scheduler::Scheduler;
use cube_workflow::Workflow;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use tonic::Code;
use tonic_types::StatusExt;

/// The packages fuzzed, each routed by the gateway to its service.
const PACKAGES: [&str; 4] = [
    "cube.auth.v1",
    "cube.projects.v1",
    "cube.scheduler.v1",
    "cube.workflow.v1",
];
/// Random messages per method and token.
const SHAPED_PER_METHOD: usize = 24;
/// Random byte strings per method and token.
const RANDOM_PER_METHOD: usize = 6;
/// Connections calling at the same time.
const WORKERS: usize = 4;
/// The longest a call may take.
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// The most bytes an error's message and details may take in the answer's headers or trailers.
const STATUS_LIMIT: usize = 8 * 1024;
/// The password of lena, the plain user.
const USER_PASSWORD: &str = "lena long password";

/// Calls sent again on a new connection after their reused one failed.
static RESENT: AtomicUsize = AtomicUsize::new(0);

/// splitmix64: small, seedable, and good enough to pick fuzz inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (bound > 0).
    fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(bound).unwrap_or(u64::MAX)).unwrap_or(0)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}

/// Strings that have broken parsers before: names of real and missing resources, separators, huge and odd text.
fn interesting_string(rng: &mut Rng) -> String {
    const FIXED: [&str; 30] = [
        "",
        "admin",
        "lena",
        "Admin",
        "users/admin",
        "users/lena",
        "projects/public",
        "projects/a b",
        "projects/vision",
        "projects/public/notebooks/x",
        "projects/other/notebooks/x",
        "projects/",
        "projects//x",
        "clusters/kube",
        "clusters/nope",
        "roles/admin",
        "*",
        "-",
        "1",
        "-1",
        "0.25",
        "1e400",
        "2(T4)",
        "nvidia.com/gpu",
        "cpu",
        "cn=ops,ou=teams,dc=cube,dc=test",
        "x)(uid=*",
        "ü€😀\u{202e}",
        "\u{0}\u{1}",
        "../../etc/passwd",
    ];
    match rng.below(10) {
        0..=5 => FIXED[rng.below(FIXED.len())].to_owned(),
        6 => {
            let len = rng.below(40);
            (0..len)
                .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789-_./ A"[rng.below(42)]))
                .collect()
        }
        7 => format!("projects/{}", "p".repeat(1 + rng.below(300))),
        8 => "x".repeat(rng.below(20_000)),
        _ => (0..rng.below(30))
            .filter_map(|_| char::from_u32(u32::try_from(rng.below(0x11_0000)).unwrap_or(0)))
            .collect(),
    }
}

fn interesting_int(rng: &mut Rng) -> u64 {
    const FIXED: [i64; 8] = [0, 1, -1, 2, i32::MAX as i64, i32::MIN as i64, i64::MAX, i64::MIN];
    if rng.chance(60) {
        FIXED[rng.below(FIXED.len())] as u64
    } else {
        rng.next() >> rng.below(64)
    }
}

fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8(u8::try_from(value & 0x7f).unwrap_or(0) | 0x80);
        value >>= 7;
    }
    out.put_u8(u8::try_from(value).unwrap_or(0));
}

fn put_key(out: &mut BytesMut, number: i32, wire_type: u64) {
    put_varint(out, (u64::try_from(number).unwrap_or(1) << 3) | wire_type);
}

fn put_len(out: &mut BytesMut, number: i32, data: &[u8]) {
    put_key(out, number, 2);
    put_varint(out, data.len() as u64);
    out.put_slice(data);
}

/// The messages of the descriptor set, by full name (`cube.auth.v1.LoginRequest`, nested ones too).
struct Messages(HashMap<String, DescriptorProto>);

impl Messages {
    fn new(set: &FileDescriptorSet) -> Self {
        fn add(prefix: &str, message: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
            let name = format!("{prefix}.{}", message.name());
            for nested in &message.nested_type {
                add(&name, nested, out);
            }
            out.insert(name, message.clone());
        }
        let mut out = HashMap::new();
        for file in &set.file {
            for message in &file.message_type {
                add(file.package(), message, &mut out);
            }
        }
        Self(out)
    }

    /// Encodes a random message of type `name`, each field present or not, nested messages `depth` deep at most.
    fn random(&self, name: &str, rng: &mut Rng, depth: usize) -> BytesMut {
        let mut out = BytesMut::new();
        let Some(message) = self.0.get(name.trim_start_matches('.')) else {
            return out;
        };
        for field in &message.field {
            if !rng.chance(70) {
                continue;
            }
            let repeated = field.label() == Label::Repeated;
            let count = if repeated { rng.below(4) } else { 1 };
            for _ in 0..count {
                self.random_field(field, rng, depth, &mut out);
            }
        }
        out
    }

    fn random_field(&self, field: &prost_types::FieldDescriptorProto, rng: &mut Rng, depth: usize, out: &mut BytesMut) {
        let number = field.number();
        match field.r#type() {
            Type::String => put_len(out, number, interesting_string(rng).as_bytes()),
            Type::Bytes => {
                let len = rng.below(64);
                put_len(out, number, &rng.bytes(len));
            }
            Type::Message | Type::Group => {
                if depth > 0 {
                    let nested = self.random(field.type_name(), rng, depth - 1);
                    put_len(out, number, &nested);
                }
            }
            Type::Enum => {
                put_key(out, number, 0);
                put_varint(
                    out,
                    if rng.chance(70) {
                        rng.below(6) as u64
                    } else {
                        interesting_int(rng)
                    },
                );
            }
            Type::Bool => {
                put_key(out, number, 0);
                put_varint(out, rng.below(2) as u64);
            }
            Type::Int32 | Type::Int64 | Type::Uint32 | Type::Uint64 | Type::Sint32 | Type::Sint64 => {
                put_key(out, number, 0);
                put_varint(out, interesting_int(rng));
            }
            Type::Fixed32 | Type::Sfixed32 | Type::Float => {
                put_key(out, number, 5);
                out.put_u32_le(u32::try_from(interesting_int(rng) & 0xffff_ffff).unwrap_or(0));
            }
            Type::Fixed64 | Type::Sfixed64 | Type::Double => {
                put_key(out, number, 1);
                let value = if rng.chance(50) {
                    [f64::NAN, f64::INFINITY, -1.0, 0.5, 1e300][rng.below(5)].to_bits()
                } else {
                    interesting_int(rng)
                };
                out.put_u64_le(value);
            }
        }
    }
}

/// One RPC of a fuzzed service.
#[derive(Debug, Clone)]
struct Method {
    path: String,
    input: String,
}

/// Whether a method can take away the callers' sessions or rights; these run last.
fn destructive(path: &str) -> bool {
    let method = path.rsplit('/').next().unwrap_or_default();
    ["Delete", "Logout", "Update", "Rotate", "Change"]
        .iter()
        .any(|prefix| method.starts_with(prefix))
}

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Caller {
    Admin,
    User,
}

/// One fuzzed call.
#[derive(Debug)]
struct Case {
    method: Method,
    caller: Caller,
    /// What the body is, for the report.
    kind: &'static str,
    /// The request message (not yet framed).
    message: Bytes,
    http: Http,
}

/// What went wrong with one call.
#[derive(Debug)]
struct Failure {
    path: String,
    caller: Caller,
    kind: &'static str,
    input: String,
    answer: String,
}

/// The platform as `cube up` assembles it, and its callers' tokens.
struct Platform {
    gateway: Running,
    tokens: Mutex<HashMap<&'static str, String>>,
    keep: Mutex<Vec<Box<dyn std::any::Any + Send>>>,
    _data: tempfile::TempDir,
}

impl Platform {
    async fn start() -> Self {
        let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
        let data = tempfile::tempdir().expect("tempdir");
        let sqlite = |name: &str| format!("sqlite://{}", data.path().join(name).display());
        let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new(BusOptions::default()));
        let auth = Auth::start(
            &AuthArgs::embedded(sqlite("auth.db"), Some(ADMIN_PASSWORD.into())).expect("flags"),
            bus.clone(),
        )
        .await
        .expect("auth");
        let auth_background = auth.background;
        let auth_channel = Channel::in_process(auth.server.into_routes().expect("auth routes"));
        let registry =
            ClusterRegistry::new(vec![ClusterConfig::new("kube", Some(kubeconfig.clone().into()))]).expect("registry");
        let (projects_for_scheduler, projects_late) = Channel::late();
        let scheduler = Scheduler::start(
            registry,
            cube_scheduler::Peers {
                auth: auth_channel.clone(),
                projects: projects_for_scheduler,
            },
            &bus,
            test_options(),
            cube_kit::db::connect::<cube_scheduler::model::Migrator>(&sqlite("scheduler.db"), true)
                .await
                .expect("the scheduler's database"),
        )
        .await
        .expect("scheduler");
        let scheduler_keep = (scheduler.feed, scheduler.background);
        let scheduler_channel = Channel::in_process(scheduler.server.into_routes().expect("scheduler routes"));
        let projects = Projects::start(
            &DatabaseArgs {
                database_url: sqlite("projects.db"),
                migrate: true,
            },
            cube_projects::Peers {
                auth: auth_channel.clone(),
                scheduler: scheduler_channel.clone(),
                workloads: Vec::new(),
            },
            bus.clone(),
            Duration::from_secs(2),
        )
        .await
        .expect("projects");
        let projects_background = projects.background;
        let projects_routes = projects.server.into_routes().expect("projects routes");
        projects_late.bind(Channel::in_process(projects_routes.clone()));
        let projects_channel = Channel::in_process(projects_routes);
        // The workflow service starts once the admin can make its service account.
        let (workflow_channel, workflow_late) = Channel::late();
        let gateway = Gateway::new(4 * 1024 * 1024)
            .route("cube.auth.v1", auth_channel.clone())
            .route("cube.scheduler.v1", scheduler_channel.clone())
            .route("cube.projects.v1", projects_channel.clone())
            .route("cube.workflow.v1", workflow_channel);
        let gateway = start_gateway(gateway).await;

        let workloads = data.path().join("workloads");
        let workflow_db = sqlite("workflow.db");
        let platform = Self {
            gateway,
            tokens: Mutex::new(HashMap::new()),
            keep: Mutex::new(vec![Box::new((auth_background, scheduler_keep, projects_background))]),
            _data: data,
        };
        let admin = platform.login("admin", ADMIN_PASSWORD).await.expect("admin logs in");
        let service_token = ServiceAccountServiceClient::new(connect(&platform.gateway).await)
            .create_service_account(authed(
                CreateServiceAccountRequest {
                    service_account_id: "workflow".into(),
                    service_account: None,
                },
                &admin,
            ))
            .await
            .expect("the workflow service account")
            .into_inner()
            .token;
        cube_kit::db::private_directory(&workloads).expect("the local runtime's directory");
        let (local, _statuses) = LocalRuntime::open(&workloads).await.expect("the local runtime");
        let local = Arc::new(local);
        let workflow = Workflow::start(
            Runtimes::new(
                ClusterRegistry::new(vec![
                    ClusterConfig::new("kube", Some(kubeconfig.into())),
                    ClusterConfig::new("local", None),
                ])
                .expect("registry"),
                local.clone(),
            ),
            cube_kit::db::connect::<cube_workflow::model::Migrator>(&workflow_db, true)
                .await
                .expect("the workflow database"),
            bus,
            cube_workflow::Peers {
                auth: auth_channel,
                projects: projects_channel,
                scheduler: scheduler_channel,
            },
            cube_workflow::Options::new("fuzz".into(), service_token),
        )
        .await
        .expect("workflow");
        workflow_late.bind(Channel::in_process(
            workflow.server.into_routes().expect("workflow routes"),
        ));
        if let Ok(mut keep) = platform.keep.lock() {
            keep.push(Box::new((workflow.background, local)));
        }
        UserServiceClient::new(connect(&platform.gateway).await)
            .create_user(authed(
                CreateUserRequest {
                    user: Some(User {
                        email: "lena@example.com".into(),
                        ..User::default()
                    }),
                    user_id: "lena".into(),
                    password: USER_PASSWORD.into(),
                },
                &admin,
            ))
            .await
            .expect("creating lena");
        let user = platform.login("lena", USER_PASSWORD).await.expect("lena logs in");
        if let Ok(mut tokens) = platform.tokens.lock() {
            tokens.insert("admin", admin);
            tokens.insert("lena", user);
        }
        platform
    }

    async fn login(&self, username: &str, password: &str) -> Result<String, tonic::Status> {
        Ok(AuthServiceClient::new(connect(&self.gateway).await)
            .login(LoginRequest {
                username: username.into(),
                password: password.into(),
            })
            .await?
            .into_inner()
            .access_token)
    }

    fn token(&self, caller: Caller) -> String {
        let name = match caller {
            Caller::Admin => "admin",
            Caller::User => "lena",
        };
        self.tokens
            .lock()
            .ok()
            .and_then(|tokens| tokens.get(name).cloned())
            .unwrap_or_default()
    }

    /// Logs `caller` in again after a fuzzed call ended their session (a logout, a rotated-out key, a reset
    /// password); if they can no longer log in, their calls go on with the dead token.
    async fn relogin(&self, caller: Caller) {
        let (name, password) = match caller {
            Caller::Admin => ("admin", ADMIN_PASSWORD),
            Caller::User => ("lena", USER_PASSWORD),
        };
        if let Ok(token) = self.login(name, password).await
            && let Ok(mut tokens) = self.tokens.lock()
        {
            tokens.insert(name, token);
        }
    }
}

/// The methods of the fuzzed packages, from the descriptor set the gateway and reflection use.
fn methods() -> Vec<Method> {
    let mut methods: Vec<Method> = cube_proto::methods::methods(cube_proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set decodes")
        .into_iter()
        .filter(|method| {
            method
                .service
                .rsplit_once('.')
                .is_some_and(|(package, _)| PACKAGES.contains(&package))
        })
        .map(|method| Method {
            path: method.path,
            input: method.input_type,
        })
        .collect();
    methods.sort_by_key(|method| destructive(&method.path));
    methods
}

fn cases(methods: &[Method], messages: &Messages, rng: &mut Rng) -> VecDeque<Case> {
    let mut cases = VecDeque::new();
    for method in methods {
        for caller in [Caller::User, Caller::Admin] {
            for index in 0..SHAPED_PER_METHOD + RANDOM_PER_METHOD {
                let (kind, message) = if index < SHAPED_PER_METHOD {
                    ("shaped", messages.random(&method.input, rng, 3).freeze())
                } else {
                    let len = rng.below(200);
                    ("random bytes", Bytes::from(rng.bytes(len)))
                };
                let http = if rng.chance(50) { Http::One } else { Http::Two };
                cases.push_back(Case {
                    method: method.clone(),
                    caller,
                    kind,
                    message,
                    http,
                });
            }
        }
    }
    cases
}

/// The bytes the status of `reply` takes where it was sent (trailers, or headers of a trailers-only answer).
fn status_bytes(reply: &GrpcWebReply) -> usize {
    [&reply.headers, &reply.trailers]
        .iter()
        .map(|map| {
            ["grpc-message", "grpc-status-details-bin"]
                .iter()
                .map(|name| map.get(*name).map_or(0, |value| value.len()))
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0)
}

fn describe(message: &[u8]) -> String {
    let shown: String = message.iter().take(120).map(|byte| format!("{byte:02x}")).collect();
    if message.len() > 120 {
        format!("{} bytes: {shown}…", message.len())
    } else {
        format!("{} bytes: {shown}", message.len())
    }
}

/// Makes one call; returns its code (none when it got no answer) and what was wrong with it, if anything.
async fn run(
    platform: &Platform,
    clients: &mut HashMap<Http, GrpcWebClient>,
    case: &Case,
) -> (Option<Code>, Option<String>) {
    let token = platform.token(case.caller);
    let authorization = format!("Bearer {token}");
    let headers = [("authorization", authorization.as_str())];
    let mut body = BytesMut::with_capacity(case.message.len() + 5);
    body.put_u8(0);
    body.put_u32(u32::try_from(case.message.len()).unwrap_or(u32::MAX));
    body.put_slice(&case.message);
    let body = body.freeze();
    let mut started = Instant::now();
    let mut reply = None;
    for attempt in 0..2 {
        // A server may close an idle HTTP/1.1 connection just as a request is sent on it (HTTP allows that; browsers
        // retry): a call that fails on a reused connection is sent once more on a new one.
        let reused = clients.contains_key(&case.http);
        let client = match clients.entry(case.http) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(
                GrpcWebClient::connect(platform.gateway.address, case.http)
                    .await
                    .expect("connecting to the gateway"),
            ),
        };
        started = Instant::now();
        let call = client.call(&case.method.path, Mode::Binary, body.clone(), &headers);
        match tokio::time::timeout(CALL_LIMIT, call).await {
            Err(_) => {
                clients.remove(&case.http);
                return (None, Some(format!("no answer within {CALL_LIMIT:?}")));
            }
            Ok(Err(error)) => {
                clients.remove(&case.http);
                if !reused || attempt > 0 {
                    return (None, Some(format!("the HTTP exchange failed: {error}")));
                }
                RESENT.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(answer)) => {
                reply = Some(answer);
                break;
            }
        }
    }
    let Some(reply) = reply else {
        return (None, Some("no answer".to_owned()));
    };
    let elapsed = started.elapsed();
    let status = reply.status();
    let sent = status_bytes(&reply);
    if status.code() == Code::Unauthenticated {
        platform.relogin(case.caller).await;
    }
    let mut problems = Vec::new();
    if matches!(status.code(), Code::Internal | Code::Unknown | Code::Unavailable) {
        problems.push(format!("{:?}", status.code()));
    }
    if sent > STATUS_LIMIT {
        problems.push(format!("{sent} bytes of grpc-message and grpc-status-details-bin"));
    }
    if elapsed > CALL_LIMIT {
        problems.push(format!("took {elapsed:?}"));
    }
    let problem = (!problems.is_empty()).then(|| {
        let message: String = status.message().chars().take(300).collect();
        format!("{}: {:?} {message:?}", problems.join(", "), status.code())
    });
    (Some(status.code()), problem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_survives_random_input_through_the_gateway() {
    let seed = std::env::var("CUBE_FUZZ_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |now| {
                    u64::try_from(now.as_nanos() & u128::from(u64::MAX)).unwrap_or(1)
                })
        });
    eprintln!("fuzz seed {seed} (replay with CUBE_FUZZ_SEED={seed})");
    let platform = Arc::new(Platform::start().await);
    let set = FileDescriptorSet::decode(cube_proto::FILE_DESCRIPTOR_SET).expect("the descriptor set decodes");
    let messages = Messages::new(&set);
    let methods = methods();
    assert!(methods.len() >= 50, "only {} methods found", methods.len());
    for package in PACKAGES {
        assert!(
            methods
                .iter()
                .any(|method| method.path.starts_with(&format!("/{package}."))),
            "no method of {package} is fuzzed"
        );
    }
    let mut rng = Rng(seed);
    let queue = Arc::new(Mutex::new(cases(&methods, &messages, &mut rng)));
    let total = queue.lock().map(|queue| queue.len()).unwrap_or(0);
    let failures = Arc::new(Mutex::new(Vec::<Failure>::new()));
    let codes = Arc::new(Mutex::new(HashMap::<(Caller, Code), usize>::new()));
    let started = Instant::now();

    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (platform, queue, failures, codes) = (platform.clone(), queue.clone(), failures.clone(), codes.clone());
            tokio::spawn(async move {
                let mut clients = HashMap::new();
                loop {
                    let Some(case) = queue.lock().ok().and_then(|mut queue| queue.pop_front()) else {
                        break;
                    };
                    let (code, problem) = run(&platform, &mut clients, &case).await;
                    if let Some(code) = code
                        && let Ok(mut codes) = codes.lock()
                    {
                        *codes.entry((case.caller, code)).or_default() += 1;
                    }
                    if let Some(answer) = problem
                        && let Ok(mut failures) = failures.lock()
                    {
                        failures.push(Failure {
                            path: case.method.path.clone(),
                            caller: case.caller,
                            kind: case.kind,
                            input: describe(&case.message),
                            answer,
                        });
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("a fuzz worker");
    }
    let failures = failures
        .lock()
        .map(|mut failures| std::mem::take(&mut *failures))
        .unwrap_or_default();
    eprintln!(
        "{total} calls to {} methods in {:?}; {} failed",
        methods.len(),
        started.elapsed(),
        failures.len()
    );
    let codes = codes.lock().map(|codes| codes.clone()).unwrap_or_default();
    let mut tally: Vec<_> = codes.iter().collect();
    tally.sort_by_key(|((caller, code), _)| (format!("{caller:?}"), *code as i32));
    eprintln!(
        "answers by caller and code: {tally:?}; {} calls resent on a new connection",
        RESENT.load(Ordering::Relaxed)
    );
    // The fuzz is only worth something if its calls get past the gate to the handlers, for both callers.
    for caller in [Caller::Admin, Caller::User] {
        let handled: usize = codes
            .iter()
            .filter(|((who, code), _)| *who == caller && *code != Code::Unauthenticated)
            .map(|(_, count)| count)
            .sum();
        assert!(
            handled * 2 > total / 2,
            "only {handled} of {caller:?}'s calls got past authentication: {tally:?}"
        );
    }
    let report: Vec<String> = failures
        .iter()
        .map(|failure| {
            format!(
                "{} as {:?} with {} ({}): {}",
                failure.path, failure.caller, failure.kind, failure.input, failure.answer
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {total} calls failed:\n{}",
        failures.len(),
        report.join("\n")
    );
}

#[tokio::test]
async fn undecodable_and_doubled_requests_are_the_callers_mistake() {
    let platform = Platform::start().await;
    let token = platform.token(Caller::Admin);
    let authorization = format!("Bearer {token}");
    for http in [Http::One, Http::Two] {
        let mut client = GrpcWebClient::connect(platform.gateway.address, http)
            .await
            .expect("connecting to the gateway");
        // Login's username (field 1) holding bytes that are not UTF-8: the service cannot decode the message.
        let mut body = BytesMut::new();
        body.put_u8(0);
        body.put_u32(4);
        body.put_slice(&[0x0a, 0x02, 0xff, 0xfe]);
        let reply = client
            .call("/cube.auth.v1.AuthService/Login", Mode::Binary, body.freeze(), &[])
            .await
            .expect("answered");
        let status = reply.status();
        assert_eq!(status.code(), Code::InvalidArgument, "{http:?}: {status:?}");
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "MALFORMED_REQUEST");
        assert_eq!(info.domain, "auth.cube.dev");

        // The same for a call that needs a token, past the gate.
        let mut body = BytesMut::new();
        body.put_u8(0);
        body.put_u32(2);
        body.put_slice(&[0x08, 0xff]);
        let reply = client
            .call(
                "/cube.projects.v1.ProjectService/ListProjects",
                Mode::Binary,
                body.freeze(),
                &[("authorization", authorization.as_str())],
            )
            .await
            .expect("answered");
        let status = reply.status();
        assert_eq!(status.code(), Code::InvalidArgument, "{http:?}: {status:?}");
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "MALFORMED_REQUEST");
        assert_eq!(info.domain, "projects.cube.dev");

        // A unary call with two request messages is refused by the gateway before it reaches auth.
        let login = LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        };
        let doubled = [frame(&login), frame(&login)].concat();
        let reply = client
            .call(
                "/cube.auth.v1.AuthService/Login",
                Mode::Binary,
                Bytes::from(doubled),
                &[],
            )
            .await
            .expect("answered");
        let status = reply.status();
        assert_eq!(status.code(), Code::InvalidArgument, "{http:?}: {status:?}");
        assert_eq!(
            status.get_details_error_info().expect("error info").reason,
            "MALFORMED_REQUEST"
        );
        assert!(reply.messages.is_empty(), "no tokens for a doubled login");
    }
}
