//! What the benchmark binaries share: servers run as child processes (so that their CPU time can be read from
//! /proc), closed-loop load at a given concurrency with latency percentiles, and medians over rounds.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A server the benchmark started, and the processes whose CPU time counts as its own.
pub struct Server {
    /// Where it listens.
    pub address: SocketAddr,
    /// The process.
    pub child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM, not the SIGKILL of kill_on_drop: nginx's master must live to stop its workers, which would
        // otherwise outlive the benchmark holding its stdout open.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

impl Server {
    /// Returns the server's process id.
    ///
    /// # Errors
    /// Returns an error when the server has exited.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the server has exited")
    }
}

/// Re-runs this binary with `role` as its arguments and waits for its `listening ADDRESS` line.
///
/// # Errors
/// Returns an error when the child fails to start or to listen within 30 seconds.
pub async fn spawn_role(role: &[&str]) -> anyhow::Result<Server> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(role)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let line = tokio::time::timeout(Duration::from_secs(30), BufReader::new(stdout).lines().next_line())
        .await
        .context("waiting for the server to listen")??
        .context("the server exited before listening")?;
    let address = line
        .strip_prefix("listening ")
        .context("unexpected first line")?
        .parse()?;
    Ok(Server { address, child })
}

/// Returns CPU seconds (user + system) used so far by `pid` and its child processes.
///
/// # Errors
/// Returns an error when /proc cannot be read.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let ticks = 100.0; // USER_HZ, 100 on Linux for every architecture Debian ships.
    let mut total = process_ticks(pid)?;
    for entry in std::fs::read_dir("/proc")? {
        let name = entry?.file_name();
        let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if parent_of(child) == Some(pid) {
            total += process_ticks(child).unwrap_or(0.0);
        }
    }
    Ok(total / ticks)
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; the fields after it are plain.
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

fn process_ticks(pid: u32) -> anyhow::Result<f64> {
    let fields = stat_fields(pid).context("reading /proc stat")?;
    // After the name: state(0) ppid(1) … utime(11) stime(12).
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// One measured row.
pub struct Measurement {
    /// Calls answered in the measured window.
    pub requests: u64,
    /// Calls that failed.
    pub errors: u64,
    /// The window's length.
    pub seconds: f64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th-percentile latency.
    pub p99_us: f64,
    /// CPU seconds the measured process used in the window.
    pub cpu_seconds: f64,
}

impl Measurement {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// CPU seconds per 1,000 requests.
    pub fn cpu_per_1000(&self) -> f64 {
        self.cpu_seconds / (self.requests.max(1) as f64) * 1000.0
    }

    /// Returns the median of each figure over `runs` (errors are summed).
    pub fn median(runs: &[Measurement]) -> Measurement {
        fn middle(mut values: Vec<f64>) -> f64 {
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
        }
        let seconds = runs.first().map_or(1.0, |m| m.seconds);
        let requests = middle(runs.iter().map(|m| m.requests as f64).collect()) as u64;
        let cpu_per_request = middle(runs.iter().map(|m| m.cpu_seconds / m.requests.max(1) as f64).collect());
        Measurement {
            requests,
            errors: runs.iter().map(|m| m.errors).sum(),
            seconds,
            p50_us: middle(runs.iter().map(|m| m.p50_us).collect()),
            p99_us: middle(runs.iter().map(|m| m.p99_us).collect()),
            cpu_seconds: cpu_per_request * requests as f64,
        }
    }
}

/// Makes one call after another; each worker of a measurement owns one.
pub trait Caller: Send + 'static {
    /// Makes one call; `true` when it succeeded.
    fn call(&mut self) -> BoxFuture<'_, bool>;
}

/// Runs `callers` concurrently, each in a closed loop, for `warmup` and then `duration`, and measures the
/// calls of the second part and the CPU time of `cpu_pid` meanwhile.
///
/// # Errors
/// Returns an error when /proc cannot be read or a worker fails.
pub async fn measure(
    callers: Vec<Box<dyn Caller>>,
    warmup: Duration,
    duration: Duration,
    cpu_pid: u32,
) -> anyhow::Result<Measurement> {
    let start_at = Instant::now() + warmup;
    let stop_at = start_at + duration;
    let mut workers = Vec::new();
    for mut caller in callers {
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= stop_at {
                    break;
                }
                let ok = caller.call().await;
                if sent >= start_at {
                    latencies.push(sent.elapsed().as_micros() as u32);
                    errors += u64::from(!ok);
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep_until(start_at.into()).await;
    let cpu_before = cpu_seconds(cpu_pid)?;
    tokio::time::sleep_until(stop_at.into()).await;
    let cpu_after = cpu_seconds(cpu_pid)?;
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (mut worker_latencies, worker_errors) = worker.await?;
        latencies.append(&mut worker_latencies);
        errors += worker_errors;
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies.get(index).copied().map_or(f64::NAN, f64::from)
    };
    Ok(Measurement {
        requests: latencies.len() as u64,
        errors,
        seconds: duration.as_secs_f64(),
        p50_us: percentile(0.50),
        p99_us: percentile(0.99),
        cpu_seconds: cpu_after - cpu_before,
    })
}
