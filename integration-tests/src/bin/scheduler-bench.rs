//! Benchmarks the scheduler's balancer plan: `plan` over 5,000 nodes in 100 resource groups (CPU and GPU nodes,
//! spread loads, 200 pending pods), the size issue 5 sets a 50 ms target for.
//!
//! Run: `cargo run --release -p cube-integration-tests --bin scheduler-bench -- [--runs 200]`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use cube_scheduler::balance::{BalanceNode, BalancePolicy, NodeClass, PendingPod, Resources, plan};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks the scheduler's balancer plan at 5,000 nodes and 100 groups")]
struct Args {
    /// How many times the plan is computed.
    #[arg(long, default_value_t = 200)]
    runs: usize,
}

fn node(index: u64) -> BalanceNode {
    let group = format!("group-{:03}", index % 100);
    let load = (index * 7_919) % 101;
    let gpu = index.is_multiple_of(5);
    let mut labels = BTreeMap::from([
        ("org".to_owned(), group),
        ("train".to_owned(), "true".to_owned()),
        ((if gpu { "gpu" } else { "cpu" }).to_owned(), "true".to_owned()),
    ]);
    labels.insert("share".to_owned(), "true".to_owned());
    let (allocatable, requested) = if gpu {
        (
            Resources {
                cpu_millis: 64_000,
                memory_bytes: 256 << 30,
                gpus: 8,
            },
            Resources {
                cpu_millis: 8_000,
                memory_bytes: 32 << 30,
                gpus: load % 9,
            },
        )
    } else {
        (
            Resources {
                cpu_millis: 10_000,
                memory_bytes: 64 << 30,
                gpus: 0,
            },
            Resources {
                cpu_millis: load * 100,
                memory_bytes: (load * 600) << 20,
                gpus: 0,
            },
        )
    };
    BalanceNode {
        name: format!("node-{index:05}"),
        labels,
        allocatable,
        requested,
        ready: true,
    }
}

fn main() {
    let args = Args::parse();
    let nodes: Vec<BalanceNode> = (0..5_000).map(node).collect();
    let pending: Vec<PendingPod> = (0..200u64)
        .map(|i| PendingPod {
            resource_group: format!("group-{:03}", i % 37),
            class: NodeClass::Cpu,
            pending_for: Duration::from_secs(200 + i * 10),
            insufficient_resources: i % 3 != 0,
        })
        .collect();
    let clusters = vec![("big".to_owned(), nodes, pending)];
    let policy = BalancePolicy::default();
    let mut times = Vec::with_capacity(args.runs);
    let mut moves = 0;
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        moves = plan(&clusters, &policy).len();
        times.push(started.elapsed());
    }
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "PlanBalance plan() over 5,000 nodes, 100 groups, 200 pending pods, {} runs: median {:.2} ms, p99 {:.2} ms, \
         max {:.2} ms ({moves} moves; target ≤ 50 ms)",
        times.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}
