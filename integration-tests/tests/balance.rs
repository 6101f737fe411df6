//! The balancer and the cluster registry through their RPCs, with real tokens from auth: who may plan, run and
//! reload, what a run records, and how the moves list pages.

use std::time::Duration;

use cube_integration_tests::connect;
use cube_integration_tests::platform::{FakeNode, TestNamespace, authed, kube_client, platform_with, test_options};
use cube_integration_tests::shape::Shape;
use cube_proto::cube::scheduler::v1::balance_service_client::BalanceServiceClient;
use cube_proto::cube::scheduler::v1::cluster_service_client::ClusterServiceClient;
use cube_proto::cube::scheduler::v1::{
    ListNodeMovesRequest, PlanBalanceRequest, ReloadClustersRequest, RunBalanceRequest,
};
use cube_scheduler::Options;
use cube_scheduler::balancer::BalanceSettings;
use cube_testkit::{eventually, require};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt as _;

cube_integration_tests::on_every_shape!(plans_runs_and_records_moves_for_those_allowed);

async fn plans_runs_and_records_moves_for_those_allowed(shape: Shape) {
    let kubeconfig = require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    let run = format!("run-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let namespace = TestNamespace::create(&client, format!("balance-{run}")).await;
    let labels = |org: &str| json!({"cube-test-run": run, "org": org, "gpu": "true", "train": "true"});
    let mut hot = Vec::new();
    let mut cold = Vec::new();
    for _ in 0..4 {
        hot.push(FakeNode::create(&client, labels("hot"), &[("nvidia.com/gpu", 4)]).await);
        cold.push(FakeNode::create(&client, labels("cold"), &[("nvidia.com/gpu", 4)]).await);
    }
    for (index, node) in hot.iter().enumerate() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("load-{index}")},
            "spec": {"nodeName": node.name, "containers": [{"name": "work", "image": "busybox",
                "resources": {"requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "4"}}}]},
        }))
        .expect("pod");
        namespace
            .pods()
            .create(&PostParams::default(), &pod)
            .await
            .expect("a bound pod");
    }
    let options = Options {
        balance: BalanceSettings {
            node_selector: format!("cube-test-run={run}"),
            lease_namespace: namespace.name.clone(),
            ..test_options().balance
        },
        ..test_options()
    };
    let platform = platform_with(shape, &kubeconfig, options).await;
    let mut balance = BalanceServiceClient::new(connect(&platform.scheduler).await);
    let mut clusters = ClusterServiceClient::new(connect(&platform.scheduler).await);

    // Anyone signed in may plan; the plan moves a cold node to the hot group and changes nothing.
    let plan = eventually("a plan with the scenario's loads", Duration::from_secs(10), || {
        let mut balance = balance.clone();
        let token = platform.token.clone();
        async move {
            let plan = balance
                .plan_balance(authed(PlanBalanceRequest::default(), &token))
                .await
                .ok()?
                .into_inner();
            (plan.moves.len() == 1).then_some(plan)
        }
    })
    .await;
    let planned = &plan.moves[0];
    assert_eq!(
        (planned.from_group.as_str(), planned.to_group.as_str()),
        ("cold", "hot")
    );
    assert_eq!(planned.class, "gpu");
    assert!(planned.name.is_empty() && planned.replica.is_empty(), "{planned:?}");
    assert!((planned.to_load_percent - 100.0).abs() < 1e-9, "{planned:?}");
    let node = planned
        .node
        .strip_prefix("clusters/kube/nodes/")
        .expect("a node name")
        .to_owned();
    assert!(cold.iter().any(|cold| cold.name == node));

    let error = balance
        .plan_balance(tonic::Request::new(PlanBalanceRequest::default()))
        .await
        .expect_err("no token");
    assert_eq!(error.code(), Code::Unauthenticated);
    let error = balance
        .plan_balance(authed(
            PlanBalanceRequest {
                clusters: vec!["clusters/elsewhere".into()],
            },
            &platform.token,
        ))
        .await
        .expect_err("unknown cluster");
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    assert!(error.message().contains("kube"), "names the registered: {error:?}");

    // Only admins run rounds; the round makes the planned move, recorded and visible.
    let error = balance
        .run_balance(authed(RunBalanceRequest::default(), &platform.token))
        .await
        .expect_err("not an admin");
    assert_eq!(error.code(), Code::PermissionDenied);
    let nodes = Api::<Node>::all(client.clone());
    let org = |node: Node| node.metadata.labels.unwrap_or_default().get("org").cloned();
    assert_eq!(org(nodes.get(&node).await.expect("node")).as_deref(), Some("cold"));
    let round = balance
        .run_balance(authed(RunBalanceRequest::default(), &platform.admin))
        .await
        .expect("a round")
        .into_inner();
    assert!(round.skipped.is_empty(), "{:?}", round.skipped);
    assert_eq!(round.moves.len(), 1, "{round:?}");
    let made = &round.moves[0];
    assert_eq!(made.node, planned.node);
    assert!(made.name.starts_with("clusters/kube/nodeMoves/"), "{made:?}");
    assert!(!made.replica.is_empty() && made.create_time.is_some(), "{made:?}");
    assert_eq!(org(nodes.get(&node).await.expect("node")).as_deref(), Some("hot"));

    let listed = balance
        .list_node_moves(authed(
            ListNodeMovesRequest {
                parent: "clusters/kube".into(),
                page_size: 1,
                page_token: String::new(),
            },
            &platform.stranger,
        ))
        .await
        .expect("the moves")
        .into_inner();
    assert_eq!(listed.moves.len(), 1);
    assert_eq!(listed.moves[0].name, made.name);
    assert_eq!(listed.moves[0].reason, made.reason);
    assert!(listed.next_page_token.is_empty(), "one move, one page");
    let everywhere = balance
        .list_node_moves(authed(
            ListNodeMovesRequest {
                parent: "clusters/-".into(),
                ..ListNodeMovesRequest::default()
            },
            &platform.token,
        ))
        .await
        .expect("the moves")
        .into_inner();
    assert_eq!(everywhere.moves.len(), 1);
    for (parent, code, field) in [
        ("kube", Code::InvalidArgument, Some("parent")),
        ("clusters/elsewhere", Code::NotFound, None),
    ] {
        let error = balance
            .list_node_moves(authed(
                ListNodeMovesRequest {
                    parent: parent.into(),
                    ..ListNodeMovesRequest::default()
                },
                &platform.token,
            ))
            .await
            .expect_err("refused");
        assert_eq!(error.code(), code, "{parent}: {error:?}");
        if let Some(field) = field {
            let violations = error.get_details_bad_request().expect("BadRequest").field_violations;
            assert_eq!(violations[0].field, field);
        }
    }
    let error = balance
        .list_node_moves(authed(
            ListNodeMovesRequest {
                parent: "clusters/-".into(),
                page_token: "not a token".into(),
                ..ListNodeMovesRequest::default()
            },
            &platform.token,
        ))
        .await
        .expect_err("refused");
    assert_eq!(error.code(), Code::InvalidArgument);

    // Reloading the cluster file is for admins.
    let error = clusters
        .reload_clusters(authed(ReloadClustersRequest {}, &platform.token))
        .await
        .expect_err("not an admin");
    assert_eq!(error.code(), Code::PermissionDenied);
    let reloaded = clusters
        .reload_clusters(authed(ReloadClustersRequest {}, &platform.admin))
        .await
        .expect("a reload")
        .into_inner();
    assert_eq!(reloaded.clusters.len(), 1);
    assert_eq!(reloaded.clusters[0].name, "clusters/kube");
    drop((hot, cold));
}
