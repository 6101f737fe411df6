//! The watcher's event API across services, on both shapes, against the real kube-apiserver with the fake kubelet:
//! a pod's phases, a container restart, an OOM kill and an image pull error each reach the bus once and a member's
//! grpc-web `WatchEvents` through the gateway once, on a stream that outlives the gateway's request timeout; no
//! caller ever sees another project's events, whatever the filter says; a stream resumed after the last event it
//! saw yields exactly the missed events, then live ones.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use cube_bus::Subscription;
use cube_clusters::ClusterRegistry;
use cube_gateway::Gateway;
use cube_integration_tests::grpc_web::{GrpcWebClient, GrpcWebStream, Http, frame};
use cube_integration_tests::platform::{FakeNode, Platform, TestNamespace, authed, kube_client, platform};
use cube_integration_tests::shape::Shape;
use cube_integration_tests::{Running, connect, start_gateway_with, start_server, test_server_args};
use cube_kit::Channel;
use cube_kit::config::ServerArgs;
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{
    CreateMemberRequest, CreateProjectRequest, DeleteMemberRequest, Member, Project, ProjectType, Role, member,
};
use cube_proto::cube::scheduler::v1::Placement;
use cube_proto::cube::watcher::v1::event_service_client::EventServiceClient;
use cube_proto::cube::watcher::v1::{
    Event, ListEventsRequest, ObjectKind, WatchEventsRequest, WorkloadState, WorkloadTransition,
};
use cube_runtime::kubernetes::KubernetesRuntime;
use cube_runtime::transition::TOPIC;
use cube_runtime::{Container, LocalRuntime, ObjectKey, RestartPolicy, Runtime as _, WorkloadSpec, labels};
use cube_testkit::kubernetes::{Kubelet, Script, unique_name};
use futures::StreamExt as _;
use prost::Message as _;
use serde_json::json;
use tonic::Code;

cube_integration_tests::on_every_shape!(
    transitions_reach_members_once_through_the_gateway,
    a_resumed_stream_yields_the_missed_events_then_live_ones,
    local_processes_are_events_like_pods,
    a_member_removed_from_a_project_stops_seeing_it,
);

/// Longest wait for something that should happen soon.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The gateway's request timeout in these tests: streams must outlive it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The label only a test's fake node carries and its pods select.
const RUN_LABEL: &str = "cube.test/run";
const WATCH: &str = "/cube.watcher.v1.EventService/WatchEvents";

/// Creates project `id` as the holder of `token`, who becomes its owner.
async fn create_project(platform: &Platform, id: &str, token: &str) {
    ProjectServiceClient::new(connect(&platform.projects).await)
        .create_project(authed(
            CreateProjectRequest {
                project: Some(Project {
                    r#type: ProjectType::Org as i32,
                    ..Project::default()
                }),
                project_id: id.into(),
            },
            token,
        ))
        .await
        .expect("creating a project");
}

/// A pod `name` of `project` that only the test's node (labelled `run`) fits.
fn pod(namespace: &str, run: &str, project: &str, name: &str, restart: RestartPolicy) -> WorkloadSpec {
    let mut labels = labels::for_project(project);
    labels.insert("script".to_owned(), name.to_owned());
    WorkloadSpec {
        key: ObjectKey::new("kube", namespace, name),
        labels,
        containers: vec![Container {
            name: "main".to_owned(),
            image: "cube.test/worker:1".to_owned(),
            command: vec!["train".to_owned()],
            ..Container::default()
        }],
        placement: Some(Placement {
            node_selector: HashMap::from([(RUN_LABEL.to_owned(), run.to_owned())]),
            ..Placement::default()
        }),
        restart_policy: restart,
        ..WorkloadSpec::default()
    }
}

/// Reads `stream` until `done` holds for what was read.
async fn read_web(stream: &mut GrpcWebStream, seen: &mut Vec<Event>, done: impl Fn(&[Event]) -> bool) {
    tokio::time::timeout(TIMEOUT, async {
        while !done(seen) {
            let message = stream
                .message()
                .await
                .expect("reading the stream")
                .unwrap_or_else(|| panic!("the stream ended: {:?}", stream.status()));
            seen.push(Event::decode(message).expect("an event"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("events seen so far: {seen:#?}"));
}

/// Reads a gRPC stream until `done` holds for what was read.
async fn read(stream: &mut tonic::Streaming<Event>, seen: &mut Vec<Event>, done: impl Fn(&[Event]) -> bool) {
    tokio::time::timeout(TIMEOUT, async {
        while !done(seen) {
            let event = stream.next().await.expect("the stream is open").expect("an event");
            seen.push(event);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("events seen so far: {seen:#?}"));
}

/// Reads the bus until `done` holds for the transitions of `namespace` read.
async fn read_bus(
    subscription: &mut Subscription,
    seen: &mut Vec<WorkloadTransition>,
    namespace: &str,
    done: impl Fn(&[WorkloadTransition]) -> bool,
) {
    tokio::time::timeout(TIMEOUT, async {
        while !done(seen) {
            let delivery = subscription
                .next()
                .await
                .expect("the subscription is open")
                .expect("a delivery");
            delivery.ack().await.expect("acknowledging");
            let transition = WorkloadTransition::decode(delivery.payload.clone()).expect("a transition");
            if transition.namespace == namespace {
                seen.push(transition);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("transitions seen so far: {seen:#?}"));
}

fn transition(event: &Event) -> &WorkloadTransition {
    event.transition.as_ref().expect("a transition")
}

/// Whether the four pods of the first test reached what they are made for.
fn all_happened(transitions: &[&WorkloadTransition]) -> bool {
    let of = |name: &'static str| transitions.iter().filter(move |transition| transition.name == name);
    of("done").any(|transition| transition.to_state() == WorkloadState::Succeeded)
        && of("oom")
            .any(|transition| transition.to_state() == WorkloadState::Failed && transition.reason == "OOMKilled")
        && of("pull").any(|transition| transition.reason == "ErrImagePull" || transition.reason == "ImagePullBackOff")
        && of("restart").any(|transition| transition.container_restarts >= 1)
}

/// Each transition's id once.
fn assert_once<'a>(transitions: impl Iterator<Item = &'a WorkloadTransition>, what: &str) {
    let mut ids = HashSet::new();
    for transition in transitions {
        assert!(ids.insert(transition.id.clone()), "{what}: {} twice", transition.id);
    }
}

/// A gateway in front of the watcher, whose request timeout is [`REQUEST_TIMEOUT`].
async fn gateway(platform: &Platform) -> Running {
    let gateway = Gateway::new(4 << 20).route(
        "cube.watcher.v1",
        Channel::remote(&platform.watcher.url()).expect("url"),
    );
    start_gateway_with(
        gateway,
        ServerArgs {
            request_timeout: REQUEST_TIMEOUT,
            ..test_server_args()
        },
    )
    .await
}

async fn transitions_reach_members_once_through_the_gateway(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform(shape, &kubeconfig).await;
    let kube = kube_client(&kubeconfig).await;
    let run = unique_name("events");
    let (lenas, omars) = (unique_name("vision"), unique_name("speech"));
    create_project(&platform, &lenas, &platform.token).await;
    create_project(&platform, &omars, &platform.stranger).await;
    let node = FakeNode::create(&kube, json!({RUN_LABEL: run}), &[]).await;
    let namespace = TestNamespace::create(&kube, run.clone()).await;
    let _kubelet = Kubelet::start(&kube, [&node])
        .script("script=done", Script::run_for(Duration::from_millis(300)))
        .script("script=oom", Script::run_for(Duration::from_millis(300)).oom_killed())
        .script("script=pull", Script::image_pull_backoff())
        .script(
            "script=restart",
            Script::run_for(Duration::from_millis(300)).exit(1).then(Script::run()),
        )
        .script("script=secret", Script::run());
    let runtime = KubernetesRuntime::new("kube", kube.clone());
    let mut bus = platform
        .bus
        .subscribe(TOPIC, &unique_name("events-test"), "test")
        .await
        .expect("subscribing");

    // Lena watches through the gateway with grpc-web; omar over gRPC.
    let gateway = gateway(&platform).await;
    let mut web = GrpcWebClient::connect(gateway.address, Http::One)
        .await
        .expect("connecting");
    let bearer = format!("Bearer {}", platform.token);
    let mut lena = web
        .open(
            WATCH,
            frame(&WatchEventsRequest::default()),
            &[("authorization", &bearer)],
        )
        .await
        .expect("watching");
    let mut omar = EventServiceClient::new(connect(&platform.watcher).await)
        .watch_events(authed(WatchEventsRequest::default(), &platform.stranger))
        .await
        .expect("watching")
        .into_inner();
    // The stream outlives the gateway's request timeout: everything below arrives after it.
    tokio::time::sleep(REQUEST_TIMEOUT * 2).await;

    for (name, restart) in [
        ("done", RestartPolicy::Never),
        ("oom", RestartPolicy::Never),
        ("pull", RestartPolicy::Never),
        ("restart", RestartPolicy::OnFailure),
    ] {
        runtime
            .apply(&pod(&namespace.name, &run, &lenas, name, restart))
            .await
            .expect("applying");
    }
    runtime
        .apply(&pod(&namespace.name, &run, &omars, "secret", RestartPolicy::Never))
        .await
        .expect("applying");

    let mut lena_saw = Vec::new();
    read_web(&mut lena, &mut lena_saw, |seen| {
        all_happened(&seen.iter().map(transition).collect::<Vec<_>>())
    })
    .await;
    let mut omar_saw = Vec::new();
    read(&mut omar, &mut omar_saw, |seen| {
        seen.iter()
            .any(|event| transition(event).name == "secret" && transition(event).to_state() == WorkloadState::Running)
    })
    .await;
    let mut on_bus = Vec::new();
    read_bus(&mut bus, &mut on_bus, &namespace.name, |seen| {
        all_happened(&seen.iter().collect::<Vec<_>>())
    })
    .await;

    // Each transition once, on the bus and on the stream, and the stream's are the bus's (of lena's project).
    assert_once(on_bus.iter(), "the bus");
    assert_once(lena_saw.iter().map(transition), "lena's stream");
    let lenas_project = format!("projects/{lenas}");
    assert!(
        lena_saw.iter().all(|event| transition(event).project == lenas_project),
        "lena sees only her project: {lena_saw:#?}"
    );
    assert!(
        omar_saw
            .iter()
            .all(|event| transition(event).project == format!("projects/{omars}")),
        "omar sees only his: {omar_saw:#?}"
    );
    let streamed: HashSet<&str> = lena_saw.iter().map(|event| transition(event).id.as_str()).collect();
    let published: HashSet<&str> = on_bus
        .iter()
        .filter(|transition| transition.project == lenas_project)
        .map(|transition| transition.id.as_str())
        .collect();
    assert!(
        published.is_subset(&streamed) || streamed.is_subset(&published),
        "the stream and the bus carry the same transitions: {streamed:?} vs {published:?}"
    );
    let oom = lena_saw
        .iter()
        .map(transition)
        .find(|transition| transition.name == "oom" && transition.to_state() == WorkloadState::Failed)
        .expect("the OOM kill");
    assert_eq!((oom.reason.as_str(), oom.exit_code), ("OOMKilled", Some(137)));
    let pull = lena_saw
        .iter()
        .map(transition)
        .find(|transition| transition.name == "pull" && !transition.reason.is_empty())
        .expect("the pull error");
    assert!(!pull.message.is_empty(), "the pull error carries its message: {pull:?}");
    // Names increase: the history's order.
    let ids: Vec<i64> = lena_saw
        .iter()
        .map(|event| event.name.trim_start_matches("events/").parse().expect("an id"))
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");

    // Lists: the same isolation, whatever the filter names.
    let mut events = EventServiceClient::new(connect(&platform.watcher).await);
    let listed = events
        .list_events(authed(
            ListEventsRequest {
                page_size: 1000,
                ..ListEventsRequest::default()
            },
            &platform.token,
        ))
        .await
        .expect("listing")
        .into_inner();
    assert!(
        !listed.events.is_empty()
            && listed
                .events
                .iter()
                .all(|event| transition(event).project == lenas_project),
        "{listed:#?}"
    );
    for (filter, code) in [
        (format!("project = projects/{omars}"), Code::NotFound),
        ("kind = NODE".to_owned(), Code::PermissionDenied),
        ("colour = red".to_owned(), Code::InvalidArgument),
    ] {
        let listing = events
            .list_events(authed(
                ListEventsRequest {
                    filter: filter.clone(),
                    ..ListEventsRequest::default()
                },
                &platform.token,
            ))
            .await
            .map(|_| ());
        assert_eq!(
            listing.as_ref().err().map(tonic::Status::code),
            Some(code),
            "{filter}: {listing:?}"
        );
        let watching = events
            .watch_events(authed(
                WatchEventsRequest {
                    filter: filter.clone(),
                    ..WatchEventsRequest::default()
                },
                &platform.token,
            ))
            .await
            .map(|_| ());
        assert_eq!(
            watching.as_ref().err().map(tonic::Status::code),
            Some(code),
            "{filter}: {watching:?}"
        );
    }
    // The admin sees both projects, Nodes too.
    let everything = events
        .list_events(authed(
            ListEventsRequest {
                page_size: 1000,
                filter: format!("namespace = {}", namespace.name),
                ..ListEventsRequest::default()
            },
            &platform.admin,
        ))
        .await
        .expect("listing")
        .into_inner();
    let projects: BTreeMap<&str, usize> = everything.events.iter().fold(BTreeMap::new(), |mut counts, event| {
        *counts.entry(transition(event).project.as_str()).or_default() += 1;
        counts
    });
    assert_eq!(projects.len(), 2, "{projects:?}");
}

async fn a_resumed_stream_yields_the_missed_events_then_live_ones(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform(shape, &kubeconfig).await;
    let kube = kube_client(&kubeconfig).await;
    let run = unique_name("resume");
    let project = unique_name("vision");
    create_project(&platform, &project, &platform.token).await;
    let node = FakeNode::create(&kube, json!({RUN_LABEL: run}), &[]).await;
    let namespace = TestNamespace::create(&kube, run.clone()).await;
    let _kubelet = Kubelet::start(&kube, [&node]);
    let runtime = KubernetesRuntime::new("kube", kube.clone());
    let mut events = EventServiceClient::new(connect(&platform.watcher).await);
    let running = |name: &'static str| {
        move |seen: &[Event]| {
            seen.iter()
                .any(|event| transition(event).name == name && transition(event).to_state() == WorkloadState::Running)
        }
    };
    let filter = format!("namespace = {}", namespace.name);
    let watch = |resume_after: String| {
        authed(
            WatchEventsRequest {
                filter: filter.clone(),
                resume_after,
            },
            &platform.token,
        )
    };

    let mut stream = events
        .watch_events(watch(String::new()))
        .await
        .expect("watching")
        .into_inner();
    let apply = async |name: &str| {
        runtime
            .apply(&pod(&namespace.name, &run, &project, name, RestartPolicy::Never))
            .await
    };
    apply("first").await.expect("applying");
    let mut seen = Vec::new();
    read(&mut stream, &mut seen, running("first")).await;
    let last = seen.last().expect("an event").name.clone();
    drop(stream);

    // Missed while disconnected.
    apply("second").await.expect("applying");
    let missed = tokio::time::timeout(TIMEOUT, async {
        loop {
            let listed = events
                .list_events(authed(
                    ListEventsRequest {
                        page_size: 1000,
                        filter: filter.clone(),
                        ..ListEventsRequest::default()
                    },
                    &platform.token,
                ))
                .await
                .expect("listing")
                .into_inner()
                .events;
            if running("second")(&listed) {
                let after = listed
                    .iter()
                    .position(|event| event.name == last)
                    .expect("the last seen is listed");
                return listed[after + 1..].to_vec();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the second pod runs");

    let mut resumed = events
        .watch_events(watch(last.clone()))
        .await
        .expect("resuming")
        .into_inner();
    let mut again = Vec::new();
    read(&mut resumed, &mut again, |seen| seen.len() >= missed.len()).await;
    assert_eq!(again, missed, "exactly the missed events, in order");
    apply("third").await.expect("applying");
    read(&mut resumed, &mut again, running("third")).await;
    let live = &again[missed.len()..];
    assert!(
        live.iter().all(|event| transition(event).name == "third"),
        "then only live events: {live:#?}"
    );
    let names: HashSet<&str> = again.iter().map(|event| event.name.as_str()).collect();
    assert_eq!(names.len(), again.len(), "none twice: {again:#?}");

    // Resuming from a malformed or unknown event names the field.
    for resume_after in ["42".to_owned(), "events/999999999".to_owned()] {
        let refused = events.watch_events(watch(resume_after.clone())).await.map(|_| ());
        let status = refused.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{resume_after}: {status:?}");
        assert!(status.message().contains("resume_after"), "{status:?}");
    }
}

/// `cube up`'s wiring: the watcher records the local runtime's processes; members watch them like pods.
async fn local_processes_are_events_like_pods(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform(shape, &kubeconfig).await;
    let project = unique_name("vision");
    create_project(&platform, &project, &platform.token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (local, statuses) = LocalRuntime::open(dir.path()).await.expect("the local runtime");
    let database = format!("sqlite://{}", dir.path().join("watcher.db").display());
    let watcher = cube_watcher::Watcher::start(
        ClusterRegistry::embedded(),
        cube_kit::db::connect::<cube_watcher::store::Migrator>(&database, true)
            .await
            .expect("the watcher's database"),
        platform.bus.clone(),
        cube_watcher::Peers {
            auth: Channel::remote(&platform.auth.url()).expect("url"),
            projects: Channel::remote(&platform.projects.url()).expect("url"),
        },
        cube_watcher::Options {
            holder: cube_watcher::holder_name().expect("a holder name"),
            lease_duration: Duration::from_secs(5),
            retention: cube_watcher::Retention {
                age: Duration::from_secs(3600),
                count: 1000,
            },
        },
        Some(cube_watcher::LocalStatuses {
            cluster: "local".to_owned(),
            statuses,
        }),
    )
    .await
    .expect("the watcher");
    let _background = watcher.background;
    let server = start_server(watcher.server).await;
    let mut stream = EventServiceClient::new(connect(&server).await)
        .watch_events(authed(
            WatchEventsRequest {
                filter: "kind = LOCAL_PROCESS".to_owned(),
                ..WatchEventsRequest::default()
            },
            &platform.token,
        ))
        .await
        .expect("watching")
        .into_inner();

    let mut labels = labels::for_project(&project);
    labels.insert(labels::RUN.to_owned(), "r1".to_owned());
    let spec = WorkloadSpec {
        key: ObjectKey::new("local", "vision", "trainer"),
        labels,
        containers: vec![Container {
            name: "main".to_owned(),
            image: "cube.test/worker:1".to_owned(),
            command: vec!["sh".to_owned(), "-c".to_owned()],
            args: vec!["sleep 0.3; exit 3".to_owned()],
            ..Container::default()
        }],
        ..WorkloadSpec::default()
    };
    local.apply(&spec).await.expect("running a process");
    let mut seen = Vec::new();
    read(&mut stream, &mut seen, |seen| {
        seen.iter()
            .any(|event| transition(event).to_state() == WorkloadState::Failed)
    })
    .await;
    let failed = seen.last().map(transition).expect("an event");
    assert_eq!(
        (
            failed.kind(),
            failed.cluster.as_str(),
            failed.exit_code,
            failed.project.clone()
        ),
        (
            ObjectKind::LocalProcess,
            "local",
            Some(3),
            format!("projects/{project}")
        )
    );
    assert_eq!(failed.labels.get(labels::RUN).map(String::as_str), Some("r1"));
    let states: Vec<WorkloadState> = seen.iter().map(|event| transition(event).to_state()).collect();
    assert!(states.contains(&WorkloadState::Running), "{seen:#?}");
    assert_once(seen.iter().map(transition), "the local process's events");
    // Its deletion is one more.
    assert!(local.delete(&spec.key, Duration::ZERO).await.expect("deleting"));
    read(&mut stream, &mut seen, |seen| {
        seen.iter()
            .any(|event| transition(event).to_state() == WorkloadState::Deleted)
    })
    .await;
}

/// Omar, made a viewer of lena's project, watches it; once removed, his stream ends with NOT_FOUND and his lists
/// no longer show it.
async fn a_member_removed_from_a_project_stops_seeing_it(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform(shape, &kubeconfig).await;
    let project = unique_name("vision");
    create_project(&platform, &project, &platform.token).await;
    let mut projects = ProjectServiceClient::new(connect(&platform.projects).await);
    let member = projects
        .create_member(authed(
            CreateMemberRequest {
                parent: format!("projects/{project}"),
                member: Some(Member {
                    subject: Some(member::Subject::User("users/omar".to_owned())),
                    role: Role::Viewer as i32,
                    ..Member::default()
                }),
            },
            &platform.token,
        ))
        .await
        .expect("adding omar")
        .into_inner();
    let mut events = EventServiceClient::new(connect(&platform.watcher).await);
    let filter = format!("project = projects/{project}");
    let mut stream = events
        .watch_events(authed(
            WatchEventsRequest {
                filter: filter.clone(),
                ..WatchEventsRequest::default()
            },
            &platform.stranger,
        ))
        .await
        .expect("omar watches the project he is a member of")
        .into_inner();
    projects
        .delete_member(authed(DeleteMemberRequest { name: member.name }, &platform.token))
        .await
        .expect("removing omar");
    let ended = match tokio::time::timeout(TIMEOUT, stream.next())
        .await
        .expect("the stream ends")
    {
        Some(Ok(event)) => panic!("no event reaches a removed member: {event:?}"),
        Some(Err(status)) => Some(status),
        None => None,
    };
    assert_eq!(ended.map(|status| status.code()), Some(Code::NotFound));
    let listing = events
        .list_events(authed(
            ListEventsRequest {
                filter,
                ..ListEventsRequest::default()
            },
            &platform.stranger,
        ))
        .await;
    assert_eq!(listing.err().map(|status| status.code()), Some(Code::NotFound));
}
