//! Service identity across services, on both shapes: a service account acting for a member places, admits and
//! releases as that member would, and reads the member's membership; acting for a non-member it gets exactly the
//! non-member's answer; a user's token that names someone to act for is refused; a deleted account is refused by
//! every service within seconds.

use std::time::Duration;

use cube_integration_tests::connect;
use cube_integration_tests::platform::{FakeNode, Platform, authed, create_project, kube_client, platform};
use cube_integration_tests::shape::Shape;
use cube_kit::identity::ON_BEHALF_OF;
use cube_proto::cube::auth::v1::service_account_service_client::ServiceAccountServiceClient;
use cube_proto::cube::auth::v1::{CreateServiceAccountRequest, DeleteServiceAccountRequest};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{GetMembershipRequest, Quota, Role, Settings};
use cube_proto::cube::scheduler::v1::admission_service_client::AdmissionServiceClient;
use cube_proto::cube::scheduler::v1::placement_service_client::PlacementServiceClient;
use cube_proto::cube::scheduler::v1::{AdmissionState, AdmitRequest, PlaceRequest, ReleaseRequest, WorkloadKind};
use serde_json::json;
use tonic::Code;

cube_integration_tests::on_every_shape!(
    a_service_acts_for_a_member_as_the_member_and_for_others_as_them,
    a_deleted_service_account_is_refused_by_every_service,
);

/// `message` sent by the holder of `token` naming `user` as the one it acts for.
fn acting<T>(message: T, token: &str, user: &str) -> tonic::Request<T> {
    let mut request = authed(message, token);
    request
        .metadata_mut()
        .insert(ON_BEHALF_OF, user.parse().expect("metadata"));
    request
}

/// Makes the service account `workflow` and returns its token.
async fn service_token(platform: &Platform) -> String {
    ServiceAccountServiceClient::new(connect(&platform.auth).await)
        .create_service_account(authed(
            CreateServiceAccountRequest {
                service_account_id: "workflow".into(),
                service_account: None,
            },
            &platform.admin,
        ))
        .await
        .expect("creating the service account")
        .into_inner()
        .token
}

fn run(name: &str) -> AdmitRequest {
    AdmitRequest {
        workload: format!("projects/speech/runs/{name}"),
        project: "projects/speech".into(),
        kind: WorkloadKind::Train as i32,
        cpu: "1".into(),
        memory: "1G".into(),
        gpu: String::new(),
    }
}

fn membership() -> GetMembershipRequest {
    GetMembershipRequest {
        project: "projects/speech".into(),
        user: String::new(),
    }
}

async fn a_service_acts_for_a_member_as_the_member_and_for_others_as_them(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    let group = format!("identity-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _node = FakeNode::create(&client, json!({"cpu": "true", "train": "true", "org": group}), &[]).await;
    let platform = platform(shape, &kubeconfig).await;
    create_project(
        &platform,
        "speech",
        Settings {
            resource_group: group.clone(),
            ..Settings::default()
        },
        Quota::default(),
    )
    .await;
    let token = service_token(&platform).await;
    let admissions = AdmissionServiceClient::new(connect(&platform.scheduler).await);
    let placer = PlacementServiceClient::new(connect(&platform.scheduler).await);
    let mut projects = ProjectServiceClient::new(connect(&platform.projects).await);

    // For lena, a member (the owner) of speech: what lena may do.
    let role = projects
        .get_membership(acting(membership(), &token, "users/lena"))
        .await
        .expect("lena's membership")
        .into_inner();
    assert_eq!(role.role(), Role::Owner);
    let placed = cube_testkit::eventually("a placement for lena", Duration::from_secs(10), || {
        let mut placer = placer.clone();
        let request = acting(
            PlaceRequest {
                project: "projects/speech".into(),
                kind: WorkloadKind::Train as i32,
                cpu: "1".into(),
                memory: "1G".into(),
                workload: "projects/speech/runs/nightly".into(),
                ..PlaceRequest::default()
            },
            &token,
            "users/lena",
        );
        async move { placer.place(request).await.ok() }
    })
    .await
    .into_inner();
    assert_eq!(placed.node_selector.get("org"), Some(&group), "{placed:?}");
    let admitted = admissions
        .clone()
        .admit(acting(run("nightly"), &token, "users/lena"))
        .await
        .expect("admitting for lena")
        .into_inner();
    assert_eq!(admitted.state(), AdmissionState::Admitted);
    admissions
        .clone()
        .release(acting(
            ReleaseRequest {
                workload: "projects/speech/runs/nightly".into(),
            },
            &token,
            "users/lena",
        ))
        .await
        .expect("releasing for lena");

    // For omar, not a member: exactly what omar himself is told.
    let as_omar = admissions
        .clone()
        .admit(acting(run("sneaky"), &token, "users/omar"))
        .await
        .expect_err("omar is no member");
    let omar_himself = admissions
        .clone()
        .admit(authed(run("sneaky"), &platform.stranger))
        .await
        .expect_err("omar is no member");
    assert_eq!(
        (as_omar.code(), as_omar.message()),
        (omar_himself.code(), omar_himself.message())
    );
    let as_omar = projects
        .get_membership(acting(membership(), &token, "users/omar"))
        .await
        .expect_err("omar is no member");
    let omar_himself = projects
        .get_membership(authed(membership(), &platform.stranger))
        .await
        .expect_err("omar is no member");
    assert_eq!(
        (as_omar.code(), as_omar.message()),
        (omar_himself.code(), omar_himself.message())
    );

    // A user's token cannot act for anyone, not even with a valid name.
    let refused = admissions
        .clone()
        .admit(acting(run("borrowed"), &platform.stranger, "users/lena"))
        .await
        .expect_err("a user acting for lena");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = projects
        .get_membership(acting(membership(), &platform.stranger, "users/lena"))
        .await
        .expect_err("a user acting for lena");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // Alone, the account is a member of nothing.
    let alone = projects
        .get_membership(authed(membership(), &token))
        .await
        .expect_err("the account alone");
    assert_eq!(alone.code(), Code::NotFound, "{alone:?}");
}

async fn a_deleted_service_account_is_refused_by_every_service(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform(shape, &kubeconfig).await;
    create_project(&platform, "speech", Settings::default(), Quota::default()).await;
    let token = service_token(&platform).await;
    let admissions = AdmissionServiceClient::new(connect(&platform.scheduler).await);
    let projects = ProjectServiceClient::new(connect(&platform.projects).await);
    admissions
        .clone()
        .admit(acting(run("before"), &token, "users/lena"))
        .await
        .expect("works before the deletion");
    projects
        .clone()
        .get_membership(acting(membership(), &token, "users/lena"))
        .await
        .expect("works before the deletion");

    ServiceAccountServiceClient::new(connect(&platform.auth).await)
        .delete_service_account(authed(
            DeleteServiceAccountRequest {
                name: "serviceAccounts/workflow".into(),
            },
            &platform.admin,
        ))
        .await
        .expect("deleting the account");
    cube_testkit::eventually(
        "the scheduler refuses the deleted account",
        Duration::from_secs(5),
        || {
            let mut admissions = admissions.clone();
            let request = acting(run("after"), &token, "users/lena");
            async move {
                match admissions.admit(request).await {
                    Err(status) if status.code() == Code::Unauthenticated => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;
    cube_testkit::eventually("projects refuses the deleted account", Duration::from_secs(5), || {
        let mut projects = projects.clone();
        let request = acting(membership(), &token, "users/lena");
        async move {
            match projects.get_membership(request).await {
                Err(status) if status.code() == Code::Unauthenticated => Some(()),
                _ => None,
            }
        }
    })
    .await;
}
