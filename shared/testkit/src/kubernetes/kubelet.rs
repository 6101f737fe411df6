//! The fake kubelet: watches the pods the real scheduler binds to fake nodes and reports what their containers do,
//! as a script says.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::task::{AbortHandle, JoinSet};

use super::status::{PodView, Report, RestartPolicy, State, Terminated, address, not_ready_conditions, pod_status};

/// How long a failed image pull shows `ErrImagePull` before the kubelet backs off (`ImagePullBackOff`).
const PULL_BACKOFF: Duration = Duration::from_millis(200);

/// Pod addresses handed out in this process, so that no two pods share one.
static POD_ADDRESSES: AtomicU32 = AtomicU32::new(1);
/// Node addresses handed out in this process.
static NODE_ADDRESSES: AtomicU32 = AtomicU32::new(1);

/// What a container does on one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    /// How long it runs; `None` runs until the pod is deleted.
    lasts: Option<Duration>,
    /// How it ends.
    end: End,
}

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The process exits with this code.
    Exit(i32),
    /// The kernel kills it for memory (exit code 137).
    OomKilled,
}

/// What the containers of the pods a [`Kubelet`] script matches do, run after run.
///
/// ```ignore
/// Script::run_for(Duration::from_millis(300)).exit(3);                        // runs, then fails with 3
/// Script::run_for(ms(200)).exit(1).times(2).then(Script::run());              // crashes twice, then runs
/// Script::run_for(ms(200)).oom_killed();                                      // OOMKilled
/// Script::image_pull_backoff();                                               // ErrImagePull, ImagePullBackOff
/// ```
///
/// After each run the pod's `restartPolicy` decides, as the kubelet would: `Never` ends the pod (`Succeeded` on
/// exit 0, `Failed` otherwise), `OnFailure` restarts after a non-zero exit, `Always` restarts after any. A restart
/// plays the script's next run (the container's `restartCount` goes up and `lastState` tells how the previous run
/// ended); when there is none, the container waits in `CrashLoopBackOff`. All containers of a pod play the same
/// script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    runs: Vec<Run>,
    start_after: Duration,
    pull_fails: bool,
    stop_takes: Duration,
}

impl Default for Script {
    fn default() -> Self {
        Self::run()
    }
}

impl Script {
    /// Returns a script whose containers start and run until the pod is deleted.
    pub fn run() -> Self {
        Self {
            runs: vec![Run {
                lasts: None,
                end: End::Exit(0),
            }],
            start_after: Duration::ZERO,
            pull_fails: false,
            stop_takes: Duration::ZERO,
        }
    }

    /// Returns a script whose containers run for `lasts`, then exit with code 0 (see [`Script::exit`]).
    pub fn run_for(lasts: Duration) -> Self {
        let mut script = Self::run();
        script.runs[0].lasts = Some(lasts);
        script
    }

    /// Returns a script whose image cannot be pulled: the pod stays `Pending`, its containers waiting with
    /// `ErrImagePull`, then `ImagePullBackOff`.
    pub fn image_pull_backoff() -> Self {
        Self {
            pull_fails: true,
            ..Self::run()
        }
    }

    /// Makes the last run end with exit code `code` (`Completed` for 0, `Error` otherwise).
    #[must_use]
    pub fn exit(mut self, code: i32) -> Self {
        self.last_run().end = End::Exit(code);
        self
    }

    /// Makes the last run end killed for memory: terminated with reason `OOMKilled` and exit code 137.
    #[must_use]
    pub fn oom_killed(mut self) -> Self {
        self.last_run().end = End::OomKilled;
        self
    }

    /// Plays the last run `count` times in all (at least once).
    #[must_use]
    pub fn times(mut self, count: u32) -> Self {
        let last = *self.last_run();
        for _ in 1..count {
            self.runs.push(last);
        }
        self
    }

    /// Plays `next`'s runs after this script's, when the restart policy restarts the containers.
    #[must_use]
    pub fn then(mut self, next: Script) -> Self {
        self.runs.extend(next.runs);
        self
    }

    /// Keeps the containers in `ContainerCreating` for `delay` before the first run (or the failed pull).
    #[must_use]
    pub fn start_after(mut self, delay: Duration) -> Self {
        self.start_after = delay;
        self
    }

    /// Takes `delay`, or the deletion's grace period when shorter, to stop the containers of a deleted pod.
    #[must_use]
    pub fn stop_takes(mut self, delay: Duration) -> Self {
        self.stop_takes = delay;
        self
    }

    fn last_run(&mut self) -> &mut Run {
        if self.runs.is_empty() {
            self.runs.push(Self::run().runs[0]);
        }
        let last = self.runs.len() - 1;
        &mut self.runs[last]
    }
}

/// Which pods a script is for: `key=value` pairs, all of which a pod must carry as labels or annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector(Vec<(String, String)>);

impl Selector {
    /// Parses `app=x,cube.io/task=train`, and panics naming the pair that is not `key=value`.
    fn parse(text: &str) -> Self {
        Self(
            text.split(',')
                .map(str::trim)
                .filter(|pair| !pair.is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((key, value)) if !key.trim().is_empty() => (key.trim().to_owned(), value.trim().to_owned()),
                    _ => panic!("kubelet script selector {text:?}: {pair:?} is not key=value"),
                })
                .collect(),
        )
    }

    fn matches(
        &self,
        labels: Option<&BTreeMap<String, String>>,
        annotations: Option<&BTreeMap<String, String>>,
    ) -> bool {
        self.0.iter().all(|(key, value)| {
            [labels, annotations]
                .into_iter()
                .flatten()
                .any(|map| map.get(key) == Some(value))
        })
    }
}

/// The scripts of one kubelet, in the order they were added.
type Scripts = Arc<Mutex<Vec<(Selector, Script)>>>;

/// Returns the script of the first selector `pod` matches, or [`Script::run`] when none does.
fn script_for(scripts: &Scripts, pod: &Pod) -> Script {
    let scripts = scripts.lock().unwrap_or_else(PoisonError::into_inner);
    let meta = &pod.metadata;
    scripts
        .iter()
        .find(|(selector, _)| selector.matches(meta.labels.as_ref(), meta.annotations.as_ref()))
        .map_or_else(Script::run, |(_, script)| script.clone())
}

/// A fake kubelet for some fake nodes: plays every pod bound to them by its script until stopped or dropped.
///
/// ```ignore
/// let kubelet = Kubelet::start(&client, [&node]).script("app=trainer", Script::run_for(ms(300)).exit(0));
/// ```
///
/// A pod is matched to a script when the kubelet first sees it bound, so add scripts before creating their pods;
/// a pod that is not yet `Succeeded` or `Failed` when the kubelet starts is played from the start of its script.
/// Pods no script matches run until deleted. A deleted pod (which the API server keeps until its node's kubelet
/// confirms its containers stopped) is removed at once, or after [`Script::stop_takes`]. Dropping the kubelet
/// stops it silently; [`Kubelet::stop`] also reports its nodes lost.
pub struct Kubelet {
    client: Client,
    nodes: Vec<String>,
    scripts: Scripts,
    tasks: JoinSet<()>,
}

impl Kubelet {
    /// Starts playing the kubelet of `nodes` (their names, or [`FakeNode`](super::FakeNode)s).
    pub fn start<I, S>(client: &Client, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let scripts = Scripts::default();
        let mut tasks = JoinSet::new();
        let nodes: Vec<String> = nodes.into_iter().map(|node| node.as_ref().to_owned()).collect();
        for node in &nodes {
            let host_ip = address(10, NODE_ADDRESSES.fetch_add(1, Ordering::Relaxed));
            tasks.spawn(play_node(client.clone(), node.clone(), host_ip, scripts.clone()));
        }
        Self {
            client: client.clone(),
            nodes,
            scripts,
            tasks,
        }
    }

    /// Plays `script` for the pods whose labels or annotations carry every `key=value` of `selector`
    /// (`"app=x,cube.io/task=train"`); earlier scripts win when several match.
    #[must_use]
    pub fn script(self, selector: &str, script: Script) -> Self {
        self.add_script(selector, script);
        self
    }

    /// Adds a script to a running kubelet, as [`Kubelet::script`] does.
    pub fn add_script(&self, selector: &str, script: Script) {
        let selector = Selector::parse(selector);
        self.scripts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((selector, script));
    }

    /// Stops the kubelet as if its nodes went away: no more pod updates, each node `Ready=False` and tainted
    /// `node.kubernetes.io/not-ready:NoSchedule`, and the pods left on them not ready (as the node controller
    /// would leave them). Panics when the API server refuses the node or pod updates.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let nodes = Api::<Node>::all(self.client.clone());
        for node in &self.nodes {
            let status = json!({"status": {"conditions": [{
                "type": "Ready", "status": "False", "reason": "KubeletNotReady",
                "message": "the fake kubelet stopped", "lastHeartbeatTime": now, "lastTransitionTime": now,
            }]}});
            nodes
                .patch_status(node, &PatchParams::default(), &Patch::Strategic(&status))
                .await
                .unwrap_or_else(|error| panic!("reporting node {node} not ready: {error}"));
            let taint = json!({"spec": {"taints": [
                {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule", "timeAdded": now},
            ]}});
            nodes
                .patch(node, &PatchParams::default(), &Patch::Merge(&taint))
                .await
                .unwrap_or_else(|error| panic!("tainting node {node} not ready: {error}"));
            let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
            let pods = Api::<Pod>::all(self.client.clone())
                .list(&on_node)
                .await
                .unwrap_or_else(|error| panic!("listing the pods on node {node}: {error}"));
            for pod in pods.items {
                let phase = pod.status.as_ref().and_then(|status| status.phase.as_deref());
                if matches!(phase, Some("Succeeded" | "Failed")) {
                    continue;
                }
                let (Some(name), Some(namespace)) = (&pod.metadata.name, &pod.metadata.namespace) else {
                    continue;
                };
                let conditions = pod
                    .status
                    .as_ref()
                    .and_then(|status| status.conditions.as_ref())
                    .map(|all| {
                        all.iter()
                            .filter_map(|c| serde_json::to_value(c).ok())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                let patch = json!({"status": {"conditions": not_ready_conditions(&conditions, &now)}});
                let result = Api::<Pod>::namespaced(self.client.clone(), namespace)
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                match result {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.is_not_found() => {}
                    Err(error) => panic!("reporting pod {namespace}/{name} not ready: {error}"),
                }
            }
        }
    }
}

/// A pod the kubelet plays.
struct Tracked {
    /// The task that plays its script.
    player: AbortHandle,
    /// How long stopping its containers takes.
    stop_takes: Duration,
    /// Whether its deletion is under way.
    stopping: bool,
}

/// Watches the pods bound to `node` and plays each one's script, until aborted (which aborts the players too).
async fn play_node(client: Client, node: String, host_ip: String, scripts: Scripts) {
    let mut players = JoinSet::new();
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(Api::<Pod>::all(client.clone()), config)
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        while players.try_join_next().is_some() {}
        let pod = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(gone) = pod.metadata.uid.as_ref().and_then(|uid| tracked.remove(uid)) {
                    gone.player.abort();
                }
                continue;
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
            Err(error) => {
                eprintln!("fake kubelet of {node}: watching pods: {error}");
                continue;
            }
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        let deleting = pod.metadata.deletion_timestamp.is_some();
        match tracked.get_mut(&uid) {
            Some(known) if deleting && !known.stopping => {
                known.player.abort();
                known.stopping = true;
                let stop_takes = known.stop_takes;
                players.spawn(remove(client.clone(), pod, stop_takes));
            }
            Some(_) => {}
            None => {
                let phase = pod.status.as_ref().and_then(|status| status.phase.as_deref());
                if matches!(phase, Some("Succeeded" | "Failed")) {
                    continue;
                }
                let script = script_for(&scripts, &pod);
                let stop_takes = script.stop_takes;
                let player = if deleting {
                    players.spawn(remove(client.clone(), pod, stop_takes))
                } else {
                    let pod_ip = address(172, POD_ADDRESSES.fetch_add(1, Ordering::Relaxed));
                    players.spawn(play_pod(client.clone(), pod, script, host_ip.clone(), pod_ip))
                };
                tracked.insert(
                    uid,
                    Tracked {
                        player,
                        stop_takes,
                        stopping: deleting,
                    },
                );
            }
        }
    }
}

/// Reports `report` for the pod; false when the pod is gone, so its player can end.
async fn report(pods: &Api<Pod>, name: &str, view: &PodView, report: Report) -> bool {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = pod_status(view, &report, &now);
    match pods
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => true,
        Err(kube::Error::Api(status)) if status.is_not_found() => false,
        Err(error) => {
            eprintln!("fake kubelet: reporting the status of pod {name}: {error}");
            true
        }
    }
}

/// Plays `script` for `pod`: container creation, then its runs, each ended as the script and restart policy say.
async fn play_pod(client: Client, pod: Pod, script: Script, host_ip: String, pod_ip: String) {
    let (Some(name), Some(namespace)) = (pod.metadata.name.clone(), pod.metadata.namespace.clone()) else {
        return;
    };
    let pods = Api::<Pod>::namespaced(client, &namespace);
    let spec = pod.spec.as_ref();
    let containers = |list: Option<&Vec<k8s_openapi::api::core::v1::Container>>| -> Vec<(String, String)> {
        list.map(|all| {
            all.iter()
                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
    };
    let scheduled_at = pod
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|all| all.iter().find(|c| c.type_ == "PodScheduled"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|time| time.0.to_string());
    let view = PodView {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        containers: containers(spec.map(|s| &s.containers)),
        init_containers: containers(spec.and_then(|s| s.init_containers.as_ref())),
        scheduled_at,
        host_ip,
        pod_ip,
        start_time: k8s_openapi::jiff::Timestamp::now().to_string(),
    };
    let policy = RestartPolicy::parse(spec.and_then(|s| s.restart_policy.as_deref()));
    let waiting =
        |reason: &'static str, message: &str, pending: bool, last: Option<Terminated>, restarts: u32| Report {
            state: State::Waiting {
                reason,
                message: message.to_owned(),
            },
            last,
            restart_count: restarts,
            pending,
        };

    if !report(&pods, &name, &view, waiting("ContainerCreating", "", true, None, 0)).await {
        return;
    }
    tokio::time::sleep(script.start_after).await;
    if script.pull_fails {
        let message = "failed to pull and unpack image \"{image}\": not found";
        if !report(&pods, &name, &view, waiting("ErrImagePull", message, true, None, 0)).await {
            return;
        }
        tokio::time::sleep(PULL_BACKOFF).await;
        let message = "Back-off pulling image \"{image}\"";
        report(&pods, &name, &view, waiting("ImagePullBackOff", message, true, None, 0)).await;
        return;
    }
    let mut last = None;
    for (index, run) in script.runs.iter().enumerate() {
        let restarts = u32::try_from(index).unwrap_or(u32::MAX);
        let started_at = k8s_openapi::jiff::Timestamp::now().to_string();
        let running = Report {
            state: State::Running {
                started_at: started_at.clone(),
            },
            last: last.clone(),
            restart_count: restarts,
            pending: false,
        };
        if !report(&pods, &name, &view, running).await {
            return;
        }
        let Some(lasts) = run.lasts else {
            return;
        };
        tokio::time::sleep(lasts).await;
        let (exit_code, reason) = match run.end {
            End::Exit(code) => (code, Terminated::exit_reason(code)),
            End::OomKilled => (137, "OOMKilled"),
        };
        let ended = Terminated {
            exit_code,
            reason,
            started_at,
            finished_at: k8s_openapi::jiff::Timestamp::now().to_string(),
        };
        if !policy.restarts(exit_code) {
            let done = Report {
                state: State::Terminated(ended),
                last,
                restart_count: restarts,
                pending: false,
            };
            report(&pods, &name, &view, done).await;
            return;
        }
        if index + 1 == script.runs.len() {
            let message = "back-off 5m0s restarting failed container={container}";
            report(
                &pods,
                &name,
                &view,
                waiting("CrashLoopBackOff", message, false, Some(ended), restarts),
            )
            .await;
            return;
        }
        last = Some(ended);
    }
}

/// Finishes the graceful deletion of `pod` as its kubelet would once the containers stopped: deletes it with
/// grace period 0, after `stop_takes` or the deletion's grace period, whichever is shorter.
async fn remove(client: Client, pod: Pod, stop_takes: Duration) {
    let (Some(name), Some(namespace)) = (pod.metadata.name.clone(), pod.metadata.namespace.clone()) else {
        return;
    };
    let grace = pod
        .metadata
        .deletion_grace_period_seconds
        .and_then(|seconds| u64::try_from(seconds).ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    tokio::time::sleep(stop_takes.min(grace)).await;
    let now = DeleteParams::default().grace_period(0).preconditions(Preconditions {
        uid: pod.metadata.uid.clone(),
        resource_version: None,
    });
    match Api::<Pod>::namespaced(client, &namespace).delete(&name, &now).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() || status.code == 409 => {}
        Err(error) => eprintln!("fake kubelet: removing deleted pod {namespace}/{name}: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn selectors_match_labels_and_annotations() {
        let labels = map(&[("app", "x"), ("cube.io/task", "train")]);
        let annotations = map(&[("cube.test/script", "fail")]);
        for (selector, matches) in [
            ("app=x", true),
            ("app=x, cube.io/task=train", true),
            ("cube.test/script=fail", true),
            ("app=x,cube.test/script=fail", true),
            ("app=y", false),
            ("app=x,cube.io/task=serve", false),
            ("other=x", false),
            ("", true),
        ] {
            assert_eq!(
                Selector::parse(selector).matches(Some(&labels), Some(&annotations)),
                matches,
                "{selector:?}"
            );
        }
        assert!(!Selector::parse("app=x").matches(None, None), "a pod without labels");
    }

    #[test]
    #[should_panic(expected = "is not key=value")]
    fn a_selector_without_a_value_is_refused() {
        Selector::parse("app");
    }

    #[test]
    fn scripts_chain_runs() {
        let ms = Duration::from_millis;
        let script = Script::run_for(ms(5)).exit(1).times(2).then(Script::run());
        assert_eq!(
            script.runs,
            [
                Run {
                    lasts: Some(ms(5)),
                    end: End::Exit(1)
                },
                Run {
                    lasts: Some(ms(5)),
                    end: End::Exit(1)
                },
                Run {
                    lasts: None,
                    end: End::Exit(0)
                },
            ]
        );
        assert_eq!(
            Script::run_for(ms(5)).oom_killed().runs,
            [Run {
                lasts: Some(ms(5)),
                end: End::OomKilled
            }]
        );
        assert!(Script::image_pull_backoff().pull_fails);
    }

    #[test]
    fn the_first_matching_script_wins() {
        let scripts = Scripts::default();
        let ms = Duration::from_millis;
        for (selector, script) in [
            ("app=x", Script::run_for(ms(1)).exit(3)),
            ("app=x", Script::image_pull_backoff()),
        ] {
            scripts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((Selector::parse(selector), script));
        }
        let mut pod = Pod::default();
        pod.metadata.labels = Some(map(&[("app", "x")]));
        assert_eq!(script_for(&scripts, &pod), Script::run_for(ms(1)).exit(3));
        pod.metadata.labels = Some(map(&[("app", "y")]));
        assert_eq!(script_for(&scripts, &pod), Script::run());
    }
}
