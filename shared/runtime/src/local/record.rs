//! What the local runtime keeps on disk for each workload: a [`Record`] in `record.json` of the workload's
//! directory, replaced atomically (written beside, then renamed), so that a restart of the owning process finds
//! every workload as it last was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::spec::{ObjectKey, RestartPolicy};
use crate::status::WorkloadStatus;

/// The record's file name in a workload's directory.
const RECORD: &str = "record.json";

/// How to start a workload again (each attempt is started the same way) and where it is in its life.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The status last reported.
    pub(crate) status: WorkloadStatus,
    /// The image the spec named (recorded, not pulled).
    pub(crate) image: String,
    /// The main container's command and arguments.
    pub(crate) argv: Vec<String>,
    /// The environment the workload gets, the spec's and the ports'.
    pub(crate) env: Vec<(String, String)>,
    /// What happens when an attempt ends.
    pub(crate) restart_policy: RestartPolicy,
    /// When the workload is stopped as failed, in milliseconds since the epoch.
    pub(crate) deadline_ms: Option<i64>,
    /// The current attempt, from 1; 0 before the first is started.
    pub(crate) attempt: u32,
    /// The current attempt's process (the wrapper leading its process group) once it started.
    pub(crate) pid: Option<i32>,
    /// The process's start time (field 22 of `/proc/<pid>/stat`), which tells it from a later process of the same
    /// pid.
    pub(crate) start_ticks: Option<u64>,
}

/// Where a workload's files are: `<root>/<cluster>/<namespace>/<name>/`.
pub(crate) fn dir(root: &Path, key: &ObjectKey) -> PathBuf {
    root.join(&key.cluster).join(&key.namespace).join(&key.name)
}

/// The log file of `attempt`.
pub(crate) fn log_file(dir: &Path, attempt: u32) -> PathBuf {
    dir.join(format!("attempt-{attempt}.log"))
}

/// The file the wrapper writes its pid into when `attempt` starts.
pub(crate) fn pid_file(dir: &Path, attempt: u32) -> PathBuf {
    dir.join(format!("attempt-{attempt}.pid"))
}

/// The file the wrapper writes the main command's exit code into when `attempt` ends.
pub(crate) fn exit_file(dir: &Path, attempt: u32) -> PathBuf {
    dir.join(format!("attempt-{attempt}.exit"))
}

/// The directory the workload's processes run in.
pub(crate) fn work_dir(dir: &Path) -> PathBuf {
    dir.join("work")
}

/// Replaces the record of the workload in `dir`.
pub(crate) fn save(dir: &Path, record: &Record) -> Result<(), RuntimeError> {
    let text =
        serde_json::to_vec_pretty(record).map_err(|error| RuntimeError::io("encoding a record", error.into()))?;
    let temporary = dir.join(format!("{RECORD}.tmp"));
    std::fs::write(&temporary, text)
        .map_err(|error| RuntimeError::io(format!("writing {}", temporary.display()), error))?;
    let path = dir.join(RECORD);
    std::fs::rename(&temporary, &path).map_err(|error| RuntimeError::io(format!("replacing {}", path.display()), error))
}

/// Reads every record under `root`; a directory whose record cannot be read is skipped with a warning.
pub(crate) fn load_all(root: &Path) -> Result<BTreeMap<ObjectKey, Record>, RuntimeError> {
    let mut records = BTreeMap::new();
    for cluster in subdirectories(root)? {
        for namespace in subdirectories(&cluster)? {
            for workload in subdirectories(&namespace)? {
                let path = workload.join(RECORD);
                let Ok(text) = std::fs::read(&path) else {
                    tracing::warn!(path = %path.display(), "a workload directory without a readable record");
                    continue;
                };
                match serde_json::from_slice::<Record>(&text) {
                    Ok(record) => {
                        records.insert(record.status.key.clone(), record);
                    }
                    Err(error) => tracing::warn!(path = %path.display(), %error, "an unreadable workload record"),
                }
            }
        }
    }
    Ok(records)
}

/// The directories in `dir` (none when it does not exist).
fn subdirectories(dir: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(RuntimeError::io(format!("listing {}", dir.display()), error)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| RuntimeError::io(format!("listing {}", dir.display()), error))?;
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            found.push(entry.path());
        }
    }
    Ok(found)
}
