//! Placement: where and how a workload runs. Given the workload's kind and resources, its project's placement
//! settings and the scheduler's [`PlacementConfig`], [`place`] returns the node selector, container resources,
//! pod labels, affinity and tolerations; [`why_unplaceable`] says why no node of a cluster could ever run it.
//!
//! Node labels keep cube-studio's meaning (reference §3.1–3.5), made deterministic and correct:
//! - The class label is exactly one of `cpu=true` (no GPU), `gpu=true` (whole GPUs) and `vgpu=true` (a GPU share),
//!   never two. The kind label is `train=true`, `notebook=true` or `service=true`. `org=<resource group>` is always
//!   set, `public` when the project names none. `gpu-type=<TYPE>` is set when the GPU string names a type, for
//!   whole GPUs and shares alike. `rdma=true` is set when RDMA devices are asked for.
//! - The project's extra node selector is merged in, but it may not set any of those labels
//!   ([`RESERVED_LABELS`]): cube-studio rewrote `cpu=true` to `gpu=true` inside it and appended its own, so a
//!   project could end up asking for `gpu=true` and `cpu=true` at once, or an `org` that fights the resource group.
//!   Cube refuses such a selector with [`PlaceError::ReservedLabel`] instead of guessing which one wins.
//! - The selector is a `BTreeMap`, so it renders in the same order every time (cube-studio joined a Python set).
//! - Resources: CPU and memory as the strings ask (`a~b` = request a, limit b), except that notebooks and services
//!   that are not exclusive ([`PlacementConfig::notebook_exclusive`], [`PlacementConfig::service_exclusive`])
//!   request 0 and keep the limit, as cube-studio's `NOTEBOOK_EXCLUSIVE`/`SERVICE_EXCLUSIVE=False` did. Whole GPUs
//!   request = limit = the count of the vendor's resource (`nvidia.com/gpu` by default); a share requests the
//!   configured fractional resource (e.g. `tencent.com/vcuda-core` in hundredths: 0.25 → 25, rounded up), or
//!   nothing but the `vgpu=true` selector when none is configured, as in cube-studio; RDMA requests the configured
//!   resource and is refused when none is configured.
//! - A lone word in a GPU string that is a configured vendor (`1(gpu)`) names the vendor, not a type, as in
//!   cube-studio; vendor names compare case-insensitively.
//! - Pods with whole GPUs get the label `gpu=true` and a preferred pod affinity (weight 10, per host) to other
//!   `gpu=true` pods, which packs GPU work onto fewer nodes; CPU-only service replicas get a preferred pod
//!   anti-affinity (weight 10, per host) on the label their replicas share, which spreads them.
//!
//! The output is plain data (maps and small structs) rather than `k8s-openapi` types, so this module needs no
//! Kubernetes dependency and the code building pods converts it in a few lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cube_resources::{CpuSpec, GpuSpec, MemorySpec, ParseError, quantity};
use serde::Deserialize;

/// The node labels placement derives itself, which a project's extra node selector may not set.
pub const RESERVED_LABELS: [&str; 9] = [
    "cpu", "gpu", "vgpu", "rdma", "org", "train", "notebook", "service", "gpu-type",
];

/// The resource group of projects that name none.
pub const DEFAULT_RESOURCE_GROUP: &str = "public";

/// The topology key affinity terms use: one node.
pub const HOSTNAME_TOPOLOGY: &str = "kubernetes.io/hostname";

/// The weight of the preferred affinity terms, cube-studio's.
pub const AFFINITY_WEIGHT: i32 = 10;

/// Names what a workload is, which selects the kind label and the exclusivity setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// Pipeline tasks and hyper-parameter searches: `train=true`, always exclusive.
    Train,
    /// Notebooks: `notebook=true`.
    Notebook,
    /// Inference and other services: `service=true`.
    Service,
}

impl WorkloadKind {
    /// Returns the node label key of this kind, set to `true` in the selector.
    pub fn label(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Notebook => "notebook",
            Self::Service => "service",
        }
    }
}

/// Holds what placement takes from the project: where it runs and on which nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectPlacement {
    /// The cluster, already resolved by the caller (the project's setting or the default cluster).
    pub cluster: String,
    /// The namespace, already resolved by the caller for the workload's kind.
    pub namespace: String,
    /// The resource group (`org` node label); empty means [`DEFAULT_RESOURCE_GROUP`].
    pub resource_group: String,
    /// Extra node labels every pod of the project must match; none of [`RESERVED_LABELS`].
    pub node_selector: BTreeMap<String, String>,
}

/// Holds the resources one container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// CPU request and limit.
    pub cpu: CpuSpec,
    /// Memory request and limit.
    pub memory: MemorySpec,
    /// GPUs: none, whole, or a share.
    pub gpu: GpuSpec,
    /// RDMA devices; 0 for none.
    pub rdma: u32,
}

/// Holds the workload being placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// What it is.
    pub kind: WorkloadKind,
    /// What each container asks for.
    pub resources: Resources,
    /// The label (key, value) all replicas of a service share, e.g. `cube.io/inference-service=<name>`; CPU-only
    /// service replicas spread over nodes by it. Ignored for other kinds and for GPU services.
    pub replica_label: Option<(String, String)>,
}

/// Names a fractional GPU resource and how many of its units make one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FractionalResource {
    /// The extended resource, e.g. `tencent.com/vcuda-core`.
    pub name: String,
    /// Its units per whole GPU, e.g. 100 for `tencent.com/vcuda-core` (0.25 → 25).
    pub units_per_gpu: u32,
}

/// Holds one toleration as Kubernetes spells it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    /// The taint key; empty with `Exists` tolerates every taint.
    #[serde(default)]
    pub key: String,
    /// `Exists` or `Equal`.
    pub operator: String,
    /// The taint value, for `Equal`.
    #[serde(default)]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; none tolerates every effect.
    #[serde(default)]
    pub effect: Option<String>,
}

/// Holds the scheduler's placement settings: resource names and exclusivity.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// The resource of whole GPUs whose string names no vendor (cube-studio's `DEFAULT_GPU_RESOURCE_NAME`).
    pub gpu_resource: String,
    /// The resource of whole GPUs per vendor name (cube-studio's `GPU_RESOURCE`).
    pub gpu_vendors: BTreeMap<String, String>,
    /// The resource of GPU shares whose string names no vendor; none requests nothing but `vgpu=true` nodes.
    pub vgpu_resource: Option<FractionalResource>,
    /// The resource of GPU shares per vendor name (cube-studio's `VGPU_RESOURCE`).
    pub vgpu_vendors: BTreeMap<String, FractionalResource>,
    /// The resource of RDMA devices (cube-studio's `RDMA_RESOURCE_NAME`); none refuses workloads asking for RDMA.
    pub rdma_resource: Option<String>,
    /// Whether notebooks request the CPU and memory they ask for; when false they request 0 up to the limit.
    pub notebook_exclusive: bool,
    /// Whether services request the CPU and memory they ask for; when false they request 0 up to the limit.
    pub service_exclusive: bool,
    /// Tolerations added to pods using GPUs, whole or shared (e.g. for `nvidia.com/gpu:NoSchedule` taints).
    pub gpu_tolerations: Vec<Toleration>,
}

impl Default for PlacementConfig {
    /// Returns cube-studio's defaults: `nvidia.com/gpu` (also as vendors `gpu` and `nvidia`), no vGPU or RDMA
    /// resource, notebooks not exclusive, services exclusive (cube-studio's inference services always requested
    /// what they asked for; only its rarely used plain services followed `SERVICE_EXCLUSIVE=False`).
    fn default() -> Self {
        let nvidia = "nvidia.com/gpu".to_owned();
        Self {
            gpu_resource: nvidia.clone(),
            gpu_vendors: [("gpu".to_owned(), nvidia.clone()), ("nvidia".to_owned(), nvidia)].into(),
            vgpu_resource: None,
            vgpu_vendors: BTreeMap::new(),
            rdma_resource: None,
            notebook_exclusive: false,
            service_exclusive: true,
            gpu_tolerations: Vec::new(),
        }
    }
}

/// Holds a preferred pod (anti-)affinity term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedPodAffinityTerm {
    /// The weight, 1 to 100.
    pub weight: i32,
    /// The labels of the pods to be near (affinity) or away from (anti-affinity).
    pub match_labels: BTreeMap<String, String>,
    /// The topology domain, [`HOSTNAME_TOPOLOGY`].
    pub topology_key: String,
}

/// Holds the preferred pod affinity and anti-affinity of a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affinity {
    /// Pods to be near.
    pub pod_affinity: Vec<WeightedPodAffinityTerm>,
    /// Pods to be away from.
    pub pod_anti_affinity: Vec<WeightedPodAffinityTerm>,
}

impl Affinity {
    /// Whether there is no term at all.
    pub fn is_empty(&self) -> bool {
        self.pod_affinity.is_empty() && self.pod_anti_affinity.is_empty()
    }
}

/// Holds where and how a workload runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The cluster.
    pub cluster: String,
    /// The namespace.
    pub namespace: String,
    /// The node labels every pod must match.
    pub node_selector: BTreeMap<String, String>,
    /// Requests per resource in base units: `cpu` in millicores, `memory` in bytes, devices in units.
    pub requests: BTreeMap<String, u64>,
    /// Limits per resource, in the units of [`requests`](Self::requests).
    pub limits: BTreeMap<String, u64>,
    /// Labels to add to every pod.
    pub pod_labels: BTreeMap<String, String>,
    /// Preferred pod affinity and anti-affinity.
    pub affinity: Affinity,
    /// Tolerations to add to every pod.
    pub tolerations: Vec<Toleration>,
}

impl Placement {
    /// Returns the requests as Kubernetes quantities: `cpu: 500m`, `memory: 4Gi`, `nvidia.com/gpu: 2`.
    pub fn request_quantities(&self) -> BTreeMap<String, String> {
        quantities(&self.requests)
    }

    /// Returns the limits as Kubernetes quantities.
    pub fn limit_quantities(&self) -> BTreeMap<String, String> {
        quantities(&self.limits)
    }
}

/// Renders an amount of `resource` in base units as a Kubernetes quantity.
pub fn render_quantity(resource: &str, amount: u64) -> String {
    match resource {
        "cpu" => quantity::cpu(amount),
        "memory" => quantity::memory(amount),
        _ => amount.to_string(),
    }
}

fn quantities(amounts: &BTreeMap<String, u64>) -> BTreeMap<String, String> {
    amounts
        .iter()
        .map(|(resource, amount)| (resource.clone(), render_quantity(resource, *amount)))
        .collect()
}

/// Says why a workload cannot be placed; every message names the field and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    /// The GPU spec was built by hand and breaks the grammar's rules.
    #[error(transparent)]
    Gpu(#[from] ParseError),
    /// The project's node selector sets a label placement derives.
    #[error(
        "the project's node_selector sets {key:?}, which placement derives from the workload (cpu/gpu/vgpu/rdma from its resources, train/notebook/service from its kind, gpu-type from its GPU string, org from resource_group): remove it"
    )]
    ReservedLabel {
        /// The label key.
        key: String,
    },
    /// The resource group cannot be a node label value.
    #[error(
        "the resource group {0:?} is not a node label value: at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
    )]
    ResourceGroup(String),
    /// The GPU string names a vendor without a configured resource.
    #[error("the GPU vendor {vendor:?} is not configured for {class}; configured: {known}")]
    UnknownVendor {
        /// The vendor as written.
        vendor: String,
        /// `whole GPUs` or `GPU shares`.
        class: &'static str,
        /// The configured vendors, comma-separated, or `none`.
        known: String,
    },
    /// RDMA devices were asked for but no RDMA resource is configured.
    #[error("{count} RDMA devices were asked for, but this scheduler has no RDMA resource configured; ask for 0")]
    RdmaNotConfigured {
        /// How many were asked for.
        count: u32,
    },
}

impl PlaceError {
    /// Returns the request field the error is about: `gpu`, `rdma`, `node_selector` or `resource_group`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Gpu(_) | Self::UnknownVendor { .. } => "gpu",
            Self::ReservedLabel { .. } => "node_selector",
            Self::ResourceGroup(_) => "resource_group",
            Self::RdmaNotConfigured { .. } => "rdma",
        }
    }
}

/// Whether `value` can be a node label value (non-empty).
fn label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Finds a configured vendor case-insensitively.
fn vendor_entry<'a, V>(vendors: &'a BTreeMap<String, V>, name: &str) -> Option<&'a V> {
    vendors
        .iter()
        .find(|(vendor, _)| vendor.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
}

/// Splits a GPU spec's words into vendor and type: a lone type that names a configured vendor is the vendor.
fn vendor_and_type<'a, V>(
    vendor: Option<&'a str>,
    gpu_type: Option<&'a str>,
    vendors: &BTreeMap<String, V>,
) -> (Option<&'a str>, Option<&'a str>) {
    match (vendor, gpu_type) {
        (None, Some(word)) if vendor_entry(vendors, word).is_some() => (Some(word), None),
        other => other,
    }
}

fn unknown_vendor<V>(vendor: &str, class: &'static str, vendors: &BTreeMap<String, V>) -> PlaceError {
    let known = if vendors.is_empty() {
        "none".to_owned()
    } else {
        vendors.keys().cloned().collect::<Vec<_>>().join(", ")
    };
    PlaceError::UnknownVendor {
        vendor: vendor.to_owned(),
        class,
        known,
    }
}

/// Places a workload of a project: node selector, container resources, pod labels, affinity and tolerations.
///
/// # Errors
/// Returns an error when the project's node selector sets a [reserved label](RESERVED_LABELS), the resource group
/// is not a label value, the GPU spec breaks the grammar or names an unconfigured vendor, or RDMA is asked for
/// without an RDMA resource configured.
pub fn place(
    workload: &Workload,
    project: &ProjectPlacement,
    config: &PlacementConfig,
) -> Result<Placement, PlaceError> {
    let resources = &workload.resources;
    let gpu = &resources.gpu;
    gpu.validate()?;
    if let Some(key) = project
        .node_selector
        .keys()
        .find(|key| RESERVED_LABELS.contains(&key.as_str()))
    {
        return Err(PlaceError::ReservedLabel { key: key.clone() });
    }
    let group = if project.resource_group.is_empty() {
        DEFAULT_RESOURCE_GROUP
    } else {
        project.resource_group.as_str()
    };
    if !label_value(group) {
        return Err(PlaceError::ResourceGroup(group.to_owned()));
    }

    let exclusive = match workload.kind {
        WorkloadKind::Train => true,
        WorkloadKind::Notebook => config.notebook_exclusive,
        WorkloadKind::Service => config.service_exclusive,
    };
    let request = |request: u64| if exclusive { request } else { 0 };
    let mut requests = BTreeMap::from([
        ("cpu".to_owned(), request(resources.cpu.request_millis())),
        ("memory".to_owned(), request(resources.memory.request_bytes())),
    ]);
    let mut limits = BTreeMap::from([
        ("cpu".to_owned(), resources.cpu.limit_millis()),
        ("memory".to_owned(), resources.memory.limit_bytes()),
    ]);
    let mut devices = BTreeMap::new();

    let mut node_selector = project.node_selector.clone();
    let mut selector = |key: &str, value: &str| node_selector.insert(key.to_owned(), value.to_owned());
    selector(workload.kind.label(), "true");
    selector("org", group);
    let mut pod_labels = BTreeMap::new();
    let mut affinity = Affinity::default();
    let mut tolerations = Vec::new();
    match gpu {
        GpuSpec::None => {
            selector("cpu", "true");
            if let (WorkloadKind::Service, Some((key, value))) = (workload.kind, &workload.replica_label) {
                affinity.pod_anti_affinity.push(WeightedPodAffinityTerm {
                    weight: AFFINITY_WEIGHT,
                    match_labels: BTreeMap::from([(key.clone(), value.clone())]),
                    topology_key: HOSTNAME_TOPOLOGY.to_owned(),
                });
            }
        }
        GpuSpec::Whole { count, .. } => {
            let (vendor, gpu_type) = vendor_and_type(gpu.vendor(), gpu.gpu_type(), &config.gpu_vendors);
            let resource = match vendor {
                Some(vendor) => vendor_entry(&config.gpu_vendors, vendor)
                    .ok_or_else(|| unknown_vendor(vendor, "whole GPUs", &config.gpu_vendors))?,
                None => &config.gpu_resource,
            };
            selector("gpu", "true");
            if let Some(gpu_type) = gpu_type {
                selector("gpu-type", gpu_type);
            }
            devices.insert(resource.clone(), u64::from(*count));
            pod_labels.insert("gpu".to_owned(), "true".to_owned());
            affinity.pod_affinity.push(WeightedPodAffinityTerm {
                weight: AFFINITY_WEIGHT,
                match_labels: BTreeMap::from([("gpu".to_owned(), "true".to_owned())]),
                topology_key: HOSTNAME_TOPOLOGY.to_owned(),
            });
            tolerations.extend(config.gpu_tolerations.iter().cloned());
        }
        GpuSpec::Fraction { share_thousandths, .. } => {
            let (vendor, gpu_type) = vendor_and_type(gpu.vendor(), gpu.gpu_type(), &config.vgpu_vendors);
            let resource = match vendor {
                Some(vendor) => Some(
                    vendor_entry(&config.vgpu_vendors, vendor)
                        .ok_or_else(|| unknown_vendor(vendor, "GPU shares", &config.vgpu_vendors))?,
                ),
                None => config.vgpu_resource.as_ref(),
            };
            selector("vgpu", "true");
            if let Some(gpu_type) = gpu_type {
                selector("gpu-type", gpu_type);
            }
            if let Some(resource) = resource {
                let units = (u64::from(*share_thousandths) * u64::from(resource.units_per_gpu)).div_ceil(1000);
                devices.insert(resource.name.clone(), units.max(1));
            }
            tolerations.extend(config.gpu_tolerations.iter().cloned());
        }
    }
    if resources.rdma > 0 {
        let resource = config
            .rdma_resource
            .as_ref()
            .ok_or(PlaceError::RdmaNotConfigured { count: resources.rdma })?;
        selector("rdma", "true");
        *devices.entry(resource.clone()).or_default() += u64::from(resources.rdma);
    }
    for (resource, amount) in devices {
        // Extended resources must request exactly their limit.
        requests.insert(resource.clone(), amount);
        limits.insert(resource, amount);
    }

    Ok(Placement {
        cluster: project.cluster.clone(),
        namespace: project.namespace.clone(),
        node_selector,
        requests,
        limits,
        pod_labels,
        affinity,
        tolerations,
    })
}

/// Holds what placement needs to know of a node: its labels and allocatable amounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeShape {
    /// The node's labels.
    pub labels: BTreeMap<String, String>,
    /// Allocatable amounts per resource in [`Placement::requests`]' base units: `cpu` in millicores, `memory` in
    /// bytes, devices in units. A resource that is missing has none.
    pub allocatable: BTreeMap<String, u64>,
}

impl NodeShape {
    /// Builds a shape from a node's labels and its `status.allocatable` quantities (`cpu: 3900m`,
    /// `memory: 16Gi`, `nvidia.com/gpu: 4`); a quantity that cannot be read counts as none, fractions of a byte or
    /// device are dropped.
    pub fn from_quantities(labels: BTreeMap<String, String>, allocatable: &BTreeMap<String, String>) -> Self {
        let allocatable = allocatable
            .iter()
            .map(|(resource, text)| {
                let milli = quantity::parse_milli(text).unwrap_or(0);
                let amount = if resource == "cpu" { milli } else { milli / 1000 };
                (resource.clone(), u64::try_from(amount).unwrap_or(u64::MAX))
            })
            .collect();
        Self { labels, allocatable }
    }

    fn has_labels(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(key, value)| self.labels.get(key) == Some(value))
    }

    fn offers(&self, resource: &str) -> u64 {
        self.allocatable.get(resource).copied().unwrap_or(0)
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn amounts_text<'a>(amounts: impl Iterator<Item = (&'a String, u64)>) -> String {
    amounts
        .map(|(resource, amount)| format!("{resource} {}", render_quantity(resource, amount)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Says why no node of the cluster could ever run the placement, or `None` when one could: a node can when it has
/// every label of the node selector and at least the requested amount of every resource allocatable (what other
/// pods use is admission's business, not this function's).
pub fn why_unplaceable(placement: &Placement, nodes: &[NodeShape]) -> Option<String> {
    let cluster = &placement.cluster;
    let selector = &placement.node_selector;
    let wanted: Vec<(&String, u64)> = placement
        .requests
        .iter()
        .filter(|(_, amount)| **amount > 0)
        .map(|(resource, amount)| (resource, *amount))
        .collect();
    if nodes.is_empty() {
        return Some(format!("cluster {cluster} has no nodes"));
    }
    let matching: Vec<&NodeShape> = nodes.iter().filter(|node| node.has_labels(selector)).collect();
    if matching.is_empty() {
        let mut reason = format!("no node in cluster {cluster} has the labels {}", labels_text(selector));
        let missing: BTreeMap<String, String> = selector
            .iter()
            .filter(|(key, value)| !nodes.iter().any(|node| node.labels.get(*key) == Some(*value)))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        if !missing.is_empty() {
            let _ = write!(
                reason,
                " (none of its {} nodes has {})",
                nodes.len(),
                labels_text(&missing)
            );
        }
        return Some(reason);
    }
    if matching
        .iter()
        .any(|node| wanted.iter().all(|(resource, amount)| node.offers(resource) >= *amount))
    {
        return None;
    }
    let most = wanted.iter().map(|(resource, _)| {
        (
            *resource,
            matching.iter().map(|node| node.offers(resource)).max().unwrap_or(0),
        )
    });
    Some(format!(
        "no node in cluster {cluster} with the labels {} has {} allocatable; the most any of its {} such nodes has is {}",
        labels_text(selector),
        amounts_text(wanted.iter().copied()),
        matching.len(),
        amounts_text(most),
    ))
}
