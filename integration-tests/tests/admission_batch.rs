//! Admission at speed (issue 12) across real services, on SQLite, PostgreSQL and MariaDB: single admissions (one
//! statement on PostgreSQL and MariaDB) and `BatchAdmit` batches racing for one quota never admit more than it
//! allows; a batch decides each workload all or nothing, in order, and answers per workload; and a quota lowered
//! by an admin or an owner is enforced within a second although the scheduler keeps quota answers for minutes
//! (the `project.members.changed` event makes it forget them).

use std::time::Duration;

use cube_integration_tests::connect;
use cube_integration_tests::platform::{Platform, authed, create_project, platform_with, test_options};
use cube_integration_tests::shape::Shape;
use cube_proto::cube::common::v1::ErrorReason;
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{
    CreateMemberRequest, Member, Project, Quota, Role, Settings, UpdateMemberRequest, UpdateProjectRequest, member,
};
use cube_proto::cube::scheduler::v1::admission_service_client::AdmissionServiceClient;
use cube_proto::cube::scheduler::v1::{
    AdmissionState, AdmitRequest, BatchAdmitRequest, BatchAdmitResult, ExplainPendingRequest, GetProjectUsageRequest,
    ProjectUsage, ReleaseRequest, WorkloadKind, batch_admit_result,
};
use cube_scheduler::Options;
use cube_scheduler::admission::AdmissionOptions;
use tonic::Code;
use tonic_types::StatusExt as _;

type Client = AdmissionServiceClient<tonic::transport::Channel>;

/// The platform of `shape` with quota answers kept for `ttl`.
async fn platform(shape: Shape, ttl: Duration) -> Platform {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let options = Options {
        admission: AdmissionOptions {
            quota_cache_ttl: ttl,
            ..AdmissionOptions::default()
        },
        ..test_options()
    };
    platform_with(shape, &kubeconfig, options).await
}

/// A run of `project` named `name`, asking for one CPU and `gpu`.
fn run(project: &str, name: &str, gpu: &str) -> AdmitRequest {
    AdmitRequest {
        workload: format!("projects/{project}/runs/{name}"),
        project: format!("projects/{project}"),
        kind: WorkloadKind::Train as i32,
        cpu: "1".into(),
        memory: "1M".into(),
        gpu: gpu.into(),
    }
}

/// A batch of `project`'s runs, their `project` left empty as the batch's is enough.
fn batch(project: &str, runs: impl IntoIterator<Item = AdmitRequest>) -> BatchAdmitRequest {
    BatchAdmitRequest {
        project: format!("projects/{project}"),
        requests: runs
            .into_iter()
            .map(|request| AdmitRequest {
                project: String::new(),
                ..request
            })
            .collect(),
    }
}

async fn admit_batch(client: &Client, token: &str, request: BatchAdmitRequest) -> Vec<BatchAdmitResult> {
    client
        .clone()
        .batch_admit(authed(request, token))
        .await
        .expect("a batch")
        .into_inner()
        .results
}

/// The state of each result: its admission's, or `None` for an error.
fn states(results: &[BatchAdmitResult]) -> Vec<Option<AdmissionState>> {
    results
        .iter()
        .map(|result| match &result.result {
            Some(batch_admit_result::Result::Admission(admission)) => Some(admission.state()),
            _ => None,
        })
        .collect()
}

async fn usage(client: &Client, token: &str, project: &str) -> ProjectUsage {
    client
        .clone()
        .get_project_usage(authed(
            GetProjectUsageRequest {
                project: format!("projects/{project}"),
            },
            token,
        ))
        .await
        .expect("usage")
        .into_inner()
}

/// 60 single admissions and 4 batches of 30, all asking for one GPU each, race for a 20-GPU quota: exactly 20
/// are admitted, and the usage says so.
async fn single_and_batch_admissions_racing_never_over_commit(shape: Shape) {
    let platform = platform(shape, AdmissionOptions::default().quota_cache_ttl).await;
    create_project(
        &platform,
        "vision",
        Settings::default(),
        Quota {
            gpu: Some(20.0),
            ..Quota::default()
        },
    )
    .await;
    let client = AdmissionServiceClient::new(connect(&platform.scheduler).await);
    let mut singles = Vec::new();
    for n in 0..60 {
        let mut client = client.clone();
        let request = authed(run("vision", &format!("single-{n}"), "1"), &platform.token);
        singles.push(tokio::spawn(async move { client.admit(request).await }));
    }
    let mut batches = Vec::new();
    for b in 0..4 {
        let (client, token) = (client.clone(), platform.token.clone());
        let request = batch("vision", (0..30).map(|n| run("vision", &format!("batch-{b}-{n}"), "1")));
        batches.push(tokio::spawn(async move { admit_batch(&client, &token, request).await }));
    }
    let mut admitted = 0;
    let mut queued = 0;
    for single in singles {
        match single.await.expect("task").expect("an admission").into_inner().state() {
            AdmissionState::Admitted => admitted += 1,
            AdmissionState::Queued => queued += 1,
            AdmissionState::Unspecified => panic!("no state"),
        }
    }
    for results in batches {
        let results = results.await.expect("task");
        assert_eq!(results.len(), 30);
        for state in states(&results) {
            match state.expect("an admission for every workload of the batch") {
                AdmissionState::Admitted => admitted += 1,
                AdmissionState::Queued => queued += 1,
                AdmissionState::Unspecified => panic!("no state"),
            }
        }
    }
    assert_eq!(admitted, 20, "exactly the quota is admitted, never more");
    assert_eq!(queued, 160);
    let used = usage(&client, &platform.token, "vision").await;
    assert_eq!((used.gpu, used.runs, used.cpu), (20.0, 20, 20.0), "{used:?}");
}

/// A batch decides its workloads in order against what the ones before reserved (here lena's own quota of 3
/// CPUs), each all or nothing, and answers per workload; asking again changes nothing, and after a release the
/// first workload of the next batch that does not hold its CPU takes it. A workload another member admitted is that workload's ALREADY_EXISTS, the others are
/// admitted; malformed batches are refused whole, naming the request and field; a non-member learns nothing.
async fn a_batch_decides_each_workload_in_order(shape: Shape) {
    let platform = platform(shape, AdmissionOptions::default().quota_cache_ttl).await;
    create_project(&platform, "speech", Settings::default(), Quota::default()).await;
    let mut projects = ProjectServiceClient::new(connect(&platform.projects).await);
    projects
        .update_member(authed(
            UpdateMemberRequest {
                member: Some(Member {
                    name: "projects/speech/members/u-lena".into(),
                    quota: Some(Quota {
                        cpu: Some(3.0),
                        ..Quota::default()
                    }),
                    ..Member::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["quota".into()],
                }),
            },
            &platform.token,
        ))
        .await
        .expect("lena's quota");
    let client = AdmissionServiceClient::new(connect(&platform.scheduler).await);
    let five = || batch("speech", (0..5).map(|n| run("speech", &format!("r-{n}"), "")));
    let results = admit_batch(&client, &platform.token, five()).await;
    let workloads: Vec<&str> = results.iter().map(|result| result.workload.as_str()).collect();
    assert_eq!(
        workloads,
        (0..5)
            .map(|n| format!("projects/speech/runs/r-{n}"))
            .collect::<Vec<_>>()
    );
    use AdmissionState::{Admitted, Queued};
    assert_eq!(
        states(&results),
        [
            Some(Admitted),
            Some(Admitted),
            Some(Admitted),
            Some(Queued),
            Some(Queued)
        ]
    );
    let explanation = client
        .clone()
        .explain_pending(authed(
            ExplainPendingRequest {
                workload: "projects/speech/runs/r-3".into(),
            },
            &platform.token,
        ))
        .await
        .expect("explaining")
        .into_inner();
    let blocker = explanation.blockers.first().expect("a blocker");
    assert_eq!(
        (
            blocker.quota.as_str(),
            blocker.resource.as_str(),
            blocker.in_use,
            blocker.limit
        ),
        ("projects/speech/members/u-lena", "cpu", 3.0, 3.0)
    );

    // Again: the same answers, nothing reserved twice.
    let again = admit_batch(&client, &platform.token, five()).await;
    assert_eq!(states(&again), states(&results));
    assert_eq!(usage(&client, &platform.token, "speech").await.cpu, 3.0);

    // A release makes room for the first queued workload, which the next batch admits.
    client
        .clone()
        .release(authed(
            ReleaseRequest {
                workload: "projects/speech/runs/r-0".into(),
            },
            &platform.token,
        ))
        .await
        .expect("releasing");
    let after = admit_batch(&client, &platform.token, five()).await;
    // r-0 comes first in the batch, so it takes the released CPU again and r-3 still waits.
    assert_eq!(
        states(&after),
        [
            Some(Admitted),
            Some(Admitted),
            Some(Admitted),
            Some(Queued),
            Some(Queued)
        ]
    );
    let used = usage(&client, &platform.token, "speech").await;
    assert_eq!((used.cpu, used.runs), (3.0, 3), "{used:?}");

    // omar joins: his batch holding one of lena's names gets ALREADY_EXISTS for it, and his own is admitted.
    projects
        .create_member(authed(
            CreateMemberRequest {
                parent: "projects/speech".into(),
                member: Some(Member {
                    subject: Some(member::Subject::User("users/omar".into())),
                    role: Role::Developer as i32,
                    ..Member::default()
                }),
            },
            &platform.token,
        ))
        .await
        .expect("adding omar");
    let mixed = || batch("speech", [run("speech", "r-1", ""), run("speech", "omar-1", "")]);
    let results = cube_testkit::eventually("omar's membership seen", Duration::from_secs(5), || {
        let (client, token, request) = (client.clone(), platform.stranger.clone(), mixed());
        async move { client.clone().batch_admit(authed(request, &token)).await.ok() }
    })
    .await
    .into_inner()
    .results;
    match &results[0].result {
        Some(batch_admit_result::Result::Error(error)) => {
            assert_eq!(error.code, Code::AlreadyExists as i32, "{error:?}");
            assert_eq!(error.reason, ErrorReason::AlreadyExists as i32, "{error:?}");
        }
        other => panic!("lena's workload answered to omar: {other:?}"),
    }
    assert_eq!(states(&results)[1], Some(Admitted));

    // Malformed batches are refused whole, naming the request and its field.
    let refusals = [
        (
            batch("speech", [run("speech", "dup", ""), run("speech", "dup", "")]),
            "requests[1].workload",
        ),
        (
            batch("speech", [run("speech", "ok", ""), run("omar-lab", "x", "")]),
            "requests[1].workload",
        ),
        (
            batch(
                "speech",
                [AdmitRequest {
                    cpu: "lots".into(),
                    ..run("speech", "bad", "")
                }],
            ),
            "requests[0].cpu",
        ),
        (batch("speech", []), "requests"),
        (
            BatchAdmitRequest {
                requests: vec![run("omar-lab", "x", "")],
                ..batch("speech", [])
            },
            "requests[0].project",
        ),
    ];
    for (request, field) in refusals {
        let status = client
            .clone()
            .batch_admit(authed(request, &platform.token))
            .await
            .expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let fields: Vec<String> = status
            .get_details_bad_request()
            .map(|bad| {
                bad.field_violations
                    .into_iter()
                    .map(|violation| violation.field)
                    .collect()
            })
            .unwrap_or_default();
        assert!(fields.iter().any(|found| found == field), "{field}: {fields:?}");
    }

    // A non-member is refused as for a project that does not exist.
    create_project(&platform, "hidden", Settings::default(), Quota::default()).await;
    let status = client
        .clone()
        .batch_admit(authed(batch("hidden", [run("hidden", "x", "")]), &platform.stranger))
        .await
        .expect_err("a non-member");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

/// An owner lowers a member's notebook quota and an admin lowers a project's GPU quota while the scheduler keeps
/// quota answers for 10 minutes: each is enforced within a second.
async fn a_lowered_quota_is_enforced_within_a_second(shape: Shape) {
    let platform = platform(shape, Duration::from_secs(600)).await;
    create_project(
        &platform,
        "vision",
        Settings::default(),
        Quota {
            gpu: Some(10.0),
            ..Quota::default()
        },
    )
    .await;
    let client = AdmissionServiceClient::new(connect(&platform.scheduler).await);
    let admit = |request: AdmitRequest| {
        let (mut client, token) = (client.clone(), platform.token.clone());
        async move {
            client
                .admit(authed(request, &token))
                .await
                .expect("admitting")
                .into_inner()
                .state()
        }
    };
    for n in 0..2 {
        assert_eq!(
            admit(run("vision", &format!("held-{n}"), "1")).await,
            AdmissionState::Admitted
        );
    }
    // Each probe is a new workload (a notebook, or a run asking for a GPU); one admitted on the old quota is
    // released again, so the probes themselves never fill the quota.
    let probes = std::sync::atomic::AtomicUsize::new(0);
    let probe = |kind: WorkloadKind, gpu: &'static str| {
        let n = probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (client, token) = (client.clone(), platform.token.clone());
        async move {
            let collection = if kind == WorkloadKind::Notebook {
                "notebooks"
            } else {
                "runs"
            };
            let workload = format!("projects/vision/{collection}/probe-{n}");
            let state = client
                .clone()
                .admit(authed(
                    AdmitRequest {
                        workload: workload.clone(),
                        kind: kind as i32,
                        ..run("vision", "unused", gpu)
                    },
                    &token,
                ))
                .await
                .expect("admitting")
                .into_inner()
                .state();
            if state == AdmissionState::Admitted {
                client
                    .clone()
                    .release(authed(ReleaseRequest { workload }, &token))
                    .await
                    .expect("releasing a probe");
                return None;
            }
            Some(state)
        }
    };
    // The owner lowers lena's own notebook quota in the project to none.
    let mut projects = ProjectServiceClient::new(connect(&platform.projects).await);
    projects
        .update_member(authed(
            UpdateMemberRequest {
                member: Some(Member {
                    name: "projects/vision/members/u-lena".into(),
                    quota: Some(Quota {
                        notebooks: Some(0),
                        ..Quota::default()
                    }),
                    ..Member::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["quota".into()],
                }),
            },
            &platform.token,
        ))
        .await
        .expect("the owner lowers lena's quota");
    cube_testkit::eventually("the lowered member quota enforced", Duration::from_secs(1), || {
        probe(WorkloadKind::Notebook, "")
    })
    .await;
    let status = client
        .clone()
        .explain_pending(authed(
            ExplainPendingRequest {
                workload: format!(
                    "projects/vision/notebooks/probe-{}",
                    probes.load(std::sync::atomic::Ordering::Relaxed) - 1
                ),
            },
            &platform.token,
        ))
        .await
        .expect("explaining")
        .into_inner();
    assert_eq!(
        status
            .blockers
            .first()
            .map(|blocker| (blocker.quota.as_str(), blocker.resource.as_str())),
        Some(("projects/vision/members/u-lena", "notebooks")),
        "{status:?}"
    );

    // An admin lowers the project's GPU quota to what it holds.
    projects
        .update_project(authed(
            UpdateProjectRequest {
                project: Some(Project {
                    name: "projects/vision".into(),
                    quota: Some(Quota {
                        gpu: Some(2.0),
                        ..Quota::default()
                    }),
                    ..Project::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["quota".into()],
                }),
            },
            &platform.admin,
        ))
        .await
        .expect("an admin lowers the quota");
    cube_testkit::eventually("the lowered project quota enforced", Duration::from_secs(1), || {
        probe(WorkloadKind::Train, "1")
    })
    .await;
    assert_eq!(usage(&client, &platform.token, "vision").await.gpu, 2.0);
}

cube_integration_tests::on_every_shape!(
    mariadb,
    single_and_batch_admissions_racing_never_over_commit,
    a_batch_decides_each_workload_in_order,
    a_lowered_quota_is_enforced_within_a_second,
);
