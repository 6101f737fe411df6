//! The balancer's planning: which shared nodes to move between resource groups, and why. [`plan`] is pure (no
//! I/O, no Kubernetes types): the inventory hands it each cluster's nodes and long-pending pods, and the caller
//! makes the moves it returns by setting each node's `org` label to [`Move::to_group`].
//!
//! It is cube-studio's `adjust_node_resource` (reference §3.7) made correct:
//! - Every cluster is planned every round, and each class of each cluster independently; cube-studio returned
//!   after its first move, so it moved one node per run and skipped every cluster after the first that moved.
//! - The pool of a class is the nodes that are ready, `train=true`, `share` not `false`, and `gpu=true` (the GPU
//!   class) or else `cpu=true` (the CPU class). A missing `share` label counts as `true`, as in cube-studio, so
//!   nodes are shared unless an administrator opts them out. A node labelled both `gpu=true` and `cpu=true`
//!   belongs to the GPU class only, so one round never moves it twice; placement never asks for both. A node
//!   with nothing allocatable in its class (a GPU node whose device plugin has not reported) is left out, since
//!   moving it would give nothing.
//! - A node's resource group is its `org` label, [`PUBLIC_GROUP`] when the label is missing or empty. Such nodes
//!   can be moved like any other (cube-studio counted them as `public` but never chose them); the move then sets
//!   `org` explicitly.
//! - The load of a group is requested / allocatable over its pool nodes. For CPU nodes it is the larger of the CPU
//!   and the memory ratio, since pods wait for either; for GPU nodes it is the GPU ratio. The same measure ranks
//!   a group's nodes. Loads are compared as exact fractions, so a gap of exactly the threshold never moves a node
//!   (floating point would find 90% − 70% to be more than 20 points).
//! - Pending pods come first: a group whose pods of a class have waited longer than
//!   [`BalancePolicy::pending_after`] for lack of resources receives the least-loaded node of the least-loaded
//!   other group that can give one, whatever the loads; groups with the longest wait are served first, one node
//!   each per round. Such a group never gives a node away in that round, and it receives one even when it has no
//!   node in the pool yet.
//! - Otherwise the most-loaded group receives the least-loaded node of the least-loaded group that can give one,
//!   when its load exceeds that group's by more than [`BalancePolicy::threshold_points`], and only when the move
//!   leaves the two groups closer than they were, so a large node cannot swing the imbalance the other way and
//!   back again in the next round.
//! - A group gives a node only while it has more pool nodes than its guaranteed minimum (cube-studio had no such
//!   guard). Only pool nodes count: nodes that are not shared are the group's own anyway.
//! - A node moves with the pods it runs: the `org` label only steers new pods, as in cube-studio, so its requests
//!   count toward its new group from then on. A node moves at most once per round.
//! - Ties are broken by name, and the moves come out ordered by cluster, then class (CPU before GPU), then in the
//!   order they were planned. At most [`BalancePolicy::max_moves_per_class`] moves are planned per cluster and
//!   class.
//!
//! Planning is one pass over the nodes to group them, a sort of each group's nodes, and a scan of the groups per
//! move: O(n log n) for n nodes.

use std::cmp::{Ordering, Reverse};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The node label that names a node's resource group.
pub const ORG_LABEL: &str = "org";

/// The resource group of nodes without an `org` label.
pub const PUBLIC_GROUP: &str = "public";

/// Holds amounts of the resources the balancer weighs, in base units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Whole GPUs.
    pub gpus: u64,
}

impl Resources {
    fn saturating_add(self, other: Self) -> Self {
        Self {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            gpus: self.gpus.saturating_add(other.gpus),
        }
    }

    fn saturating_sub(self, other: Self) -> Self {
        Self {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            gpus: self.gpus.saturating_sub(other.gpus),
        }
    }
}

/// Names a class of nodes the balancer plans separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeClass {
    /// Nodes labelled `cpu=true`, weighed by CPU and memory.
    Cpu,
    /// Nodes labelled `gpu=true`, weighed by GPUs.
    Gpu,
}

impl NodeClass {
    /// Returns the node label (set to `true`) that puts a node in this class.
    pub fn label(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Gpu => "gpu",
        }
    }
}

impl fmt::Display for NodeClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Holds what the balancer needs to know of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceNode {
    /// The node's name.
    pub name: String,
    /// The node's labels.
    pub labels: BTreeMap<String, String>,
    /// What the node can give to pods (`status.allocatable`).
    pub allocatable: Resources,
    /// What the pods bound to it request, summed.
    pub requested: Resources,
    /// Whether new pods can run there: the node is `Ready` (and, as the caller sees fit, not cordoned).
    pub ready: bool,
}

impl BalanceNode {
    /// Returns the node's resource group: its `org` label, or [`PUBLIC_GROUP`] when that is missing or empty.
    pub fn resource_group(&self) -> &str {
        match self.labels.get(ORG_LABEL) {
            Some(org) if !org.is_empty() => org,
            _ => PUBLIC_GROUP,
        }
    }

    /// Returns the class whose pool the node belongs to, or `None` when the balancer must leave it alone (see the
    /// module documentation).
    pub fn pool_class(&self) -> Option<NodeClass> {
        let is = |label: &str| self.labels.get(label).is_some_and(|value| value == "true");
        let shared = self.labels.get("share").is_none_or(|value| value == "true");
        if !self.ready || !shared || !is("train") {
            return None;
        }
        let class = if is("gpu") {
            NodeClass::Gpu
        } else if is("cpu") {
            NodeClass::Cpu
        } else {
            return None;
        };
        let has_capacity = match class {
            NodeClass::Cpu => self.allocatable.cpu_millis > 0 && self.allocatable.memory_bytes > 0,
            NodeClass::Gpu => self.allocatable.gpus > 0,
        };
        has_capacity.then_some(class)
    }
}

/// Holds a pod that has not been scheduled yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPod {
    /// The resource group it asks for (its `org` selector); empty means [`PUBLIC_GROUP`].
    pub resource_group: String,
    /// The class of node it asks for.
    pub class: NodeClass,
    /// How long it has been pending.
    pub pending_for: Duration,
    /// Whether it is pending because no node has the resources it requests (`Insufficient cpu`, …), rather than
    /// for another reason such as an image or volume problem.
    pub insufficient_resources: bool,
}

/// Holds the balancer's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancePolicy {
    /// How many percentage points the most-loaded group must exceed the least-loaded by for a node to move.
    pub threshold_points: u32,
    /// How long pods must have been pending for lack of resources before their group receives a node.
    pub pending_after: Duration,
    /// How many pool nodes of each class a group keeps at least, unless [`Self::minimums`] says otherwise.
    pub default_minimum: usize,
    /// Guaranteed minimums per resource group.
    pub minimums: BTreeMap<String, usize>,
    /// How many nodes may move per cluster and class in one round.
    pub max_moves_per_class: usize,
}

impl Default for BalancePolicy {
    /// Returns the defaults: 20 points, 5 minutes, 3 nodes, one move per cluster and class.
    fn default() -> Self {
        Self {
            threshold_points: 20,
            pending_after: Duration::from_mins(5),
            default_minimum: 3,
            minimums: BTreeMap::new(),
            max_moves_per_class: 1,
        }
    }
}

impl BalancePolicy {
    /// Returns the guaranteed minimum of `group`.
    pub fn minimum(&self, group: &str) -> usize {
        self.minimums.get(group).copied().unwrap_or(self.default_minimum)
    }
}

/// Holds one planned move: set the node's `org` label to `to_group`.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    /// The cluster the node is in.
    pub cluster: String,
    /// The node's name.
    pub node: String,
    /// The class it was weighed in.
    pub class: NodeClass,
    /// The group it leaves.
    pub from_group: String,
    /// The group it joins.
    pub to_group: String,
    /// Why it moves.
    pub reason: MoveReason,
}

/// Says why a node moves.
#[derive(Debug, Clone, PartialEq)]
pub enum MoveReason {
    /// The receiving group was loaded more than the threshold above the giving one; loads before the move.
    Imbalance {
        /// The load of the group the node leaves, in percent.
        from_load_percent: f64,
        /// The load of the group the node joins, in percent.
        to_load_percent: f64,
    },
    /// Pods of the receiving group had been pending too long for lack of resources.
    Pending {
        /// How many of its pods of this class had been pending longer than the policy allows.
        pods: usize,
        /// How long the longest-waiting of them had waited.
        longest: Duration,
    },
}

/// Plans one balancing round over every cluster: `(cluster, nodes, pending pods)` per cluster.
#[must_use]
pub fn plan(clusters: &[(String, Vec<BalanceNode>, Vec<PendingPod>)], policy: &BalancePolicy) -> Vec<Move> {
    let mut moves = Vec::new();
    for (cluster, nodes, pending) in clusters {
        for class in [NodeClass::Cpu, NodeClass::Gpu] {
            plan_class(cluster, class, nodes, pending, policy, &mut moves);
        }
    }
    // Stable: keeps class order and planning order within a cluster.
    moves.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    moves
}

/// A load: requested / allocatable, an exact fraction whose denominator is never zero.
#[derive(Debug, Clone, Copy)]
struct Load {
    requested: u64,
    allocatable: u64,
}

impl Load {
    fn ratio(requested: u64, allocatable: u64) -> Self {
        match allocatable {
            // Only a group without nodes has nothing allocatable, and then nothing requested either.
            0 if requested == 0 => Self {
                requested: 0,
                allocatable: 1,
            },
            0 => Self {
                requested: u64::MAX,
                allocatable: 1,
            },
            _ => Self { requested, allocatable },
        }
    }

    fn of(class: NodeClass, requested: Resources, allocatable: Resources) -> Self {
        match class {
            NodeClass::Cpu => Self::ratio(requested.cpu_millis, allocatable.cpu_millis)
                .max(Self::ratio(requested.memory_bytes, allocatable.memory_bytes)),
            NodeClass::Gpu => Self::ratio(requested.gpus, allocatable.gpus),
        }
    }

    #[expect(clippy::cast_precision_loss, reason = "the percentage is for people to read")]
    fn percent(self) -> f64 {
        self.requested as f64 * 100.0 / self.allocatable as f64
    }

    /// Whether `self` exceeds `lower` by more than `points` percentage points: self > lower + points / 100.
    fn exceeds_by(self, lower: Self, points: u32) -> bool {
        let (requested, allocatable) = (u128::from(lower.requested), u128::from(lower.allocatable));
        compare_fractions(
            u128::from(self.requested),
            u128::from(self.allocatable),
            100 * requested + u128::from(points) * allocatable,
            100 * allocatable,
        )
        .is_gt()
    }

    /// |self − other| as a fraction (numerator, denominator).
    fn distance(self, other: Self) -> (u128, u128) {
        let left = u128::from(self.requested) * u128::from(other.allocatable);
        let right = u128::from(other.requested) * u128::from(self.allocatable);
        (
            left.abs_diff(right),
            u128::from(self.allocatable) * u128::from(other.allocatable),
        )
    }
}

impl Ord for Load {
    fn cmp(&self, other: &Self) -> Ordering {
        (u128::from(self.requested) * u128::from(other.allocatable))
            .cmp(&(u128::from(other.requested) * u128::from(self.allocatable)))
    }
}

impl PartialOrd for Load {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Load {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Load {}

/// Compares a/b with c/d exactly (b, d > 0) without multiplying, so nothing overflows: by their continued
/// fractions.
fn compare_fractions(mut a: u128, mut b: u128, mut c: u128, mut d: u128) -> Ordering {
    loop {
        let (left, right) = (a / b, c / d);
        if left != right {
            return left.cmp(&right);
        }
        let (left_rest, right_rest) = (a % b, c % d);
        match (left_rest == 0, right_rest == 0) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            // left_rest/b against right_rest/d is d/right_rest against b/left_rest.
            (false, false) => (a, b, c, d) = (d, right_rest, b, left_rest),
        }
    }
}

/// One pool node a group could give away.
#[derive(Debug)]
struct Candidate<'a> {
    name: &'a str,
    load: Load,
    requested: Resources,
    allocatable: Resources,
}

/// One resource group's share of a class's pool, as the round changes it.
#[derive(Debug)]
struct Group<'a> {
    name: &'a str,
    minimum: usize,
    /// Pool nodes now in the group, received ones included.
    nodes: usize,
    requested: Resources,
    allocatable: Resources,
    /// The group's own nodes, least-loaded first; those before `next` have been given away.
    candidates: Vec<Candidate<'a>>,
    next: usize,
    /// Pods waiting too long for lack of resources: how many, and the longest wait.
    pending: Option<(usize, Duration)>,
    served: bool,
}

impl Group<'_> {
    fn load(&self, class: NodeClass) -> Load {
        Load::of(class, self.requested, self.allocatable)
    }

    fn can_give(&self) -> bool {
        self.pending.is_none() && self.nodes > self.minimum && self.next < self.candidates.len()
    }
}

fn plan_class(
    cluster: &str,
    class: NodeClass,
    nodes: &[BalanceNode],
    pending: &[PendingPod],
    policy: &BalancePolicy,
    moves: &mut Vec<Move>,
) {
    if policy.max_moves_per_class == 0 {
        return;
    }
    let mut groups: BTreeMap<&str, Group<'_>> = BTreeMap::new();
    let group = |name| Group {
        name,
        minimum: policy.minimum(name),
        nodes: 0,
        requested: Resources::default(),
        allocatable: Resources::default(),
        candidates: Vec::new(),
        next: 0,
        pending: None,
        served: false,
    };
    for node in nodes.iter().filter(|node| node.pool_class() == Some(class)) {
        let name = node.resource_group();
        let entry = groups.entry(name).or_insert_with(|| group(name));
        entry.nodes += 1;
        entry.requested = entry.requested.saturating_add(node.requested);
        entry.allocatable = entry.allocatable.saturating_add(node.allocatable);
        entry.candidates.push(Candidate {
            name: &node.name,
            load: Load::of(class, node.requested, node.allocatable),
            requested: node.requested,
            allocatable: node.allocatable,
        });
    }
    let waiting = pending
        .iter()
        .filter(|pod| pod.class == class && pod.insufficient_resources && pod.pending_for > policy.pending_after);
    for pod in waiting {
        let name = match pod.resource_group.as_str() {
            "" => PUBLIC_GROUP,
            name => name,
        };
        let entry = groups.entry(name).or_insert_with(|| group(name));
        let (pods, longest) = entry.pending.get_or_insert((0, Duration::ZERO));
        *pods += 1;
        *longest = (*longest).max(pod.pending_for);
    }
    let mut groups: Vec<Group<'_>> = groups.into_values().collect();
    for group in &mut groups {
        group
            .candidates
            .sort_by(|a, b| a.load.cmp(&b.load).then_with(|| a.name.cmp(b.name)));
    }

    for _ in 0..policy.max_moves_per_class {
        let Some((giver, receiver, reason)) =
            serve_pending(&mut groups, class).or_else(|| relieve_imbalance(&groups, class, policy.threshold_points))
        else {
            break;
        };
        let node = transfer(&mut groups, giver, receiver);
        moves.push(Move {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            class,
            from_group: groups[giver].name.to_owned(),
            to_group: groups[receiver].name.to_owned(),
            reason,
        });
    }
}

/// The least-loaded group other than `receiver` that can give a node.
fn least_loaded_giver(groups: &[Group<'_>], class: NodeClass, receiver: usize) -> Option<usize> {
    groups
        .iter()
        .enumerate()
        .filter(|&(index, group)| index != receiver && group.can_give())
        .min_by(|(_, a), (_, b)| a.load(class).cmp(&b.load(class)).then_with(|| a.name.cmp(b.name)))
        .map(|(index, _)| index)
}

/// Picks a move for the longest-waiting pending group not yet served that some group can give a node to.
fn serve_pending(groups: &mut [Group<'_>], class: NodeClass) -> Option<(usize, usize, MoveReason)> {
    loop {
        let (receiver, (pods, longest)) = groups
            .iter()
            .enumerate()
            .filter(|(_, group)| !group.served)
            .filter_map(|(index, group)| group.pending.map(|pending| (index, pending)))
            .min_by_key(|&(index, (_, longest))| (Reverse(longest), groups[index].name))?;
        groups[receiver].served = true;
        if let Some(giver) = least_loaded_giver(groups, class, receiver) {
            return Some((giver, receiver, MoveReason::Pending { pods, longest }));
        }
    }
}

/// Picks a move from the least-loaded group that can give a node to the most-loaded group, if the gap between
/// them exceeds the threshold and the move narrows it.
fn relieve_imbalance(
    groups: &[Group<'_>],
    class: NodeClass,
    threshold_points: u32,
) -> Option<(usize, usize, MoveReason)> {
    let (receiver, hot) = groups
        .iter()
        .enumerate()
        .filter(|(_, group)| group.nodes > 0)
        .max_by(|(_, a), (_, b)| a.load(class).cmp(&b.load(class)).then_with(|| b.name.cmp(a.name)))?;
    let giver = least_loaded_giver(groups, class, receiver)?;
    let cold = &groups[giver];
    let (hot_load, cold_load) = (hot.load(class), cold.load(class));
    if !hot_load.exceeds_by(cold_load, threshold_points) {
        return None;
    }
    let node = &cold.candidates[cold.next];
    let hot_after = Load::of(
        class,
        hot.requested.saturating_add(node.requested),
        hot.allocatable.saturating_add(node.allocatable),
    );
    let cold_after = Load::of(
        class,
        cold.requested.saturating_sub(node.requested),
        cold.allocatable.saturating_sub(node.allocatable),
    );
    let (before, before_denominator) = hot_load.distance(cold_load);
    let (after, after_denominator) = hot_after.distance(cold_after);
    if compare_fractions(after, after_denominator, before, before_denominator).is_ge() {
        return None;
    }
    let reason = MoveReason::Imbalance {
        from_load_percent: cold_load.percent(),
        to_load_percent: hot_load.percent(),
    };
    Some((giver, receiver, reason))
}

/// Moves the giver's least-loaded remaining node to the receiver and returns its name.
fn transfer<'a>(groups: &mut [Group<'a>], giver: usize, receiver: usize) -> &'a str {
    let from = &mut groups[giver];
    let node = &from.candidates[from.next];
    let (name, requested, allocatable) = (node.name, node.requested, node.allocatable);
    from.next += 1;
    from.nodes -= 1;
    from.requested = from.requested.saturating_sub(requested);
    from.allocatable = from.allocatable.saturating_sub(allocatable);
    let to = &mut groups[receiver];
    to.nodes += 1;
    to.requested = to.requested.saturating_add(requested);
    to.allocatable = to.allocatable.saturating_add(allocatable);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_compare_exactly() {
        assert_eq!(compare_fractions(9, 10, 7 + 2, 10), Ordering::Equal);
        assert_eq!(compare_fractions(1, 3, 333_333, 1_000_000), Ordering::Greater);
        assert_eq!(compare_fractions(2, 4, 1, 2), Ordering::Equal);
        assert_eq!(compare_fractions(5, 1, 9, 2), Ordering::Greater);
        assert_eq!(
            compare_fractions(u128::MAX - 1, u128::MAX, u128::MAX - 2, u128::MAX - 1),
            Ordering::Greater
        );
        assert_eq!(compare_fractions(0, 7, 0, 3), Ordering::Equal);
    }

    #[test]
    fn the_threshold_is_exclusive() {
        let load = |requested, allocatable| Load::ratio(requested, allocatable);
        assert!(!load(90, 100).exceeds_by(load(70, 100), 20));
        assert!(load(901, 1000).exceeds_by(load(70, 100), 20));
        // 8/15 − 1/3 is exactly 0.2.
        assert!(!load(8, 15).exceeds_by(load(1, 3), 20));
        assert!(load(u64::MAX, u64::MAX).exceeds_by(load(0, u64::MAX), 99));
        assert!(!load(u64::MAX, u64::MAX).exceeds_by(load(0, u64::MAX), 100));
    }
}
