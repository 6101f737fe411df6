//! The statuses a kubelet reports, as JSON merge patches built from plain values: no client, no clock.

use serde_json::{Value, json};

/// What a pod's restart policy does with a container that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestartPolicy {
    /// Restarts the container whatever its exit code (`Always`, the default).
    Always,
    /// Restarts the container when its exit code is not 0.
    OnFailure,
    /// Never restarts the container.
    Never,
}

impl RestartPolicy {
    /// Returns the policy a pod spec's `restartPolicy` names; the API server's default, `Always`, when unset.
    pub(crate) fn parse(policy: Option<&str>) -> Self {
        match policy {
            Some("Never") => Self::Never,
            Some("OnFailure") => Self::OnFailure,
            _ => Self::Always,
        }
    }

    /// Tells whether a container that exited with `exit_code` is started again.
    pub(crate) fn restarts(self, exit_code: i32) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => exit_code != 0,
            Self::Never => false,
        }
    }
}

/// How a container's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Terminated {
    /// The process's exit code.
    pub(crate) exit_code: i32,
    /// `Completed`, `Error` or `OOMKilled`, as the kubelet says.
    pub(crate) reason: &'static str,
    /// When the run started (RFC 3339).
    pub(crate) started_at: String,
    /// When the run ended (RFC 3339).
    pub(crate) finished_at: String,
}

impl Terminated {
    /// Returns the kubelet's reason for an exit with `exit_code`: `Completed` for 0, `Error` otherwise.
    pub(crate) fn exit_reason(exit_code: i32) -> &'static str {
        if exit_code == 0 { "Completed" } else { "Error" }
    }

    fn to_json(&self, container_id: &str) -> Value {
        json!({"terminated": {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": container_id,
        }})
    }
}

/// The state every container of a pod is in (the fake kubelet runs them all alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// Not running: `ContainerCreating`, `ErrImagePull`, `ImagePullBackOff`, `CrashLoopBackOff`.
    Waiting {
        /// The kubelet's reason.
        reason: &'static str,
        /// The kubelet's message, with `{container}` and `{image}` filled in per container.
        message: String,
    },
    /// Running since `started_at` (RFC 3339).
    Running {
        /// When this run started.
        started_at: String,
    },
    /// Ended and not restarted.
    Terminated(Terminated),
}

/// One status report of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    /// The state of every container.
    pub(crate) state: State,
    /// How the previous run ended, once a container has restarted or is waiting to.
    pub(crate) last: Option<Terminated>,
    /// How many times the containers were restarted.
    pub(crate) restart_count: u32,
    /// Whether the pod phase is still `Pending` rather than `Running` while containers wait (image pulls).
    pub(crate) pending: bool,
}

impl Report {
    /// Returns the pod phase this report implies: terminated containers decide `Succeeded` or `Failed`.
    pub(crate) fn phase(&self) -> &'static str {
        match &self.state {
            State::Terminated(end) if end.exit_code == 0 => "Succeeded",
            State::Terminated(_) => "Failed",
            State::Running { .. } => "Running",
            State::Waiting { .. } if self.pending => "Pending",
            State::Waiting { .. } => "Running",
        }
    }

    fn ready(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }
}

/// The parts of a pod that its reports repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodView {
    /// The pod's UID (container IDs are made from it).
    pub(crate) uid: String,
    /// The pod's containers: name and image.
    pub(crate) containers: Vec<(String, String)>,
    /// The pod's init containers: name and image (reported completed).
    pub(crate) init_containers: Vec<(String, String)>,
    /// When the scheduler bound the pod (RFC 3339), if it said.
    pub(crate) scheduled_at: Option<String>,
    /// The fake node's address.
    pub(crate) host_ip: String,
    /// The address given to the pod.
    pub(crate) pod_ip: String,
    /// When the kubelet first saw the pod (RFC 3339).
    pub(crate) start_time: String,
}

fn condition(type_: &str, ok: bool, reason: Option<&str>, message: Option<String>, at: &str) -> Value {
    let mut condition = json!({
        "type": type_,
        "status": if ok { "True" } else { "False" },
        "lastProbeTime": null,
        "lastTransitionTime": at,
    });
    if let Some(reason) = reason {
        condition["reason"] = json!(reason);
    }
    if let Some(message) = message {
        condition["message"] = json!(message);
    }
    condition
}

/// Returns the status patch (`{"status": …}`) that reports `report` for the pod `view` at time `now`.
pub(crate) fn pod_status(view: &PodView, report: &Report, now: &str) -> Value {
    let ready = report.ready();
    let names: Vec<&str> = view.containers.iter().map(|(name, _)| name.as_str()).collect();
    let (reason, message) = match (&report.state, ready) {
        (_, true) => (None, None),
        (State::Terminated(_), false) => (Some("PodCompleted"), None),
        (_, false) => (
            Some("ContainersNotReady"),
            Some(format!("containers with unready status: [{}]", names.join(" "))),
        ),
    };
    let conditions = [
        condition("Initialized", true, None, None, now),
        condition("Ready", ready, reason, message.clone(), now),
        condition("ContainersReady", ready, reason, message, now),
        condition(
            "PodScheduled",
            true,
            None,
            None,
            view.scheduled_at.as_deref().unwrap_or(now),
        ),
    ];
    let statuses: Vec<Value> = view
        .containers
        .iter()
        .map(|(name, image)| {
            let id = format!("containerd://{}-{name}-{}", view.uid, report.restart_count);
            let state = match &report.state {
                State::Waiting { reason, message } => json!({"waiting": {
                    "reason": reason,
                    "message": message.replace("{container}", name).replace("{image}", image),
                }}),
                State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
                State::Terminated(end) => end.to_json(&id),
            };
            let last = report.last.as_ref().map_or_else(
                || json!({}),
                |end| {
                    let previous = report.restart_count.saturating_sub(1);
                    end.to_json(&format!("containerd://{}-{name}-{previous}", view.uid))
                },
            );
            let mut status = json!({
                "name": name,
                "image": image,
                "imageID": "",
                "ready": ready,
                "started": ready,
                "restartCount": report.restart_count,
                "state": state,
                "lastState": last,
            });
            if !matches!(report.state, State::Waiting { .. }) || report.restart_count > 0 {
                status["containerID"] = json!(id);
            }
            status
        })
        .collect();
    let init_statuses: Vec<Value> = view
        .init_containers
        .iter()
        .map(|(name, image)| {
            json!({
                "name": name,
                "image": image,
                "imageID": "",
                "ready": true,
                "restartCount": 0,
                "state": {"terminated": {
                    "exitCode": 0, "reason": "Completed", "startedAt": view.start_time, "finishedAt": view.start_time,
                }},
                "lastState": {},
            })
        })
        .collect();
    json!({"status": {
        "phase": report.phase(),
        "conditions": conditions,
        "hostIP": view.host_ip,
        "podIP": view.pod_ip,
        "podIPs": [{"ip": view.pod_ip}],
        "startTime": view.start_time,
        "containerStatuses": statuses,
        "initContainerStatuses": init_statuses,
    }})
}

/// Returns the pod's `conditions` with `Ready` set to False, as the node controller leaves the pods of a lost node.
pub(crate) fn not_ready_conditions(conditions: &[Value], now: &str) -> Vec<Value> {
    conditions
        .iter()
        .map(|c| {
            if c.get("type").and_then(Value::as_str) == Some("Ready") {
                condition(
                    "Ready",
                    false,
                    Some("NodeNotReady"),
                    Some("the node's kubelet stopped".into()),
                    now,
                )
            } else {
                c.clone()
            }
        })
        .collect()
}

/// The address of the `index`th thing in a /8 made of `first` and `index` (pods and fake nodes, each their own).
pub(crate) fn address(first: u8, index: u32) -> String {
    let [_, b, c, d] = index.to_be_bytes();
    format!("{first}.{b}.{c}.{d}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> PodView {
        PodView {
            uid: "u1".into(),
            containers: vec![("main".into(), "busybox:1".into())],
            init_containers: vec![("init".into(), "busybox:1".into())],
            scheduled_at: Some("2026-01-01T00:00:00Z".into()),
            host_ip: "10.0.0.1".into(),
            pod_ip: "10.1.0.2".into(),
            start_time: "2026-01-01T00:00:01Z".into(),
        }
    }

    fn end(exit_code: i32, reason: &'static str) -> Terminated {
        Terminated {
            exit_code,
            reason,
            started_at: "2026-01-01T00:00:02Z".into(),
            finished_at: "2026-01-01T00:00:03Z".into(),
        }
    }

    #[test]
    fn restart_policies_follow_the_kubelet() {
        for (policy, exit_code, restarts) in [
            (None, 0, true),
            (Some("Always"), 1, true),
            (Some("OnFailure"), 0, false),
            (Some("OnFailure"), 137, true),
            (Some("Never"), 0, false),
            (Some("Never"), 3, false),
        ] {
            assert_eq!(
                RestartPolicy::parse(policy).restarts(exit_code),
                restarts,
                "{policy:?} after exit {exit_code}"
            );
        }
    }

    #[test]
    fn phases_follow_the_containers() {
        let waiting = State::Waiting {
            reason: "ImagePullBackOff",
            message: String::new(),
        };
        for (state, pending, phase) in [
            (waiting.clone(), true, "Pending"),
            (waiting, false, "Running"),
            (State::Running { started_at: "t".into() }, false, "Running"),
            (State::Terminated(end(0, "Completed")), false, "Succeeded"),
            (State::Terminated(end(3, "Error")), false, "Failed"),
            (State::Terminated(end(137, "OOMKilled")), false, "Failed"),
        ] {
            let report = Report {
                state: state.clone(),
                last: None,
                restart_count: 0,
                pending,
            };
            assert_eq!(report.phase(), phase, "{state:?}");
        }
    }

    #[test]
    fn a_running_report_is_ready_and_keeps_the_previous_run() {
        let report = Report {
            state: State::Running {
                started_at: "2026-01-01T00:00:04Z".into(),
            },
            last: Some(end(1, "Error")),
            restart_count: 2,
            pending: false,
        };
        let patch = pod_status(&view(), &report, "2026-01-01T00:00:05Z");
        let status = &patch["status"];
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["podIP"], "10.1.0.2");
        let ready = status["conditions"]
            .as_array()
            .and_then(|all| all.iter().find(|c| c["type"] == "Ready"))
            .cloned();
        assert_eq!(ready.map(|c| c["status"].clone()), Some(json!("True")));
        let container = &status["containerStatuses"][0];
        assert_eq!(container["restartCount"], 2);
        assert_eq!(container["state"]["running"]["startedAt"], "2026-01-01T00:00:04Z");
        assert_eq!(container["lastState"]["terminated"]["exitCode"], 1);
        assert_eq!(
            container["lastState"]["terminated"]["containerID"],
            "containerd://u1-main-1"
        );
        assert_eq!(
            status["initContainerStatuses"][0]["state"]["terminated"]["reason"],
            "Completed"
        );
    }

    #[test]
    fn a_waiting_report_names_the_container_and_image() {
        let report = Report {
            state: State::Waiting {
                reason: "ErrImagePull",
                message: "pulling {image} for {container} failed".into(),
            },
            last: None,
            restart_count: 0,
            pending: true,
        };
        let patch = pod_status(&view(), &report, "2026-01-01T00:00:05Z");
        let container = &patch["status"]["containerStatuses"][0];
        assert_eq!(
            container["state"]["waiting"]["message"],
            "pulling busybox:1 for main failed"
        );
        assert_eq!(container["ready"], false);
        assert_eq!(patch["status"]["phase"], "Pending");
        assert_eq!(patch["status"]["conditions"][1]["reason"], "ContainersNotReady");
    }

    #[test]
    fn addresses_count_up_inside_their_network() {
        assert_eq!(address(10, 1), "10.0.0.1");
        assert_eq!(address(10, 258), "10.0.1.2");
        assert_eq!(address(172, 65_536), "172.1.0.0");
    }
}
