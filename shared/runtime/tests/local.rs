//! The local runtime with real processes (`sh -c` scripts): a restart of the owning process after `kill -9` adopts
//! what runs, finishes what ended and reports what vanished as `Lost` once, starting nothing twice; ports, restart
//! policies, deadlines, graceful deletion and logs per attempt.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cube_runtime::{
    Container, LocalRuntime, ObjectKey, Phase, Port, RestartPolicy, Runtime, StatusStream, WorkloadSpec,
    WorkloadStatus, labels, reasons,
};
use futures::StreamExt as _;
use tokio::io::AsyncBufReadExt as _;

/// Longest wait for something that should happen soon.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Set in the owner child process: the data directory it runs workloads from.
const OWNER_DIR: &str = "CUBE_TEST_LOCAL_OWNER_DIR";
/// What the owner child prints once its workloads run.
const APPLIED: &str = "applied";

/// A workload of `name` running `script` with `sh -c`.
fn spec(name: &str, script: &str) -> WorkloadSpec {
    let mut labels = labels::for_project("vision");
    labels.insert(labels::RUN.to_owned(), "r1".to_owned());
    WorkloadSpec {
        key: ObjectKey::new("local", "vision", name),
        labels,
        containers: vec![Container {
            name: "main".to_owned(),
            image: "cube.test/worker:1".to_owned(),
            command: vec!["sh".to_owned(), "-c".to_owned()],
            args: vec![script.to_owned()],
            ..Container::default()
        }],
        ..WorkloadSpec::default()
    }
}

/// Lines in `path` (0 when it does not exist).
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
}

/// Polls the status of `key` until `done` holds.
async fn status_until(
    runtime: &LocalRuntime,
    key: &ObjectKey,
    what: &str,
    done: impl Fn(&WorkloadStatus) -> bool,
) -> WorkloadStatus {
    cube_testkit::eventually(what, TIMEOUT, || async {
        runtime.status(key).await.expect("status").filter(|status| done(status))
    })
    .await
}

/// The statuses `changes` yields until it has been quiet for a second.
async fn drain(changes: &mut StatusStream) -> Vec<WorkloadStatus> {
    let mut seen = Vec::new();
    while let Ok(Some(status)) = tokio::time::timeout(Duration::from_secs(1), changes.next()).await {
        seen.push(status);
    }
    seen
}

/// Acts as the owning process of `a_restart_after_kill_9_adopts_finishes_and_loses_starting_nothing_twice` when that
/// test runs this binary with [`OWNER_DIR`] set: starts three workloads, says so, and waits to be killed.
#[test]
fn local_owner_process() {
    let Ok(dir) = std::env::var(OWNER_DIR) else {
        return;
    };
    let dir = Path::new(&dir).to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let (local, _changes) = LocalRuntime::open(&dir).await.expect("opening");
        let counter = |name: &str| dir.join(format!("{name}.count")).display().to_string();
        let flag = |name: &str| dir.join(name).display().to_string();
        // Outlives the owner, then exits 4 when the test says so.
        let adopted = format!(
            "echo started >> {}; while [ ! -f {} ]; do sleep 0.05; done; exit 4",
            counter("adopted"),
            flag("release")
        );
        // Ends while the owner is down, when the test says so.
        let ended = format!(
            "echo started >> {}; while [ ! -f {} ]; do sleep 0.05; done; echo bye > {}",
            counter("ended"),
            flag("go"),
            flag("ended.done")
        );
        // Is killed with its wrapper while the owner is down: nothing tells how it ended.
        let vanished = format!(
            "echo started >> {}; echo $$ > {}; sleep 60",
            counter("vanished"),
            dir.join("vanished.pid").display()
        );
        for (name, script) in [("adopted", adopted), ("ended", ended), ("vanished", vanished)] {
            local.apply(&spec(name, &script)).await.expect("applying");
        }
        cube_testkit::eventually("the vanishing one says its pid", TIMEOUT, || async {
            dir.join("vanished.pid").exists().then_some(())
        })
        .await;
        println!("{APPLIED}");
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_kill_9_adopts_finishes_and_loses_starting_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut owner = tokio::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["local_owner_process", "--exact", "--nocapture", "--test-threads=1"])
        .env(OWNER_DIR, dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the owner");
    let mut output = tokio::io::BufReader::new(owner.stdout.take().expect("stdout")).lines();
    tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = output.next_line().await.expect("reading the owner") {
            // libtest prints the test's name on the same line first.
            if line.ends_with(APPLIED) {
                return;
            }
        }
        panic!("the owner ended before applying");
    })
    .await
    .expect("the owner applies its workloads");
    // SIGKILL: the owner gets no chance to clean up or record anything more.
    owner.kill().await.expect("kill -9 the owner");

    // The vanishing workload's whole process group dies meanwhile, its wrapper too.
    let pid: i32 = std::fs::read_to_string(dir.path().join("vanished.pid"))
        .expect("the pid")
        .trim()
        .parse()
        .expect("a pid");
    let group = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).expect("its group");
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).expect("killing its group");
    // The ended one ends while nobody owns it.
    let counter = |name: &str| dir.path().join(format!("{name}.count"));
    std::fs::write(dir.path().join("go"), "").expect("letting it end");
    cube_testkit::eventually("the ended one ends", TIMEOUT, || async {
        dir.path().join("ended.done").exists().then_some(())
    })
    .await;

    let (local, mut changes) = LocalRuntime::open(dir.path()).await.expect("reopening");
    let key = |name: &str| ObjectKey::new("local", "vision", name);
    let adopted = local.status(&key("adopted")).await.expect("status").expect("known");
    assert_eq!(adopted.phase, Phase::Running, "still running: adopted, {adopted:?}");
    // Its wrapper wrote how it ended (or, had it not yet, the adopted wrapper's end tells): never Lost.
    let ended = status_until(
        &local,
        &key("ended"),
        "the ended one is known to have ended",
        |status| status.phase.is_final(),
    )
    .await;
    assert_eq!((ended.phase, ended.exit_code), (Phase::Succeeded, Some(0)), "{ended:?}");
    std::fs::write(dir.path().join("release"), "").expect("letting the adopted one end");
    let vanished = local.status(&key("vanished")).await.expect("status").expect("known");
    assert_eq!(
        (vanished.phase, vanished.reason.as_deref()),
        (Phase::Failed, Some(reasons::LOST)),
        "{vanished:?}"
    );
    // The adopted one's exit code is known though it is not this process's child.
    let finished = status_until(&local, &key("adopted"), "the adopted one ends", |status| {
        status.phase.is_final()
    })
    .await;
    assert_eq!(
        (finished.phase, finished.exit_code),
        (Phase::Failed, Some(4)),
        "{finished:?}"
    );

    let reported = drain(&mut changes).await;
    let lost: Vec<_> = reported
        .iter()
        .filter(|status| status.reason.as_deref() == Some(reasons::LOST))
        .collect();
    assert_eq!(lost.len(), 1, "Lost is reported once: {reported:?}");
    assert_eq!(lost[0].key, key("vanished"));

    // Another restart reports nothing again and starts nothing.
    drop(local);
    let (again, mut changes) = LocalRuntime::open(dir.path()).await.expect("reopening again");
    assert!(drain(&mut changes).await.is_empty(), "nothing new to report");
    assert_eq!(
        again.list("local", None, &BTreeMap::new()).await.expect("list").len(),
        3
    );
    for name in ["adopted", "ended", "vanished"] {
        assert_eq!(lines(&counter(name)), 1, "{name} started exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_are_free_ports_passed_in_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (local, _changes) = LocalRuntime::open(dir.path()).await.expect("opening");
    let out = dir.path().join("env.out");
    let mut spec = spec(
        "served",
        &format!("echo $PORT $CUBE_PORT_HTTP $CUBE_PORT_METRICS_API > {}", out.display()),
    );
    spec.containers[0].ports = vec![
        Port {
            name: "http".to_owned(),
            container_port: 8080,
        },
        Port {
            name: "metrics-api".to_owned(),
            container_port: 9090,
        },
    ];
    spec.containers[0].env = vec![("SECRET_OF_THE_SPEC".to_owned(), "kept".to_owned())];
    let status = local.apply(&spec).await.expect("applying");
    let http = status.ports["http"];
    let metrics = status.ports["metrics-api"];
    assert_ne!(http, metrics);
    assert_eq!(status.address.as_deref(), Some("127.0.0.1"));
    status_until(&local, &spec.key, "it ends", |status| status.phase == Phase::Succeeded).await;
    assert_eq!(
        std::fs::read_to_string(&out).expect("its output").trim(),
        format!("{http} {http} {metrics}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_is_the_specs_and_the_owners_is_not_inherited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (local, _changes) = LocalRuntime::open(dir.path()).await.expect("opening");
    let out = dir.path().join("env.out");
    // Cargo and nextest give the test process this variable; the workload must not see the owner's environment.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    let mut spec = spec(
        "env",
        &format!(
            "echo \"$EPOCHS/${{CARGO_MANIFEST_DIR:-none}}/$(pwd)\" > {}",
            out.display()
        ),
    );
    spec.containers[0].env = vec![("EPOCHS".to_owned(), "3".to_owned())];
    local.apply(&spec).await.expect("applying");
    status_until(&local, &spec.key, "it ends", |status| status.phase == Phase::Succeeded).await;
    let text = std::fs::read_to_string(&out).expect("its output");
    let parts: Vec<&str> = text.trim().splitn(3, '/').collect();
    assert_eq!(parts[..2], ["3", "none"]);
    assert!(
        text.trim().ends_with("workloads/local/vision/env/work"),
        "runs in a directory of its own: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_starts_again_until_it_succeeds_with_a_log_per_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (local, _changes) = LocalRuntime::open(dir.path()).await.expect("opening");
    let tries = dir.path().join("tries");
    let mut spec = spec(
        "flaky",
        &format!(
            "echo try >> {tries}; n=$(wc -l < {tries}); echo attempt $n; [ $n -ge 3 ]",
            tries = tries.display()
        ),
    );
    spec.restart_policy = RestartPolicy::OnFailure;
    local.apply(&spec).await.expect("applying");
    let done = status_until(&local, &spec.key, "it succeeds", |status| status.phase.is_final()).await;
    assert_eq!(
        (done.phase, done.restarts, done.exit_code),
        (Phase::Succeeded, 2, Some(0))
    );
    assert_eq!(lines(&tries), 3);
    let log: Vec<u8> = local
        .logs(&spec.key, false)
        .await
        .expect("logs")
        .map(|chunk| chunk.expect("a chunk").to_vec())
        .concat()
        .await;
    assert_eq!(
        String::from_utf8_lossy(&log),
        "attempt 3\n",
        "the current attempt's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_past_its_deadline_is_stopped_as_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (local, _changes) = LocalRuntime::open(dir.path()).await.expect("opening");
    let mut spec = spec("slow", "sleep 60");
    spec.deadline = Some(Duration::from_millis(300));
    spec.restart_policy = RestartPolicy::Always;
    local.apply(&spec).await.expect("applying");
    let done = status_until(&local, &spec.key, "it is stopped", |status| status.phase.is_final()).await;
    assert_eq!(
        (done.phase, done.reason.as_deref(), done.restarts),
        (Phase::Failed, Some(reasons::DEADLINE_EXCEEDED), 0),
        "not started again: {done:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_gives_the_process_its_grace_then_kills_the_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (local, mut changes) = LocalRuntime::open(dir.path()).await.expect("opening");
    let termed = dir.path().join("termed");
    let graceful = spec(
        "graceful",
        &format!(
            "trap 'echo bye > {}; exit 0' TERM; echo ready; while true; do sleep 0.05; done",
            termed.display()
        ),
    );
    // A child of the workload that ignores TERM: the group is killed after the grace.
    let stubborn_pid = dir.path().join("stubborn.pid");
    let stubborn = spec(
        "stubborn",
        &format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; sleep 60' ; sleep 60",
            stubborn_pid.display()
        ),
    );
    for spec in [&graceful, &stubborn] {
        local.apply(spec).await.expect("applying");
    }
    cube_testkit::eventually("the stubborn one runs", TIMEOUT, || async {
        stubborn_pid.exists().then_some(())
    })
    .await;
    cube_testkit::eventually("the graceful one traps TERM", TIMEOUT, || async {
        let log: Vec<u8> = local
            .logs(&graceful.key, false)
            .await
            .ok()?
            .map(|chunk| chunk.map(|bytes| bytes.to_vec()).unwrap_or_default())
            .concat()
            .await;
        (log == b"ready\n").then_some(())
    })
    .await;
    assert!(
        local
            .delete(&graceful.key, Duration::from_secs(5))
            .await
            .expect("deleting")
    );
    assert_eq!(std::fs::read_to_string(&termed).expect("it handled TERM"), "bye\n");
    assert!(
        local
            .delete(&stubborn.key, Duration::from_millis(200))
            .await
            .expect("deleting")
    );
    let pid: i32 = std::fs::read_to_string(&stubborn_pid)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    cube_testkit::eventually("the stubborn child is killed", TIMEOUT, || async {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            .is_err()
            .then_some(())
    })
    .await;
    assert!(local.status(&graceful.key).await.expect("status").is_none());
    assert!(
        !local
            .delete(&graceful.key, Duration::ZERO)
            .await
            .expect("deleting again")
    );
    let deleted: Vec<_> = drain(&mut changes)
        .await
        .into_iter()
        .filter(|status| status.reason.as_deref() == Some(reasons::DELETED))
        .map(|status| status.key.name)
        .collect();
    assert_eq!(deleted, ["graceful", "stubborn"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_a_process_cannot_run_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (local, _changes) = LocalRuntime::open(dir.path()).await.expect("opening");
    let mut no_command = spec("empty", "true");
    no_command.containers[0].command.clear();
    no_command.containers[0].args.clear();
    let mut escaping = spec("escaping", "true");
    escaping.key.namespace = "../..".to_owned();
    let mut no_container = spec("bare", "true");
    no_container.containers.clear();
    for (spec, field) in [
        (no_command, "containers[0].command"),
        (escaping, "key.namespace"),
        (no_container, "containers"),
    ] {
        match local.apply(&spec).await {
            Err(cube_runtime::RuntimeError::Invalid { field: named, .. }) => assert_eq!(named, field),
            other => panic!("{field}: {other:?}"),
        }
        assert!(local.status(&spec.key).await.expect("status").is_none(), "nothing kept");
    }
}
