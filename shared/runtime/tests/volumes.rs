//! Volume rendering with cube-studio's rules (reference §4.6), as tables, and the rendered volumes accepted by the
//! test environment's real kube-apiserver.

use cube_runtime::RuntimeError;
use cube_runtime::volumes::{Rendered, dns_label, render, user_directory};
use cube_testkit::kubernetes::{TestNamespace, client};
use k8s_openapi::api::core::v1::{Pod, Volume, VolumeMount};
use kube::api::PostParams;
use serde_json::{Value, json};

fn rendered(text: &str, user: &str) -> Rendered {
    let mounts = cube_volumes::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"));
    render(&mounts, user).unwrap_or_else(|error| panic!("{text}: {error}"))
}

/// The volumes and mounts as JSON, to compare with tables.
fn as_json(rendered: &Rendered) -> Vec<(Value, Value)> {
    rendered
        .volumes
        .iter()
        .zip(&rendered.mounts)
        .map(|(volume, mount)| {
            (
                serde_json::to_value(volume).expect("a volume as JSON"),
                serde_json::to_value(mount).expect("a mount as JSON"),
            )
        })
        .collect()
}

fn dshm() -> (Value, Value) {
    (
        json!({"name": "dshm", "emptyDir": {"medium": "Memory"}}),
        json!({"name": "dshm", "mountPath": "/dev/shm"}),
    )
}

#[test]
fn every_row_of_cube_studio_renders_as_it_did() {
    let table = [
        (
            "kubeflow-user-workspace(pvc):/mnt",
            json!({"name": "kubeflow-user-workspace", "persistentVolumeClaim": {"claimName": "kubeflow-user-workspace"}}),
            json!({"name": "kubeflow-user-workspace", "mountPath": "/mnt/alice", "subPath": "alice"}),
        ),
        (
            "kubeflow-user-workspace(pvc):/mnt/",
            json!({"name": "kubeflow-user-workspace", "persistentVolumeClaim": {"claimName": "kubeflow-user-workspace"}}),
            json!({"name": "kubeflow-user-workspace", "mountPath": "/mnt/alice", "subPath": "alice"}),
        ),
        (
            "archives(pvc-share):/archives",
            json!({"name": "archives", "persistentVolumeClaim": {"claimName": "archives"}}),
            json!({"name": "archives", "mountPath": "/archives"}),
        ),
        (
            "s3.bucket(storage):/data/s3",
            json!({"name": "s3-bucket", "persistentVolumeClaim": {"claimName": "s3.bucket"}}),
            json!({"name": "s3-bucket", "mountPath": "/data/s3"}),
        ),
        (
            "/data/x(hostpath):/data",
            json!({"name": "data-x", "hostPath": {"path": "/data/x"}}),
            json!({"name": "data-x", "mountPath": "/data"}),
        ),
        (
            "/Data/my_set.v2/(hostpath):/set",
            json!({"name": "data-my-set-v2", "hostPath": {"path": "/Data/my_set.v2/"}}),
            json!({"name": "data-my-set-v2", "mountPath": "/set"}),
        ),
        (
            "settings(configmap):/etc/app",
            json!({"name": "settings", "configMap": {"name": "settings"}}),
            json!({"name": "settings", "mountPath": "/etc/app"}),
        ),
        (
            "tokens(secret):/etc/tokens",
            json!({"name": "tokens", "secret": {"secretName": "tokens"}}),
            json!({"name": "tokens", "mountPath": "/etc/tokens"}),
        ),
        (
            "8G(memory):/cache",
            json!({"name": "memory-8", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}),
            json!({"name": "memory-8", "mountPath": "/cache"}),
        ),
        (
            "512Mi(memory):/cache",
            json!({"name": "memory-512mi", "emptyDir": {"medium": "Memory", "sizeLimit": "512Mi"}}),
            json!({"name": "memory-512mi", "mountPath": "/cache"}),
        ),
    ];
    for (text, volume, mount) in table {
        let got = as_json(&rendered(text, "alice"));
        assert_eq!(got, [(volume, mount), dshm()], "{text}");
    }
}

#[test]
fn the_reference_vector_renders_every_kind_together() {
    let text = "kubeflow-user-workspace(pvc):/mnt,4G(memory):/dev/shm,/data/x(hostpath):/data";
    let got = as_json(&rendered(text, "alice"));
    assert_eq!(
        got,
        [
            (
                json!({"name": "kubeflow-user-workspace",
                       "persistentVolumeClaim": {"claimName": "kubeflow-user-workspace"}}),
                json!({"name": "kubeflow-user-workspace", "mountPath": "/mnt/alice", "subPath": "alice"}),
            ),
            (
                json!({"name": "memory-4", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}}),
                json!({"name": "memory-4", "mountPath": "/dev/shm"}),
            ),
            (
                json!({"name": "data-x", "hostPath": {"path": "/data/x"}}),
                json!({"name": "data-x", "mountPath": "/data"}),
            ),
        ],
        "no implicit dshm when /dev/shm is mounted, and no Asia/Shanghai time zone"
    );
}

#[test]
fn no_mounts_still_get_shared_memory_and_no_time_zone() {
    assert_eq!(as_json(&rendered("", "alice")), [dshm()]);
    assert_eq!(as_json(&rendered("/dev/shm/(hostpath):/dev/shm/", "alice")).len(), 1);
    let nested = rendered("cache(pvc-share):/dev/shm/cache", "alice");
    assert_eq!(nested.mounts.last().map(|m| m.mount_path.as_str()), Some("/dev/shm"));
    for volume in &rendered("a(pvc):/mnt", "alice").volumes {
        assert!(volume.host_path.is_none(), "no hostPath volume is implicit: {volume:?}");
    }
}

#[test]
fn colliding_names_get_distinct_volumes() {
    let text = "my.claim(pvc-share):/a,my-claim(pvc-share):/b,/my/claim(hostpath):/c,2G(memory):/d,2G(memory):/e,\
                dshm(configmap):/f";
    let got = rendered(text, "alice");
    let names: Vec<&str> = got.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "my-claim",
            "my-claim-2",
            "my-claim-3",
            "memory-2",
            "memory-2-2",
            "dshm",
            "dshm-2"
        ]
    );
    for (volume, mount) in got.volumes.iter().zip(&got.mounts) {
        assert_eq!(volume.name, mount.name);
    }
}

#[test]
fn long_names_are_cut_to_valid_unique_labels() {
    let long = format!("x{}", "a".repeat(80));
    let text = format!(
        "{long}(pvc-share):/a,{long}(pvc-share):/b,/{}(hostpath):/c",
        "b".repeat(70)
    );
    let got = rendered(&text, "alice");
    for volume in &got.volumes {
        let name = &volume.name;
        assert!(name.len() <= 63, "{name}");
        assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{name}"
        );
    }
    assert_eq!(
        got.volumes[0].name,
        "a".repeat(60),
        "the last 60 characters, as cube-studio"
    );
    assert_eq!(got.volumes[1].name, format!("{}-2", "a".repeat(60)));
    assert_eq!(got.volumes[2].name, "b".repeat(60));
}

#[test]
fn names_are_made_as_cube_studio_made_them() {
    for (text, name) in [
        ("kubeflow_user_workspace", "kubeflow-user-workspace"),
        ("Claim.Name", "claim-name"),
        ("/data/x/", "data-x"),
        ("/", ""),
        ("--a--", "a"),
    ] {
        assert_eq!(dns_label(text), name, "{text}");
    }
    let root = rendered("/(hostpath):/host", "alice");
    assert_eq!(root.volumes[0].name, "hostpath", "a name with nothing left is the kind");
}

#[test]
fn user_names_are_escaped_into_one_safe_directory() {
    for (user, directory) in [
        ("alice", "alice"),
        ("Alice_B-2.x", "Alice_B-2.x"),
        ("..", "~2e."),
        (".hidden", "~2ehidden"),
        ("a/b", "a~2fb"),
        ("a b", "a~20b"),
        ("a~2fb", "a~7e2fb"),
        ("zoë", "zo~c3~ab"),
    ] {
        assert_eq!(user_directory(user).ok().as_deref(), Some(directory), "{user:?}");
    }
    let got = rendered("work(pvc):/mnt", "a/b");
    assert_eq!(got.mounts[0].mount_path, "/mnt/a~2fb");
    assert_eq!(got.mounts[0].sub_path.as_deref(), Some("a~2fb"));
}

#[test]
fn an_empty_user_is_refused_only_where_a_claim_is_per_user() {
    let mounts = cube_volumes::parse("work(pvc):/mnt").expect("a setting");
    match render(&mounts, "") {
        Err(RuntimeError::Invalid { field, message }) => {
            assert_eq!(field, "user");
            assert!(message.contains("empty"), "{message}");
        }
        other => panic!("expected an invalid user, got {other:?}"),
    }
    let long = "u".repeat(256);
    assert!(matches!(render(&mounts, &long), Err(RuntimeError::Invalid { field, .. }) if field == "user"));
    let shared = cube_volumes::parse("work(pvc-share):/mnt").expect("a setting");
    assert!(render(&shared, "").is_ok(), "a shared claim needs no user");
}

#[test]
fn malformed_mounts_built_by_hand_are_refused_naming_volumes() {
    use cube_volumes::{VolumeMount as Mount, VolumeSource};
    let bad = [
        vec![Mount {
            source: VolumeSource::PvcShare {
                claim: "Bad_Claim".into(),
            },
            mount_path: "/mnt".into(),
        }],
        vec![Mount {
            source: VolumeSource::HostPath {
                path: "relative".into(),
            },
            mount_path: "/mnt".into(),
        }],
        vec![Mount {
            source: VolumeSource::ConfigMap { name: "ok".into() },
            mount_path: "/".into(),
        }],
        vec![
            Mount {
                source: VolumeSource::ConfigMap { name: "a".into() },
                mount_path: "/same".into(),
            },
            Mount {
                source: VolumeSource::Secret { name: "b".into() },
                mount_path: "/same/".into(),
            },
        ],
    ];
    for mounts in bad {
        match render(&mounts, "alice") {
            Err(RuntimeError::Invalid { field, message }) => {
                assert_eq!(field, "volumes", "{mounts:?}");
                assert!(message.contains("accepted forms"), "{message}");
            }
            other => panic!("{mounts:?}: expected invalid volumes, got {other:?}"),
        }
    }
}

/// Every kind, rendered, in one pod the real API server accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_volumes_are_accepted_by_the_api_server() {
    let client = client().await;
    let namespace = TestNamespace::unique(&client, "volumes").await;
    let text = "kubeflow-user-workspace(pvc):/mnt/,archives(pvc-share):/archives,s3(storage):/s3,\
                /data/x(hostpath):/data,settings(configmap):/etc/app,tokens(secret):/etc/tokens,\
                4G(memory):/cache,my.claim(pvc-share):/a,my-claim(pvc-share):/b";
    let got = rendered(text, "Zoë/..");
    let volumes: Vec<Volume> = got.volumes.clone();
    let mounts: Vec<VolumeMount> = got.mounts.clone();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "volumes"},
        "spec": {
            "restartPolicy": "Never",
            "volumes": volumes,
            "containers": [{"name": "main", "image": "cube.test/worker:1", "volumeMounts": mounts}],
        },
    }))
    .expect("a pod");
    let created = namespace
        .pods()
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|error| panic!("the API server refused the rendered volumes: {error}"));
    let stored = created.spec.and_then(|spec| spec.volumes).unwrap_or_default();
    assert_eq!(stored.len(), got.volumes.len());
}
