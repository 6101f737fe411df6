//! The local runtime (`cube up`'s embedded default): each workload is a process on this machine.
//!
//! A workload lives in `<data-dir>/workloads/<cluster>/<namespace>/<name>/`: its [`record`] (`record.json`), a
//! `work/` directory it runs in, and per attempt a log file (stdout and stderr appended), a pid file and an exit
//! file written by the attempt's wrapper (see [`process`]). The record is written before an attempt starts and
//! again once its pid is known, so a restart of the owning process ([`LocalRuntime::open`] on the same directory)
//! never starts an attempt twice: a workload still running is adopted (its pid and start time match), one that
//! ended meanwhile is finished with the exit code its wrapper wrote, and one that died without a word (or was
//! being started at the crash) is reported failed with reason [`reasons::LOST`] — once, as that is recorded too.
//!
//! Every status change is sent on the stream [`LocalRuntime::open`] returns, each with a `version` greater than
//! every earlier one (also across restarts), for turning into `WorkloadTransition`s.

mod logs;
mod process;
mod record;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt as _;
use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::sync::{Mutex, mpsc};
use tokio::task::AbortHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::RuntimeError;
use crate::spec::{ObjectKey, PodField, RestartPolicy, WorkloadSpec};
use crate::status::{Phase, WorkloadStatus, reasons};
use crate::{LogStream, Runtime, StatusStream};
use record::Record;

/// How often an adopted process (not a child of this one) is checked.
const POLL: Duration = Duration::from_millis(100);

/// Runs workloads as processes of this machine, for every local cluster.
#[derive(Clone)]
pub struct LocalRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRuntime")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// `<data-dir>/workloads`.
    root: PathBuf,
    /// This machine's host name.
    node: String,
    /// Every workload's record, as on disk; held while a workload changes.
    records: Mutex<BTreeMap<ObjectKey, Record>>,
    /// The last version given to a status.
    version: AtomicU64,
    /// Where status changes go.
    changes: mpsc::UnboundedSender<WorkloadStatus>,
    /// The tasks following running attempts, stopped when the runtime goes.
    watchers: std::sync::Mutex<HashMap<(ObjectKey, u32), AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let watchers = self
            .watchers
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, watcher) in watchers.drain() {
            watcher.abort();
        }
    }
}

/// How an attempt ended.
enum Outcome {
    /// The main command exited with this code (128 + the signal when one killed it).
    Exited(i32),
    /// It ran past the workload's deadline and was killed.
    DeadlineExceeded,
    /// It is gone and nothing says how it ended.
    Lost,
}

impl LocalRuntime {
    /// Opens the runtime keeping its workloads under `<data_dir>/workloads`, and takes over the workloads a
    /// previous owner of that directory left: those still running are adopted, those that ended meanwhile are
    /// finished, those that vanished are reported [`reasons::LOST`]. Returns the runtime and the stream of its
    /// status changes (from these first reports on).
    ///
    /// # Errors
    /// Returns [`RuntimeError::Io`] when the directory cannot be made or read.
    pub async fn open(data_dir: &Path) -> Result<(Self, StatusStream), RuntimeError> {
        let root = data_dir.join("workloads");
        std::fs::create_dir_all(&root)
            .map_err(|error| RuntimeError::io(format!("creating {}", root.display()), error))?;
        let records = record::load_all(&root)?;
        let last = records
            .values()
            .filter_map(|record| record.status.version.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let (changes, received) = mpsc::unbounded_channel();
        let runtime = Self {
            inner: Arc::new(Inner {
                root,
                node: process::host_name(),
                records: Mutex::new(BTreeMap::new()),
                version: AtomicU64::new(last),
                changes,
                watchers: std::sync::Mutex::default(),
            }),
        };
        runtime.take_over(records).await?;
        Ok((runtime, UnboundedReceiverStream::new(received).boxed()))
    }

    /// Adopts, finishes or loses each workload a previous owner left unfinished.
    async fn take_over(&self, found: BTreeMap<ObjectKey, Record>) -> Result<(), RuntimeError> {
        let mut records = self.inner.records.lock().await;
        for (key, mut record) in found {
            if record.status.phase.is_final() {
                records.insert(key, record);
                continue;
            }
            let dir = record::dir(&self.inner.root, &key);
            let attempt = record.attempt;
            // The pid is in the record once the attempt started; the wrapper's own pid file covers a crash
            // between starting it and recording it.
            let pid = record.pid.or_else(|| {
                std::fs::read_to_string(record::pid_file(&dir, attempt))
                    .ok()
                    .and_then(|text| text.trim().parse().ok())
            });
            let running = pid.and_then(|pid| {
                let ticks = process::start_ticks(pid)?;
                (record.start_ticks.is_none_or(|recorded| recorded == ticks)).then_some((pid, ticks))
            });
            if let Some((pid, ticks)) = running
                && attempt > 0
            {
                tracing::info!(%key, pid, "adopting a running workload");
                record.pid = Some(pid);
                record.start_ticks = Some(ticks);
                if record.status.phase != Phase::Running {
                    record.status.phase = Phase::Running;
                    self.report(&mut record);
                }
                record::save(&dir, &record)?;
                self.watch(&key, attempt, None, pid, ticks, record.deadline_ms);
                records.insert(key, record);
                continue;
            }
            let outcome = match process::exit_code(&record::exit_file(&dir, attempt)) {
                Some(code) if attempt > 0 => Outcome::Exited(code),
                _ => Outcome::Lost,
            };
            tracing::info!(%key, attempt, "a workload ended while its owner was away");
            records.insert(key.clone(), record);
            self.end_attempt(&mut records, &key, attempt, outcome)?;
        }
        Ok(())
    }

    /// Gives `record`'s status the next version and sends it as a change.
    fn report(&self, record: &mut Record) {
        let now = u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0);
        let previous = self
            .inner
            .version
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(last.saturating_add(1).max(now))
            })
            .unwrap_or(0);
        record.status.version = previous.saturating_add(1).max(now).to_string();
        // Nobody listening is not an error: the status stays readable.
        let _ = self.inner.changes.send(record.status.clone());
    }

    /// Starts attempt `record.attempt + 1` of the workload: recorded before its process starts, then with its pid.
    fn start_attempt(&self, record: &mut Record) -> Result<(), RuntimeError> {
        let key = record.status.key.clone();
        let dir = record::dir(&self.inner.root, &key);
        record.attempt += 1;
        record.pid = None;
        record.start_ticks = None;
        record::save(&dir, record)?;
        let attempt = record.attempt;
        let launch = process::Launch {
            argv: &record.argv,
            env: &record.env,
            work_dir: &record::work_dir(&dir),
            log_file: &record::log_file(&dir, attempt),
            pid_file: &record::pid_file(&dir, attempt),
            exit_file: &record::exit_file(&dir, attempt),
        };
        let child = process::spawn(&launch)?;
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| RuntimeError::io("starting the workload's process", std::io::Error::other("no pid")))?;
        // A process that exited at once has no start time left: it is then told by its exit file.
        let ticks = process::start_ticks(pid).unwrap_or(0);
        record.pid = Some(pid);
        record.start_ticks = Some(ticks);
        let now = Utc::now();
        record.status.phase = Phase::Running;
        record.status.reason = None;
        record.status.message = None;
        record.status.exit_code = None;
        record.status.started_at = Some(now);
        record::save(&dir, record)?;
        self.report(record);
        tracing::info!(%key, attempt, pid, "workload attempt started");
        self.watch(&key, attempt, Some(child), pid, ticks, record.deadline_ms);
        Ok(())
    }

    /// Follows attempt `attempt` until it ends (or the deadline), then records how.
    fn watch(
        &self,
        key: &ObjectKey,
        attempt: u32,
        child: Option<Child>,
        pid: i32,
        ticks: u64,
        deadline_ms: Option<i64>,
    ) {
        let runtime = Arc::downgrade(&self.inner);
        let watched = key.clone();
        let exit_file = record::exit_file(&record::dir(&self.inner.root, key), attempt);
        let task = tokio::spawn(async move {
            let outcome = follow(child, pid, ticks, deadline_ms, &exit_file).await;
            let Some(inner) = Weak::upgrade(&runtime) else {
                return;
            };
            let runtime = LocalRuntime { inner };
            let mut records = runtime.inner.records.lock().await;
            if let Err(error) = runtime.end_attempt(&mut records, &watched, attempt, outcome) {
                tracing::warn!(key = %watched, %error, "recording the end of a workload attempt");
            }
            runtime
                .inner
                .watchers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&(watched, attempt));
        });
        self.inner
            .watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((key.clone(), attempt), task.abort_handle());
    }

    /// Records that attempt `attempt` of `key` ended with `outcome`, and starts the next when the restart policy
    /// says so. Nothing happens when the workload was deleted or is at another attempt.
    fn end_attempt(
        &self,
        records: &mut BTreeMap<ObjectKey, Record>,
        key: &ObjectKey,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<(), RuntimeError> {
        let Some(record) = records.get_mut(key) else {
            return Ok(());
        };
        if record.attempt != attempt || record.status.phase.is_final() {
            return Ok(());
        }
        record.pid = None;
        record.start_ticks = None;
        let (phase, reason, exit_code) = match outcome {
            Outcome::Exited(0) => (Phase::Succeeded, Some("Completed"), Some(0)),
            Outcome::Exited(code) => (Phase::Failed, Some("Error"), Some(code)),
            Outcome::DeadlineExceeded => (Phase::Failed, Some(reasons::DEADLINE_EXCEEDED), None),
            Outcome::Lost => (Phase::Failed, Some(reasons::LOST), None),
        };
        let again = match (record.restart_policy, &outcome) {
            (_, Outcome::DeadlineExceeded | Outcome::Lost) | (RestartPolicy::Never, _) => false,
            (RestartPolicy::OnFailure, Outcome::Exited(code)) => *code != 0,
            (RestartPolicy::Always, Outcome::Exited(_)) => true,
        };
        record.status.exit_code = exit_code;
        if again {
            record.status.restarts += 1;
            tracing::info!(%key, attempt, ?exit_code, "workload attempt ended; starting it again");
            return self.start_attempt(record);
        }
        record.status.phase = phase;
        record.status.ready = false;
        record.status.reason = reason.map(str::to_owned);
        record.status.message = match outcome {
            Outcome::Lost => Some("the process was gone when its owner came back, and left no exit code".into()),
            Outcome::DeadlineExceeded => Some("stopped at its deadline".into()),
            Outcome::Exited(_) => None,
        };
        record.status.finished_at = Some(Utc::now());
        record::save(&record::dir(&self.inner.root, key), record)?;
        self.report(record);
        tracing::info!(%key, attempt, ?phase, ?exit_code, reason, "workload ended");
        Ok(())
    }

    /// The record of a spec to run: validated, with its ports chosen.
    fn record_of(&self, spec: &WorkloadSpec) -> Result<Record, RuntimeError> {
        let Some(main) = spec.containers.first() else {
            return Err(RuntimeError::Invalid {
                field: "containers".into(),
                message: "a workload needs at least one container".into(),
            });
        };
        let argv: Vec<String> = main.command.iter().chain(&main.args).cloned().collect();
        if argv.is_empty() {
            return Err(RuntimeError::Invalid {
                field: "containers[0].command".into(),
                message: "a local workload needs a command: there is no image entrypoint to fall back on".into(),
            });
        }
        for (field, part) in [
            ("key.cluster", &spec.key.cluster),
            ("key.namespace", &spec.key.namespace),
            ("key.name", &spec.key.name),
        ] {
            if !cube_clusters::dns_label(part) {
                return Err(RuntimeError::Invalid {
                    field: field.into(),
                    message: format!("{part:?} is not a DNS-1123 label"),
                });
            }
        }
        let mut env = main.env.clone();
        for (name, field) in &main.env_from_pod {
            let value = match field {
                PodField::NodeName => self.inner.node.clone(),
                PodField::PodIp | PodField::HostIp => "127.0.0.1".to_owned(),
                PodField::PodName => spec.key.name.clone(),
                PodField::PodNamespace => spec.key.namespace.clone(),
            };
            env.push((name.clone(), value));
        }
        let mut ports = BTreeMap::new();
        for (index, port) in main.ports.iter().enumerate() {
            let chosen = process::free_port()?;
            if index == 0 {
                env.push(("PORT".into(), chosen.to_string()));
            }
            env.push((
                format!("CUBE_PORT_{}", port.name.to_uppercase().replace('-', "_")),
                chosen.to_string(),
            ));
            ports.insert(port.name.clone(), chosen);
        }
        let mut status = WorkloadStatus::new(spec.key.clone(), Phase::Pending);
        status.labels = spec.labels.clone();
        status.node = Some(self.inner.node.clone());
        status.address = Some("127.0.0.1".into());
        status.ports = ports;
        Ok(Record {
            status,
            image: main.image.clone(),
            argv,
            env,
            restart_policy: spec.restart_policy,
            // The deadline counts from now: the first attempt starts at once.
            deadline_ms: spec
                .deadline
                .and_then(|deadline| i64::try_from(deadline.as_millis()).ok())
                .map(|deadline| Utc::now().timestamp_millis().saturating_add(deadline)),
            attempt: 0,
            pid: None,
            start_ticks: None,
        })
    }
}

/// Waits for an attempt to end: its own child's exit, or (adopted) its process's disappearance, then reads the exit
/// code its wrapper wrote; kills its process group at the deadline.
async fn follow(child: Option<Child>, pid: i32, ticks: u64, deadline_ms: Option<i64>, exit_file: &Path) -> Outcome {
    let deadline = deadline_ms.map(|deadline| {
        let left = deadline.saturating_sub(Utc::now().timestamp_millis());
        tokio::time::Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0))
    });
    let ended = async {
        match child {
            Some(mut child) => match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt as _;
                    Outcome::Exited(
                        status
                            .code()
                            .or_else(|| status.signal().map(|signal| 128 + signal))
                            .unwrap_or(-1),
                    )
                }
                Err(_) => Outcome::Lost,
            },
            None => {
                while process::alive(pid, ticks) {
                    tokio::time::sleep(POLL).await;
                }
                process::exit_code(exit_file).map_or(Outcome::Lost, Outcome::Exited)
            }
        }
    };
    match deadline {
        Some(deadline) => {
            tokio::select! {
                outcome = ended => outcome,
                () = tokio::time::sleep_until(deadline) => {
                    if let Err(error) = process::signal_group(pid, Signal::SIGKILL) {
                        tracing::warn!(pid, %error, "killing a workload at its deadline");
                    }
                    Outcome::DeadlineExceeded
                }
            }
        }
        None => ended.await,
    }
}

impl Runtime for LocalRuntime {
    /// Starts the workload unless one of its key exists: then returns that one's status and starts nothing.
    async fn apply(&self, spec: &WorkloadSpec) -> Result<WorkloadStatus, RuntimeError> {
        let mut records = self.inner.records.lock().await;
        if let Some(record) = records.get(&spec.key) {
            return Ok(record.status.clone());
        }
        let mut record = self.record_of(spec)?;
        let dir = record::dir(&self.inner.root, &spec.key);
        let work = record::work_dir(&dir);
        std::fs::create_dir_all(&work)
            .map_err(|error| RuntimeError::io(format!("creating {}", work.display()), error))?;
        self.report(&mut record);
        record::save(&dir, &record)?;
        let started = self.start_attempt(&mut record);
        let status = record.status.clone();
        records.insert(spec.key.clone(), record);
        started?;
        Ok(status)
    }

    /// Stops the workload's process group (SIGTERM, SIGKILL after `grace`) and removes it with its files.
    async fn delete(&self, key: &ObjectKey, grace: Duration) -> Result<bool, RuntimeError> {
        let removed = self.inner.records.lock().await.remove(key);
        let Some(mut record) = removed else {
            return Ok(false);
        };
        if let Some(pid) = record.pid.filter(|_| !record.status.phase.is_final()) {
            let signal = if grace.is_zero() {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            };
            process::signal_group(pid, signal)?;
            let until = tokio::time::Instant::now() + grace;
            while process::group_alive(pid) && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            process::signal_group(pid, Signal::SIGKILL)?;
        }
        if let Some(watcher) = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(key.clone(), record.attempt))
        {
            watcher.abort();
        }
        let dir = record::dir(&self.inner.root, key);
        std::fs::remove_dir_all(&dir)
            .map_err(|error| RuntimeError::io(format!("removing {}", dir.display()), error))?;
        if !record.status.phase.is_final() {
            record.status.phase = Phase::Failed;
            record.status.finished_at = Some(Utc::now());
        }
        record.status.ready = false;
        record.status.reason = Some(reasons::DELETED.into());
        self.report(&mut record);
        tracing::info!(%key, "workload deleted");
        Ok(true)
    }

    async fn status(&self, key: &ObjectKey) -> Result<Option<WorkloadStatus>, RuntimeError> {
        Ok(self
            .inner
            .records
            .lock()
            .await
            .get(key)
            .map(|record| record.status.clone()))
    }

    async fn list(
        &self,
        cluster: &str,
        namespace: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        let records = self.inner.records.lock().await;
        Ok(records
            .values()
            .map(|record| &record.status)
            .filter(|status| status.key.cluster == cluster)
            .filter(|status| namespace.is_none_or(|namespace| status.key.namespace == namespace))
            .filter(|status| {
                labels
                    .iter()
                    .all(|(name, value)| status.labels.get(name) == Some(value))
            })
            .cloned()
            .collect())
    }

    /// The current attempt's log; followed, it goes on until that attempt ends.
    async fn logs(&self, key: &ObjectKey, follow: bool) -> Result<LogStream, RuntimeError> {
        let attempt = {
            let records = self.inner.records.lock().await;
            let record = records.get(key).ok_or_else(|| RuntimeError::NotFound(key.clone()))?;
            record.attempt
        };
        let path = record::log_file(&record::dir(&self.inner.root, key), attempt);
        let running = {
            let runtime = Arc::downgrade(&self.inner);
            let key = key.clone();
            move || {
                let runtime = runtime.clone();
                let key = key.clone();
                async move {
                    let Some(inner) = runtime.upgrade() else {
                        return false;
                    };
                    let records = inner.records.lock().await;
                    records
                        .get(&key)
                        .is_some_and(|record| record.attempt == attempt && !record.status.phase.is_final())
                }
            }
        };
        logs::stream(path, follow, running).await
    }
}
