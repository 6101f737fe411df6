//! Why an admitted workload's pods wait for a node: each waiting pod carrying the workload's annotation is judged
//! against the nodes of its cluster from the inventory, resource by resource, and the first thing no node has
//! enough of becomes a node blocker. Plain functions over the inventory's views, tested without a cluster.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use cube_clusters::ClusterRegistry;
use cube_proto::cube::scheduler::v1::{Blocker, BlockerKind};

use crate::inventory::{Amounts, Fleet, NodeView, WaitingPod};

/// Why the pods of an admitted workload wait for a node, if any does, from the node inventory.
pub(super) fn waiting_pods(
    registry: &ClusterRegistry,
    fleet: &Fleet,
    workload: &str,
    now: SystemTime,
) -> (String, Vec<Blocker>) {
    let mut waiting: Vec<(String, WaitingPod)> = Vec::new();
    for cluster in registry.names() {
        let Ok(pods) = fleet.waiting(&cluster) else {
            continue;
        };
        waiting.extend(
            pods.into_iter()
                .filter(|pod| pod.workload.as_deref() == Some(workload))
                .map(|pod| (cluster.clone(), pod)),
        );
    }
    if waiting.is_empty() {
        return ("admitted: nothing blocks it".into(), Vec::new());
    }
    waiting.sort_by_key(|(_, pod)| std::cmp::Reverse(pod.waited(now)));
    let mut reason = String::new();
    let mut blockers = Vec::new();
    for (index, (cluster, pod)) in waiting.iter().enumerate() {
        let (text, blocker) = match fleet.nodes(cluster) {
            Ok(nodes) => judge_pod(cluster, pod, &nodes),
            Err(error) => (error.to_string(), None),
        };
        if index == 0 {
            reason = format!(
                "admitted; pod {}/{} has waited {}: {text}",
                pod.namespace,
                pod.name,
                waited_text(pod.waited(now))
            );
        }
        blockers.extend(blocker);
    }
    if waiting.len() > 1 {
        reason.push_str(&format!("; {} more pods of the workload wait", waiting.len() - 1));
    }
    (reason, blockers)
}

/// `6m`, `45s`, `2h5m`, `3d4h`.
fn waited_text(waited: Duration) -> String {
    let seconds = waited.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86400 => format!("{}h{}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How much of `resource` (`gpu`, `cpu`, `memory` or an extended resource) `amounts` hold.
fn amount_in(amounts: &Amounts, resource: &str) -> i64 {
    match resource {
        "gpu" => amounts.gpus,
        "cpu" => amounts.cpu_millis,
        "memory" => amounts.memory_bytes,
        other => amounts.other.get(other).copied().unwrap_or(0),
    }
}

/// An amount for people: `2 GPUs`, `1.5 CPU cores`, `4Gi of memory`, `25 tencent.com/vcuda-core`; `bare`
/// leaves out the unit.
fn amount_text(resource: &str, amount: i64, bare: bool) -> String {
    let unsigned = u64::try_from(amount).unwrap_or(0);
    let number = match resource {
        "cpu" => {
            let cores = format!("{:.3}", amount as f64 / 1000.0);
            cores.trim_end_matches('0').trim_end_matches('.').to_owned()
        }
        "memory" => cube_resources::quantity::memory(unsigned),
        _ => amount.to_string(),
    };
    if bare {
        return number;
    }
    match resource {
        "gpu" if amount == 1 => "1 GPU".into(),
        "gpu" => format!("{number} GPUs"),
        "cpu" => format!("{number} CPU cores"),
        "memory" => format!("{number} of memory"),
        other => format!("{number} {other}"),
    }
}

/// The unit scale of a resource in blockers: CPU in cores, everything else as counted.
fn blocker_value(resource: &str, amount: i64) -> f64 {
    if resource == "cpu" {
        amount as f64 / 1000.0
    } else {
        amount as f64
    }
}

/// What keeps a waiting pod off the cluster's nodes: a sentence, and a blocker when the nodes lack something.
/// Nodes are narrowed resource by resource (GPUs, CPU, memory, then extended resources): the first resource no
/// remaining node has enough of free is the blocker, measured on the node with the most of it free.
fn judge_pod(cluster: &str, pod: &WaitingPod, nodes: &[std::sync::Arc<NodeView>]) -> (String, Option<Blocker>) {
    let selector = &pod.node_selector;
    let labels = labels_text(selector);
    let blocker = |resource: &str| Blocker {
        quota: format!("clusters/{cluster}"),
        resource: resource.to_owned(),
        kind: BlockerKind::Nodes as i32,
        pod: format!("{}/{}", pod.namespace, pod.name),
        node_selector: selector.clone().into_iter().collect(),
        ..Blocker::default()
    };
    let matching: Vec<&NodeView> = nodes
        .iter()
        .map(|node| &**node)
        .filter(|node| selector.iter().all(|(key, value)| node.labels.get(key) == Some(value)))
        .collect();
    if matching.is_empty() {
        let absent: BTreeMap<String, String> = selector
            .iter()
            .filter(|(key, value)| !nodes.iter().any(|node| node.labels.get(*key) == Some(*value)))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let mut text = if selector.is_empty() {
            format!("cluster {cluster} has no nodes")
        } else {
            format!("no node has labels {labels}")
        };
        if !absent.is_empty() {
            text.push_str(&format!(
                " (none of the cluster's {} nodes has {})",
                nodes.len(),
                labels_text(&absent)
            ));
        }
        return (text, Some(blocker("labels")));
    }
    let usable: Vec<&NodeView> = matching
        .iter()
        .copied()
        .filter(|node| node.ready && !node.unschedulable)
        .collect();
    if usable.is_empty() {
        return (
            format!(
                "the {} nodes with labels {labels} are all not ready or cordoned",
                matching.len()
            ),
            Some(blocker("labels")),
        );
    }
    let mut resources: Vec<String> = vec!["gpu".into(), "cpu".into(), "memory".into()];
    resources.extend(pod.requests.other.keys().cloned());
    let free =
        |node: &NodeView, resource: &str| amount_in(&node.allocatable, resource) - amount_in(&node.requested, resource);
    let nodes_match = |count: usize| {
        if count == 1 {
            "1 node matches".to_owned()
        } else {
            format!("{count} nodes match")
        }
    };
    let mut candidates = usable.clone();
    let mut enough: Vec<&str> = Vec::new();
    for resource in &resources {
        let requested = amount_in(&pod.requests, resource);
        if requested <= 0 {
            continue;
        }
        let fitting: Vec<&NodeView> = candidates
            .iter()
            .copied()
            .filter(|node| free(node, resource) >= requested)
            .collect();
        if fitting.is_empty() {
            let Some(best) = candidates.iter().copied().max_by_key(|node| free(node, resource)) else {
                break;
            };
            let mut text = format!(
                "no node with labels {labels} has {} free (most free on one node: {}, on {}; {}",
                amount_text(resource, requested, false),
                amount_text(resource, std::cmp::max(free(best, resource), 0), true),
                best.name,
                nodes_match(usable.len())
            );
            if !enough.is_empty() {
                text.push_str(&format!(
                    ", {} of them with enough {} free",
                    candidates.len(),
                    enough.join(" and ")
                ));
            }
            text.push(')');
            let in_use = amount_in(&best.requested, resource);
            let limit = amount_in(&best.allocatable, resource);
            return (
                text,
                Some(Blocker {
                    requested: blocker_value(resource, requested),
                    in_use: blocker_value(resource, in_use),
                    limit: blocker_value(resource, limit),
                    matching_nodes: i32::try_from(usable.len()).unwrap_or(i32::MAX),
                    node: best.name.clone(),
                    ..blocker(resource)
                }),
            );
        }
        candidates = fitting;
        enough.push(resource);
    }
    let mut text = match candidates.first() {
        Some(node) => format!(
            "node {} has labels {labels} and room for it now; the Kubernetes scheduler has not bound it yet",
            node.name
        ),
        None => format!("a node with labels {labels} has room for it now"),
    };
    if let Some(message) = pod.unschedulable.as_deref().filter(|message| !message.is_empty()) {
        text.push_str(&format!(" (it last said: {message})"));
    }
    (text, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_read_like_people_write_them() {
        assert_eq!(waited_text(Duration::from_secs(45)), "45s");
        assert_eq!(waited_text(Duration::from_secs(6 * 60 + 5)), "6m");
        assert_eq!(waited_text(Duration::from_secs(2 * 3600 + 5 * 60)), "2h5m");
        assert_eq!(waited_text(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d4h");
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn node(name: &str, node_labels: &[(&str, &str)], gpus: i64, used_gpus: i64) -> NodeView {
        NodeView {
            name: name.into(),
            labels: labels(node_labels),
            resource_group: "vision".into(),
            ready: true,
            unschedulable: false,
            taints: Vec::new(),
            allocatable: Amounts {
                cpu_millis: 32_000,
                memory_bytes: 64 << 30,
                gpus,
                other: BTreeMap::new(),
            },
            requested: Amounts {
                cpu_millis: 1_000,
                memory_bytes: 1 << 30,
                gpus: used_gpus,
                other: BTreeMap::new(),
            },
        }
    }

    fn pod(selector: &[(&str, &str)], gpus: i64, cpu_millis: i64) -> WaitingPod {
        WaitingPod {
            namespace: "jupyter".into(),
            name: "alice-lab-0".into(),
            workload: Some("projects/vision/notebooks/alice-lab".into()),
            node_selector: labels(selector),
            requests: Amounts {
                cpu_millis,
                memory_bytes: 1 << 30,
                gpus,
                other: BTreeMap::new(),
            },
            since: None,
            unschedulable: Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()),
        }
    }

    #[test]
    fn a_waiting_pod_is_explained_by_the_resource_its_nodes_lack() {
        let t4 = [("gpu", "true"), ("gpu-type", "T4"), ("org", "vision")];
        let nodes = [
            node("node-a", &t4, 4, 3),
            node("node-b", &t4, 4, 4),
            node("node-c", &t4, 2, 2),
            node(
                "node-d",
                &[("gpu", "true"), ("gpu-type", "V100"), ("org", "vision")],
                8,
                0,
            ),
        ]
        .map(std::sync::Arc::new);
        let (text, blocker) = judge_pod("kube", &pod(&t4, 2, 1_000), &nodes);
        assert_eq!(
            text,
            "no node with labels gpu=true,gpu-type=T4,org=vision has 2 GPUs free (most free on one node: 1, on \
             node-a; 3 nodes match)"
        );
        let blocker = blocker.expect("a blocker");
        assert_eq!(blocker.kind(), BlockerKind::Nodes);
        assert_eq!(
            (blocker.quota.as_str(), blocker.resource.as_str(), blocker.node.as_str()),
            ("clusters/kube", "gpu", "node-a")
        );
        assert_eq!((blocker.requested, blocker.in_use, blocker.limit), (2.0, 3.0, 4.0));
        assert_eq!(blocker.matching_nodes, 3);
        assert_eq!(blocker.pod, "jupyter/alice-lab-0");

        // Enough GPUs on one node, but not with the CPU too.
        let (text, blocker) = judge_pod("kube", &pod(&t4, 1, 40_000), &nodes);
        assert!(
            text.starts_with("no node with labels gpu=true,gpu-type=T4,org=vision has 40 CPU cores free"),
            "{text}"
        );
        assert!(
            text.ends_with("3 nodes match, 1 of them with enough gpu free)"),
            "{text}"
        );
        assert_eq!(blocker.map(|blocker| blocker.resource), Some("cpu".to_owned()));

        let a100 = [("gpu", "true"), ("gpu-type", "A100"), ("org", "vision")];
        let (text, blocker) = judge_pod("kube", &pod(&a100, 1, 1_000), &nodes);
        assert_eq!(
            text,
            "no node has labels gpu=true,gpu-type=A100,org=vision (none of the cluster's 4 nodes has gpu-type=A100)"
        );
        assert_eq!(blocker.map(|blocker| blocker.resource), Some("labels".to_owned()));

        let (text, blocker) = judge_pod("kube", &pod(&t4, 1, 1_000), &nodes);
        assert!(text.starts_with("node node-a has labels"), "{text}");
        assert!(blocker.is_none());
    }
}
