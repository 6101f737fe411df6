//! Placement against reference §3.2–3.5: node selectors, container resources, labels, affinity, refusals and why a
//! cluster cannot run a placement.

use std::collections::BTreeMap;

use cube_resources::{CpuSpec, GpuSpec, MemorySpec};
use cube_scheduler::placement::{
    FractionalResource, NodeShape, PlaceError, Placement, PlacementConfig, ProjectPlacement, RESERVED_LABELS,
    Resources, Toleration, WeightedPodAffinityTerm, Workload, WorkloadKind, place, why_unplaceable,
};
use proptest::prelude::*;

/// Parses `a=b,c=d` into a map; the empty string is the empty map.
fn map(text: &str) -> BTreeMap<String, String> {
    text.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn resources(cpu: &str, memory: &str, gpu: &str, rdma: u32) -> Resources {
    Resources {
        cpu: cpu.parse().unwrap_or_else(|error| panic!("{error}")),
        memory: memory.parse().unwrap_or_else(|error| panic!("{error}")),
        gpu: gpu.parse().unwrap_or_else(|error| panic!("{error}")),
        rdma,
    }
}

fn project(group: &str, selector: &str) -> ProjectPlacement {
    ProjectPlacement {
        cluster: "dev".into(),
        namespace: "pipeline".into(),
        resource_group: group.into(),
        node_selector: map(selector),
    }
}

fn vcuda() -> FractionalResource {
    FractionalResource {
        name: "tencent.com/vcuda-core".into(),
        units_per_gpu: 100,
    }
}

fn gpu_taint() -> Toleration {
    Toleration {
        key: "nvidia.com/gpu".into(),
        operator: "Exists".into(),
        value: None,
        effect: Some("NoSchedule".into()),
    }
}

/// The configuration of a row: cube-studio's defaults, or one change to them.
#[derive(Clone, Copy)]
enum Config {
    Default,
    Vgpu,
    VgpuVendor,
    Huawei,
    Rdma,
    NotebookExclusive,
    ServiceNotExclusive,
    GpuTolerations,
}

fn config(which: Config) -> PlacementConfig {
    let mut config = PlacementConfig::default();
    match which {
        Config::Default => {}
        Config::Vgpu => config.vgpu_resource = Some(vcuda()),
        Config::VgpuVendor => {
            config.vgpu_vendors.insert("mgpu".into(), vcuda());
        }
        Config::Huawei => {
            config
                .gpu_vendors
                .insert("huawei".into(), "huawei.com/Ascend910".into());
        }
        Config::Rdma => config.rdma_resource = Some("rdma/hca".into()),
        Config::NotebookExclusive => config.notebook_exclusive = true,
        Config::ServiceNotExclusive => config.service_exclusive = false,
        Config::GpuTolerations => config.gpu_tolerations = vec![gpu_taint()],
    }
    config
}

struct Row {
    name: &'static str,
    kind: WorkloadKind,
    cpu: &'static str,
    memory: &'static str,
    gpu: &'static str,
    rdma: u32,
    group: &'static str,
    project_selector: &'static str,
    config: Config,
    replica_label: bool,
    selector: &'static str,
    requests: &'static str,
    limits: &'static str,
    pod_labels: &'static str,
    /// `pack` (affinity to gpu=true pods), `spread` (anti-affinity to the replicas) or empty.
    affinity: &'static str,
    tolerations: bool,
}

const ROW: Row = Row {
    name: "",
    kind: WorkloadKind::Train,
    cpu: "2",
    memory: "4G",
    gpu: "",
    rdma: 0,
    group: "",
    project_selector: "",
    config: Config::Default,
    replica_label: false,
    selector: "",
    requests: "",
    limits: "",
    pod_labels: "",
    affinity: "",
    tolerations: false,
};

fn rows() -> Vec<Row> {
    use WorkloadKind::{Notebook, Service, Train};
    vec![
        Row {
            name: "cpu-only train: cpu=true, kind label, org default public",
            selector: "cpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "gpu string 0 is cpu-only",
            gpu: "0",
            selector: "cpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "millicores and mebibytes",
            cpu: "0.5",
            memory: "512M",
            selector: "cpu=true,org=public,train=true",
            requests: "cpu=500m,memory=512Mi",
            limits: "cpu=500m,memory=512Mi",
            ..ROW
        },
        Row {
            name: "ranges are request~limit",
            cpu: "1~4",
            memory: "2G~8G",
            selector: "cpu=true,org=public,train=true",
            requests: "cpu=1,memory=2Gi",
            limits: "cpu=4,memory=8Gi",
            ..ROW
        },
        Row {
            name: "resource group sets org",
            group: "team-a",
            selector: "cpu=true,org=team-a,train=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "project selector is merged",
            project_selector: "disk=ssd,zone=b",
            selector: "cpu=true,disk=ssd,org=public,train=true,zone=b",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "whole GPUs: gpu=true, nvidia.com/gpu request = limit, pod label, packing affinity",
            gpu: "2",
            selector: "gpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=2",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=2",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "1.0 GPU is one GPU",
            gpu: "1.0",
            selector: "gpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "gpu type adds gpu-type",
            gpu: "2(T4)",
            selector: "gpu-type=T4,gpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=2",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=2",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "full-width parentheses and lower-case type",
            gpu: "1（t4）",
            selector: "gpu-type=T4,gpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "vendor and type",
            gpu: "1(nvidia,V100)",
            selector: "gpu-type=V100,gpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "configured vendor selects its resource",
            gpu: "4(huawei,910B)",
            config: Config::Huawei,
            selector: "gpu-type=910B,gpu=true,org=public,train=true",
            requests: "cpu=2,huawei.com/Ascend910=4,memory=4Gi",
            limits: "cpu=2,huawei.com/Ascend910=4,memory=4Gi",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "a lone word that is a vendor names the vendor, not a type (cube-studio 1(gpu))",
            gpu: "1(gpu)",
            selector: "gpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "a lone vendor word in another case",
            gpu: "2(Huawei)",
            config: Config::Huawei,
            selector: "gpu=true,org=public,train=true",
            requests: "cpu=2,huawei.com/Ascend910=2,memory=4Gi",
            limits: "cpu=2,huawei.com/Ascend910=2,memory=4Gi",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "a vendor without a type",
            gpu: "1(nvidia,)",
            selector: "gpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "a GPU share: vgpu=true, no resource when none is configured (cube-studio OSS)",
            gpu: "0.25",
            selector: "org=public,train=true,vgpu=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "a GPU share requests the configured fractional resource in hundredths",
            gpu: "0.25",
            config: Config::Vgpu,
            selector: "org=public,train=true,vgpu=true",
            requests: "cpu=2,memory=4Gi,tencent.com/vcuda-core=25",
            limits: "cpu=2,memory=4Gi,tencent.com/vcuda-core=25",
            ..ROW
        },
        Row {
            name: "a GPU share rounds up to whole units",
            gpu: "0.125",
            config: Config::Vgpu,
            selector: "org=public,train=true,vgpu=true",
            requests: "cpu=2,memory=4Gi,tencent.com/vcuda-core=13",
            limits: "cpu=2,memory=4Gi,tencent.com/vcuda-core=13",
            ..ROW
        },
        Row {
            name: "the smallest share is one unit",
            gpu: "0.001",
            config: Config::Vgpu,
            selector: "org=public,train=true,vgpu=true",
            requests: "cpu=2,memory=4Gi,tencent.com/vcuda-core=1",
            limits: "cpu=2,memory=4Gi,tencent.com/vcuda-core=1",
            ..ROW
        },
        Row {
            name: "a GPU share of a type",
            gpu: "0.5(T4)",
            config: Config::Vgpu,
            selector: "gpu-type=T4,org=public,train=true,vgpu=true",
            requests: "cpu=2,memory=4Gi,tencent.com/vcuda-core=50",
            limits: "cpu=2,memory=4Gi,tencent.com/vcuda-core=50",
            ..ROW
        },
        Row {
            name: "a GPU share of a configured vGPU vendor (cube-studio VGPU_RESOURCE)",
            gpu: "0.5(mgpu)",
            config: Config::VgpuVendor,
            selector: "org=public,train=true,vgpu=true",
            requests: "cpu=2,memory=4Gi,tencent.com/vcuda-core=50",
            limits: "cpu=2,memory=4Gi,tencent.com/vcuda-core=50",
            ..ROW
        },
        Row {
            name: "notebooks are not exclusive by default: request 0, limit n",
            kind: Notebook,
            selector: "cpu=true,notebook=true,org=public",
            requests: "cpu=0,memory=0",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "a non-exclusive notebook keeps the limit of a range",
            kind: Notebook,
            cpu: "1~4",
            memory: "2G~8G",
            selector: "cpu=true,notebook=true,org=public",
            requests: "cpu=0,memory=0",
            limits: "cpu=4,memory=8Gi",
            ..ROW
        },
        Row {
            name: "exclusive notebooks request what they ask",
            kind: Notebook,
            config: Config::NotebookExclusive,
            selector: "cpu=true,notebook=true,org=public",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "a non-exclusive GPU notebook still requests its GPUs",
            kind: Notebook,
            gpu: "1(T4)",
            selector: "gpu-type=T4,gpu=true,notebook=true,org=public",
            requests: "cpu=0,memory=0,nvidia.com/gpu=1",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "services are exclusive by default; CPU-only replicas spread",
            kind: Service,
            replica_label: true,
            selector: "cpu=true,org=public,service=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            affinity: "spread",
            ..ROW
        },
        Row {
            name: "non-exclusive services request 0",
            kind: Service,
            config: Config::ServiceNotExclusive,
            replica_label: true,
            selector: "cpu=true,org=public,service=true",
            requests: "cpu=0,memory=0",
            limits: "cpu=2,memory=4Gi",
            affinity: "spread",
            ..ROW
        },
        Row {
            name: "a service without a replica label does not spread",
            kind: Service,
            selector: "cpu=true,org=public,service=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "GPU service replicas pack instead of spreading",
            kind: Service,
            gpu: "1",
            replica_label: true,
            selector: "gpu=true,org=public,service=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "vGPU service replicas neither pack nor spread",
            kind: Service,
            gpu: "0.5",
            replica_label: true,
            selector: "org=public,service=true,vgpu=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "train tasks do not spread by a replica label",
            kind: Train,
            replica_label: true,
            selector: "cpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
        Row {
            name: "RDMA requests the configured resource and rdma=true nodes",
            gpu: "8(A100)",
            rdma: 2,
            config: Config::Rdma,
            selector: "gpu-type=A100,gpu=true,org=public,rdma=true,train=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=8,rdma/hca=2",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=8,rdma/hca=2",
            pod_labels: "gpu=true",
            affinity: "pack",
            ..ROW
        },
        Row {
            name: "GPU tolerations go to GPU pods",
            gpu: "1",
            config: Config::GpuTolerations,
            selector: "gpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            limits: "cpu=2,memory=4Gi,nvidia.com/gpu=1",
            pod_labels: "gpu=true",
            affinity: "pack",
            tolerations: true,
            ..ROW
        },
        Row {
            name: "GPU tolerations go to vGPU pods",
            gpu: "0.5",
            config: Config::GpuTolerations,
            selector: "org=public,train=true,vgpu=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            tolerations: true,
            ..ROW
        },
        Row {
            name: "GPU tolerations stay off CPU pods",
            config: Config::GpuTolerations,
            selector: "cpu=true,org=public,train=true",
            requests: "cpu=2,memory=4Gi",
            limits: "cpu=2,memory=4Gi",
            ..ROW
        },
    ]
}

fn placed(row: &Row) -> Result<Placement, PlaceError> {
    let workload = Workload {
        kind: row.kind,
        resources: resources(row.cpu, row.memory, row.gpu, row.rdma),
        replica_label: row
            .replica_label
            .then(|| ("cube.io/inference-service".to_owned(), "resnet".to_owned())),
    };
    place(
        &workload,
        &project(row.group, row.project_selector),
        &config(row.config),
    )
}

#[test]
fn placement_table() -> Result<(), PlaceError> {
    for row in rows() {
        let name = row.name;
        let placement = placed(&row)?;
        assert_eq!(placement.cluster, "dev", "{name}");
        assert_eq!(placement.namespace, "pipeline", "{name}");
        assert_eq!(placement.node_selector, map(row.selector), "{name}");
        assert_eq!(placement.request_quantities(), map(row.requests), "{name}");
        assert_eq!(placement.limit_quantities(), map(row.limits), "{name}");
        assert_eq!(placement.pod_labels, map(row.pod_labels), "{name}");
        let term = |labels: &str| WeightedPodAffinityTerm {
            weight: 10,
            match_labels: map(labels),
            topology_key: "kubernetes.io/hostname".into(),
        };
        let (pack, spread) = match row.affinity {
            "pack" => (vec![term("gpu=true")], vec![]),
            "spread" => (vec![], vec![term("cube.io/inference-service=resnet")]),
            _ => (vec![], vec![]),
        };
        assert_eq!(placement.affinity.pod_affinity, pack, "{name}");
        assert_eq!(placement.affinity.pod_anti_affinity, spread, "{name}");
        assert_eq!(placement.affinity.is_empty(), row.affinity.is_empty(), "{name}");
        let tolerations = if row.tolerations { vec![gpu_taint()] } else { vec![] };
        assert_eq!(placement.tolerations, tolerations, "{name}");
        // Base units behind the quantities.
        assert_eq!(
            placement.limits.get("cpu").copied(),
            Some(row.cpu.parse::<CpuSpec>().map_or(0, |cpu| cpu.limit_millis())),
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn the_placement_is_deterministic() -> Result<(), PlaceError> {
    let row = Row {
        gpu: "2(T4)",
        project_selector: "zone=b,disk=ssd,a=1",
        ..ROW
    };
    let first = placed(&row)?;
    for _ in 0..10 {
        assert_eq!(placed(&row)?, first);
    }
    let keys: Vec<&str> = first.node_selector.keys().map(String::as_str).collect();
    assert_eq!(keys, ["a", "disk", "gpu", "gpu-type", "org", "train", "zone"]);
    Ok(())
}

#[test]
fn reserved_labels_in_the_project_selector_are_refused() {
    for key in RESERVED_LABELS {
        for kind in [WorkloadKind::Train, WorkloadKind::Notebook, WorkloadKind::Service] {
            let selector = format!("disk=ssd,{key}=true");
            let workload = Workload {
                kind,
                resources: resources("1", "1G", "", 0),
                replica_label: None,
            };
            let project = ProjectPlacement {
                node_selector: map(&selector),
                ..project("", "")
            };
            let error = place(&workload, &project, &PlacementConfig::default());
            assert_eq!(error, Err(PlaceError::ReservedLabel { key: key.to_owned() }), "{key}");
            if let Err(error) = error {
                assert_eq!(error.field(), "node_selector");
                assert!(error.to_string().contains(&format!("{key:?}")), "{error}");
            }
        }
    }
}

#[test]
fn refusals() {
    let row = |gpu: &'static str, rdma: u32, config: Config, group: &'static str| Row {
        gpu,
        rdma,
        config,
        group,
        ..ROW
    };
    let cases = [
        (
            row("", 0, Config::Default, "bad group"),
            PlaceError::ResourceGroup("bad group".into()),
            "resource_group",
        ),
        (
            row("", 0, Config::Default, "-x"),
            PlaceError::ResourceGroup("-x".into()),
            "resource_group",
        ),
        (
            row("1(amd,MI250)", 0, Config::Default, ""),
            PlaceError::UnknownVendor {
                vendor: "amd".into(),
                class: "whole GPUs",
                known: "gpu, nvidia".into(),
            },
            "gpu",
        ),
        (
            row("0.5(mgpu,T4)", 0, Config::Vgpu, ""),
            PlaceError::UnknownVendor {
                vendor: "mgpu".into(),
                class: "GPU shares",
                known: "none".into(),
            },
            "gpu",
        ),
        (
            row("", 1, Config::Default, ""),
            PlaceError::RdmaNotConfigured { count: 1 },
            "rdma",
        ),
    ];
    for (row, expected, field) in cases {
        let result = placed(&row);
        assert_eq!(result.as_ref().err(), Some(&expected), "{:?}", row.gpu);
        assert_eq!(expected.field(), field);
    }
}

#[test]
fn hand_built_gpu_specs_are_checked() {
    for gpu in [
        GpuSpec::Whole {
            count: 0,
            vendor: None,
            gpu_type: None,
        },
        GpuSpec::Fraction {
            share_thousandths: 1500,
            vendor: None,
            gpu_type: None,
        },
        GpuSpec::Whole {
            count: 1,
            vendor: None,
            gpu_type: Some("t 4".into()),
        },
    ] {
        let workload = Workload {
            kind: WorkloadKind::Train,
            resources: Resources {
                gpu: gpu.clone(),
                ..resources("1", "1G", "", 0)
            },
            replica_label: None,
        };
        let result = place(&workload, &project("", ""), &PlacementConfig::default());
        assert!(matches!(&result, Err(PlaceError::Gpu(_))), "{gpu:?}: {result:?}");
        if let Err(error) = result {
            assert_eq!(error.field(), "gpu");
            assert!(error.to_string().starts_with("gpu "), "{error}");
        }
    }
}

#[test]
fn messages_say_what_to_do() {
    let error = PlaceError::ReservedLabel { key: "cpu".into() };
    assert_eq!(
        error.to_string(),
        "the project's node_selector sets \"cpu\", which placement derives from the workload (cpu/gpu/vgpu/rdma from its resources, train/notebook/service from its kind, gpu-type from its GPU string, org from resource_group): remove it"
    );
    let error = PlaceError::RdmaNotConfigured { count: 2 };
    assert_eq!(
        error.to_string(),
        "2 RDMA devices were asked for, but this scheduler has no RDMA resource configured; ask for 0"
    );
}

#[test]
fn config_reads_from_json_with_defaults() -> Result<(), serde_json::Error> {
    let config: PlacementConfig = serde_json::from_str(
        r#"{"vgpu_resource": {"name": "tencent.com/vcuda-core", "units_per_gpu": 100},
            "rdma_resource": "rdma/hca",
            "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}"#,
    )?;
    assert_eq!(config.gpu_resource, "nvidia.com/gpu");
    assert_eq!(config.vgpu_resource, Some(vcuda()));
    assert_eq!(config.rdma_resource.as_deref(), Some("rdma/hca"));
    assert_eq!(config.gpu_tolerations, vec![gpu_taint()]);
    assert!(!config.notebook_exclusive);
    assert!(config.service_exclusive);
    assert!(serde_json::from_str::<PlacementConfig>(r#"{"gpu_resurce": "x"}"#).is_err());
    Ok(())
}

// Nodes and why_unplaceable.

fn node(labels: &str, allocatable: &str) -> NodeShape {
    NodeShape::from_quantities(map(labels), &map(allocatable))
}

fn cpu_node(group: &str) -> NodeShape {
    node(
        &format!("cpu=true,train=true,notebook=true,service=true,org={group}"),
        "cpu=32,memory=128Gi",
    )
}

fn gpu_node(gpu_type: &str, gpus: u32) -> NodeShape {
    node(
        &format!("gpu=true,train=true,notebook=true,service=true,org=public,gpu-type={gpu_type}"),
        &format!("cpu=64,memory=512Gi,nvidia.com/gpu={gpus}"),
    )
}

fn train(cpu: &str, memory: &str, gpu: &str, group: &str) -> Placement {
    let workload = Workload {
        kind: WorkloadKind::Train,
        resources: resources(cpu, memory, gpu, 0),
        replica_label: None,
    };
    place(&workload, &project(group, ""), &config(Config::Vgpu)).unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn node_shapes_read_allocatable_quantities() {
    let shape = node(
        "cpu=true",
        "cpu=3900m,memory=263597696Ki,nvidia.com/gpu=4,pods=110,ephemeral-storage=bad",
    );
    assert_eq!(shape.allocatable.get("cpu"), Some(&3900));
    assert_eq!(shape.allocatable.get("memory"), Some(&(263_597_696 * 1024)));
    assert_eq!(shape.allocatable.get("nvidia.com/gpu"), Some(&4));
    assert_eq!(shape.allocatable.get("pods"), Some(&110));
    assert_eq!(shape.allocatable.get("ephemeral-storage"), Some(&0));
}

#[test]
fn why_unplaceable_cases() {
    let cluster = vec![
        cpu_node("public"),
        cpu_node("team-a"),
        gpu_node("T4", 4),
        gpu_node("V100", 8),
        node(
            "vgpu=true,train=true,org=public",
            "cpu=16,memory=64Gi,tencent.com/vcuda-core=400",
        ),
    ];
    let fits: [(&str, Placement); 9] = [
        ("small cpu job", train("2", "4G", "", "")),
        ("cpu job of another group", train("32", "128G", "", "team-a")),
        ("exactly the node", train("32", "128G", "", "")),
        ("gpu job of a type", train("8", "64G", "4(T4)", "")),
        ("gpu job of no type", train("8", "64G", "8", "")),
        ("vgpu job", train("2", "4G", "0.5", "")),
        ("range asks only its request", train("1~64", "1G~1T", "", "")),
        ("large gpu job on the large node", train("64", "512G", "8(V100)", "")),
        ("millicores", train("0.001", "1M", "", "")),
    ];
    for (name, placement) in fits {
        assert_eq!(why_unplaceable(&placement, &cluster), None, "{name}");
    }

    let refused: [(&str, Placement, &[NodeShape], &str); 7] = [
        ("no nodes", train("1", "1G", "", ""), &[], "cluster dev has no nodes"),
        (
            "unknown gpu type",
            train("1", "1G", "1(A100)", ""),
            &cluster,
            "no node in cluster dev has the labels gpu=true,gpu-type=A100,org=public,train=true (none of its 5 nodes has gpu-type=A100)",
        ),
        (
            "unknown resource group",
            train("1", "1G", "", "team-b"),
            &cluster,
            "no node in cluster dev has the labels cpu=true,org=team-b,train=true (none of its 5 nodes has org=team-b)",
        ),
        (
            "labels exist, but never together",
            train("1", "1G", "1(T4)", "team-a"),
            &cluster,
            "no node in cluster dev has the labels gpu=true,gpu-type=T4,org=team-a,train=true",
        ),
        (
            "too many cores",
            train("33", "1G", "", ""),
            &cluster,
            "no node in cluster dev with the labels cpu=true,org=public,train=true has cpu 33, memory 1Gi allocatable; the most any of its 1 such nodes has is cpu 32, memory 128Gi",
        ),
        (
            "too many GPUs of a type",
            train("1", "1G", "8(T4)", ""),
            &cluster,
            "no node in cluster dev with the labels gpu=true,gpu-type=T4,org=public,train=true has cpu 1, memory 1Gi, nvidia.com/gpu 8 allocatable; the most any of its 1 such nodes has is cpu 64, memory 512Gi, nvidia.com/gpu 4",
        ),
        (
            "vgpu node without the share resource",
            train("1", "1G", "0.5", ""),
            &[node("vgpu=true,train=true,org=public", "cpu=16,memory=64Gi")],
            "no node in cluster dev with the labels org=public,train=true,vgpu=true has cpu 1, memory 1Gi, tencent.com/vcuda-core 50 allocatable; the most any of its 1 such nodes has is cpu 16, memory 64Gi, tencent.com/vcuda-core 0",
        ),
    ];
    for (name, placement, nodes, reason) in refused {
        assert_eq!(why_unplaceable(&placement, nodes).as_deref(), Some(reason), "{name}");
    }
}

#[test]
fn every_resource_must_fit_on_one_node() {
    let nodes = [
        node("cpu=true,train=true,org=public", "cpu=64,memory=8Gi"),
        node("cpu=true,train=true,org=public", "cpu=4,memory=512Gi"),
    ];
    let placement = train("32", "256G", "", "");
    assert_eq!(
        why_unplaceable(&placement, &nodes).as_deref(),
        Some(
            "no node in cluster dev with the labels cpu=true,org=public,train=true has cpu 32, memory 256Gi allocatable; the most any of its 2 such nodes has is cpu 64, memory 512Gi"
        )
    );
}

#[test]
fn zero_requests_fit_anywhere_the_labels_match() {
    let workload = Workload {
        kind: WorkloadKind::Notebook,
        resources: resources("64", "1T", "", 0),
        replica_label: None,
    };
    let placement =
        place(&workload, &project("", ""), &PlacementConfig::default()).unwrap_or_else(|error| panic!("{error}"));
    let nodes = [node("cpu=true,notebook=true,org=public", "cpu=1,memory=1Gi")];
    assert_eq!(why_unplaceable(&placement, &nodes), None);
}

// Generated workloads.

fn gpu_strategy() -> impl Strategy<Value = GpuSpec> {
    let gpu_type = prop::option::of(prop::sample::select(vec![
        "T4", "V100", "A100", "GPU", "MGPU", "HUAWEI",
    ]));
    let vendor = prop::option::of(prop::sample::select(vec!["gpu", "nvidia", "huawei", "mgpu", "amd"]));
    prop_oneof![
        Just(GpuSpec::None),
        (1u32..=u32::MAX, vendor.clone(), gpu_type.clone()).prop_map(|(count, vendor, gpu_type)| GpuSpec::Whole {
            count,
            vendor: vendor.map(str::to_owned),
            gpu_type: gpu_type.map(str::to_owned),
        }),
        (1u32..=999, vendor, gpu_type).prop_map(|(share_thousandths, vendor, gpu_type)| GpuSpec::Fraction {
            share_thousandths,
            vendor: vendor.map(str::to_owned),
            gpu_type: gpu_type.map(str::to_owned),
        }),
    ]
}

fn workload_strategy() -> impl Strategy<Value = Workload> {
    let cpu = (0u64..=u64::MAX / 2, 1u64..=u64::MAX / 2)
        .prop_filter_map("cpu", |(request, limit)| CpuSpec::new(request.min(limit), limit).ok());
    let memory = (0u64..=1 << 24, 1u64..=1 << 24).prop_filter_map("memory", |(request, limit)| {
        MemorySpec::new(request.min(limit) << 20, limit << 20).ok()
    });
    let kind = prop::sample::select(vec![WorkloadKind::Train, WorkloadKind::Notebook, WorkloadKind::Service]);
    (
        kind,
        cpu,
        memory,
        gpu_strategy(),
        prop_oneof![3 => Just(0u32), 1 => 1u32..=u32::MAX],
        any::<bool>(),
    )
        .prop_map(|(kind, cpu, memory, gpu, rdma, spread)| Workload {
            kind,
            resources: Resources { cpu, memory, gpu, rdma },
            replica_label: spread.then(|| ("app".to_owned(), "x".to_owned())),
        })
}

fn config_strategy() -> impl Strategy<Value = PlacementConfig> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        1u32..=u32::MAX,
    )
        .prop_map(|(vgpu, rdma, notebook_exclusive, service_exclusive, units_per_gpu)| {
            let mut config = PlacementConfig {
                notebook_exclusive,
                service_exclusive,
                ..PlacementConfig::default()
            };
            let share = FractionalResource {
                name: "example.com/share".into(),
                units_per_gpu,
            };
            if vgpu {
                config.vgpu_resource = Some(share.clone());
                config.vgpu_vendors.insert("mgpu".into(), share);
                config
                    .gpu_vendors
                    .insert("HUAWEI".into(), "huawei.com/Ascend910".into());
            }
            if rdma {
                config.rdma_resource = Some("rdma/hca".into());
            }
            config
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn place_never_panics_and_keeps_its_invariants(
        workload in workload_strategy(),
        config in config_strategy(),
        group in prop::sample::select(vec!["", "public", "team-a"]),
        extra in prop::sample::select(vec!["", "disk=ssd", "zone=b,disk=ssd"]),
    ) {
        let project = project(group, extra);
        let Ok(placement) = place(&workload, &project, &config) else {
            return Ok(());
        };
        let selector = &placement.node_selector;
        let classes = ["cpu", "gpu", "vgpu"].iter().filter(|class| selector.contains_key(**class)).count();
        prop_assert_eq!(classes, 1);
        prop_assert_eq!(selector.get(workload.kind.label()).map(String::as_str), Some("true"));
        let group = if group.is_empty() { "public" } else { group };
        prop_assert_eq!(selector.get("org").map(String::as_str), Some(group));
        for (key, value) in &project.node_selector {
            prop_assert_eq!(selector.get(key), Some(value));
        }
        for (resource, request) in &placement.requests {
            let limit = placement.limits.get(resource).copied().unwrap_or(0);
            prop_assert!(*request <= limit);
            if resource != "cpu" && resource != "memory" {
                prop_assert_eq!(*request, limit);
            }
        }
        prop_assert_eq!(placement.pod_labels.contains_key("gpu"), matches!(workload.resources.gpu, GpuSpec::Whole { .. }));
        let _ = placement.request_quantities();
        let _ = placement.limit_quantities();
        let _ = why_unplaceable(&placement, &[cpu_node("public"), gpu_node("T4", 4)]);
    }
}
