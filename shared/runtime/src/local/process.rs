//! Starting a workload's process and telling, later and from another process, whether it still runs.
//!
//! Each attempt runs under a small `sh` wrapper that leads a process group of its own: it writes its pid, runs the
//! main command as its child, then writes the command's exit code to the attempt's exit file. So the exit code of
//! an attempt is known even when the process that started it was killed meanwhile and a new one adopted it.

use std::path::Path;
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::error::RuntimeError;

/// The wrapper: `$1` the pid file, `$2` the exit file, then the command and its arguments.
const WRAPPER: &str = r#"echo $$ > "$1.tmp" && mv "$1.tmp" "$1"
exit_file=$2
shift 2
"$@"
code=$?
echo $code > "$exit_file.tmp" && mv "$exit_file.tmp" "$exit_file"
exit $code"#;

/// The variables of the owning process a workload inherits; everything else comes from its spec.
const INHERITED: [&str; 5] = ["PATH", "HOME", "LANG", "TMPDIR", "USER"];

/// What to start: one attempt of a workload.
pub(crate) struct Launch<'a> {
    pub(crate) argv: &'a [String],
    pub(crate) env: &'a [(String, String)],
    pub(crate) work_dir: &'a Path,
    pub(crate) log_file: &'a Path,
    pub(crate) pid_file: &'a Path,
    pub(crate) exit_file: &'a Path,
}

/// Starts an attempt in a process group of its own, its output appended to its log file.
pub(crate) fn spawn(launch: &Launch<'_>) -> Result<Child, RuntimeError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(launch.log_file)
        .map_err(|error| RuntimeError::io(format!("opening {}", launch.log_file.display()), error))?;
    let errors = log
        .try_clone()
        .map_err(|error| RuntimeError::io("sharing the log file", error))?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(WRAPPER)
        .arg("cube-workload")
        .arg(launch.pid_file)
        .arg(launch.exit_file)
        .args(launch.argv)
        .env_clear()
        .current_dir(launch.work_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(errors)
        .process_group(0);
    for name in INHERITED {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.envs(launch.env.iter().map(|(name, value)| (name, value)));
    command
        .spawn()
        .map_err(|error| RuntimeError::io("starting the workload's process", error))
}

/// The start time of process `pid` (clock ticks after boot, field 22 of `/proc/<pid>/stat`) while it runs (a
/// zombie no longer does), or `None`.
pub(crate) fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: the fields after it follow the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // Fields from 3 on: state is field 3 (index 0 here), start time field 22 (index 19).
    if fields.first().is_some_and(|state| *state == "Z" || *state == "X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether process `pid` still runs and is the one that started at `ticks`.
pub(crate) fn alive(pid: i32, ticks: u64) -> bool {
    start_ticks(pid) == Some(ticks)
}

/// Sends `signal` to the process group `pid` leads; a group that is gone already is not an error.
pub(crate) fn signal_group(pid: i32, signal: Signal) -> Result<(), RuntimeError> {
    match killpg(Pid::from_raw(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(error) => Err(RuntimeError::io(
            format!("signalling process group {pid}"),
            std::io::Error::from(error),
        )),
    }
}

/// Whether any process of the group `pid` led still runs (zombies do not: where PID 1 does not reap orphans, a dead
/// workload's processes stay zombies of the group).
pub(crate) fn group_alive(pid: i32) -> bool {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return false;
    };
    processes.flatten().any(|entry| {
        let Some(stat) = entry
            .file_name()
            .to_str()
            .filter(|name| name.bytes().all(|byte| byte.is_ascii_digit()))
            .and_then(|name| std::fs::read_to_string(format!("/proc/{name}/stat")).ok())
        else {
            return false;
        };
        // After the command name: state (field 3), ppid (4), process group (5).
        let fields: Vec<&str> = stat
            .rfind(')')
            .and_then(|end| stat.get(end + 1..))
            .map(|rest| rest.split_whitespace().take(3).collect())
            .unwrap_or_default();
        matches!(fields.as_slice(), [state, _, group] if *state != "Z" && *state != "X" && group.parse() == Ok(pid))
    })
}

/// The exit code an attempt's wrapper wrote, once it wrote one.
pub(crate) fn exit_code(exit_file: &Path) -> Option<i32> {
    std::fs::read_to_string(exit_file).ok()?.trim().parse().ok()
}

/// A port of this machine no process listens on now.
pub(crate) fn free_port() -> Result<u16, RuntimeError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|error| RuntimeError::io("finding a free port", error))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| RuntimeError::io("finding a free port", error))
}

/// This machine's host name, the node local workloads run on.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
